"""Uploaded and indexed images: checked before decoding, converted to 8-bit RGB, drawn on.

``decode_image`` refuses what is not an image (or a truncated or corrupt one) and an image
whose header announces more pixels than allowed, before any pixel is decoded (PIL reads
only the header at ``Image.open``; its own ``DecompressionBombError`` guards what slips
past). Valid but unusual images are converted: greyscale with or without alpha, palette,
CMYK, 16-bit and 32-bit integer or float images all become 8-bit RGB, with the EXIF
orientation applied (a browser shows the image that way, and the box is drawn on it).
The result is what ``ardetect.export.runtime.prepare_image_and_box`` resizes, as it
resizes every training and evaluation image.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageRejected(ValueError):
    """An image that cannot be used; ``status`` is the HTTP status it maps to (413 too large, 422 otherwise)."""

    def __init__(self, problem: str, status: int = 422):
        super().__init__(problem)
        self.status = status


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes of an image file -> an 8-bit RGB PIL image; ``ImageRejected`` says why not."""
    return load_image(probe_image(data, max_pixels))


def probe_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open an image file's header only (nothing decoded): refuse an empty upload, what is not an image,
    and an image over ``max_pixels`` or flagged by PIL as a decompression bomb."""
    if not data:
        raise ImageRejected("the upload is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected(f"refused from its header as a decompression bomb ({err})", 413) from None
    except UnidentifiedImageError:
        raise ImageRejected(f"not an image file that PIL can read ({len(data):,} bytes, starting {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageRejected(f"the image header is corrupt ({type(err).__name__}: {err})") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageRejected(f"the image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageRejected(f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} (serve.max_pixels)", 413)
    return img


def load_image(img: Image.Image) -> Image.Image:
    """Decode a ``probe_image`` result -> 8-bit RGB; a truncated or corrupt file is refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected(f"refused as a decompression bomb ({err})", 413) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageRejected(f"the image is truncated or corrupt ({type(err).__name__}: {err})") from None
    return to_rgb(img)


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as ``to_rgb`` will return it: EXIF orientations 5 to 8 swap the sides. Reads only
    EXIF found in the header (a PNG's getexif would decode the image to look for it after the pixels)."""
    if img.format == "PNG" and "exif" not in img.info:
        return img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: exif_transpose will leave the image as it is
        orientation = 1
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def open_image(path: Path, max_pixels: int | None = None) -> Image.Image:
    """An image file on disk -> 8-bit RGB, through the same checks as an upload when ``max_pixels`` is given."""
    data = Path(path).read_bytes()
    return decode_image(data, max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS or 2**31)


def to_rgb(img: Image.Image, exif: bool = True) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB (EXIF orientation applied unless ``exif`` is False, as for an annotated
    image whose boxes are in its stored pixels; 16-bit and float scaled, not clipped). Always a new, loaded image:
    it outlives the file ``img`` was opened from."""
    original = img
    if exif:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / 65535.0
        elif img.mode == "I":
            lo, hi = float(a.min()), float(a.max())
            a = a / 65535.0 if lo >= 0 and hi <= 65535 else (a - lo) / max(hi - lo, 1.0)
        else:
            a = np.nan_to_num(a)
            lo, hi = float(a.min()), float(a.max())
            a = a if lo >= 0 and hi <= 1 else (a - lo) / max(hi - lo, 1e-12)
        img = Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img.copy() if img is original else img


def draw_boxes(img: Image.Image, boxes: list[tuple[list[float], str]], width: int | None = None) -> Image.Image:
    """A copy of ``img`` with each (pixel xyxy box, colour) drawn as a rectangle."""
    out = img.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    w = width or max(2, round(max(out.size) / 80))
    for box, colour in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        d.rectangle([x0, y0, x1, y1], outline=colour, width=w)
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
