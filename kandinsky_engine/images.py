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
import os
import stat
import struct
import threading
import zlib
from contextlib import contextmanager

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

from .limits import DEFAULT_MAX_INPUT_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_READ_TIMEOUT_S  # noqa: F401 (re-exported)
from .storage import is_http, options_for, protocol, redact, redact_url, url_to_fs

BACKGROUND = (255, 255, 255)  # transparent pixels become white: the neutral "paper" colour
MASK_BACKGROUND = (0, 0, 0)  # transparent mask pixels become 0 = keep, so nothing is repainted by accident
_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFSOCK: "a socket"}

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


def read_uri(uri: str, storage_options: dict | None = None, *, max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
             timeout_s: float = DEFAULT_READ_TIMEOUT_S, redirect_check=None) -> bytes:
    """The file at a local path or fsspec URL (file://, s3://, ...) as bytes, if it holds at most
    `max_bytes` and arrives within `timeout_s`. Which URIs may be read at all is the caller's
    business (uri_policy); messages show the URI redacted (storage.redact_url).

    `redirect_check(url)`, for http(s): called with every URL a redirect leads to, before it is
    followed; an exception from it ends the read (it is how the input policy sees each hop)."""
    shown = redact_url(uri)
    try:
        fs, path = _http_fs(uri, storage_options, redirect_check) if redirect_check else url_to_fs(uri, storage_options)
        if isinstance(fs, LocalFileSystem) and (kind := _special_file(path)):
            raise ImageInputError(f"cannot read {shown}: {kind}, not a regular file")
        data = _within(timeout_s, lambda: _read_at_most(fs, path, max_bytes))
    except ImageInputError:
        raise
    except FileNotFoundError as exc:  # fsspec also turns any error of its http HEAD into this
        raise _refused_redirect(exc) or ImageInputError(f"file not found: {shown}") from None
    except TimeoutError:  # before OSError, its base class; fsspec's FSTimeoutError is one too
        raise ImageInputError(f"cannot read {shown}: no answer within input.read_timeout_s={timeout_s:g}") from None
    except (OSError, ValueError, ImportError) as exc:
        # ImportError/ValueError: unknown protocol or missing backend (e.g. s3fs not installed).
        raise _refused_redirect(exc) or ImageInputError(
            f"cannot read {shown}: {type(exc).__name__}: {redact(str(exc), storage_options)}") from None
    if data is None:
        raise ImageInputError(f"{shown} is larger than input.max_input_bytes={max_bytes}")
    return data


class RedirectRefused(ImageInputError):
    """An http(s) input redirected to a URL its reader may not read."""


def _refused_redirect(exc: BaseException) -> RedirectRefused | None:
    """The RedirectRefused behind `exc`, if a redirect check ended the read (fsspec wraps it)."""
    while exc is not None:
        if isinstance(exc, RedirectRefused):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _http_fs(uri: str, storage_options: dict | None, check):
    """(filesystem, path) for `uri`, an http(s) filesystem whose client calls `check` on every
    redirect before following it (an aiohttp trace hook, so that every request fsspec makes, the
    HEAD for the size and each GET, is covered); any other URI as url_to_fs gives it."""
    fs, path = url_to_fs(uri, storage_options)
    if not is_http(fs):
        return fs, path
    import aiohttp
    import fsspec
    from yarl import URL

    async def on_redirect(session, context, params):
        target = str(params.url.join(URL(params.response.headers.get("Location", ""))))
        try:
            check(target)
        except Exception as exc:
            params.response.close()
            raise RedirectRefused(f"{redact_url(str(params.url))} redirects to {redact_url(target)}: {exc}") from None

    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(on_redirect)
    options = options_for(uri, storage_options)
    client = dict(options.get("client_kwargs") or {})
    client["trace_configs"] = [*client.get("trace_configs", []), trace]
    return fsspec.filesystem(protocol(uri), skip_instance_cache=True, **{**options, "client_kwargs": client}), path


def _special_file(path: str) -> str | None:
    """What a local path is if it is neither a regular file nor a folder (the open reports a folder).
    Such inputs are refused before opening: /dev/zero would be read forever, and opening a FIFO
    blocks until someone writes to it."""
    mode = os.stat(path).st_mode  # follows symlinks: the file that would be opened
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return _FILE_KINDS.get(stat.S_IFMT(mode), "a special file")


def _read_at_most(fs, path: str, max_bytes: int) -> bytes | None:
    """The file's bytes, or None if it holds more than max_bytes: at most max_bytes + 1 are read.
    cache_type="none": s3fs's default read-ahead would fetch a 50 MB block beyond what is asked."""
    chunks, total = [], 0
    with fs.open(path, "rb", cache_type="none") as f:
        if (getattr(f, "size", None) or 0) > max_bytes:  # known up front (stat, HEAD): nothing to read
            return None
        while total <= max_bytes:  # a streamed read (http without a length) may return less than asked
            chunk = f.read(max_bytes + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    return None if total > max_bytes else b"".join(chunks)


def _within(timeout_s: float, read):
    """read() in a daemon thread, waited for at most timeout_s. No filesystem bounds a whole read
    (s3fs and http only bound each request; local opens have no timeout at all), and a thread
    is the one way to bound any of them. A read that never returns keeps its daemon thread, which
    never holds up the worker's exit."""
    result: dict = {}
    done = threading.Event()

    def run():
        try:
            result["data"] = read()
        except BaseException as exc:  # handed to the caller as is
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="read_uri", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in result:
        raise result["error"]
    return result["data"]


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


def centre_offsets(outer: tuple[int, int], inner: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of an inner (h, w) box centred in an outer (H, W) one: where a padded input's
    content sits, and the window the size policy `crop` cuts from the output."""
    return (outer[0] - inner[0]) // 2, (outer[1] - inner[1]) // 2


def pad_centred(pixels: np.ndarray, height: int, width: int, fill: int | None = None) -> np.ndarray:
    """(h, w[, C]) pixels -> (height, width[, C]) with the content centred where the size policy
    `crop` cuts the output back (`centre_offsets`); the border repeats the edge pixels, or is `fill`."""
    top, left = centre_offsets((height, width), pixels.shape[:2])
    widths = ((top, height - pixels.shape[0] - top), (left, width - pixels.shape[1] - left))
    widths += ((0, 0),) * (pixels.ndim - 2)
    return np.pad(pixels, widths, mode="edge") if fill is None else np.pad(pixels, widths, constant_values=fill)


def fit_and_pad(image: Image.Image, size: tuple[int, int], working: tuple[int, int], resample, *,
                reducing_gap: float | None = None, fill: int | None = None) -> Image.Image:
    """Resize to `size` (w, h), then pad to `working` (W, H) with `pad_centred`."""
    pixels = np.asarray(image.resize(size, resample, reducing_gap=reducing_gap))
    return Image.fromarray(pad_centred(pixels, working[1], working[0], fill))


def fit_to_size(image: Image.Image, width: int, height: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Resize to exactly (width, height), aspect ratio not kept; the same object if already that size."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample)
