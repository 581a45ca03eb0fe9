"""Procedural silhouettes of the world's base classes.

Each shape is a list of parts in a unit frame (about [-1, 1] on each axis, y down).
A part is ``(kind, colour, points)`` where kind is ``"fill"`` or ``"hole"`` and
colour indexes the identity palette: 1 = primary (carries the texture),
2 = secondary, 3 = accent, 4 = dark. Proportions ``p`` (dict of floats near 1)
stretch parts so two identities of one class differ in shape detail while
sharing the silhouette family.
"""

from __future__ import annotations

import math

import numpy as np

PRI, SEC, ACC, DARK = 1, 2, 3, 4


def ell(cx: float, cy: float, rx: float, ry: float, n: int = 20, a0: float = 0.0, a1: float = 2 * math.pi) -> np.ndarray:
    t = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * math.pi - 1e-6)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def line(x0: float, y0: float, x1: float, y1: float, w: float) -> np.ndarray:
    d = np.array([x1 - x0, y1 - y0], float)
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9) * w / 2
    return np.array([[x0, y0] + n, [x1, y1] + n, [x1, y1] - n, [x0, y0] - n])


def poly(*pts: float) -> np.ndarray:
    return np.array(pts, float).reshape(-1, 2)


def F(c: int, pts: np.ndarray) -> tuple[str, int, np.ndarray]:
    return ("fill", c, pts)


def H(pts: np.ndarray) -> tuple[str, int, np.ndarray]:
    return ("hole", 0, pts)


def _cat(p):
    a, b = p["a"], p["b"]
    hx, hy, hr = 0.55, -0.2, 0.3 * b
    return [
        F(PRI, line(-0.6, 0.1, -0.95, -0.55 * a, 0.13)),
        F(PRI, rect(-0.5, 0.35, -0.35, 0.85)), F(PRI, rect(0.2, 0.35, 0.35, 0.85)),
        F(PRI, ell(-0.1, 0.25, 0.62, 0.33 * a)),
        F(PRI, poly(hx - hr, hy - 0.1, hx - hr * 0.7, hy - hr - 0.3 * b, hx - 0.02, hy - hr + 0.05)),
        F(PRI, poly(hx + hr, hy - 0.1, hx + hr * 0.7, hy - hr - 0.3 * b, hx + 0.02, hy - hr + 0.05)),
        F(PRI, ell(hx, hy, hr, hr * 0.9)),
        F(DARK, ell(hx - 0.11, hy - 0.05, 0.045, 0.06, 8)), F(DARK, ell(hx + 0.11, hy - 0.05, 0.045, 0.06, 8)),
        F(SEC, ell(hx, hy + 0.1, 0.06, 0.04, 8)),
    ]


def _dog(p):
    a, b = p["a"], p["b"]
    return [
        F(PRI, line(-0.62, 0.05, -0.85, -0.45, 0.12)),
        F(PRI, rect(-0.55, 0.3, -0.38, 0.9)), F(PRI, rect(0.25, 0.3, 0.42, 0.9)),
        F(PRI, ell(-0.08, 0.2, 0.65, 0.3 * a)),
        F(PRI, ell(0.55, -0.3, 0.27 * b, 0.25)),
        F(PRI, ell(0.85, -0.2, 0.22 * b, 0.13)),
        F(SEC, ell(0.4, -0.2, 0.1, 0.26 * a, 12)),
        F(DARK, ell(1.03, -0.24, 0.06, 0.05, 8)), F(DARK, ell(0.62, -0.38, 0.04, 0.05, 8)),
    ]


def _bird(p):
    a, b = p["a"], p["b"]
    return [
        F(DARK, line(-0.05, 0.4, -0.1, 0.9, 0.05)), F(DARK, line(0.15, 0.4, 0.15, 0.9, 0.05)),
        F(PRI, poly(-0.55, 0.05, -1.0, -0.15 * a, -0.95, 0.3)),
        F(PRI, ell(0.0, 0.1, 0.6, 0.38 * a)),
        F(PRI, ell(0.55, -0.35, 0.26 * b, 0.26 * b)),
        F(ACC, poly(0.75, -0.42, 1.05, -0.33, 0.75, -0.25)),
        F(SEC, ell(-0.1, 0.05, 0.38, 0.2 * a, 16)),
        F(DARK, ell(0.62, -0.4, 0.05, 0.05, 8)),
    ]


def _fish(p):
    a, b = p["a"], p["b"]
    return [
        F(SEC, poly(-0.55, 0.0, -1.0, -0.5 * b, -0.9, 0.0, -1.0, 0.5 * b)),
        F(SEC, poly(-0.2, -0.3 * a, 0.15, -0.65 * a, 0.25, -0.3 * a)),
        F(PRI, ell(0.05, 0.0, 0.75, 0.42 * a)),
        F(DARK, ell(0.5, -0.08, 0.07, 0.07, 8)),
        F(SEC, line(0.25, -0.25 * a, 0.3, 0.25 * a, 0.05)),
    ]


def _hat(p):
    a, b = p["a"], p["b"]
    return [
        F(PRI, ell(0.0, 0.45, 0.95 * b, 0.18)),
        F(PRI, poly(-0.5, 0.45, -0.45, -0.35 * a - 0.1, 0.0, -0.5 * a - 0.1, 0.45, -0.35 * a - 0.1, 0.5, 0.45)),
        F(SEC, rect(-0.49, 0.2, 0.49, 0.38)),
    ]


def _shoe(p):
    a, b = p["a"], p["b"]
    return [
        F(SEC, poly(-0.95, 0.35, 0.95, 0.35, 0.98, 0.55, -0.95, 0.55)),
        F(PRI, poly(-0.95, 0.4, -0.9, -0.4 * a, -0.45, -0.45 * a, -0.35, -0.05, 0.6 * b, 0.05, 0.95, 0.25, 0.95, 0.4)),
        F(ACC, line(-0.3, -0.15, 0.1, 0.0, 0.06)), F(ACC, line(-0.2, -0.25, 0.2, -0.05, 0.06)),
    ]


def _chair(p):
    a, b = p["a"], p["b"]
    return [
        F(SEC, rect(-0.6, 0.1, -0.48, 1.0)), F(SEC, rect(0.48 * b, 0.1, 0.6 * b, 1.0)),
        F(PRI, rect(-0.64, -1.0 * a, -0.42, 0.15)),
        F(SEC, rect(-0.42, -0.85 * a, -0.36, -0.25 * a)),
        F(PRI, rect(-0.64, 0.0, 0.62 * b, 0.18)),
    ]


def _lamp(p):
    a, b = p["a"], p["b"]
    return [
        F(SEC, ell(0.0, 0.9, 0.5 * b, 0.12)),
        F(DARK, rect(-0.05, -0.2, 0.05, 0.9)),
        F(PRI, poly(-0.3 * b, -0.95, 0.3 * b, -0.95, 0.65 * b, -0.15 * a, -0.65 * b, -0.15 * a)),
        F(ACC, rect(-0.65 * b, -0.25 * a, 0.65 * b, -0.15 * a)),
    ]


def _vase(p):
    a, b = p["a"], p["b"]
    ys = np.linspace(-0.95, 0.95, 15)
    w = 0.25 + 0.45 * b * np.sin(np.clip((ys + 0.95) / 1.9, 0, 1) * math.pi * 0.95) ** (1.0 * a)
    w[:3] = [0.32, 0.22, 0.2]
    pts = np.concatenate([np.stack([w, ys], 1), np.stack([-w[::-1], ys[::-1]], 1)])
    return [F(PRI, pts), F(SEC, rect(-0.34, -1.0, 0.34, -0.88)), F(ACC, rect(-0.6 * b, 0.15, 0.6 * b, 0.25))]


def _clock(p):
    a, b = p["a"], p["b"]
    parts = [F(PRI, ell(0, 0, 0.95, 0.95 * a, 32)), F(SEC, ell(0, 0, 0.72, 0.72 * a, 32))]
    for k in range(12):
        t = k * math.pi / 6
        parts.append(F(DARK, ell(0.6 * math.cos(t), 0.6 * a * math.sin(t), 0.04, 0.04, 6)))
    parts += [F(DARK, line(0, 0, 0.0, -0.5 * a * b, 0.07)), F(DARK, line(0, 0, 0.35 * b, 0.1, 0.07))]
    return parts


def _hammer(p):
    a, b = p["a"], p["b"]
    return [
        F(SEC, rect(-0.09, -0.45, 0.09, 1.0)),
        F(PRI, poly(-0.75 * b, -0.95, 0.45, -0.95, 0.6, -0.75, 0.45, -0.45 * a, -0.75 * b, -0.45 * a)),
        F(DARK, rect(-0.12, 0.6, 0.12, 1.0)),
    ]


def _key(p):
    a, b = p["a"], p["b"]
    return [
        F(PRI, ell(-0.55, 0.0, 0.42 * b, 0.42 * b, 24)),
        F(PRI, rect(-0.2, -0.1 * a, 0.95, 0.1 * a)),
        F(PRI, rect(0.55, 0.05, 0.65, 0.4)), F(PRI, rect(0.8, 0.05, 0.9, 0.32)),
        H(ell(-0.62, 0.0, 0.16, 0.16, 16)),
    ]


def _car(p):
    a, b = p["a"], p["b"]
    return [
        F(PRI, poly(-1.0, 0.4, -1.0, 0.0, -0.45, -0.05, -0.25 * b, -0.45 * a, 0.35, -0.45 * a, 0.55, -0.05, 1.0, 0.05, 1.0, 0.4)),
        F(SEC, poly(-0.35, -0.07, -0.2 * b, -0.38 * a, 0.0, -0.38 * a, 0.0, -0.07)),
        F(SEC, poly(0.07, -0.07, 0.07, -0.38 * a, 0.32, -0.38 * a, 0.45, -0.07)),
        F(DARK, ell(-0.55, 0.42, 0.22, 0.22, 16)), F(DARK, ell(0.6, 0.42, 0.22, 0.22, 16)),
        F(ACC, ell(-0.55, 0.42, 0.09, 0.09, 10)), F(ACC, ell(0.6, 0.42, 0.09, 0.09, 10)),
    ]


def _boat(p):
    a, b = p["a"], p["b"]
    return [
        F(DARK, rect(-0.04, -1.0, 0.04, 0.3)),
        F(SEC, poly(0.08, -0.95, 0.08, 0.2, 0.75 * b, 0.2)),
        F(SEC, poly(-0.08, -0.7, -0.08, 0.2, -0.55 * b, 0.2)),
        F(PRI, poly(-1.0, 0.3, 1.0, 0.3, 0.7, 0.3 + 0.5 * a, -0.7, 0.3 + 0.5 * a)),
        F(ACC, rect(-0.92, 0.38, 0.92, 0.46)),
    ]


def _bicycle(p):
    a, b = p["a"], p["b"]
    r = 0.42 * b
    return [
        F(DARK, ell(-0.55, 0.4, r, r, 24)), H(ell(-0.55, 0.4, r - 0.09, r - 0.09, 24)),
        F(DARK, ell(0.55, 0.4, r, r, 24)), H(ell(0.55, 0.4, r - 0.09, r - 0.09, 24)),
        F(PRI, line(-0.55, 0.4, -0.1, -0.15 * a, 0.1)), F(PRI, line(-0.1, -0.15 * a, 0.45, -0.15 * a, 0.1)),
        F(PRI, line(-0.55, 0.4, 0.05, 0.4, 0.1)), F(PRI, line(0.05, 0.4, 0.45, -0.15 * a, 0.1)),
        F(PRI, line(-0.1, -0.15 * a, 0.05, 0.4, 0.1)),
        F(PRI, line(0.45, -0.15 * a, 0.55, 0.4, 0.09)), F(PRI, line(0.45, -0.15 * a, 0.4, -0.45, 0.08)),
        F(SEC, rect(-0.3, -0.3, -0.02, -0.2)), F(SEC, rect(0.28, -0.5, 0.55, -0.42)),
    ]


def _phone(p):
    a, b = p["a"], p["b"]
    w = 0.5 * b
    return [
        F(PRI, rect(-w, -0.95 * a, w, 0.95 * a)),
        F(SEC, rect(-w + 0.07, -0.8 * a, w - 0.07, 0.7 * a)),
        F(DARK, ell(0, 0.83 * a, 0.07, 0.06, 8)), F(DARK, rect(-0.1, -0.9 * a, 0.1, -0.86 * a)),
    ]


def _camera(p):
    a, b = p["a"], p["b"]
    return [
        F(PRI, rect(-0.95, -0.45 * a, 0.95, 0.6 * a)),
        F(PRI, rect(-0.35, -0.7 * a, 0.2, -0.4 * a)),
        F(DARK, ell(0.0, 0.08, 0.45 * b, 0.45 * b, 24)),
        F(SEC, ell(0.0, 0.08, 0.3 * b, 0.3 * b, 20)),
        F(ACC, rect(0.55, -0.35 * a, 0.8, -0.2 * a)),
    ]


def _mug(p):
    a, b = p["a"], p["b"]
    return [
        F(PRI, ell(0.5 * b, 0.0, 0.38, 0.4 * a, 20)), H(ell(0.5 * b, 0.0, 0.2, 0.23 * a, 16)),
        F(PRI, rect(-0.7, -0.8 * a, 0.55 * b, 0.8 * a)),
        F(SEC, rect(-0.7, -0.8 * a, 0.55 * b, -0.65 * a)),
    ]


def _bottle(p):
    a, b = p["a"], p["b"]
    w = 0.45 * b
    return [
        F(PRI, poly(-w, 1.0, -w, -0.2 * a, -0.15, -0.6, -0.15, -0.85, 0.15, -0.85, 0.15, -0.6, w, -0.2 * a, w, 1.0)),
        F(ACC, rect(-0.17, -1.0, 0.17, -0.82)),
        F(SEC, rect(-w, 0.15, w, 0.6)),
    ]


def _apple(p):
    a, b = p["a"], p["b"]
    return [
        F(DARK, line(0.0, -0.5, 0.08, -0.95, 0.08)),
        F(SEC, ell(0.3, -0.72, 0.25 * b, 0.1, 12)),
        F(PRI, ell(-0.3, 0.1, 0.55, 0.75 * a)), F(PRI, ell(0.3, 0.1, 0.55, 0.75 * a)),
    ]


def _tree(p):
    a, b = p["a"], p["b"]
    return [
        F(SEC, rect(-0.13 * b, 0.1, 0.13 * b, 1.0)),
        F(PRI, ell(0.0, -0.35, 0.8, 0.6 * a, 24)),
        F(PRI, ell(-0.45, -0.05, 0.45, 0.38, 16)), F(PRI, ell(0.45, -0.05, 0.45, 0.38, 16)),
    ]


def _flower(p):
    a, b = p["a"], p["b"]
    parts = [F(SEC, line(0.0, -0.3, 0.0, 1.0, 0.08)), F(SEC, ell(0.22, 0.55, 0.22, 0.08, 10))]
    n = 6 if b < 1.0 else 8
    for k in range(n):
        t = 2 * math.pi * k / n
        parts.append(F(PRI, ell(0.4 * math.cos(t), -0.4 + 0.4 * math.sin(t), 0.3 * a, 0.3 * a, 12)))
    parts.append(F(ACC, ell(0.0, -0.4, 0.25 * b, 0.25 * b, 16)))
    return parts


def _ball(p):
    a, b = p["a"], p["b"]
    return [
        F(PRI, ell(0, 0, 0.95, 0.95, 32)),
        F(SEC, line(-0.95, 0.0, 0.95, 0.0, 0.08 * b)),
        F(SEC, ell(0.0, 0.0, 0.42 * a, 0.95, 24)), H(ell(0.0, 0.0, 0.42 * a - 0.08, 0.87, 24)),
        F(SEC, line(0.0, -0.95, 0.0, 0.95, 0.08 * b)),
    ]


def _kite(p):
    a, b = p["a"], p["b"]
    return [
        F(DARK, line(0.0, 0.5, 0.25, 1.0, 0.04)),
        F(ACC, poly(0.1, 0.72, 0.25, 0.65, 0.22, 0.82)),
        F(PRI, poly(0.0, -1.0, 0.55 * b, -0.35 * a, 0.0, 0.5, -0.55 * b, -0.35 * a)),
        F(SEC, line(0.0, -1.0, 0.0, 0.5, 0.05)), F(SEC, line(-0.55 * b, -0.35 * a, 0.55 * b, -0.35 * a, 0.05)),
    ]


def _book(p):
    a, b = p["a"], p["b"]
    return [
        F(SEC, rect(-0.6 * b, -0.85 * a, 0.75 * b, 0.9 * a)),
        F(PRI, rect(-0.7 * b, -0.9 * a, 0.65 * b, 0.85 * a)),
        F(DARK, rect(-0.7 * b, -0.9 * a, -0.55 * b, 0.85 * a)),
        F(ACC, rect(-0.3 * b, -0.5 * a, 0.4 * b, -0.3 * a)),
    ]


def _umbrella(p):
    a, b = p["a"], p["b"]
    canopy = np.concatenate([ell(0.0, -0.2, 0.95, 0.75 * a, 24, math.pi, 2 * math.pi), poly(0.95, -0.15, -0.95, -0.15)])
    parts = [F(DARK, line(0.0, -0.3, 0.0, 0.85, 0.06)), F(DARK, ell(-0.12, 0.85, 0.12, 0.1, 10, 0, math.pi))]
    parts.append(F(PRI, canopy))
    for k in range(4):
        parts.append(H(ell(-0.71 + k * 0.475, -0.15, 0.2375, 0.1 * b, 10, 0, math.pi)))
    parts.append(F(SEC, line(0.0, -0.95 * a - 0.2, 0.0, -0.15, 0.05)))
    return parts


SHAPES = {
    "cat": _cat, "dog": _dog, "bird": _bird, "fish": _fish,
    "hat": _hat, "shoe": _shoe,
    "chair": _chair, "lamp": _lamp, "vase": _vase, "clock": _clock,
    "hammer": _hammer, "key": _key,
    "car": _car, "boat": _boat, "bicycle": _bicycle,
    "phone": _phone, "camera": _camera,
    "mug": _mug, "bottle": _bottle, "apple": _apple,
    "tree": _tree, "flower": _flower,
    "ball": _ball, "kite": _kite,
    "book": _book, "umbrella": _umbrella,
}

# Region (cx, cy, rx, ry) of the unit frame where identity marks may sit.
MARK_REGION = {
    "cat": (-0.1, 0.25, 0.4, 0.18), "dog": (-0.1, 0.2, 0.4, 0.15), "bird": (0.1, 0.25, 0.3, 0.12),
    "fish": (0.0, 0.05, 0.4, 0.2), "hat": (0.0, -0.1, 0.3, 0.2), "shoe": (0.2, 0.2, 0.35, 0.08),
    "chair": (0.0, 0.08, 0.45, 0.03), "lamp": (0.0, -0.55, 0.25, 0.2), "vase": (0.0, 0.5, 0.3, 0.2),
    "clock": (0.0, 0.85, 0.0, 0.0), "hammer": (-0.2, -0.7, 0.3, 0.1), "key": (0.3, 0.0, 0.3, 0.0),
    "car": (0.3, 0.2, 0.5, 0.08), "boat": (0.0, 0.6, 0.45, 0.08), "bicycle": (0.15, -0.15, 0.15, 0.0),
    "phone": (0.0, 0.0, 0.2, 0.5), "camera": (-0.65, 0.3, 0.15, 0.15), "mug": (-0.1, 0.2, 0.3, 0.35),
    "bottle": (0.0, 0.8, 0.2, 0.1), "apple": (0.0, 0.2, 0.4, 0.35), "tree": (0.0, -0.4, 0.45, 0.3),
    "flower": (0.0, -0.4, 0.1, 0.1), "ball": (0.45, 0.45, 0.15, 0.15), "kite": (0.0, -0.1, 0.2, 0.3),
    "book": (0.0, 0.4, 0.35, 0.25), "umbrella": (0.0, -0.5, 0.5, 0.15),
}
