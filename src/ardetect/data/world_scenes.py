"""Procedural scene backgrounds and whole-image style transforms (media)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

# (sky top, sky horizon, ground near-horizon, ground bottom, horizon fraction)
_SCENE_COLORS = {
    "forest": ((90, 140, 190), (170, 200, 210), (40, 90, 40), (60, 110, 45), 0.45),
    "lake": ((80, 140, 215), (190, 215, 235), (60, 110, 170), (40, 80, 140), 0.5),
    "beach": ((70, 150, 230), (200, 225, 245), (230, 210, 160), (240, 220, 170), 0.55),
    "street": ((150, 160, 175), (200, 200, 205), (95, 95, 100), (70, 70, 75), 0.55),
    "mountain": ((60, 120, 200), (180, 205, 230), (110, 120, 90), (80, 100, 60), 0.65),
    "field": ((80, 150, 230), (190, 220, 240), (110, 170, 70), (80, 140, 50), 0.5),
    "sunset": ((90, 50, 120), (250, 150, 70), (70, 45, 50), (40, 25, 35), 0.62),
    "snow": ((170, 190, 210), (220, 228, 235), (235, 240, 245), (215, 225, 235), 0.5),
    "night": ((10, 15, 45), (45, 55, 95), (25, 30, 40), (15, 15, 25), 0.62),
    "room": ((200, 180, 150), (220, 200, 170), (130, 90, 60), (110, 70, 45), 0.62),
    "table": ((215, 210, 195), (195, 190, 175), (150, 105, 65), (125, 85, 50), 0.35),
    "lab": ((25, 30, 50), (50, 60, 90), (60, 65, 80), (40, 45, 60), 0.6),
    "stadium": ((60, 60, 80), (110, 110, 130), (60, 150, 60), (50, 130, 50), 0.35),
    "sky": ((40, 110, 220), (170, 210, 245), (150, 200, 240), (190, 220, 245), 0.85),
}


def _vgrad(h: int, w: int, c0, c1, y0: int, y1: int, out: np.ndarray) -> None:
    if y1 <= y0:
        return
    t = np.linspace(0.0, 1.0, y1 - y0)[:, None, None]
    out[y0:y1] = (np.array(c0, np.float32) * (1 - t) + np.array(c1, np.float32) * t)


def _jit(c, rng, s=18):
    return tuple(int(np.clip(v + rng.normal(0, s), 0, 255)) for v in c)


def background(scene: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A procedural scene, as an RGB PIL image."""
    top, hor, gnear, gbot, hf = _SCENE_COLORS.get(scene, _SCENE_COLORS["room"])
    top, hor, gnear, gbot = (_jit(c, rng) for c in (top, hor, gnear, gbot))
    hy = int(size * np.clip(hf + rng.normal(0, 0.04), 0.2, 0.9))
    arr = np.zeros((size, size, 3), np.float32)
    _vgrad(size, size, top, hor, 0, hy, arr)
    _vgrad(size, size, gnear, gbot, hy, size, arr)
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    S = size
    r = rng.random
    if scene == "forest":
        for _ in range(10):
            x, hh = r() * S, S * (0.2 + 0.2 * r())
            g = _jit((30, 80, 35), rng, 12)
            d.rectangle([x - S * 0.01, hy - hh * 0.2, x + S * 0.01, hy + S * 0.02], fill=(70, 50, 30))
            d.polygon([(x - hh * 0.3, hy - hh * 0.15), (x + hh * 0.3, hy - hh * 0.15), (x, hy - hh)], fill=g)
    elif scene in ("lake", "beach"):
        for _ in range(8):
            y = hy + r() * (S - hy) * (0.5 if scene == "beach" else 1.0)
            x = r() * S
            d.line([(x, y), (x + S * 0.15, y)], fill=(220, 235, 250), width=1)
        if scene == "beach":
            d.rectangle([0, hy, S, hy + S * 0.08], fill=_jit((50, 120, 190), rng, 10))
        else:
            d.polygon([(0, hy), (S * 0.4, hy - S * 0.12), (S * 0.8, hy)], fill=_jit((70, 110, 80), rng, 10))
        d.ellipse([S * 0.75, S * 0.08, S * 0.88, S * 0.21], fill=(255, 240, 180))
    elif scene == "street":
        x = 0.0
        while x < S:
            bw = S * (0.12 + 0.12 * r())
            bh = S * (0.15 + 0.3 * r())
            d.rectangle([x, hy - bh, x + bw - 2, hy], fill=_jit((140, 120, 110), rng, 25))
            for wy in np.arange(hy - bh + 4, hy - 4, 8):
                d.rectangle([x + 3, wy, x + bw * 0.4, wy + 3], fill=(230, 220, 150))
            x += bw
        for k in range(6):
            d.rectangle([k * S / 6, (hy + S) / 2, k * S / 6 + S / 12, (hy + S) / 2 + 2], fill=(240, 240, 240))
    elif scene == "mountain":
        for _ in range(3):
            x, hh, ww = r() * S, S * (0.25 + 0.25 * r()), S * (0.3 + 0.3 * r())
            d.polygon([(x - ww, hy), (x + ww, hy), (x, hy - hh)], fill=_jit((110, 105, 115), rng, 12))
            d.polygon([(x - ww * 0.25, hy - hh * 0.75), (x + ww * 0.25, hy - hh * 0.75), (x, hy - hh)], fill=(245, 245, 250))
    elif scene == "field":
        d.ellipse([-S * 0.3, hy - S * 0.1, S * 0.6, hy + S * 0.15], fill=_jit((100, 160, 70), rng, 10))
        for _ in range(25):
            x, y = r() * S, hy + r() * (S - hy)
            d.point([(x, y)], fill=_jit((240, 230, 90), rng, 30))
    elif scene == "sunset":
        d.ellipse([S * 0.35, hy - S * 0.12, S * 0.65, hy + S * 0.18], fill=(255, 200, 90))
        d.rectangle([0, hy, S, S], fill=gnear)
    elif scene == "snow":
        for _ in range(5):
            x, hh = r() * S, S * (0.12 + 0.12 * r())
            d.polygon([(x - hh * 0.3, hy), (x + hh * 0.3, hy), (x, hy - hh)], fill=(40, 80, 60))
        for _ in range(40):
            d.point([(r() * S, r() * S)], fill=(255, 255, 255))
    elif scene == "night":
        for _ in range(30):
            d.point([(r() * S, r() * hy)], fill=(240, 240, 200))
        d.ellipse([S * 0.1, S * 0.08, S * 0.2, S * 0.18], fill=(235, 235, 210))
    elif scene == "room":
        for k in range(0, S, 12):
            d.line([(k, 0), (k, hy)], fill=_jit(hor, rng, 6), width=3)
        d.rectangle([S * 0.6, S * 0.1, S * 0.85, S * 0.35], fill=(170, 210, 240), outline=(90, 60, 40), width=2)
        for k in range(hy, S, 10):
            d.line([(0, k), (S, k)], fill=(90, 60, 40), width=1)
    elif scene == "table":
        for _ in range(10):
            y = hy + r() * (S - hy)
            d.line([(0, y), (S, y + rng.normal(0, 3))], fill=_jit((110, 75, 45), rng, 8), width=1)
        d.rectangle([0, hy - 2, S, hy + 1], fill=(90, 60, 35))
    elif scene == "lab":
        for k in range(0, S, 16):
            d.line([(k, 0), (k, hy)], fill=(0, 200, 220), width=1)
        d.line([(0, hy), (S, hy)], fill=(240, 60, 200), width=2)
    elif scene == "stadium":
        for _ in range(120):
            x, y = r() * S, r() * hy
            d.point([(x, y)], fill=_jit((200, 180, 160), rng, 60))
        d.line([(0, (hy + S) / 2), (S, (hy + S) / 2)], fill=(245, 245, 245), width=2)
    elif scene == "sky":
        for _ in range(4):
            x, y, w = r() * S, r() * S * 0.7, S * (0.1 + 0.1 * r())
            d.ellipse([x - w, y - w * 0.4, x + w, y + w * 0.4], fill=(245, 248, 252))
    arr = np.asarray(img, np.float32) + rng.normal(0, 4, (S, S, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _gray3(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")


def stylize(img: Image.Image, medium: str, rng: np.random.Generator) -> Image.Image:
    """Apply a medium's style transform to the whole image."""
    S = img.size[0]
    if medium == "photo":
        arr = np.asarray(img, np.float32) + rng.normal(0, 3, (S, S, 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if medium == "photorealistic rendering":
        out = ImageOps.autocontrast(img.filter(ImageFilter.SHARPEN), cutoff=1)
        yy, xx = np.mgrid[0:S, 0:S] / (S - 1) - 0.5
        vig = 1.0 - 0.6 * (xx**2 + yy**2)
        return Image.fromarray(np.clip(np.asarray(out, np.float32) * vig[..., None], 0, 255).astype(np.uint8))
    if medium == "oil painting":
        out = img.filter(ImageFilter.MedianFilter(5))
        out = ImageOps.posterize(out, 4)
        arr = np.asarray(out, np.float32)
        noise = np.asarray(Image.fromarray((rng.random((S // 6, S // 2)) * 255).astype(np.uint8)).resize((S, S), Image.BILINEAR), np.float32)
        arr = arr * (0.92 + 0.16 * noise[..., None] / 255.0)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)
    if medium == "watercolor illustration":
        out = img.filter(ImageFilter.GaussianBlur(1.5))
        arr = np.asarray(out, np.float32)
        edges = np.asarray(_gray3(img).filter(ImageFilter.FIND_EDGES), np.float32)
        arr = 255 - (255 - arr) * 0.65 - edges * 0.35
        arr = arr * (0.95 + 0.05 * rng.random((S, S, 1)))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if medium == "digital painting":
        hsv = np.asarray(img.filter(ImageFilter.SMOOTH_MORE).convert("HSV"), np.float32)
        hsv[..., 1] = np.clip(hsv[..., 1] * 1.5, 0, 255)
        out = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
        return ImageOps.posterize(out, 5)
    if medium in ("charcoal sketch", "pencil drawing"):
        g = np.asarray(img.convert("L"), np.float32)
        edges = np.asarray(img.convert("L").filter(ImageFilter.FIND_EDGES), np.float32)
        if medium == "charcoal sketch":
            base = 60 + 0.6 * g
            arr = base - edges * 1.2 + rng.normal(0, 10, (S, S))
        else:
            blur = np.asarray(Image.fromarray(255 - g.astype(np.uint8)).filter(ImageFilter.GaussianBlur(3)), np.float32)
            arr = np.clip(g * 255.0 / np.maximum(255.0 - blur, 1.0), 0, 255)
            arr = arr - edges * 0.8 + rng.normal(0, 5, (S, S))
            hatch = ((np.add.outer(np.arange(S), np.arange(S)) % 5) == 0) & (g < 110)
            arr[hatch] -= 50
            arr = 0.55 * arr + 0.45 * 235
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([arr] * 3, -1))
    if medium == "ink drawing":
        g = img.convert("L").filter(ImageFilter.MedianFilter(3)).filter(ImageFilter.GaussianBlur(0.6))
        edges = np.asarray(g.filter(ImageFilter.FIND_EDGES), np.float32)
        dark = np.asarray(g, np.float32) < 75
        arr = np.where((edges > 16) | dark, 15, 245).astype(np.uint8)
        return Image.fromarray(np.stack([arr] * 3, -1))
    if medium == "vintage poster":
        out = ImageOps.posterize(img, 2)
        g = np.asarray(out.convert("L"), np.float32) / 255.0
        c = np.asarray(out, np.float32) / 255.0
        sep = np.stack([g * 240 + 15, g * 200 + 20, g * 150 + 20], -1)
        arr = 0.55 * sep + 0.45 * c * np.array([255, 220, 170])
        b = max(2, S // 32)
        arr[:b] = arr[-b:] = arr[:, :b] = arr[:, -b:] = (235, 220, 180)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    raise ValueError(f"unknown medium {medium!r}")
