"""DecoderStage: image embeddings -> final latents, with `KandinskyV22Pipeline` semantics."""

from __future__ import annotations

import numpy as np

from .config import JobConfig
from .models import load_asset, load_module, resolve_source
from .rows import generators, group_rows, latent_size

REQUIRED = ("id", "seed", "width", "height", "num_inference_steps", "guidance_scale", "image_embeds", "negative_image_embeds")


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """An object column of per-row arrays (Ray stores it as a variable-shaped tensor column)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


class DecoderStage:
    """Adds `latents` (float32, one (4, H/8, W/8) array per row) to a batch; drops the embeddings.

    Rows that share (size, steps, guidance on/off) run as one sub-batch through the U-Net.
    """

    def __init__(self, config: JobConfig):
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

        torch.set_num_threads(config.decoder.threads())
        model = config.model
        self.device = torch.device(model.device)
        self.unet = load_module(UNet2DConditionModel, model, "decoder", "unet")
        self.scheduler_config = load_asset(DDPMScheduler, model, "decoder", "scheduler").config
        movq_config = VQModel.load_config(resolve_source(model.decoder, "decoder", model.cache_dir), subfolder="movq")
        self.movq_scale_factor = 2 ** (len(movq_config["block_out_channels"]) - 1)
        self.learned_variance = self.scheduler_config.get("variance_type") in ("learned", "learned_range")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [c for c in REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"DecoderStage: batch lacks columns {missing}")
        h, w = batch["height"], batch["width"]
        steps, guidance = batch["num_inference_steps"], batch["guidance_scale"]
        key = lambda i: (*latent_size(int(h[i]), int(w[i]), self.movq_scale_factor), int(steps[i]), bool(guidance[i] > 1))
        latents: list = [None] * len(batch["id"])
        with torch.inference_mode():
            for (lh, lw, num_steps, cfg), idx in group_rows(batch, key).items():
                for i, lat in zip(idx, self._denoise(batch, idx, lh, lw, num_steps, cfg)):
                    latents[i] = lat
        out = {k: v for k, v in batch.items() if k not in ("image_embeds", "negative_image_embeds")}
        out["latents"] = ragged(latents)
        return out

    def _denoise(self, batch, idx, lh: int, lw: int, num_steps: int, cfg: bool) -> np.ndarray:
        import torch
        from diffusers import DDPMScheduler
        from diffusers.utils.torch_utils import randn_tensor

        dtype = self.unet.dtype
        embeds = torch.from_numpy(np.stack(batch["image_embeds"][idx])).to(self.device, dtype)  # (n, D)
        if cfg:
            negative = torch.from_numpy(np.stack(batch["negative_image_embeds"][idx])).to(self.device, dtype)
            embeds = torch.cat([negative, embeds])  # (2n, D): unconditional half first, as diffusers
        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_steps, device=self.device)
        channels = self.unet.config.in_channels
        gens = generators(batch["seed"][idx])
        latents = torch.cat(
            [randn_tensor((1, channels, lh, lw), generator=g, device=self.device, dtype=dtype) for g in gens]
        ) * scheduler.init_noise_sigma  # (n, C, H/8, W/8)
        scales = [float(batch["guidance_scale"][i]) for i in idx]

        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if cfg else latents
            pred = self.unet(
                sample=model_input, timestep=t, encoder_hidden_states=None,
                added_cond_kwargs={"image_embeds": embeds}, return_dict=False,
            )[0]  # (2n or n, 2C, H/8, W/8): noise and learned variance
            noise, variance = pred.split(channels, dim=1)
            rows = []
            for r, (g, scale) in enumerate(zip(gens, scales)):
                if cfg:
                    uncond, text = noise[r], noise[r + len(gens)]
                    eps = (uncond + scale * (text - uncond))[None]
                    var = variance[r + len(gens)][None]  # the text half's variance, as diffusers
                else:
                    eps, var = noise[r : r + 1], variance[r : r + 1]
                model_output = torch.cat([eps, var], dim=1) if self.learned_variance else eps
                rows.append(scheduler.step(model_output, t, latents[r : r + 1], generator=g)[0])
            latents = torch.cat(rows)
        return latents.float().cpu().numpy()
