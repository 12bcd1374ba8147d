"""The per-row denoising loops the engine ran before issue 10, kept as the reference of the vectorised ones.

Copied from `DecoderStage._denoise` and `PriorStage.run_prior` at commit 283157c, with `self` made
a `stage` argument. Three changes, none of which changes a bit of the old behaviour:
- the decoder loop takes a scheduler class, and gives each row its own instance (multistep
  schedulers keep per-sample state; the old code shared one DDPMScheduler, which keeps none);
- inpainting blends with the initial latents (noise x init_noise_sigma, diffusers' `noise =
  torch.clone(latents)`) instead of the raw noise: DDPM's init_noise_sigma is 1.0, so for the
  schedulers the old code ran the two are the same numbers;
- the prior's unconditional texts can be encoded by another function (`encode_uncond`).
Guidance and `scheduler.step` run per row, with the row's Python-float scale and its own generator,
exactly as before. Not product code: tests only.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DDPMScheduler, UnCLIPScheduler
from diffusers.utils.torch_utils import randn_tensor

from kandinsky_engine.stages.decoder import STRENGTH_TASKS
from kandinsky_engine.inputs import unpack
from kandinsky_engine.rows import generators, working_size


def takes_generator(scheduler, generator) -> dict:
    """{"generator": g} for a scheduler whose step takes one (UniPCMultistepScheduler.step does not)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def per_row_denoise(stage, batch, idx, lh: int, lw: int, num_steps: int, cfg: bool, task: str, t_start: int,
                    scheduler_class=DDPMScheduler) -> np.ndarray:
    dtype = stage.unet.dtype
    embeds = torch.from_numpy(np.stack(batch["image_embeds"][idx])).to(stage.device, dtype)  # (n, D)
    if cfg:
        negative = torch.from_numpy(np.stack(batch["negative_image_embeds"][idx])).to(stage.device, dtype)
        embeds = torch.cat([negative, embeds])
    schedulers = [scheduler_class.from_config(stage.scheduler_config) for _ in idx]
    for scheduler in schedulers:
        scheduler.set_timesteps(num_steps, device=stage.device)
    scheduler = schedulers[0]
    channels = stage.channels
    gens = generators(batch["seed"][idx])
    noise = torch.cat(
        [randn_tensor((1, channels, lh, lw), generator=g, device=stage.device, dtype=dtype) for g in gens]
    )
    timesteps = scheduler.timesteps[t_start:]
    latents = noise * scheduler.init_noise_sigma
    initial = latents
    extra = None
    cond = {"image_embeds": embeds}
    if task in ("img2img", "inpaint", "controlnet_img2img"):
        init = np.stack([unpack(batch["init_latents"][i], (channels, lh, lw)) for i in idx])
        init = torch.from_numpy(init).to(stage.device, dtype)
    if task in ("controlnet", "controlnet_img2img"):
        size = (*working_size(int(batch["height"][idx[0]]), int(batch["width"][idx[0]]), stage.movq_scale_factor), 3)
        hint = np.stack([np.frombuffer(batch["hint_pixels"][i], np.uint8).reshape(size) for i in idx])
        hint = (torch.from_numpy(hint).float() / 255.0).permute(0, 3, 1, 2).to(stage.device, dtype)
        cond["hint"] = torch.cat([hint, hint]) if cfg else hint
    if task in STRENGTH_TASKS:
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(idx)))
    elif task == "inpaint":
        keep = torch.from_numpy(np.stack([unpack(batch["keep_mask"][i], (1, lh, lw)) for i in idx]))
        keep = keep.to(stage.device, dtype)
        extra = torch.cat([init * keep, keep], dim=1)
        extra = torch.cat([extra] * 2) if cfg else extra
    scales = [float(batch["guidance_scale"][i]) for i in idx]

    for step, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if cfg else latents
        if extra is not None:
            model_input = torch.cat([model_input, extra], dim=1)
        pred = stage.unet(
            sample=model_input, timestep=t, encoder_hidden_states=None,
            added_cond_kwargs=cond, return_dict=False,
        )[0]
        pred_noise, pred_variance = pred.split(channels, dim=1)
        rows = []
        for r, (g, scale) in enumerate(zip(gens, scales)):
            if cfg:
                uncond, text = pred_noise[r], pred_noise[r + len(gens)]
                eps = (uncond + scale * (text - uncond))[None]
                var = pred_variance[r + len(gens)][None]
            else:
                eps, var = pred_noise[r : r + 1], pred_variance[r : r + 1]
            model_output = torch.cat([eps, var], dim=1) if stage.learned_variance else eps
            row = schedulers[r].step(model_output, t, latents[r : r + 1], **takes_generator(schedulers[r], g))[0]
            if task == "inpaint":
                known = init[r : r + 1]
                if step < len(timesteps) - 1:
                    known = schedulers[r].add_noise(known, initial[r : r + 1], torch.tensor([timesteps[step + 1]]))
                row = keep[r : r + 1] * known + (1 - keep[r : r + 1]) * row
            rows.append(row)
        latents = torch.cat(rows)
    if task == "inpaint":
        latents = keep * init + (1 - keep) * latents
    return latents.float().cpu().numpy()


def per_row_prior(stage, texts, negatives, gens, scales, num_steps: int, cfg: bool, init=None, t_start: int = 0,
                  encode_uncond=None):
    """`encode_uncond`: how the unconditional texts are encoded; default the old way, all of them in
    one batch (`stage._encode`). The stage now takes "" from a batch-1 cache (`stage._encode_uncond`),
    which can differ by float rounding: pass that to compare the loops alone."""
    items, uncond, spans = [], [], []
    for text, neg in zip(texts, negatives):
        row_items = [text] + ([] if neg is None else [neg])
        spans.append(slice(len(items), len(items) + len(row_items)))
        items += row_items
        uncond += ["" if neg is None else neg] * len(row_items)
    proj, hidden, mask = stage._encode(items)
    if cfg:
        u_proj, u_hidden, u_mask = (encode_uncond or stage._encode)(uncond)
        proj, hidden, mask = torch.cat([u_proj, proj]), torch.cat([u_hidden, hidden]), torch.cat([u_mask, mask])

    scheduler = UnCLIPScheduler.from_config(stage.scheduler_config)
    scheduler.set_timesteps(num_steps, device=stage.device)
    timesteps = scheduler.timesteps[t_start:]
    noise = [randn_tensor((s.stop - s.start, stage.embedding_dim), generator=g, device=stage.device, dtype=proj.dtype)
             for s, g in zip(spans, gens)]
    if init is None:
        latents = torch.cat(noise) * scheduler.init_noise_sigma
    else:
        start = [e.to(stage.device, proj.dtype).expand(s.stop - s.start, -1) for e, s in zip(init, spans)]
        latents = scheduler.add_noise(torch.cat(start), torch.cat(noise), timesteps[:1].repeat(len(items)))

    for step, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if cfg else latents
        pred = stage.prior(
            model_input, timestep=t, proj_embedding=proj, encoder_hidden_states=hidden, attention_mask=mask
        ).predicted_image_embedding
        pred_uncond, pred_text = pred.chunk(2) if cfg else (None, pred)
        prev_t = timesteps[step + 1] if step + 1 < len(timesteps) else None
        rows = []
        for s, g, scale in zip(spans, gens, scales):
            p = pred_uncond[s] + scale * (pred_text[s] - pred_uncond[s]) if cfg else pred_text[s]
            rows.append(scheduler.step(p, timestep=t, sample=latents[s], generator=g, prev_timestep=prev_t).prev_sample)
        latents = torch.cat(rows)

    latents = stage.prior.post_process_latents(latents).float().cpu()
    zero = stage.zero_embed[0].float().cpu()
    return [(latents[s.start].numpy(), (latents[s.start + 1] if s.stop - s.start == 2 else zero).numpy())
            for s in spans]
