"""DecoderStage: image embeddings -> final latents, with `KandinskyV22Pipeline` semantics."""

from __future__ import annotations

import numpy as np

from .config import JobConfig
from .inputs import pack, unpack
from .models import load_asset, load_module, resolve_source
from .rows import failed, generators, group_rows, latent_size, mark_failed, strength_start, working_size

REQUIRED = ("id", "task", "seed", "width", "height", "num_inference_steps", "guidance_scale", "strength",
            "image_embeds", "negative_image_embeds")
STRENGTH_TASKS = ("img2img", "controlnet_img2img")  # start from the noised init image


class DecoderStage:
    """Adds `latents` (packed float32 (4, H/8, W/8) per row) to a batch; drops the embeddings.

    text2img rows start from noise; img2img rows from their `init_latents`, noised to the first
    of the timesteps that `strength` keeps; inpaint rows from noise, with their masked image and
    keep mask as extra U-Net channels and the known region blended back after every step. Rows
    that share (size, steps, guidance on/off, task, start step) run as one sub-batch through the
    U-Net. Rows failed upstream pass through.
    """

    def __init__(self, config: JobConfig):
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

        torch.set_num_threads(config.decoder.threads())
        model, options = config.model, config.storage_options
        self.device = torch.device(model.device)
        self.unet = load_module(UNet2DConditionModel, model, "decoder", "unet", options)
        self.scheduler_config = load_asset(DDPMScheduler, model, "decoder", "scheduler", options).config
        movq_config = VQModel.load_config(resolve_source(model.decoder, "decoder", model.cache_dir, options),
                                          subfolder="movq")
        self.movq_scale_factor = 2 ** (len(movq_config["block_out_channels"]) - 1)
        self.channels = movq_config["latent_channels"]  # the U-Net may take more (9 for inpainting)
        self.learned_variance = self.scheduler_config.get("variance_type") in ("learned", "learned_range")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [c for c in REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"DecoderStage: batch lacks columns {missing}")
        h, w = batch["height"], batch["width"]
        steps, guidance = batch["num_inference_steps"], batch["guidance_scale"]
        start = {}  # row -> first timestep index (0 unless img2img); failed rows are absent
        for i in np.flatnonzero(~failed(batch)):
            try:
                start[i] = (strength_start(int(steps[i]), float(batch["strength"][i]))
                            if batch["task"][i] in STRENGTH_TASKS else 0)
            except ValueError as exc:
                mark_failed(batch, i, "DecoderStage", exc)
        key = lambda i: (*latent_size(int(h[i]), int(w[i]), self.movq_scale_factor), int(steps[i]),
                         bool(guidance[i] > 1), str(batch["task"][i]), start.get(i, -1))
        latents = np.full(len(batch["id"]), None, dtype=object)
        with torch.inference_mode():
            for (lh, lw, num_steps, cfg, task, t_start), idx in group_rows(batch, key).items():
                if t_start >= 0:
                    for i, lat in zip(idx, self._denoise(batch, idx, lh, lw, num_steps, cfg, task, t_start)):
                        latents[i] = pack(lat)
        internal = ("image_embeds", "negative_image_embeds", "init_latents", "keep_mask", "hint_pixels")
        out = {k: v for k, v in batch.items() if k not in internal}
        out["latents"] = latents
        return out

    def _denoise(self, batch, idx, lh: int, lw: int, num_steps: int, cfg: bool, task: str, t_start: int) -> np.ndarray:
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
        channels = self.channels
        gens = generators(batch["seed"][idx])
        noise = torch.cat(
            [randn_tensor((1, channels, lh, lw), generator=g, device=self.device, dtype=dtype) for g in gens]
        )  # (n, C, H/8, W/8): each row's first draw from its own generator
        timesteps = scheduler.timesteps[t_start:]
        latents = noise * scheduler.init_noise_sigma
        extra = None  # inpainting: per-row (image latents, keep mask), fed to the U-Net and blended in
        cond = {"image_embeds": embeds}
        if task in ("img2img", "inpaint", "controlnet_img2img"):
            init = np.stack([unpack(batch["init_latents"][i], (channels, lh, lw)) for i in idx])
            init = torch.from_numpy(init).to(self.device, dtype)  # (n, C, h, w)
        if task in ("controlnet", "controlnet_img2img"):
            size = (*working_size(int(batch["height"][idx[0]]), int(batch["width"][idx[0]]), self.movq_scale_factor), 3)
            hint = np.stack([np.frombuffer(batch["hint_pixels"][i], np.uint8).reshape(size) for i in idx])
            # diffusers' make_hint: uint8 (H, W, 3) -> float / 255 -> (3, H, W)
            hint = (torch.from_numpy(hint).float() / 255.0).permute(0, 3, 1, 2).to(self.device, dtype)
            cond["hint"] = torch.cat([hint, hint]) if cfg else hint
        if task in STRENGTH_TASKS:
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(idx)))
        elif task == "inpaint":
            keep = torch.from_numpy(np.stack([unpack(batch["keep_mask"][i], (1, lh, lw)) for i in idx]))
            keep = keep.to(self.device, dtype)  # (n, 1, h, w): 1 = keep the source
            extra = torch.cat([init * keep, keep], dim=1)  # (n, C + 1, h, w): masked image, mask
            extra = torch.cat([extra] * 2) if cfg else extra
        scales = [float(batch["guidance_scale"][i]) for i in idx]

        for step, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            if extra is not None:
                model_input = torch.cat([model_input, extra], dim=1)  # (.., 2C + 1, h, w)
            pred = self.unet(
                sample=model_input, timestep=t, encoder_hidden_states=None,
                added_cond_kwargs=cond, return_dict=False,
            )[0]  # (2n or n, 2C, H/8, W/8): noise and learned variance
            pred_noise, pred_variance = pred.split(channels, dim=1)
            rows = []
            for r, (g, scale) in enumerate(zip(gens, scales)):
                if cfg:
                    uncond, text = pred_noise[r], pred_noise[r + len(gens)]
                    eps = (uncond + scale * (text - uncond))[None]
                    var = pred_variance[r + len(gens)][None]  # the text half's variance, as diffusers
                else:
                    eps, var = pred_noise[r : r + 1], pred_variance[r : r + 1]
                model_output = torch.cat([eps, var], dim=1) if self.learned_variance else eps
                row = scheduler.step(model_output, t, latents[r : r + 1], generator=g)[0]
                if task == "inpaint":
                    # Keep the known region: the source latents, noised to the next timestep. diffusers
                    # blends every row with image[:1] / mask_image[:1] (the first row's); each row uses
                    # its own here, which is what the pipeline means and equals it at batch size 1.
                    known = init[r : r + 1]
                    if step < len(timesteps) - 1:
                        known = scheduler.add_noise(known, noise[r : r + 1], torch.tensor([timesteps[step + 1]]))
                    row = keep[r : r + 1] * known + (1 - keep[r : r + 1]) * row
                rows.append(row)
            latents = torch.cat(rows)
        if task == "inpaint":
            latents = keep * init + (1 - keep) * latents
        return latents.float().cpu().numpy()
