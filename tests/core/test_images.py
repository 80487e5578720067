"""Image limits (core/images.py): the configured pixel limit is the one that holds, up to Pillow's own bound."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from openrerank.core.images import (
    EncodedImage,
    ImageInputError,
    ImageLimits,
    ImageTooLargeError,
    decode_image,
    encoded_size,
    open_image,
    parse_data_url,
    pixel_bound,
)
from openrerank.server.config import ServerConfig


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR (1-bit greyscale), then IEND: opening reads no pixel, so any size is cheap."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_a_pixel_limit_above_pillows_warning_level_is_honoured():
    """9,500 x 9,500 = 90.25 Mpx is above Pillow's ~89.5 Mpx warning level; before, a limit of 100 Mpx
    still refused it, saying it was above the limit of 100000000."""
    image = EncodedImage("PNG", png_header(9500, 9500))
    assert open_image(image, ImageLimits(max_pixels=100_000_000)).size == (9500, 9500)
    with pytest.raises(ImageInputError, match="90250000 pixels, above the limit of 90000000") as caught:
        open_image(image, ImageLimits(max_pixels=90_000_000))
    assert isinstance(caught.value, ImageTooLargeError)


def test_past_pillows_own_bound_it_is_refused_with_the_limit():
    side = int(pixel_bound() ** 0.5) + 10
    with pytest.raises(ImageInputError, match="more pixels than the limit of 36000000") as caught:
        open_image(EncodedImage("PNG", png_header(side, side)), ImageLimits(), passage_index=2)
    assert isinstance(caught.value, ImageTooLargeError) and str(caught.value).startswith("passage 2: ")


def test_no_pixel_limit_above_pillows_bound_is_accepted():
    with pytest.raises(ValueError, match="max-image-pixels"):
        ServerConfig(max_image_pixels=pixel_bound() + 1).validate()
    ServerConfig(max_image_pixels=pixel_bound()).validate()


def test_an_error_moves_to_the_requests_passage_index():
    """The server decodes a request's images a slice at a time; an error names the request's passage, and stays
    what it was (too large or not)."""
    error = ImageInputError("the image is truncated", passage_index=1)
    moved = error.shifted(5)
    assert (str(moved), moved.passage_index, type(moved)) == ("passage 6: the image is truncated", 6, ImageInputError)
    assert str(ImageInputError("x").shifted(3)) == "x"
    assert type(ImageTooLargeError("big", passage_index=0).shifted(2)) is ImageTooLargeError


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(mode):
    """Pillow's convert("L") clips 16-bit grey at 255: a mid-grey gradient came out all white."""
    grey8 = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    wide = Image.fromarray(grey8.astype(np.uint16) * 257)  # the same page in 16 bits
    data = io.BytesIO()
    wide.save(data, "PNG")
    opened = open_image(EncodedImage("PNG", data.getvalue()), ImageLimits())
    assert opened.mode == "I;16"
    decoded = decode_image(opened if mode == "I;16" else opened.convert("I"))  # "I": older Pillow's 16-bit grey
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded)[..., 0], grey8)
    assert np.array_equal(np.asarray(decoded)[..., 1], grey8)


def test_an_image_of_exactly_the_byte_limit_is_taken():
    """The size read from the base64 length counted its `=` padding as data: an image of exactly
    --max-image-bytes was refused as one byte over (and the request total over-counted the same way)."""
    for n in range(1, 8):
        assert encoded_size("data:image/png;base64," + base64.b64encode(b"x" * n).decode()) == n
    data = io.BytesIO()
    Image.new("RGB", (7, 5), (10, 20, 30)).save(data, "PNG")
    png = data.getvalue()
    assert len(png) % 3, "the check needs a payload with padding"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert parse_data_url(url, ImageLimits(max_image_bytes=len(png))).data == png
    with pytest.raises(ImageInputError, match=f"holds {len(png)} bytes") as caught:
        parse_data_url(url, ImageLimits(max_image_bytes=len(png) - 1))
    assert isinstance(caught.value, ImageTooLargeError)


def test_a_png_with_damaged_exif_is_decoded_as_stored():
    """A damaged eXIf chunk (a bad TIFF byte-order mark) is metadata: the pixels were refused as a "truncated or
    corrupt" image, where the same EXIF in a JPEG was taken."""
    picture = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    data = io.BytesIO()
    picture.save(data, "PNG")
    png = data.getvalue()
    bad_exif = b"MX\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"
    chunk = struct.pack(">I", len(bad_exif)) + b"eXIf" + bad_exif + struct.pack(">I", zlib.crc32(b"eXIf" + bad_exif))
    damaged = png[:33] + chunk + png[33:]  # after the signature and IHDR
    decoded = decode_image(open_image(EncodedImage("PNG", damaged), ImageLimits()))
    assert np.array_equal(np.asarray(decoded), np.asarray(picture))
