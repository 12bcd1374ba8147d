"""Input images of img2img and inpaint rows: fetched from URIs, then MoVQ-encoded.

`fetch_inputs` is plain I/O (a Ray task step); `MovqEncodeStage` keeps a MoVQ resident (an actor
pool). A row whose image cannot be used is marked failed with the reason and skips later stages.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .config import JobConfig
from .images import ImageInputError, decode_input, read_uri
from .inpaint import image_tensor, keep_mask
from .models import load_module
from .rows import failed, is_null, mark_failed, object_column, working_size

IMAGE_TASKS = ("img2img", "inpaint", "controlnet_img2img")  # tasks whose image the MoVQ encodes
FETCH_TASKS = ("img2img", "inpaint", "variation", "mix", "controlnet", "controlnet_img2img")  # may name files
INPUTS = ("image", "mask", "hint")


def fetch_inputs(batch: dict[str, np.ndarray], storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Fill `image_bytes` / `mask_bytes` from the `_uri` columns where a row has no inline bytes."""
    n = len(batch["id"])
    out = dict(batch)
    for kind in INPUTS:
        uris = batch.get(f"{kind}_uri", np.full(n, None, dtype=object))
        data = np.array(batch.get(f"{kind}_bytes", np.full(n, None, dtype=object)), dtype=object)
        for i in np.flatnonzero(~failed(batch)):
            if is_null(data[i]) and not is_null(uris[i]):
                try:
                    data[i] = read_uri(str(uris[i]), storage_options)
                except ImageInputError as exc:
                    mark_failed(batch, i, "fetch_inputs", ImageInputError(f"{kind}_uri: {exc}"))
        out[f"{kind}_bytes"] = data
    if "mix" in batch:
        out["mix"] = object_column(batch["mix"])
        for i in np.flatnonzero(~failed(batch)):
            if batch["task"][i] == "mix" and not is_null(batch["mix"][i]):
                try:
                    out["mix"][i] = [_fetch_mix_item(dict(item), storage_options) for item in batch["mix"][i]]
                except ImageInputError as exc:
                    mark_failed(batch, i, "fetch_inputs", exc)
    return out


def _fetch_mix_item(item: dict, storage_options: dict | None) -> dict:
    if is_null(item.get("image_bytes")) and not is_null(item.get("image_uri")):
        try:
            item["image_bytes"] = read_uri(str(item["image_uri"]), storage_options)
        except ImageInputError as exc:
            raise ImageInputError(f"mix image_uri: {exc}") from None
    return item


def pack(latents: np.ndarray) -> bytes:
    """Latents travel between stages as raw float32 bytes (null for rows without any)."""
    return np.ascontiguousarray(latents, dtype=np.float32).tobytes()


def unpack(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32).reshape(shape)


class MovqEncodeStage:
    """Adds `init_latents` (packed (4, H/8, W/8) float32) for img2img and inpaint rows, and
    `keep_mask` (packed (1, H/8, W/8)) for inpaint rows; drops the input bytes.

    Images are decoded (EXIF applied, any mode to RGB), resized to the row's working size and
    encoded with the MoVQ encoder, each task with its diffusers pipeline's preprocessing.
    """

    def __init__(self, config: JobConfig):
        import torch
        from diffusers import VQModel
        from diffusers.image_processor import VaeImageProcessor

        torch.set_num_threads(config.encode.threads())
        self.device = torch.device(config.model.device)
        self.movq = load_module(VQModel, config.model, "decoder", "movq", config.storage_options)
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
        init, masks = np.full(n, None, dtype=object), np.full(n, None, dtype=object)
        todo = [i for i in np.flatnonzero(~failed(batch)) if batch["task"][i] in IMAGE_TASKS]
        pixels = {}
        for i in todo:
            try:
                pixels[i], masks[i] = self._prepare(batch, i)
            except ImageInputError as exc:
                mark_failed(batch, i, "MovqEncodeStage", exc)
        by_shape = defaultdict(list)
        for i, x in pixels.items():
            by_shape[tuple(x.shape)].append(i)
        with torch.inference_mode():
            for rows in by_shape.values():
                x = torch.cat([pixels[i] for i in rows]).to(self.device, self.movq.dtype)
                latents = self.movq.encode(x)["latents"].float().cpu().numpy()  # (n, 4, H/8, W/8), unquantised
                for i, lat in zip(rows, latents):
                    init[i] = pack(lat)
        out = {k: v for k, v in batch.items() if k not in ("image_bytes", "mask_bytes")}
        out["init_latents"], out["keep_mask"] = init, masks
        return out

    def _prepare(self, batch, i: int):
        """-> ((1, 3, H, W) pixels in [-1, 1], packed keep mask or None) for row i."""
        # The working size is the 64-rounded output size, as for text2img; the size policy crops
        # back afterwards.
        h, w = working_size(int(batch["height"][i]), int(batch["width"][i]), self.scale_factor)
        image = decode_input(batch["image_bytes"][i], "image", max_pixels=self.max_pixels)
        if batch["task"][i] in ("img2img", "controlnet_img2img"):
            # Height and width in the processor's order: diffusers 0.42 calls
            # preprocess(image, width, height) in both img2img pipelines, swapping them for
            # non-square sizes.
            return self.processor.preprocess(image, height=h, width=w), None
        mask = decode_input(batch["mask_bytes"][i], "mask", max_pixels=self.max_pixels, mask=True)
        mask = keep_mask(mask, w, h, (h // self.scale_factor, w // self.scale_factor))
        return image_tensor(image, w, h), pack(mask.numpy())
