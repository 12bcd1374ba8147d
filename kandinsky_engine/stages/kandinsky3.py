"""Kandinsky3UNetStage: T5 embeddings -> final latents, with `Kandinsky3Pipeline` and
`Kandinsky3Img2ImgPipeline` semantics (text2img from noise, img2img from the MoVQ-encoded image)."""

from __future__ import annotations

import numpy as np

from ..config import JobConfig
from ..device import stage_device
from ..inputs import unpack
from ..models import load_asset, load_module, model_dir
from ..rows import failed, group_rows, latent_size, mark_failed, strength_start
from ..sampling import Schedule, make_scheduler, row_scales
from ..transfer import NoisePrefetch, upload
from .decoder import GroupedUNet
from .text_encoder import MAX_LENGTH

REQUIRED = ("id", "task", "seed", "width", "height", "num_inference_steps", "guidance_scale", "strength",
            "prompt_embeds", "context_length", "prompt_tokens", "negative_prompt_embeds", "negative_prompt_tokens")
# Both pipelines hard-code the latent scale (`downscale_height_and_width(height, width, 8)`): the MoVQ's x8.
LATENT_SCALE = 8
INTERNAL = ("prompt_embeds", "context_length", "prompt_tokens", "negative_prompt_embeds", "negative_prompt_tokens",
            "init_latents", "keep_mask")


class Kandinsky3UNetStage(GroupedUNet):
    """Adds `latents` (packed float32 (4, H/8, W/8) per row); drops the text embeddings and init latents.

    Rows that share (size, steps, guidance on/off, task, start step) run as one group: one U-Net call,
    one guidance and one scheduler step per step for all of them, whatever their prompt lengths. Each
    row's context (its own L = tokens + 1 positions, see T5EncoderStage) is zero-padded to the group's
    longest L, and the padding is made exactly neutral, so each row is still its own one-prompt
    diffusers call (where diffusers' batched call is not: it cuts a batch to its longest prompt, and
    the U-Net's attention pooling averages the context over all those positions, masked or not):
    - cross-attention: the U-Net turns the mask m into an additive `(1 - m) * -10000`. Within a row's
      L, m is 1 (tokens) or 0 (the last position, -10000), as in the one-prompt call; beyond it m is
      -inf, i.e. an additive -inf, so the padding gets a softmax weight of exactly 0. (-10000 would not
      do: a row whose mask is all zeros, a null negative prompt, attends uniformly to all positions.)
    - attention pooling: its query is the mean over each row's own first L positions (see `_pool`).

    With model.compile the U-Net is compiled per batch bucket, and every group's context is padded
    to T5's 128 tokens (the same neutral padding), so that one graph serves every prompt length; the
    pooling then finds each row's positions from the mask (`_pool_masked`, a tensor computation
    instead of a Python list the graph would be specialised to).
    """

    def __init__(self, config: JobConfig, sources: dict | None = None):
        import torch
        from diffusers import DDPMScheduler, Kandinsky3UNet

        torch.set_num_threads(config.decoder.threads())
        model, folder = config.model, model_dir(config, "decoder", sources)
        self.device = stage_device(model, config.decoder)
        self.noise = NoisePrefetch(self.device)  # the next chunk's noise, drawn ahead (transfer.py)
        self.unet = load_module(Kandinsky3UNet, model, folder, "unet", self.device)
        self.scheduler_config = load_asset(DDPMScheduler, folder, "scheduler").config
        self.scheduler = config.defaults.scheduler  # SCHEDULERS key; a fresh instance per group
        self.channels = self.unet.config.in_channels  # 4: the MoVQ's latent channels
        self.text_dim = self.unet.config.encoder_hid_dim  # T5's d_model
        # diffusers' Kandinsky3AttentionPooling takes `context.mean(dim=1)` over all positions as its
        # query. This stage loaded the U-Net and is its only user, so it replaces that one module's
        # forward (an instance attribute, not the class) with `_pool`, which averages each row over its
        # own length; `_lengths` holds the current group's lengths (2n or n,), set before its U-Net calls.
        self._lengths: list[int] = []
        self.unet.add_time_condition.forward = self._pool_masked if model.compile else self._pool
        if model.fp8:
            from ..fp8 import to_float8

            to_float8(self.unet, self.device)
        self.pad_to = MAX_LENGTH if model.compile else None  # compiled: one context length, one graph per bucket
        self.run_unet = self._unet_runner(unet3_forward, "U-Net (3)", config)

    def _example(self, n: int, defaults):
        """U-Net inputs of n rows at the job's default size, contexts of MAX_LENGTH (compile warm-up)."""
        import torch

        lh, lw = latent_size(defaults.height, defaults.width, LATENT_SCALE)
        g = torch.Generator().manual_seed(0)
        mask = torch.full((n, MAX_LENGTH), -torch.inf)
        mask[:, :8] = 1.0
        return (torch.randn(n, self.channels, lh, lw, generator=g).to(self.device, self.unet.dtype),
                {"unet": self.unet, "timestep": torch.tensor(999, device=self.device),
                 "context": torch.randn(n, MAX_LENGTH, self.text_dim, generator=g).to(self.device, self.unet.dtype),
                 "mask": mask.to(self.device)})

    def groups(self, batch, mark: bool = True) -> dict[tuple, np.ndarray]:
        """The batch's rows by (latent h, w, steps, guidance on/off, task, start step); failed rows
        have start -1. `mark`: mark rows whose strength leaves no step as failed (else skip them)."""
        h, w, steps = batch["height"], batch["width"], batch["num_inference_steps"]
        start = {}  # row -> first timestep index (0 unless img2img); failed rows are absent
        for i in np.flatnonzero(~failed(batch)):
            try:
                img2img = batch["task"][i] == "img2img"
                start[i] = strength_start(int(steps[i]), float(batch["strength"][i])) if img2img else 0
            except ValueError as exc:
                if mark:
                    mark_failed(batch, i, "Kandinsky3UNetStage", exc)
        key = lambda i: (*latent_size(int(h[i]), int(w[i]), LATENT_SCALE), int(steps[i]),  # noqa: E731
                         bool(batch["guidance_scale"][i] > 1), str(batch["task"][i]), start.get(i, -1))
        return group_rows(batch, key)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        latents = self._denoise_all(batch, REQUIRED, "Kandinsky3UNetStage")
        out = {k: v for k, v in batch.items() if k not in INTERNAL}
        out["latents"] = latents
        return out

    def _pool(self, x, context, context_mask):
        """Kandinsky3AttentionPooling's forward with each row's query the mean of its own first L
        positions, as in its one-prompt call: x (B, T) time embedding, context (B, L_max, C) projected
        text, context_mask (B, 1, L_max) additive -> x + attention((B, 1, C) query, context) (B, T)."""
        import torch

        pooling = self.unet.add_time_condition
        if len(self._lengths) != len(context):
            raise ValueError(f"Kandinsky3UNetStage: {len(self._lengths)} row lengths for {len(context)} rows")
        # Each row's slice is averaged as the one-prompt call averages its whole (1, L, C) context.
        query = torch.cat([context[r : r + 1, :length].mean(dim=1, keepdim=True)
                           for r, length in enumerate(self._lengths)])  # (B, 1, C)
        return x + pooling.attention(query, context, context_mask.to(context.dtype)).squeeze(1)

    def _pool_masked(self, x, context, context_mask):
        """`_pool` for the compiled U-Net: each row's own positions are those whose additive mask is
        finite (its tokens and its last position; the padding is -inf), so its query is the mean over
        them, computed as a masked sum over the count (equal to `_pool`'s mean up to float rounding)."""
        import torch

        pooling = self.unet.add_time_condition
        own = torch.isfinite(context_mask).transpose(1, 2).to(context.dtype)  # (B, L_max, 1)
        query = (context * own).sum(dim=1, keepdim=True) / own.sum(dim=1, keepdim=True)  # (B, 1, C)
        return x + pooling.attention(query, context, context_mask.to(context.dtype)).squeeze(1)

    def _context(self, batch, idx, length: int, negative: bool):
        """((n, L_max, D) embeddings, (n, L_max) float mask) of the rows' prompts (or negative prompts:
        zeros and a mask of zeros where a row has none, as diffusers for `negative_prompt=None`).
        Row r fills its own L_r positions (mask 1 for its tokens, then 0); beyond, zeros and mask -inf."""
        name = "negative_prompt" if negative else "prompt"
        lengths = [int(batch["context_length"][i]) for i in idx]
        embeds = np.zeros((len(idx), length, self.text_dim), np.float32)
        mask = np.full((len(idx), length), -np.inf, np.float32)  # -inf: the U-Net makes it an additive -inf
        for r, (i, own) in enumerate(zip(idx, lengths)):
            if batch[f"{name}_tokens"][i] > 0:
                embeds[r, :own] = unpack(batch[f"{name}_embeds"][i], (own, self.text_dim))
            mask[r, :own] = np.arange(own) < batch[f"{name}_tokens"][i]  # right padding: ones, then zeros
        return upload(embeds, self.device, self.unet.dtype), upload(mask, self.device)

    def _denoise(self, batch, idx, lh: int, lw: int, num_steps: int, cfg: bool, task: str, t_start: int):
        """The final latents (n, 4, H/8, W/8) of one group, left on the device."""
        import torch

        dtype, n = self.unet.dtype, len(idx)
        lengths = [int(batch["context_length"][i]) for i in idx]
        length = self.pad_to or max(lengths)  # compiled: every group padded to one length
        context, mask = self._context(batch, idx, length, negative=False)
        self._lengths = lengths
        if cfg:  # unconditional half first, as diffusers; the negative has the prompt's L
            uncond, uncond_mask = self._context(batch, idx, length, negative=True)
            context, mask = torch.cat([uncond, context]), torch.cat([uncond_mask, mask])
            self._lengths = lengths * 2
        schedule = Schedule(make_scheduler(self.scheduler, self.scheduler_config), num_steps, t_start, self.device)
        noisy = schedule.noise_steps()
        # Row r's draws, in the one-row pipeline's order: its initial noise, then one per noisy step;
        # drawn ahead when the chunk was announced.
        spec = self.noise_spec(batch, idx, lh, lw, num_steps, t_start)
        noise = self.noise.take(spec)  # (1 + K, n, 4, H/8, W/8)
        if task == "img2img":
            init = np.stack([unpack(batch["init_latents"][i], (self.channels, lh, lw)) for i in idx])
            latents = schedule.add_noise(upload(init, self.device, dtype), noise[0])
        else:
            latents = noise[0] * schedule.init_noise_sigma
        guidance = [float(batch["guidance_scale"][i]) for i in idx]
        text_scales = row_scales([g + 1.0 for g in guidance], 4, self.device)  # (n, 1, 1, 1)
        uncond_scales = row_scales(guidance, 4, self.device)
        draw = 1
        for k in range(len(schedule.timesteps)):
            model_input = torch.cat([latents] * 2) if cfg else latents
            pred = self.run_unet(model_input, unet=self.unet, timestep=schedule.model_timesteps[k], context=context,
                                 mask=mask)  # (2n or n, 4, h, w)
            if cfg:
                # Kandinsky 3's guidance: (g + 1) * text - g * uncond (not uncond + g * (text - uncond)).
                # Each product is rounded to the model dtype, as a Python-float scale rounds it.
                eps = (text_scales * pred[n:]).to(dtype) - (uncond_scales * pred[:n]).to(dtype)
            else:
                eps = pred
            latents = schedule.step(k, eps, latents, noise[draw] if noisy[k] else None)
            draw += noisy[k]
        self.noise.note("queued", spec)
        return latents


def unet3_forward(x, unet, timestep, context, mask):
    """One Kandinsky 3 U-Net call: (B, 4, h, w), context (B, L, D), mask (B, L) -> (B, 4, h, w)."""
    return unet(x, timestep, encoder_hidden_states=context, encoder_attention_mask=mask, return_dict=False)[0]
