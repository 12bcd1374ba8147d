"""DecoderStage: image embeddings -> final latents, with `KandinskyV22Pipeline` semantics."""

from __future__ import annotations

import numpy as np

from ..compiled import Bucketed, buckets
from ..config import JobConfig
from ..device import stage_device
from ..inputs import pack, unpack
from ..models import load_asset, load_module, model_dir
from ..rows import check_columns, failed, group_rows, latent_size, mark_failed, strength_start, working_size
from ..sampling import Schedule, count_draws, guide, make_scheduler, row_scales
from ..transfer import NoisePrefetch, download, noise_spec, upload

REQUIRED = ("id", "task", "seed", "width", "height", "num_inference_steps", "guidance_scale", "strength",
            "image_embeds", "negative_image_embeds")
STRENGTH_TASKS = ("img2img", "controlnet_img2img")  # start from the noised init image


class GroupedUNet:
    """What the U-Net stages of the diffusers families share (DecoderStage, Decoder21Stage,
    Kandinsky3UNetStage): the U-Net call, compiled in buckets where model.compile is on; each group's
    noise, drawn ahead for the next chunk (prefetch); and the batch's groups denoised together. A stage
    sets unet, scheduler, scheduler_config, channels and noise, and defines groups(batch, mark),
    _example(n, defaults) and _denoise(batch, idx, *group)."""

    def _unet_runner(self, forward, name: str, config: JobConfig):
        """`forward`, or with model.compile its graphs per batch bucket, compiled and warmed up now."""
        if not config.model.compile:
            return forward
        step = 2 if config.defaults.guidance_scale > 1 else 1  # guidance doubles every U-Net call
        run = Bucketed(forward, buckets(step * config.decoder.batch_size, step), name, cache_dir=config.model.cache_dir)
        run.warm_up(lambda n: self._example(n, config.defaults))
        return run

    def noise_spec(self, batch, idx, lh: int, lw: int, num_steps: int, t_start: int):
        """What a group's noise is: each row's initial noise (img2img: the noise added to the input),
        then one draw per noisy step."""
        draws = count_draws(make_scheduler(self.scheduler, self.scheduler_config), num_steps, t_start)
        return noise_spec(batch["seed"][idx], (1, self.channels, lh, lw), draws, self.unet.dtype)

    def prefetch(self, batch) -> None:
        prefetch_noise(self, batch)

    def _denoise_all(self, batch: dict[str, np.ndarray], required, stage: str) -> np.ndarray:
        """The batch's packed latents: every group queued on the device before any is read back."""
        check_columns(batch, required, stage)
        return denoise_groups(batch, self.groups(batch), lambda idx, *group: self._denoise(batch, idx, *group))


class DecoderStage(GroupedUNet):
    """Adds `latents` (packed float32 (4, H/8, W/8) per row) to a batch; drops the embeddings (but
    `image_embeds` when output.columns asks for it).

    text2img rows start from noise; img2img rows from their `init_latents`, noised to the first
    of the timesteps that `strength` keeps; inpaint rows from noise, with their masked image and
    keep mask as extra U-Net channels and the known region blended back after every step. Rows
    that share (size, steps, guidance on/off, task, start step) run as one group: one U-Net call,
    one guidance and one scheduler step per step for all of them (see sampling.py). Rows failed
    upstream pass through. `prefetch(batch)` draws a batch's noise on a background thread ahead of
    its call (pipelines/chunked.py calls it for the next chunk; transfer.py).
    """

    def __init__(self, config: JobConfig, components: dict | None = None, sources: dict | None = None):
        """`components`: {unet, scheduler, movq} of `KandinskyV22Pipeline` (the MoVQ for its config
        only), ready on the stage's device, instead of loading config.model.decoder. `sources`: the
        model sources as the driver resolved them (models.model_dir; None: resolved here)."""
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

        torch.set_num_threads(config.decoder.threads())
        model = config.model
        self.device = stage_device(model, config.decoder)
        self.noise = NoisePrefetch(self.device)
        if components is None:
            folder = model_dir(config, "decoder", sources)
            self.unet = load_module(UNet2DConditionModel, model, folder, "unet", self.device)
            self.scheduler_config = load_asset(DDPMScheduler, folder, "scheduler").config
            movq_config = VQModel.load_config(folder, subfolder="movq")
        else:
            self.unet, self.scheduler_config = components["unet"], components["scheduler"].config
            movq_config = components["movq"].config
        self.scheduler = config.defaults.scheduler  # SCHEDULERS key; a fresh instance per group (sampling.Schedule)
        self.movq_scale_factor = 2 ** (len(movq_config["block_out_channels"]) - 1)
        self.channels = movq_config["latent_channels"]  # the U-Net may take more (9 for inpainting)
        self.learned_variance = self.scheduler_config.get("variance_type") in ("learned", "learned_range")
        self.hinted = self.unet.config.addition_embed_type == "image_hint"  # ControlNet: hint in added_cond_kwargs
        self.keep = {"image_embeds"} & set(config.output.columns)  # asked for as an output column: passed on
        if model.fp8:
            from ..fp8 import to_float8

            to_float8(self.unet, self.device)
        self.run_unet = self._unet_runner(unet_forward, "U-Net (2.2)", config)

    def _example(self, n: int, defaults):
        """U-Net inputs of n rows at the job's default size (compile warm-up)."""
        import torch

        lh, lw = latent_size(defaults.height, defaults.width, self.movq_scale_factor)
        dtype, hid, g = self.unet.dtype, self.unet.config.encoder_hid_dim, torch.Generator().manual_seed(0)
        sample = torch.randn(n, self.channels if self.hinted else self.unet.config.in_channels, lh, lw, generator=g)
        cond = {"image_embeds": torch.randn(n, hid, generator=g)}
        if self.hinted:
            cond["hint"] = torch.rand(n, 3, lh * self.movq_scale_factor, lw * self.movq_scale_factor, generator=g)
        cond = {k: v.to(self.device, dtype) for k, v in cond.items()}
        return sample.to(self.device, dtype), {"unet": self.unet, "timestep": torch.tensor(999, device=self.device),
                                               "cond": cond}

    def groups(self, batch, mark: bool = True) -> dict[tuple, np.ndarray]:
        """The batch's rows by (latent h, w, steps, guidance on/off, task, start step); failed rows
        have start -1. `mark`: mark rows whose strength leaves no step as failed (else skip them)."""
        h, w = batch["height"], batch["width"]
        steps, guidance = batch["num_inference_steps"], batch["guidance_scale"]
        start = {}  # row -> first timestep index (0 unless img2img); failed rows are absent
        for i in np.flatnonzero(~failed(batch)):
            try:
                start[i] = (strength_start(int(steps[i]), float(batch["strength"][i]))
                            if batch["task"][i] in STRENGTH_TASKS else 0)
            except ValueError as exc:
                if mark:
                    mark_failed(batch, i, "DecoderStage", exc)
        key = lambda i: (*latent_size(int(h[i]), int(w[i]), self.movq_scale_factor), int(steps[i]),
                         bool(guidance[i] > 1), str(batch["task"][i]), start.get(i, -1))
        return group_rows(batch, key)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        latents = self._denoise_all(batch, REQUIRED, "DecoderStage")
        internal = ("image_embeds", "negative_image_embeds", "init_latents", "keep_mask", "hint_pixels")
        out = {k: v for k, v in batch.items() if k not in internal or k in self.keep}
        out["latents"] = latents
        return out

    def _denoise(self, batch, idx, lh: int, lw: int, num_steps: int, cfg: bool, task: str, t_start: int):
        """The final latents (n, C, H/8, W/8) of one group, left on the device."""
        import torch

        dtype, n, channels = self.unet.dtype, len(idx), self.channels
        embeds = upload(np.stack(batch["image_embeds"][idx]), self.device, dtype)  # (n, D)
        if cfg:
            negative = upload(np.stack(batch["negative_image_embeds"][idx]), self.device, dtype)
            embeds = torch.cat([negative, embeds])  # (2n, D): unconditional half first, as diffusers
        schedule = Schedule(make_scheduler(self.scheduler, self.scheduler_config), num_steps, t_start, self.device)
        noisy = schedule.noise_steps()
        # Row r's draws, in the per-row loop's order: its initial noise, then one per noisy step;
        # drawn ahead on the prefetch thread when the chunk was announced.
        spec = self.noise_spec(batch, idx, lh, lw, num_steps, t_start)
        noise = self.noise.take(spec)  # (1 + K, n, C, H/8, W/8)
        latents = noise[0] * schedule.init_noise_sigma
        extra = None  # inpainting: (masked image latents, keep mask), fed to the U-Net beside the latents
        cond = {"image_embeds": embeds}
        if task in ("img2img", "inpaint", "controlnet_img2img"):
            init = np.stack([unpack(batch["init_latents"][i], (channels, lh, lw)) for i in idx])
            init = upload(init, self.device, dtype)  # (n, C, h, w)
        if task in ("controlnet", "controlnet_img2img"):
            size = (*working_size(int(batch["height"][idx[0]]), int(batch["width"][idx[0]]), self.movq_scale_factor), 3)
            hint = np.stack([np.frombuffer(batch["hint_pixels"][i], np.uint8).reshape(size) for i in idx])
            # diffusers' make_hint: uint8 (H, W, 3) -> float / 255 -> (3, H, W)
            hint = (upload(hint, self.device).float() / 255.0).permute(0, 3, 1, 2).to(dtype)
            cond["hint"] = torch.cat([hint, hint]) if cfg else hint
        if task in STRENGTH_TASKS:
            latents = schedule.add_noise(init, noise[0])
        elif task == "inpaint":
            keep = upload(np.stack([unpack(batch["keep_mask"][i], (1, lh, lw)) for i in idx]), self.device, dtype)
            # (n, 1, h, w): 1 = keep the source
            extra = torch.cat([init * keep, keep], dim=1)  # (n, C + 1, h, w): masked image, mask
            extra = torch.cat([extra] * 2) if cfg else extra
            # The known region is the source noised to the next timestep with the initial latents
            # (diffusers' `noise = torch.clone(latents)`), blended in after every step.
            initial, blend = latents, schedule.blend_coefficients(dtype)
        scales = row_scales([float(batch["guidance_scale"][i]) for i in idx], 4, self.device)  # (n, 1, 1, 1)

        draw = 1
        for k in range(len(schedule.timesteps)):
            model_input = torch.cat([latents] * 2) if cfg else latents
            if extra is not None:
                model_input = torch.cat([model_input, extra], dim=1)  # (.., 2C + 1, h, w)
            pred = self.run_unet(model_input, unet=self.unet, timestep=schedule.model_timesteps[k], cond=cond)
            pred_noise, pred_variance = pred.split(channels, dim=1)  # (2n or n, C, h, w) each
            if cfg:  # the text half's variance, as diffusers
                eps, var = guide(pred_noise[:n], pred_noise[n:], scales, dtype), pred_variance[n:]
            else:
                eps, var = pred_noise, pred_variance
            model_output = torch.cat([eps, var], dim=1) if self.learned_variance else eps
            latents = schedule.step(k, model_output, latents, noise[draw] if noisy[k] else None)
            draw += noisy[k]
            if task == "inpaint":
                # Each row blends with its own source and mask; diffusers blends every row with
                # image[:1] / mask_image[:1] (the first row's), which equals this at batch size 1.
                known = init if k == len(schedule.timesteps) - 1 else blend[k][0] * init + blend[k][1] * initial
                latents = keep * known + (1 - keep) * latents
        if task == "inpaint":
            latents = keep * init + (1 - keep) * latents
        self.noise.note("queued", spec)
        return latents


def denoise_groups(batch: dict[str, np.ndarray], groups: dict[tuple, np.ndarray], denoise) -> np.ndarray:
    """The packed latents column of a batch: each group of `groups` (keyed as the stages' `groups`,
    whose last item is the start step, -1 for failed rows, which get None) runs as one,
    `denoise(idx, *key)` -> (n, C, h, w).

    Every group is queued on the device before any result is read back, and the results come back
    in one synchronisation (transfer.download)."""
    import torch

    latents = np.full(len(batch["id"]), None, dtype=object)
    with torch.inference_mode():
        done = [(idx, denoise(idx, *group)) for group, idx in groups.items() if group[-1] >= 0]
        for (idx, _), group in zip(done, download([g.float() for _, g in done])):
            for i, lat in zip(idx, group):
                latents[i] = pack(lat)
    return latents


def prefetch_noise(stage, batch) -> None:
    """Submit the noise of every group of `batch` to `stage.noise` (None: forget what is pending).
    `stage` has `groups(batch, mark)` and `noise_spec(batch, idx, lh, lw, steps, start)`."""
    if batch is None or "seed" not in batch:
        stage.noise.clear()
        return
    for (lh, lw, steps, _, _, start), idx in stage.groups(batch, mark=False).items():
        if start >= 0:
            stage.noise.submit(stage.noise_spec(batch, idx, lh, lw, steps, start))


def unet_forward(x, unet, timestep, cond):
    """One U-Net call as the Kandinsky 2.2 decoders make it: (B, C, h, w) -> (B, 2C, h, w)."""
    return unet(sample=x, timestep=timestep, encoder_hidden_states=None, added_cond_kwargs=cond, return_dict=False)[0]
