"""Test pictures and their data URLs, for the image-passage tests (families, HTTP and gRPC)."""

from __future__ import annotations

import base64
import gc
import io
import weakref

import numpy as np
from PIL import Image


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A structured RGB picture: gradients, blocks and noise, so tiles and their order all matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x * y) % 256], -1)
    img = img + rng.integers(-40, 40, size=img.shape)
    img[height // 3: height // 2, width // 4: width // 2] = rng.integers(0, 255, size=3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def data_url(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def watch_decodes(monkeypatch, module) -> list[int]:
    """Wrap `module.decode_image`: the list it returns gets, at each decode, how many images decoded earlier
    are still alive (a family that lets go of each image once decoded: all zeros)."""
    decoded: list[weakref.ref] = []
    alive_at_each: list[int] = []
    decode = module.decode_image

    def watching(image, index=None):
        gc.collect()
        alive_at_each.append(sum(ref() is not None for ref in decoded))
        decoded.append(weakref.ref(image))
        return decode(image, index)

    monkeypatch.setattr(module, "decode_image", watching)
    return alive_at_each
