"""MovqStage: latents -> uint8 RGB (-> encoded image bytes, or that in `encode_images` after it)."""

from __future__ import annotations

import hashlib
import io

import numpy as np

from ..compiled import Bucketed, buckets
from ..config import JobConfig, OutputConfig
from ..device import stage_device
from ..images import centre_offsets
from ..inputs import unpack
from ..models import load_module, model_dir
from ..rows import ERROR_COLUMNS, failed, group_rows, latent_size, object_column
from ..transfer import download, upload

REQUIRED = ("id", "width", "height", "latents")
INTERNAL = ("latents", "image_embeds", "negative_image_embeds", "init_latents", "keep_mask", "hint_pixels",
            "image_bytes", "mask_bytes", "hint_bytes")
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def to_uint8(images) -> np.ndarray:
    """MoVQ output in [-1, 1], (B, 3, H, W) -> (B, H, W, 3) uint8.

    Exactly diffusers' `output_type="np"` post-processing followed by `(x * 255).round()`."""
    return download([device_uint8(images)])[0]


def device_uint8(images):
    """`to_uint8` computed where the images are (a quarter of the bytes to copy back from a GPU):
    clamp in the model's dtype, then float32 x 255, round half to even and cast, as numpy does it
    on the CPU (IEEE float32 on both sides: the same bytes) -> (B, H, W, 3) uint8 tensor."""
    import torch

    images = (images * 0.5 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).contiguous()


def centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = centre_offsets(image.shape[:2], (height, width))
    return image[top : top + height, left : left + width]


def encode_image(pixels: np.ndarray, fmt: str, quality: int, compress_level: int = 6) -> bytes:
    """(H, W, 3) uint8 -> PNG/JPEG/WebP bytes. `compress_level`: zlib level of PNG (Pillow's default 6)."""
    from PIL import Image

    buf = io.BytesIO()
    options = {"compress_level": compress_level} if fmt == "png" else {"quality": quality}
    Image.fromarray(pixels).save(buf, format=PIL_FORMATS[fmt], **options)
    return buf.getvalue()


def encode_images(batch: dict[str, np.ndarray], output: OutputConfig) -> dict[str, np.ndarray]:
    """`pixels` (raw (H, W, 3) uint8 bytes; sizes in image_height/image_width) -> `image` (encoded).

    The pipeline runs this in plain CPU tasks after the MoVQ actors, so that an actor holding a GPU
    never waits on zlib (PNG level 6 costs ~0.3 s per 768x768 image). Rows without pixels (failed
    upstream) keep no image; a row that fails to encode becomes a row error, alone.
    """
    out = {k: v for k, v in batch.items() if k != "pixels"}
    errors = {name: batch[name].copy() for name in ERROR_COLUMNS}
    images = []
    upstream = failed(batch)  # their error stays as it is; Ray may hand their empty cells over as NaN
    for i, (raw, h, w) in enumerate(zip(batch["pixels"], batch["image_height"], batch["image_width"])):
        if upstream[i]:
            images.append(None)
            continue
        try:
            if not isinstance(raw, (bytes, bytearray, memoryview)):
                raise ValueError(f"no decoded pixels reached the encoder (got {type(raw).__name__})")
            pixels = np.frombuffer(raw, np.uint8).reshape(int(h), int(w), 3)
            images.append(encode_image(pixels, output.image_format, output.quality, output.png_compress_level))
        except Exception as exc:
            images.append(None)
            for name, value in zip(ERROR_COLUMNS, ("encode_images", type(exc).__name__, str(exc)[:2000])):
                errors[name][i] = value
    out.update(errors, image=object_column(images))
    out.update(image_signals(images, output.columns))
    return out


def image_signals(images: list, columns: list[str]) -> dict[str, np.ndarray]:
    """The opt-in columns computed from the encoded image (None where there is none): `sha256` of its
    bytes, `phash` (imagehash's DCT perceptual hash, 16 hex digits) of the image as stored, so a
    JPEG's is the hash of what a reader decodes."""
    out = {}
    if "sha256" in columns:
        out["sha256"] = object_column(None if b is None else hashlib.sha256(b).hexdigest() for b in images)
    if "phash" in columns:
        import imagehash
        from PIL import Image

        out["phash"] = object_column(None if b is None else str(imagehash.phash(Image.open(io.BytesIO(b))))
                                     for b in images)
    return out


def movq_decode(z, movq):
    """Latents (B, 4, H/8, W/8) -> images (B, 3, H, W) in [-1, 1], unquantised as the pipelines decode."""
    return movq.decode(z, force_not_quantize=True).sample


class MovqStage:
    """Decodes `latents` with the MoVQ, applies the size policy and encodes the `image` column.

    Adds `image` (bytes), `image_width`, `image_height` (the actual size); drops the internal
    tensor columns and input bytes, so only the dataset's columns reach the writer (which adds the
    model identities and writes the mix recipe without its image bytes). With `encode=False` it
    adds `pixels` (raw uint8 bytes) instead of `image`, for `encode_images` to encode elsewhere.
    """

    # decoder output -> (B, H, W, 3) uint8, on the CPU and where the images are; other decoders' stages swap them
    to_uint8 = staticmethod(to_uint8)
    device_uint8 = staticmethod(device_uint8)

    def __init__(self, config: JobConfig, components: dict | None = None, encode: bool = True,
                 sources: dict | None = None):
        """`components`: {movq}, ready on the stage's device, instead of loading config.model.decoder's.
        `sources`: the model sources as the driver resolved them (models.model_dir; None: resolved here)."""
        import torch
        from diffusers import VQModel

        torch.set_num_threads(config.movq.threads())
        self.device = stage_device(config.model, config.movq)
        if components is None:
            self.movq = load_module(VQModel, config.model, model_dir(config, "decoder", sources), "movq", self.device)
        else:
            self.movq = components["movq"]
        self.scale_factor = 2 ** (len(self.movq.config.block_out_channels) - 1)
        self.output, self.encode = config.output, encode
        self.keep = {"image_embeds"} & set(config.output.columns)  # an output column when asked for
        self.decode = movq_decode
        if config.model.compile:  # the decode method, not the module: compiling VQModel compiles its forward
            self.decode = Bucketed(movq_decode, buckets(config.movq.batch_size), "MoVQ decode",
                                   cache_dir=config.model.cache_dir)
            defaults = config.defaults
            shape = (self.movq.config.latent_channels, *latent_size(defaults.height, defaults.width, self.scale_factor))
            g = torch.Generator().manual_seed(0)  # warm-up inputs: never the global RNG
            self.decode.warm_up(lambda n: (torch.randn(n, *shape, generator=g).to(self.device, self.movq.dtype),
                                           {"movq": self.movq}))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [c for c in REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"MovqStage: batch lacks columns {missing}")
        n = len(batch["id"])
        pixels: list = [None] * n
        ok = ~failed(batch)
        shape = lambda i: (self.movq.config.latent_channels,
                           *latent_size(int(batch["height"][i]), int(batch["width"][i]), self.scale_factor))
        with torch.inference_mode():
            # Every group decoded and converted to uint8 on the device, then copied back at once.
            done = []
            for (key_ok, latent_shape), idx in group_rows(batch, lambda i: (bool(ok[i]), shape(i))).items():
                if not key_ok:
                    continue
                z = np.stack([unpack(batch["latents"][i], latent_shape) for i in idx])  # (n, 4, H/8, W/8)
                decoded = self.decode(upload(z, self.device, self.movq.dtype), movq=self.movq)
                done.append((idx, self.device_uint8(decoded)))  # (n, 3, H, W) -> (n, H, W, 3) uint8
            for (idx, _), images in zip(done, download([images for _, images in done])):
                for i, image in zip(idx, images):
                    pixels[i] = image
        raw, widths, heights = [], [], []
        for i, image in enumerate(pixels):
            if image is None:  # failed upstream: no image, the writer sends the row to errors/
                raw.append(None)
                widths.append(None)
                heights.append(None)
                continue
            if self.output.size_policy == "crop":
                image = centre_crop(image, int(batch["height"][i]), int(batch["width"][i]))
            raw.append(np.ascontiguousarray(image).tobytes())
            heights.append(image.shape[0])
            widths.append(image.shape[1])
        out = {k: v for k, v in batch.items() if k not in INTERNAL or k in self.keep}
        out["pixels"] = object_column(raw)
        out["image_width"] = object_column(widths)
        out["image_height"] = object_column(heights)
        return encode_images(out, self.output) if self.encode else out
