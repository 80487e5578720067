"""Passage images as clients send them: base64 data URLs, decoded with Pillow under hard limits.

Images are hostile input. A data URL is checked before anything is decoded: it must be `data:image/png` or
`data:image/jpeg` with base64 content (the Reranking NIM's formats; an `http(s)://` URL is refused: the
server fetches nothing), its encoded size is capped per image and per request, and the bytes must be the
format the URL declares (a PNG labelled JPEG is refused, not guessed). Opening reads only the header, so the
pixel count is checked before a single pixel is decoded (decompression bombs); animated files are refused;
truncated or corrupt files fail as the client's error. What comes out is always a still, upright (EXIF
orientation applied), 8-bit RGB image, whatever the mode (palette, alpha, CMYK, 16-bit grey) it came in.

Every failure is an `ImageInputError` with the passage it belongs to; one over a size limit is an
`ImageTooLargeError` (what each answers is the server's to say: server/errors.py `FAILURES`). This module is
the one owner of the rules: the HTTP dialects and the gRPC `passage_image` input both hand it the client's
string (`parse_data_url`, then `open_image` / `decode_image` off the event loop).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

#: MIME type -> Pillow format name. PNG and JPEG only, as the Reranking NIM's API reference says.
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG"}
_ALIASES = {"image/jpg": "image/jpeg"}
_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
_DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    """How much image one passage and one request may carry (the only place these defaults live)."""

    #: Decoded (binary) bytes of one image: a 300-dpi letter page as PNG is 1-3 MB.
    max_image_bytes: int = 8 * 1024 * 1024
    #: Decoded bytes of all images of one request (the HTTP body cap, --max-body-bytes, also applies).
    max_request_bytes: int = 32 * 1024 * 1024
    #: Pixels of one image (width x height), checked from the header before decoding: 36 Mpx is a
    #: 600-dpi letter page; a decoded RGB image then takes at most ~110 MB while it is tiled.
    max_pixels: int = 36_000_000


def pixel_bound() -> int:
    """The most pixels Pillow opens at all (it refuses twice its `MAX_IMAGE_PIXELS` as a decompression bomb):
    the ceiling of `max_pixels`. Below it, the limit is ours alone (Pillow's warning level is not one)."""
    from PIL import Image

    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 2**63 - 1


class ImageInputError(ValueError):
    """An image the server will not decode: not a PNG or JPEG data URL, unreadable, animated."""

    def __init__(self, message: str, *, passage_index: int | None = None) -> None:
        where = f"passage {passage_index}: " if passage_index is not None else ""
        super().__init__(f"{where}{message}")
        self.reason = message
        self.passage_index = passage_index

    def shifted(self, offset: int) -> ImageInputError:
        """The same error for a slice of the passages that starts at `offset` of the request's."""
        index = None if self.passage_index is None else self.passage_index + offset
        return type(self)(self.reason, passage_index=index)


class ImageTooLargeError(ImageInputError):
    """An image, or a request's images together, over a size limit (bytes or pixels): smaller ones would do."""


@dataclass(frozen=True)
class EncodedImage:
    """A data URL's bytes, checked against the declared format but not decoded."""

    format: str  # Pillow's format name: PNG | JPEG
    data: bytes


def encoded_size(url: str) -> int:
    """Bytes a base64 payload decodes to, without decoding it (its `=` padding is not data: an image of exactly
    the limit was refused as one byte over)."""
    comma = url.find(",")
    if comma < 0:
        return len(url)
    return (len(url) - comma - 1 - (url.endswith("==") + url.endswith("="))) * 3 // 4


def check_request_size(urls: list[str | None], limits: ImageLimits) -> None:
    """All images of a request together, before any is decoded."""
    total = sum(encoded_size(u) for u in urls if u is not None)
    if total > limits.max_request_bytes:
        raise ImageTooLargeError(f"the request's images hold {total} bytes, above the limit of "
                                 f"{limits.max_request_bytes} bytes per request; send fewer or smaller images")


def parse_data_url(url: str, limits: ImageLimits, passage_index: int | None = None) -> EncodedImage:
    """A `data:image/png|jpeg;base64,...` string -> its bytes, refused unless the bytes are what it says."""
    def fail(message: str, error: type[ImageInputError] = ImageInputError) -> ImageInputError:
        return error(message, passage_index=passage_index)

    head = url[:64].lower()
    if head.startswith(("http://", "https://", "ftp://", "file:")):
        raise fail("image URLs are not fetched: send the image inline as a base64 data URL "
                   "(data:image/png;base64,... or data:image/jpeg;base64,...)")
    match = _DATA_URL.match(url[:256])
    if not head.startswith("data:") or match is None:
        raise fail("an image must be a base64 data URL (data:image/png;base64,... or data:image/jpeg;base64,...)")
    mime = match.group(1).strip().lower()
    mime = _ALIASES.get(mime, mime)
    params = [p.strip().lower() for p in match.group(2).split(";") if p.strip()]
    if "base64" not in params:
        raise fail("an image data URL must be base64-encoded (data:image/png;base64,...)")
    if mime not in FORMATS:
        raise fail(f"image type {mime or 'unspecified'!r} is not supported: send PNG or JPEG "
                   f"({', '.join(FORMATS)})")
    size = encoded_size(url)
    if size > limits.max_image_bytes:
        raise fail(f"the image holds {size} bytes, above the limit of {limits.max_image_bytes} bytes per image",
                   ImageTooLargeError)
    try:
        data = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise fail("the image data is not valid base64") from None
    fmt = FORMATS[mime]
    found = next((name for name, magic in _MAGIC.items() if data.startswith(magic)), None)
    if found is None:
        raise fail(f"the data URL says {mime} but the bytes are not a PNG or JPEG image")
    if found != fmt:
        raise fail(f"the data URL says {mime} but the bytes are a {found} image")
    return EncodedImage(fmt, data)


def open_image(encoded: EncodedImage, limits: ImageLimits, passage_index: int | None = None) -> Image:
    """Open (header only): format, size and frame count checked; no pixel decoded yet."""
    import io

    from PIL import Image, UnidentifiedImageError

    def fail(message: str, error: type[ImageInputError] = ImageInputError) -> ImageInputError:
        return error(message, passage_index=passage_index)

    try:
        with warnings.catch_warnings():  # Pillow warns above ~89 Mpx; the limit below is `limits.max_pixels`
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(encoded.data), formats=[encoded.format])
    except Image.DecompressionBombError:  # over pixel_bound(), which no limit passes
        raise fail(f"the image has more pixels than the limit of {limits.max_pixels} pixels per image",
                   ImageTooLargeError) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise fail(f"the {encoded.format} image cannot be read ({type(exc).__name__})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise fail(f"the image is {width}x{height} pixels")
    if width * height > limits.max_pixels:
        raise fail(f"the image is {width}x{height} = {width * height} pixels, above the limit of "
                   f"{limits.max_pixels} pixels per image", ImageTooLargeError)
    if getattr(image, "n_frames", 1) != 1:
        raise fail(f"the image has {image.n_frames} frames (animated or multi-picture); send a still PNG or JPEG")
    return image


#: The modes a 16-bit grey PNG opens as ("I;16"; "I" in older Pillow).
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I")


def _grey_to_8_bits(image: Image) -> Image:
    """16-bit grey scaled to 8 bits (v / 257, rounded): Pillow's own `convert("L")` clips at 255, so a 16-bit
    page came out almost all white."""
    import numpy as np
    from PIL import Image as PILImage

    wide = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    return PILImage.fromarray(((wide + 128) // 257).astype(np.uint8))


def decode_image(image: Image, passage_index: int | None = None) -> Image:
    """An opened image -> upright 8-bit RGB pixels (EXIF orientation applied, alpha dropped as the
    reference processors' `convert("RGB")` drops it)."""
    from PIL import ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings on odd EXIF / palette transparency are not errors
            image.load()  # a truncated file raises here (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
            try:
                image = ImageOps.exif_transpose(image)
            except (OSError, ValueError, SyntaxError, EOFError, struct.error):  # damaged metadata, sound pixels:
                pass  # as stored, as browsers show it (Pillow reads a JPEG's damaged EXIF leniently already)
            if image.mode in _WIDE_GREY:
                image = _grey_to_8_bits(image)
            elif image.mode in ("P", "PA", "LA", "La", "RGBa"):
                image = image.convert("RGBA")
            return image.convert("RGB") if image.mode != "RGB" else image
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageInputError(f"the image is truncated or corrupt ({type(exc).__name__})",
                              passage_index=passage_index) from None
