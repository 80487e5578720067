"""Test pictures and their data URLs, for the image-passage tests (families, HTTP and gRPC)."""

from __future__ import annotations

import base64
import io

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
