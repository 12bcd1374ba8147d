"""Input images of img2img rows: fetched from URIs, then MoVQ-encoded into init latents.

`fetch_inputs` is plain I/O (a Ray task step); `MovqEncodeStage` keeps a MoVQ resident (an actor
pool). A row whose image cannot be used is marked failed with the reason and skips later stages.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .config import JobConfig
from .images import ImageInputError, decode_image, read_uri
from .models import load_module
from .rows import failed, is_null, latent_size, mark_failed

IMAGE_TASKS = ("img2img",)


def fetch_inputs(batch: dict[str, np.ndarray], storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Fill `image_bytes` from `image_uri` where a row has a URI and no inline bytes."""
    n = len(batch["id"])
    uris = batch.get("image_uri", np.full(n, None, dtype=object))
    data = np.array(batch.get("image_bytes", np.full(n, None, dtype=object)), dtype=object)
    for i in np.flatnonzero(~failed(batch)):
        if is_null(data[i]) and not is_null(uris[i]):
            try:
                data[i] = read_uri(str(uris[i]), storage_options)
            except ImageInputError as exc:
                mark_failed(batch, i, "fetch_inputs", ImageInputError(f"image_uri: {exc}"))
    return {**batch, "image_bytes": data}


def pack(latents: np.ndarray) -> bytes:
    """Latents travel between stages as raw float32 bytes (null for rows without any)."""
    return np.ascontiguousarray(latents, dtype=np.float32).tobytes()


def unpack(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32).reshape(shape)


class MovqEncodeStage:
    """Adds `init_latents` (packed (4, H/8, W/8) float32) for img2img rows; drops `image_bytes`.

    The image is decoded (EXIF applied, any mode to RGB), resized to the row's working size and
    encoded with the MoVQ encoder, as `KandinskyV22Img2ImgPipeline` does.
    """

    def __init__(self, config: JobConfig):
        import torch
        from diffusers import VQModel
        from diffusers.image_processor import VaeImageProcessor

        torch.set_num_threads(config.movq.threads())
        self.device = torch.device(config.model.device)
        self.movq = load_module(VQModel, config.model, "decoder", "movq")
        self.scale_factor = 2 ** (len(self.movq.config.block_out_channels) - 1)
        # diffusers' img2img processor: bicubic, reducing_gap=1, output in [-1, 1].
        self.processor = VaeImageProcessor(
            vae_scale_factor=self.scale_factor,
            vae_latent_channels=self.movq.config.latent_channels,
            resample="bicubic",
            reducing_gap=1,
        )
        self.max_pixels = config.input.max_image_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["id"])
        init = np.full(n, None, dtype=object)
        todo = [i for i in np.flatnonzero(~failed(batch)) if batch["task"][i] in IMAGE_TASKS]
        pixels = {}
        for i in todo:
            data = batch["image_bytes"][i]
            try:
                image = decode_image(b"" if is_null(data) else data, max_pixels=self.max_pixels)
            except ImageInputError as exc:
                mark_failed(batch, i, "MovqEncodeStage", ImageInputError(f"image: {exc}"))
                continue
            # The working size is the 64-rounded output size, as for text2img; the size policy
            # crops back afterwards. Height and width in the processor's order: diffusers 0.42
            # calls preprocess(image, width, height), swapping them for non-square sizes.
            h, w = (s * self.scale_factor for s in latent_size(int(batch["height"][i]), int(batch["width"][i]), self.scale_factor))
            pixels[i] = self.processor.preprocess(image, height=h, width=w)  # (1, 3, H, W) in [-1, 1]
        by_shape = defaultdict(list)
        for i, x in pixels.items():
            by_shape[tuple(x.shape)].append(i)
        with torch.inference_mode():
            for rows in by_shape.values():
                x = torch.cat([pixels[i] for i in rows]).to(self.device, self.movq.dtype)
                latents = self.movq.encode(x)["latents"].float().cpu().numpy()  # (n, 4, H/8, W/8), unquantised
                for i, lat in zip(rows, latents):
                    init[i] = pack(lat)
        out = {k: v for k, v in batch.items() if k != "image_bytes"}
        out["init_latents"] = init
        return out
