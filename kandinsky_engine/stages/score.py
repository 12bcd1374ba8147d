"""ClipScoreStage: decoded pixels + prompt -> `clip_score` (output.columns: clip_score).

The score is the cosine similarity of two CLIP embeddings from the prior's own encoders
(config.model.prior): the prompt's `text_embeds` (CLIPTextModelWithProjection, tokenized as the
prior tokenizes: padded to model_max_length, truncated) and the generated image's `image_embeds`
(CLIPVisionModelWithProjection, after the prior's saved CLIPImageProcessor). It is the prior's
notion of "this image matches this text": the prior maps the first embedding to a prediction of
the second, so no other CLIP model is loaded.

It runs after the MoVQ decode on the raw pixels (`pixels`, (H, W, 3) uint8 bytes), before the
CPU encoding: the pixels are there without decoding a file, and a PNG decodes to exactly these
pixels, so the score equals the one of the stored PNG. For JPEG and WebP it scores the image the
model made, not its compression artefacts.
"""

from __future__ import annotations

import numpy as np

from ..config import JobConfig
from ..device import stage_device
from ..models import load_asset, load_module, model_dir
from ..rows import failed

REQUIRED = ("id", "prompt", "pixels", "image_height", "image_width")


class ClipScoreStage:
    """Adds `clip_score` (float32; NaN for rows failed upstream, which go to errors/)."""

    def __init__(self, config: JobConfig, sources: dict | None = None):
        import torch
        from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                                  CLIPVisionModelWithProjection)

        torch.set_num_threads(config.score.threads())
        self.device = stage_device(config.model, config.score)
        model, folder = config.model, model_dir(config, "prior", sources)
        self.tokenizer = load_asset(CLIPTokenizer, folder, "tokenizer")
        self.text_encoder = load_module(CLIPTextModelWithProjection, model, folder, "text_encoder", self.device)
        self.image_processor = load_asset(CLIPImageProcessor, folder, "image_processor")
        self.image_encoder = load_module(CLIPVisionModelWithProjection, model, folder, "image_encoder", self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        missing = [c for c in REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"ClipScoreStage: batch lacks columns {missing}")
        scores = np.full(len(batch["id"]), np.nan, np.float32)
        todo = np.flatnonzero(~failed(batch))
        if len(todo):
            images = [Image.fromarray(np.frombuffer(batch["pixels"][i], np.uint8).reshape(
                int(batch["image_height"][i]), int(batch["image_width"][i]), 3)) for i in todo]
            with torch.inference_mode():
                pixels = self.image_processor(images, return_tensors="pt").pixel_values  # (n, 3, S, S)
                image = self.image_encoder(pixels.to(self.device, self.image_encoder.dtype)).image_embeds  # (n, D)
                tokens = self.tokenizer([str(batch["prompt"][i]) for i in todo], padding="max_length",
                                        max_length=self.tokenizer.model_max_length, truncation=True,
                                        return_tensors="pt")
                text = self.text_encoder(tokens.input_ids.to(self.device)).text_embeds  # (n, D)
                cosine = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)  # (n,)
            scores[todo] = cosine.cpu().numpy()
        return {**batch, "clip_score": scores}
