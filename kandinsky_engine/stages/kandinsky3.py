"""Kandinsky3UNetStage: T5 embeddings -> final latents, with `Kandinsky3Pipeline` and
`Kandinsky3Img2ImgPipeline` semantics (text2img from noise, img2img from the MoVQ-encoded image)."""

from __future__ import annotations

import numpy as np

from ..config import JobConfig
from ..device import stage_device
from ..inputs import pack, unpack
from ..models import load_asset, load_module
from ..rows import failed, generators, group_rows, latent_size, mark_failed, strength_start
from ..sampling import Schedule, draw_noise, make_scheduler, row_scales

REQUIRED = ("id", "task", "seed", "width", "height", "num_inference_steps", "guidance_scale", "strength",
            "prompt_embeds", "context_length", "prompt_tokens", "negative_prompt_embeds", "negative_prompt_tokens")
# Both pipelines hard-code the latent scale (`downscale_height_and_width(height, width, 8)`): the MoVQ's x8.
LATENT_SCALE = 8
INTERNAL = ("prompt_embeds", "context_length", "prompt_tokens", "negative_prompt_embeds", "negative_prompt_tokens",
            "init_latents", "keep_mask")


class Kandinsky3UNetStage:
    """Adds `latents` (packed float32 (4, H/8, W/8) per row); drops the text embeddings and init latents.

    Rows that share (size, steps, guidance on/off, task, start step, context length L) run as one group:
    one U-Net call, one guidance and one scheduler step per step for all of them. L is part of the key
    because the U-Net's attention pooling averages the context over all L positions, masked or not:
    diffusers cuts a batch to its longest prompt, so there a short prompt's image changes with a long
    batch-mate; here each row is denoised with its own L, i.e. as its own one-prompt diffusers call.
    """

    def __init__(self, config: JobConfig):
        import torch
        from diffusers import DDPMScheduler, Kandinsky3UNet

        torch.set_num_threads(config.decoder.threads())
        model, options = config.model, config.storage_options
        self.device = stage_device(model, config.decoder)
        self.unet = load_module(Kandinsky3UNet, model, "decoder", "unet", options, self.device)
        self.scheduler_config = load_asset(DDPMScheduler, model, "decoder", "scheduler", options).config
        self.scheduler = config.defaults.scheduler  # SCHEDULERS key; a fresh instance per group
        self.channels = self.unet.config.in_channels  # 4: the MoVQ's latent channels
        self.text_dim = self.unet.config.encoder_hid_dim  # T5's d_model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [c for c in REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"Kandinsky3UNetStage: batch lacks columns {missing}")
        h, w, steps = batch["height"], batch["width"], batch["num_inference_steps"]
        start = {}  # row -> first timestep index (0 unless img2img); failed rows are absent
        for i in np.flatnonzero(~failed(batch)):
            try:
                img2img = batch["task"][i] == "img2img"
                start[i] = strength_start(int(steps[i]), float(batch["strength"][i])) if img2img else 0
            except ValueError as exc:
                mark_failed(batch, i, "Kandinsky3UNetStage", exc)
        key = lambda i: (*latent_size(int(h[i]), int(w[i]), LATENT_SCALE), int(steps[i]),  # noqa: E731
                         bool(batch["guidance_scale"][i] > 1), str(batch["task"][i]), start.get(i, -1),
                         int(batch["context_length"][i]))
        latents = np.full(len(batch["id"]), None, dtype=object)
        with torch.inference_mode():
            # Every group is queued on the device before any result is read back (as DecoderStage).
            done = [(idx, self._denoise(batch, idx, *group)) for group, idx in group_rows(batch, key).items()
                    if group[5] >= 0]  # failed rows have start -1
            for idx, group in done:
                for i, lat in zip(idx, group.float().cpu().numpy()):
                    latents[i] = pack(lat)
        out = {k: v for k, v in batch.items() if k not in INTERNAL}
        out["latents"] = latents
        return out

    def _context(self, batch, idx, length: int, negative: bool):
        """((n, L, D) embeddings, (n, L) bool mask) of the rows' prompts (or negative prompts: zeros
        and an all-false mask where a row has none, as diffusers for `negative_prompt=None`)."""
        import torch

        name = "negative_prompt" if negative else "prompt"
        embeds = np.zeros((len(idx), length, self.text_dim), np.float32)
        for r, i in enumerate(idx):
            if batch[f"{name}_tokens"][i] > 0:
                embeds[r] = unpack(batch[f"{name}_embeds"][i], (length, self.text_dim))
        tokens = torch.tensor([int(batch[f"{name}_tokens"][i]) for i in idx])
        mask = torch.arange(length)[None, :] < tokens[:, None]  # right padding: ones, then zeros
        return torch.from_numpy(embeds).to(self.device, self.unet.dtype), mask.to(self.device)

    def _denoise(self, batch, idx, lh: int, lw: int, num_steps: int, cfg: bool, task: str, t_start: int, length: int):
        """The final latents (n, 4, H/8, W/8) of one group, left on the device."""
        import torch

        dtype, n = self.unet.dtype, len(idx)
        context, mask = self._context(batch, idx, length, negative=False)
        if cfg:  # unconditional half first, as diffusers
            uncond, uncond_mask = self._context(batch, idx, length, negative=True)
            context, mask = torch.cat([uncond, context]), torch.cat([uncond_mask, mask])
        schedule = Schedule(make_scheduler(self.scheduler, self.scheduler_config), num_steps, t_start, self.device)
        noisy = schedule.noise_steps()
        # Row r's draws, in the one-row pipeline's order: its initial noise, then one per noisy step.
        noise = draw_noise(generators(batch["seed"][idx]), [(1, self.channels, lh, lw)] * n, 1 + sum(noisy), dtype,
                           self.device)  # (1 + K, n, 4, H/8, W/8)
        if task == "img2img":
            init = np.stack([unpack(batch["init_latents"][i], (self.channels, lh, lw)) for i in idx])
            latents = schedule.add_noise(torch.from_numpy(init).to(self.device, dtype), noise[0])
        else:
            latents = noise[0] * schedule.init_noise_sigma
        guidance = [float(batch["guidance_scale"][i]) for i in idx]
        text_scales = row_scales([g + 1.0 for g in guidance], 4, self.device)  # (n, 1, 1, 1)
        uncond_scales = row_scales(guidance, 4, self.device)
        draw = 1
        for k in range(len(schedule.timesteps)):
            model_input = torch.cat([latents] * 2) if cfg else latents
            pred = self.unet(model_input, schedule.model_timesteps[k], encoder_hidden_states=context,
                             encoder_attention_mask=mask, return_dict=False)[0]  # (2n or n, 4, h, w)
            if cfg:
                # Kandinsky 3's guidance: (g + 1) * text - g * uncond (not uncond + g * (text - uncond)).
                # Each product is rounded to the model dtype, as a Python-float scale rounds it.
                eps = (text_scales * pred[n:]).to(dtype) - (uncond_scales * pred[:n]).to(dtype)
            else:
                eps = pred
            latents = schedule.step(k, eps, latents, noise[draw] if noisy[k] else None)
            draw += noisy[k]
        return latents
