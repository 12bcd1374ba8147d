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
