"""The parity oracle: diffusers' own pipelines, run row by row with the seed rule."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


class Reference:
    """`KandinskyV22PriorPipeline` + `KandinskyV22Pipeline` loaded with `from_pretrained` like the stages."""

    def __init__(self, root):
        from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

        self.prior = KandinskyV22PriorPipeline.from_pretrained(root / "prior")
        self.decoder = KandinskyV22Pipeline.from_pretrained(root / "decoder")
        for pipe in (self.prior, self.decoder):
            pipe.set_progress_bar_config(disable=True)

    def embeds(self, row: dict):
        return self.prior(
            str(row["prompt"]),
            negative_prompt=row.get("negative_prompt"),
            num_inference_steps=int(row["prior_num_inference_steps"]),
            guidance_scale=float(row["prior_guidance_scale"]),
            generator=torch.Generator("cpu").manual_seed(int(row["seed"])),
        )

    def img2img(self, row: dict, init: Image.Image, swap_size: bool = False) -> np.ndarray:
        """`KandinskyV22Img2ImgPipeline` for one row. swap_size passes width as height and back,
        which undoes diffusers 0.42's swapped `preprocess(image, width, height)` call."""
        from diffusers import KandinskyV22Img2ImgPipeline

        if not hasattr(self, "_img2img"):
            self._img2img = KandinskyV22Img2ImgPipeline(**self.decoder.components)
            self._img2img.set_progress_bar_config(disable=True)
        prior = self.embeds(row)
        height, width = int(row["height"]), int(row["width"])
        if swap_size:
            height, width = width, height
        images = self._img2img(
            image=init,
            image_embeds=prior.image_embeds,
            negative_image_embeds=prior.negative_image_embeds,
            height=height,
            width=width,
            num_inference_steps=int(row["num_inference_steps"]),
            guidance_scale=float(row["guidance_scale"]),
            strength=float(row["strength"]),
            generator=torch.Generator("cpu").manual_seed(int(row["seed"])),
            output_type="np",
        ).images
        return (images[0] * 255).round().astype(np.uint8)

    def image(self, row: dict) -> np.ndarray:
        """uint8 (H, W, 3) for one resolved row: both pipelines get a fresh generator seeded with the row's seed."""
        seed = int(row["seed"])
        prior = self.prior(
            str(row["prompt"]),
            negative_prompt=row.get("negative_prompt"),
            num_inference_steps=int(row["prior_num_inference_steps"]),
            guidance_scale=float(row["prior_guidance_scale"]),
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        images = self.decoder(
            image_embeds=prior.image_embeds,
            negative_image_embeds=prior.negative_image_embeds,
            height=int(row["height"]),
            width=int(row["width"]),
            num_inference_steps=int(row["num_inference_steps"]),
            guidance_scale=float(row["guidance_scale"]),
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images
        return (images[0] * 255).round().astype(np.uint8)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
