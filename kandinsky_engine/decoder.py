"""DecoderStage: image embeddings -> final latents, with `KandinskyV22Pipeline` semantics."""

from __future__ import annotations

import numpy as np

from .config import JobConfig
from .inputs import pack, unpack
from .models import load_asset, load_module, resolve_source
from .rows import failed, generators, group_rows, latent_size, mark_failed

REQUIRED = ("id", "task", "seed", "width", "height", "num_inference_steps", "guidance_scale", "strength",
            "image_embeds", "negative_image_embeds")


def img2img_start(num_steps: int, strength: float) -> int:
    """Index of the first timestep img2img runs: diffusers' `get_timesteps`."""
    init_steps = min(int(num_steps * strength), num_steps)
    if init_steps < 1:
        raise ValueError(f"strength {strength} x num_inference_steps {num_steps} leaves no step to run")
    return num_steps - init_steps


class DecoderStage:
    """Adds `latents` (packed float32 (4, H/8, W/8) per row) to a batch; drops the embeddings.

    text2img rows start from noise; img2img rows from their `init_latents`, noised to the first
    of the timesteps that `strength` keeps. Rows that share (size, steps, guidance on/off, start
    step) run as one sub-batch through the U-Net. Rows failed upstream pass through.
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
        start = {}
        for i in np.flatnonzero(~failed(batch)):
            try:
                start[i] = img2img_start(int(steps[i]), float(batch["strength"][i])) if batch["task"][i] == "img2img" else None
            except ValueError as exc:
                mark_failed(batch, i, "DecoderStage", exc)
        key = lambda i: (*latent_size(int(h[i]), int(w[i]), self.movq_scale_factor), int(steps[i]),
                         bool(guidance[i] > 1), start.get(i, -1))
        latents = np.full(len(batch["id"]), None, dtype=object)
        with torch.inference_mode():
            for (lh, lw, num_steps, cfg, t_start), idx in group_rows(batch, key).items():
                idx = [i for i in idx if i in start]
                if idx:
                    for i, lat in zip(idx, self._denoise(batch, idx, lh, lw, num_steps, cfg, start[idx[0]])):
                        latents[i] = pack(lat)
        out = {k: v for k, v in batch.items() if k not in ("image_embeds", "negative_image_embeds", "init_latents")}
        out["latents"] = latents
        return out

    def _denoise(self, batch, idx, lh: int, lw: int, num_steps: int, cfg: bool, t_start: int | None) -> np.ndarray:
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
        noise = torch.cat(
            [randn_tensor((1, channels, lh, lw), generator=g, device=self.device, dtype=dtype) for g in gens]
        )  # (n, C, H/8, W/8): each row's first draw from its own generator
        timesteps = scheduler.timesteps
        if t_start is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            timesteps = timesteps[t_start:]
            init = torch.from_numpy(np.stack([unpack(batch["init_latents"][i], (channels, lh, lw)) for i in idx]))
            latents = scheduler.add_noise(init.to(self.device, dtype), noise, timesteps[:1].repeat(len(idx)))
        scales = [float(batch["guidance_scale"][i]) for i in idx]

        for t in timesteps:
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
