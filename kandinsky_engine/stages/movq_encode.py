"""MovqEncodeStage: input images of img2img, inpaint and ControlNet-img2img rows -> MoVQ latents,
each task with its diffusers pipeline's preprocessing. An actor pool keeps the MoVQ resident."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image

from ..config import JobConfig
from ..device import stage_device
from ..images import ImageInputError, decode_input, fit_and_pad
from ..inputs import IMAGE_TASKS, pack
from ..models import load_module, model_dir
from ..rows import failed, mark_failed, working_size
from .inpaint import image_tensor, keep_mask



def image_inputs(batch: dict[str, np.ndarray], prepare, stage: str):
    """The rows of a batch whose task takes an input image, each prepared by `prepare(batch, i)` ->
    ((1, 3, H, W) pixels, packed keep mask or None); a row whose image cannot be used is marked failed
    by `stage`. Returns (pixels {row: tensor}, masks (object array, one per row), rows by pixel shape)."""
    masks, pixels = np.full(len(batch["id"]), None, dtype=object), {}
    for i in [i for i in np.flatnonzero(~failed(batch)) if batch["task"][i] in IMAGE_TASKS]:
        try:
            pixels[i], masks[i] = prepare(batch, i)
        except ImageInputError as exc:
            mark_failed(batch, i, stage, exc)
    by_shape = defaultdict(list)
    for i, x in pixels.items():
        by_shape[tuple(x.shape)].append(i)
    return pixels, masks, by_shape

class MovqEncodeStage:
    """Adds `init_latents` (packed (4, H/8, W/8) float32) for img2img and inpaint rows, and
    `keep_mask` (packed (1, H/8, W/8)) for inpaint rows; drops the input bytes.

    Images are decoded (EXIF applied, any mode to RGB), resized to the row's working size and
    encoded with the MoVQ encoder, each task with its diffusers pipeline's preprocessing.
    """

    def __init__(self, config: JobConfig, sources: dict | None = None):
        import torch
        from diffusers import VQModel
        from diffusers.image_processor import VaeImageProcessor

        torch.set_num_threads(config.encode.threads())
        self.device = stage_device(config.model, config.encode)
        self.movq = load_module(VQModel, config.model, model_dir(config, "decoder", sources), "movq", self.device)
        self.scale_factor = 2 ** (len(self.movq.config.block_out_channels) - 1)
        # diffusers' img2img processor: bicubic, reducing_gap=1, output in [-1, 1].
        self.processor = VaeImageProcessor(
            vae_scale_factor=self.scale_factor,
            vae_latent_channels=self.movq.config.latent_channels,
            resample="bicubic",
            reducing_gap=1,
        )
        self.max_pixels = config.input.max_image_pixels
        self.pad = config.output.size_policy == "crop"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        init = np.full(len(batch["id"]), None, dtype=object)
        pixels, masks, by_shape = image_inputs(batch, self._prepare, "MovqEncodeStage")
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
        # The working size is the 64-rounded output size, as for text2img. With size_policy crop,
        # the input is resized to the requested size and padded to the working size, centred as
        # MovqStage crops it back (images: edges repeated; masks: padding kept, never repainted), so
        # the output keeps the input's borders and scale. Otherwise it is stretched to the working size.
        h, w = int(batch["height"][i]), int(batch["width"][i])
        work_h, work_w = working_size(h, w, self.scale_factor)
        pad = self.pad and (h, w) != (work_h, work_w)
        image = decode_input(batch["image_bytes"][i], "image", max_pixels=self.max_pixels)
        if batch["task"][i] in ("img2img", "controlnet_img2img"):
            if pad:  # the processor's own resample; its resize to the padded size is then a copy
                image = fit_and_pad(image, (w, h), (work_w, work_h), Image.Resampling.BICUBIC, reducing_gap=1)
            # Height and width in the processor's order: diffusers 0.42 calls
            # preprocess(image, width, height) in both img2img pipelines, swapping them for
            # non-square sizes.
            return self.processor.preprocess(image, height=work_h, width=work_w), None
        mask = decode_input(batch["mask_bytes"][i], "mask", max_pixels=self.max_pixels, mask=True)
        if pad:  # inpaint.image_tensor's and keep_mask's resamples, then their resizes are copies
            image = fit_and_pad(image, (w, h), (work_w, work_h), Image.Resampling.BICUBIC, reducing_gap=1)
            mask = fit_and_pad(mask, (w, h), (work_w, work_h), Image.Resampling.LANCZOS, fill=0)
        mask = keep_mask(mask, work_w, work_h, (work_h // self.scale_factor, work_w // self.scale_factor))
        return image_tensor(image, work_w, work_h), pack(mask.numpy())
