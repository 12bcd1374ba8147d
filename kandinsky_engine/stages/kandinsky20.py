"""Kandinsky20UNetStage: text conditioning (+ encoded input) -> final latents, with the original repository's
`generate_text2img`, `generate_img2img` and `generate_inpainting` (ai-forever/Kandinsky-2 at aeefc1c) and
its three samplers (kandinsky20_sampling.py), one row at a time exact, any batch of rows at once.

A row with seed s is the original's call at batch size 1 after `torch.manual_seed(s)` on the CPU: its draws
come from its own generator in the original's order and shapes (the original draws for its conditional and
unconditional halves, (2, C, h, w), and keeps the first): the input's posterior sample and q_sample's noise
(img2img) or the initial noise, then one draw per step where the sampler uses it.
"""

from __future__ import annotations

import numpy as np

from ..config import JobConfig
from ..device import stage_device
from ..inputs import unpack
from ..models import load_module, model_dir
from ..rows import failed, generators, group_rows, latent_size, mark_failed
from ..sampling import guide, row_scales
from .decoder import denoise_groups
from .kandinsky20_sampling import (check_steps, dynamic_threshold, img2img_start, linear_betas, make_sampler,
                                   q_sample_coefficients, q_sample_timestep)

REQUIRED = ("id", "task", "seed", "width", "height", "num_inference_steps", "guidance_scale", "strength",
            "prompt_embeds", "prompt_pooled", "negative_prompt_embeds", "negative_pooled")
CONTEXT_LENGTH = 154  # 77 XLM-R + 77 mT5 positions
INTERNAL = ("prompt_embeds", "prompt_pooled", "negative_prompt_embeds", "negative_pooled", "init_moments", "keep_mask")


def row_draws(gens, shapes, device):
    """For each shape (k, C, h, w), in order, every row's draw from its own generator, of which the row keeps
    the first (its half of the original's batch) -> (len(shapes), n, C, h, w) float32 on `device`, one copy."""
    import torch

    rows = [torch.stack([torch.randn(shape, generator=g)[0] for shape in shapes]) for g in gens]
    noise = torch.stack(rows, dim=1)
    return (noise.pin_memory() if device.type == "cuda" else noise).to(device, non_blocking=True)


class Kandinsky20UNetStage:
    """Adds `latents` (packed float32 (C, H/8, W/8), scaled as the VAE decode stage takes them); drops the
    conditioning columns. Rows sharing (size, steps, guidance on/off, task, start step) run as one group: one
    U-Net call per step, conditional half first as the original. The job's sampler is defaults.scheduler
    (ddpm = p_sampler, ddim, plms) with defaults.ddim_eta. Rows failed upstream pass through."""

    def __init__(self, config: JobConfig, sources: dict | None = None):
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        torch.set_num_threads(config.decoder.threads())
        model, source = config.model, model_dir(config, "decoder", sources)
        self.device = stage_device(model, config.decoder)
        self.unet = load_module(UNet2DConditionModel, model, source, "unet", self.device)
        schedule, vae = DDPMScheduler.load_config(source, subfolder="scheduler"), AutoencoderKL.load_config(source, subfolder="vae")
        self.betas = linear_betas(schedule["beta_start"], schedule["beta_end"], schedule["num_train_timesteps"])
        self.scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        self.channels, self.latent_scale = vae["latent_channels"], vae["scaling_factor"]
        self.sampler = config.defaults.scheduler
        self.eta = config.defaults.ddim_eta or 0.0
        self.context_dim = self.unet.config.cross_attention_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"Kandinsky20UNetStage: batch lacks columns {missing}")
        h, w, steps = batch["height"], batch["width"], batch["num_inference_steps"]
        start = {}  # row -> its sampler's start step (0: from noise); failed rows are absent
        for i in np.flatnonzero(~failed(batch)):
            try:
                check_steps(self.sampler, int(steps[i]))
                start[i] = (img2img_start(self.sampler, int(steps[i]), float(batch["strength"][i]))
                            if batch["task"][i] == "img2img" else 0)
            except ValueError as exc:
                mark_failed(batch, i, "Kandinsky20UNetStage", exc)
        key = lambda i: (*latent_size(int(h[i]), int(w[i]), self.scale_factor), int(steps[i]),  # noqa: E731
                         bool(batch["guidance_scale"][i] > 1), str(batch["task"][i]), start.get(i, -1))
        latents = denoise_groups(batch, group_rows(batch, key), lambda idx, *group: self._denoise(batch, idx, *group))
        out = {k: v for k, v in batch.items() if k not in INTERNAL}
        out["latents"] = latents
        return out

    def _conditioning(self, batch, idx, cfg: bool):
        """(context (B, 154, D), pooled (B, E)) on the device: the rows' prompts, then (cfg) their negatives."""
        import torch

        names = (("prompt_embeds", "prompt_pooled"),) + ((("negative_prompt_embeds", "negative_pooled"),) if cfg else ())
        e = self.unet.config.time_embedding_dim or 4 * self.unet.config.block_out_channels[0]
        context = [unpack(batch[c][i], (CONTEXT_LENGTH, self.context_dim)) for c, _ in names for i in idx]
        pooled = [unpack(batch[p][i], (e,)) for _, p in names for i in idx]
        to = lambda a: torch.from_numpy(np.stack(a)).to(self.device, self.unet.dtype)  # noqa: E731
        return to(context), to(pooled)

    def _denoise(self, batch, idx, lh: int, lw: int, num_steps: int, cfg: bool, task: str, start: int):
        """The final latents (n, C, h, w) of one group, float32, left on the device."""
        import torch

        n, c, dtype = len(idx), self.channels, self.unet.dtype
        sampler = make_sampler(self.sampler, self.betas, num_steps, start or None, self.eta)
        times = sampler.model_timesteps()
        context, pooled = self._conditioning(batch, idx, cfg)
        scales = row_scales([float(batch["guidance_scale"][i]) for i in idx], 4, self.device)  # (n, 1, 1, 1)
        one, two = (1, c, lh, lw), (2, c, lh, lw)
        image_task = task in ("img2img", "inpaint")
        shapes = [one] * image_task + [one if task == "img2img" else two] + [two] * (len(times) * sampler.noisy)
        noise = row_draws(generators(batch["seed"][idx]), shapes, self.device)  # (D, n, C, h, w)
        extra = denoise = None
        if image_task:  # the posterior's sample, scaled: encode(image).sample() * 0.0512
            moments = np.stack([unpack(batch["init_moments"][i], (2 * c, lh, lw)) for i in idx])
            mean, std = torch.from_numpy(moments).to(self.device).split(c, dim=1)
            init = (mean + std * noise[0]) * self.latent_scale  # (n, C, h, w)
        if task == "img2img":
            a, b = q_sample_coefficients(self.betas, q_sample_timestep(self.sampler, num_steps, start))
            x = a * init + b * noise[1]
        else:
            x = noise[int(image_task)]
        if task == "inpaint":
            keep = torch.from_numpy(np.stack([unpack(batch["keep_mask"][i], (1, lh, lw)) for i in idx])).to(self.device)
            extra = torch.cat([init * keep, keep], dim=1).to(dtype)  # (n, C + 1, h, w): the 9-channel U-Net's input
            extra = torch.cat([extra] * 2) if cfg else extra
            # the original's inpainting denoised_fn: threshold x0, then put the known region back
            denoise = lambda x0: dynamic_threshold(x0) * (1 - keep) + init * keep  # noqa: E731
        steps_noise = noise[1 + int(image_task):]

        def eps_fn(x, k):
            """(guided eps, variance values) at times[k], each (n, C, h, w) float32."""
            sample = (torch.cat([x, x]) if cfg else x).to(dtype)
            if extra is not None:
                sample = torch.cat([sample, extra], dim=1)
            t = torch.tensor(times[k], dtype=torch.float32, device=self.device)
            out = self.unet(sample, t, encoder_hidden_states=context, class_labels=pooled,
                            return_dict=False)[0].float()  # (B, 2C, h, w)
            eps, var = out[:, :c], out[:, c:]
            if cfg:  # guidance on the eps channels only; the variance is the conditional half's, as the original
                return guide(eps[n:], eps[:n], scales, torch.float32), var[:n]
            return eps, var

        return sampler.run(x, eps_fn, steps_noise, denoise)
