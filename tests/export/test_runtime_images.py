"""A path given to the exported runtime (the registered model's input) is read as the service reads an upload."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ardetect.export.runtime import prepare_image
from ardetect.images import decode_image

SIZE = 32


def gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def test_an_8_bit_rgb_png_is_read_as_before(tmp_path):
    """The pipeline's own images: the same array as a plain RGB decode, so the export's parity is untouched."""
    path = tmp_path / "a.png"
    Image.fromarray(gradient(40, 56)).save(path)
    got, size = prepare_image(path, SIZE)
    want, _ = prepare_image(Image.open(path).convert("RGB"), SIZE)
    assert size == (40, 56) and np.array_equal(got, want)


def test_exif_orientation_and_16_bit_depth_are_applied_as_the_service_applies_them(tmp_path):
    stored = Image.fromarray(gradient(40, 80))  # stored 80 wide, 40 high; EXIF 6: shown rotated, 40 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = tmp_path / "rotated.jpg"
    stored.save(jpeg, "JPEG", quality=95, exif=exif)
    got, size = prepare_image(jpeg, SIZE)
    served, served_size = prepare_image(decode_image(jpeg.read_bytes(), 10**7), SIZE)
    assert size == served_size == (80, 40) and np.array_equal(got, served)

    deep = tmp_path / "deep.png"
    Image.fromarray((gradient(30, 30)[..., 0].astype(np.uint16) * 257)).save(deep)
    got, _ = prepare_image(deep, SIZE)
    served, _ = prepare_image(decode_image(deep.read_bytes(), 10**7), SIZE)
    assert np.array_equal(got, served)
    assert (got >= 0.999).mean() < 0.1  # scaled to 8 bits, not clipped to white
    buf = io.BytesIO()
    Image.open(deep).convert("RGB").save(buf, "PNG")  # what a plain RGB conversion of it gives: nearly all white
    assert (np.asarray(Image.open(buf)) == 255).mean() > 0.9
