"""PriorStage: prompt -> CLIP image embedding, with `KandinskyV22PriorPipeline` semantics."""

from __future__ import annotations

import numpy as np

from .config import JobConfig
from .models import load_asset, load_module
from .rows import generators, group_rows, is_null

REQUIRED = ("id", "prompt", "negative_prompt", "seed", "prior_num_inference_steps", "prior_guidance_scale")


class PriorStage:
    """Adds `image_embeds` and `negative_image_embeds` (float32, (B, D)) to a batch.

    Loads the CLIP text encoder, tokenizer, prior transformer and CLIP image encoder once and keeps
    them resident. The zero-image embedding (the negative embedding of rows without a negative
    prompt) is computed once here; diffusers recomputes it on every call.
    """

    def __init__(self, config: JobConfig):
        import torch
        from diffusers import PriorTransformer, UnCLIPScheduler
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

        torch.set_num_threads(config.prior.threads())
        model = config.model
        self.device = torch.device(model.device)
        self.tokenizer = load_asset(CLIPTokenizer, model, "prior", "tokenizer")
        self.text_encoder = load_module(CLIPTextModelWithProjection, model, "prior", "text_encoder")
        self.prior = load_module(PriorTransformer, model, "prior", "prior")
        self.scheduler_config = load_asset(UnCLIPScheduler, model, "prior", "scheduler").config
        self.image_encoder = load_module(CLIPVisionModelWithProjection, model, "prior", "image_encoder")
        self.embedding_dim = self.prior.config.embedding_dim
        size = self.image_encoder.config.image_size
        with torch.inference_mode():
            zero_image = torch.zeros(1, 3, size, size, device=self.device, dtype=self.image_encoder.dtype)
            self.zero_embed = self.image_encoder(zero_image)["image_embeds"]  # (1, D)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [c for c in REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"PriorStage: batch lacks columns {missing}")
        n = len(batch["id"])
        embeds = np.zeros((n, self.embedding_dim), np.float32)
        negative = np.zeros((n, self.embedding_dim), np.float32)
        steps, guidance = batch["prior_num_inference_steps"], batch["prior_guidance_scale"]
        groups = group_rows(batch, lambda i: (int(steps[i]), bool(guidance[i] > 1)))
        with torch.inference_mode():
            for (num_steps, cfg), idx in groups.items():
                embeds[idx], negative[idx] = self._generate(batch, idx, num_steps, cfg)
        return {**batch, "image_embeds": embeds, "negative_image_embeds": negative}

    def _encode(self, texts: list[str]):
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        out = self.text_encoder(tokens.input_ids.to(self.device))
        return out.text_embeds, out.last_hidden_state, tokens.attention_mask.bool().to(self.device)

    def _generate(self, batch, idx: np.ndarray, num_steps: int, cfg: bool):
        import torch
        from diffusers import UnCLIPScheduler
        from diffusers.utils.torch_utils import randn_tensor

        # Like diffusers, a row with a negative prompt runs the prior on two items, [prompt,
        # negative], whose unconditional text is the negative prompt; a row without one runs one
        # item with "" as unconditional text and takes the cached zero embedding as its negative.
        texts, uncond, spans = [], [], []
        for i in idx:
            neg = None if is_null(batch["negative_prompt"][i]) else batch["negative_prompt"][i]
            items = [str(batch["prompt"][i])] + ([] if neg is None else [str(neg)])
            start = len(texts)
            texts += items
            uncond += ["" if neg is None else str(neg)] * len(items)
            spans.append(slice(start, len(texts)))
        proj, hidden, mask = self._encode(texts)  # (M, D), (M, 77, H), (M, 77)
        if cfg:
            u_proj, u_hidden, u_mask = self._encode(uncond)
            proj, hidden, mask = torch.cat([u_proj, proj]), torch.cat([u_hidden, hidden]), torch.cat([u_mask, mask])

        scheduler = UnCLIPScheduler.from_config(self.scheduler_config)  # per call: never mutate shared state
        scheduler.set_timesteps(num_steps, device=self.device)
        timesteps = scheduler.timesteps
        gens = generators(batch["seed"][idx])
        # Each row draws its (items, D) block from its own generator: the exact draw of the reference.
        latents = torch.cat(
            [randn_tensor((s.stop - s.start, self.embedding_dim), generator=g, device=self.device, dtype=proj.dtype)
             for s, g in zip(spans, gens)]
        ) * scheduler.init_noise_sigma
        scales = [float(batch["prior_guidance_scale"][i]) for i in idx]

        for step, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            pred = self.prior(
                model_input, timestep=t, proj_embedding=proj, encoder_hidden_states=hidden, attention_mask=mask
            ).predicted_image_embedding
            pred_uncond, pred_text = pred.chunk(2) if cfg else (None, pred)
            prev_t = timesteps[step + 1] if step + 1 < len(timesteps) else None
            # Guidance and the scheduler step run per row, with the row's scalar scale and its own
            # generator: elementwise work, so identical to the reference at any batch size.
            rows = []
            for s, g, scale in zip(spans, gens, scales):
                p = pred_uncond[s] + scale * (pred_text[s] - pred_uncond[s]) if cfg else pred_text[s]
                rows.append(scheduler.step(p, timestep=t, sample=latents[s], generator=g, prev_timestep=prev_t).prev_sample)
            latents = torch.cat(rows)

        latents = self.prior.post_process_latents(latents).float().cpu()
        zero = self.zero_embed[0].float().cpu()
        embeds = torch.stack([latents[s.start] for s in spans])
        negative = torch.stack([latents[s.start + 1] if s.stop - s.start == 2 else zero for s in spans])
        return embeds.numpy(), negative.numpy()
