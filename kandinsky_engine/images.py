"""Input images and masks for image-to-image and inpainting rows: read, check, decode, resize.

Every way an input can be unusable ends in ImageInputError with a short reason, so the
caller can mark that one row failed (prefixing the column name) instead of failing the batch.

Decoding rules:
- The result is 8-bit RGB (images) or 8-bit L (masks), EXIF orientation applied.
- Transparent pixels are composited onto BACKGROUND (white) for images, onto black for masks.
- 16-bit greys (I;16*) and 'I' (what Pillow gives for 16-bit PGM, and 32-bit TIFF) are taken
  as 0..65535 and scaled to 0..255 by round(v / 257); 'I' values outside that range are clipped.
- 'F' (32-bit float) is taken as 0..1, the usual convention for float image data, and scaled by
  255; values outside [0, 1] are clipped and NaN becomes 0.
- Everything else (1, L, P, RGB, CMYK, YCbCr, ...) goes through Pillow's own convert().
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .storage import redact, url_to_fs

BACKGROUND = (255, 255, 255)  # transparent pixels become white: the neutral "paper" colour
MASK_BACKGROUND = (0, 0, 0)  # transparent mask pixels become 0 = keep, so nothing is repainted by accident
DEFAULT_MAX_PIXELS = 8192 * 8192  # decompression-bomb limit; configurable per call

# What Pillow raises for corrupt or truncated data varies by plugin.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

# Pillow's own bomb check reads the process-wide Image.MAX_IMAGE_PIXELS in Image.open and in some
# load() paths (TIFF tiles, GIF frames). It would fire before ours with a different message, or
# raise at a different limit than the caller asked for. There is no per-call switch, so we lift
# the global for the duration of open + load only, under a lock: the lock keeps concurrent calls
# from restoring each other's saved value (which could leave the limit off for good). Our check
# replaces Pillow's for these decodes; the cost is that decodes in this module are serialised,
# which is negligible next to diffusion steps (and Ray workers decode in one thread anyway).
_LIMIT_LOCK = threading.Lock()


class ImageInputError(ValueError):
    """A row's input image cannot be used; str(err) is the reason."""


def read_uri(uri: str, storage_options: dict | None = None) -> bytes:
    """Whole file at a local path or fsspec URL (file://, s3://, ...) as bytes."""
    try:
        fs, path = url_to_fs(uri, storage_options)
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ImageInputError(f"file not found: {uri}") from None
    except (OSError, ValueError, ImportError) as exc:
        # ImportError/ValueError: unknown protocol or missing backend (e.g. s3fs not installed).
        raise ImageInputError(f"cannot read {uri}: {type(exc).__name__}: {redact(str(exc), storage_options)}") from None


@contextmanager
def _pillow_limit_lifted():
    with _LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Decoded first frame, EXIF-transposed, in its file's own mode; size checked before decoding."""
    if not data:
        raise ImageInputError("empty file (0 bytes)")
    error = None
    with _pillow_limit_lifted():
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                width, height = im.size
                if width * height > max_pixels:
                    error = f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                else:
                    im.load()  # raises on truncated data: LOAD_TRUNCATED_IMAGES stays off
                    # Before any mode conversion: TIFF keeps orientation in its tags, which convert() drops.
                    return ImageOps.exif_transpose(im)
        except UnidentifiedImageError:
            error = "not a decodable image: unrecognised format"
        except _DECODE_ERRORS as exc:
            error = f"not a decodable image: {type(exc).__name__}: {exc}"
    # Raised outside the try so it is not caught as a ValueError above, and without the chained traceback.
    raise ImageInputError(error)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info


def _grey16_to_l(im: Image.Image) -> Image.Image:
    """I;16*, I and F -> L by the scaling rules in the module docstring."""
    values = np.asarray(im)
    if im.mode == "F":
        scaled = np.nan_to_num(values, nan=0.0) * 255.0
    else:
        scaled = np.clip(values.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(np.clip(scaled, 0, 255)).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return _grey16_to_l(im).convert("RGB")
    if _has_alpha(im):
        # convert("RGBA") applies tRNS / info['transparency'] for P, L and RGB images too.
        base = Image.new("RGBA", im.size, background + (255,))
        return Image.alpha_composite(base, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB, EXIF orientation applied, transparency on BACKGROUND."""
    return _to_rgb(_open_checked(data, max_pixels), BACKGROUND)


def decode_mask(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded mask bytes -> mode L: 255 = repaint, 0 = keep.

    Colour masks become their luminance; transparent pixels count as black (keep), since a
    cut-out PNG mask usually means "only the opaque part".
    """
    # RGB -> L of a grey pixel is exact in Pillow (the weights sum to one), so greys pass through.
    return _to_rgb(_open_checked(data, max_pixels), MASK_BACKGROUND).convert("L")


def decode_input(data, kind: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, mask: bool = False) -> Image.Image:
    """A row's input cell (bytes, or null) -> decoded image; errors name the input, e.g. 'mask: empty file'."""
    from .rows import is_null

    try:
        return (decode_mask if mask else decode_image)(b"" if is_null(data) else data, max_pixels=max_pixels)
    except ImageInputError as exc:
        raise ImageInputError(f"{kind}: {exc}") from None


def fit_to_size(image: Image.Image, width: int, height: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Resize to exactly (width, height), aspect ratio not kept; the same object if already that size."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample)
