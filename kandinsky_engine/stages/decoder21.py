"""Decoder21Stage: prompts + image embeddings -> final latents, with the semantics of Kandinsky 2.1's
`KandinskyPipeline`, `KandinskyImg2ImgPipeline` and `KandinskyInpaintPipeline`.

Unlike 2.2, the 2.1 U-Net is conditioned on the text too: the prompt, tokenized to 77 tokens by the
XLM-R tokenizer, goes through `MultilingualCLIP`, whose pooled output joins the image embedding in
`added_cond_kwargs` and whose hidden states are the cross-attention input (no attention mask is
passed to the U-Net, as diffusers does not). The text encoder lives in this stage, so the (77, H)
hidden states never travel between actors.
"""

from __future__ import annotations

import numpy as np

from ..config import JobConfig
from ..device import stage_device
from ..inputs import unpack
from ..models import load_asset, load_module, model_dir
from ..rows import failed, group_rows, is_null, latent_size, mark_failed, strength_start
from ..sampling import Schedule, guide, make_scheduler, row_scales
from ..transfer import NoisePrefetch, upload
from .decoder import GroupedUNet

REQUIRED = ("id", "task", "prompt", "negative_prompt", "seed", "width", "height", "num_inference_steps",
            "guidance_scale", "strength", "image_embeds", "negative_image_embeds")
MAX_LENGTH = 77  # the pipelines' `max_length=77`, whatever the tokenizer's model_max_length


def img2img_alphas_cumprod():
    """The schedule 2.1's img2img noises its input with, whatever the sampler: linear betas
    1e-4..0.02 over 1000 steps (`KandinskyImg2ImgPipeline.add_noise`, from the original repo)."""
    import torch

    return torch.cumprod(1.0 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float32), dim=0)  # (1000,)


class Decoder21Stage(GroupedUNet):
    """Adds `latents` (packed float32 (4, H/8, W/8) per row) to a batch; drops the embeddings.

    text2img and mix rows start from noise; img2img rows from their `init_latents` noised to the
    fixed timestep int(1000 * strength) - 2 with 2.1's own schedule, then denoised over the timesteps
    `strength` keeps; inpaint rows from noise, with [masked image latents, keep mask] as extra U-Net
    channels and no blending (2.1 has none, unlike 2.2). The unconditional text is the row's negative
    prompt, "" without one (encoded once per actor). Rows sharing (size, steps, guidance on/off, task,
    start step) run as one group, each with its own generator (sampling.py). Rows failed upstream
    pass through.
    """

    def __init__(self, config: JobConfig, sources: dict | None = None):
        import torch
        from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel
        from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP
        from transformers import XLMRobertaTokenizer

        torch.set_num_threads(config.decoder.threads())
        model, folder = config.model, model_dir(config, "decoder", sources)
        self.device = stage_device(model, config.decoder)
        self.noise = NoisePrefetch(self.device)  # the next chunk's noise, drawn ahead (transfer.py)
        load = lambda cls, subfolder: load_module(cls, model, folder, subfolder, self.device)
        self.unet = load(UNet2DConditionModel, "unet")
        self.text_encoder = load(MultilingualCLIP, "text_encoder")
        self.tokenizer = load_asset(XLMRobertaTokenizer, folder, "tokenizer")
        self.scheduler_config = load_asset(DDIMScheduler, folder, "scheduler").config
        movq = VQModel.load_config(folder, subfolder="movq")
        self.scheduler = config.defaults.scheduler  # SCHEDULERS key; a fresh instance per group
        self.movq_scale_factor = 2 ** (len(movq["block_out_channels"]) - 1)
        self.channels = movq["latent_channels"]  # the inpainting U-Net takes 2C + 1
        self.learned_variance = self.scheduler_config.get("variance_type") in ("learned", "learned_range")
        self.noise_table = img2img_alphas_cumprod()
        with torch.inference_mode():
            self.empty_prompt = self._encode([""])  # ((1, D), (1, 77, H)): the negative of most rows
        if model.fp8:
            from ..fp8 import to_float8

            to_float8(self.unet, self.device)
        self.run_unet = self._unet_runner(unet21_forward, "U-Net (2.1)", config)

    def _example(self, n: int, defaults):
        """U-Net inputs of n rows at the job's default size (compile warm-up)."""
        import torch

        lh, lw = latent_size(defaults.height, defaults.width, self.movq_scale_factor)
        cfg, g = self.unet.config, torch.Generator().manual_seed(0)
        sample = torch.randn(n, cfg.in_channels, lh, lw, generator=g)
        hidden = torch.randn(n, MAX_LENGTH, cfg.encoder_hid_dim, generator=g)
        cond = {"text_embeds": torch.randn(n, cfg.cross_attention_dim, generator=g),
                "image_embeds": torch.randn(n, cfg.cross_attention_dim, generator=g)}
        to = lambda t: t.to(self.device, self.unet.dtype)  # noqa: E731
        return to(sample), {"unet": self.unet, "timestep": torch.tensor(999, device=self.device), "hidden": to(hidden),
                            "cond": {k: to(v) for k, v in cond.items()}}

    def _encode(self, texts: list[str]):
        """-> pooled (n, D) and hidden states (n, 77, H), as the pipelines' `_encode_prompt`."""
        tokens = self.tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        return self.text_encoder(input_ids=tokens.input_ids.to(self.device),
                                 attention_mask=tokens.attention_mask.to(self.device))

    def _encode_negatives(self, texts: list[str]):
        """Unconditional inputs: "" from the actor's cache, the other negative prompts encoded together."""
        import torch

        others = [t for t in texts if t != ""]
        encoded = self._encode(others) if others else None
        parts, j = [], 0
        for text in texts:
            parts.append(self.empty_prompt if text == "" else tuple(x[j : j + 1] for x in encoded))
            j += text != ""
        return tuple(torch.cat(column) for column in zip(*parts))

    def groups(self, batch, mark: bool = True) -> dict[tuple, np.ndarray]:
        """The batch's rows by (latent h, w, steps, guidance on/off, task, start step); failed rows
        have start -1. `mark`: mark rows whose strength leaves no step as failed (else skip them)."""
        h, w = batch["height"], batch["width"]
        steps, guidance = batch["num_inference_steps"], batch["guidance_scale"]
        start = {}  # row -> first timestep index (0 unless img2img); failed rows are absent
        for i in np.flatnonzero(~failed(batch)):
            try:
                start[i] = self._start(batch, i)
            except ValueError as exc:
                if mark:
                    mark_failed(batch, i, "Decoder21Stage", exc)
        key = lambda i: (*latent_size(int(h[i]), int(w[i]), self.movq_scale_factor), int(steps[i]),
                         bool(guidance[i] > 1), str(batch["task"][i]), start.get(i, -1))
        return group_rows(batch, key)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        latents = self._denoise_all(batch, REQUIRED, "Decoder21Stage")
        internal = ("image_embeds", "negative_image_embeds", "init_latents", "keep_mask")
        out = {k: v for k, v in batch.items() if k not in internal}
        out["latents"] = latents
        return out

    def _start(self, batch, i: int) -> int:
        if batch["task"][i] != "img2img":
            return 0
        strength = float(batch["strength"][i])
        if int(self.scheduler_config["num_train_timesteps"] * strength) - 2 < 0:
            raise ValueError(f"strength {strength}: img2img noises to timestep int(1000 x strength) - 2, "
                             "which must be >= 0")
        return strength_start(int(batch["num_inference_steps"][i]), strength)

    def _conditioning(self, batch, idx, cfg: bool):
        """U-Net conditioning of a group: hidden states (B, 77, H) and {text_embeds, image_embeds} (B, D),
        B = 2n with guidance (unconditional half first, as diffusers), else n."""
        import torch

        dtype = self.unet.dtype
        text, hidden = self._encode([str(batch["prompt"][i]) for i in idx])
        image = upload(np.stack(batch["image_embeds"][idx]), self.device)  # (n, D)
        if cfg:
            negatives = ["" if is_null(batch["negative_prompt"][i]) else str(batch["negative_prompt"][i]) for i in idx]
            u_text, u_hidden = self._encode_negatives(negatives)
            u_image = upload(np.stack(batch["negative_image_embeds"][idx]), self.device)
            text, hidden, image = torch.cat([u_text, text]), torch.cat([u_hidden, hidden]), torch.cat([u_image, image])
        return hidden.to(dtype), {"text_embeds": text.to(dtype), "image_embeds": image.to(dtype)}

    def _denoise(self, batch, idx, lh: int, lw: int, num_steps: int, cfg: bool, task: str, t_start: int):
        """The final latents (n, C, H/8, W/8) of one group, left on the device."""
        import torch

        dtype, n, channels = self.unet.dtype, len(idx), self.channels
        hidden, cond = self._conditioning(batch, idx, cfg)
        schedule = Schedule(make_scheduler(self.scheduler, self.scheduler_config), num_steps, t_start, self.device)
        noisy = schedule.noise_steps()
        # Row r's draws, in the pipeline's order: its initial noise (img2img: the noise added to
        # the input), then one per noisy step; drawn ahead when the chunk was announced.
        spec = self.noise_spec(batch, idx, lh, lw, num_steps, t_start)
        noise = self.noise.take(spec)  # (1 + K, n, C, H/8, W/8)
        latents = noise[0] * schedule.init_noise_sigma
        extra = None  # inpainting: [masked image latents, keep mask] beside the latents
        if task in ("img2img", "inpaint"):
            init = np.stack([unpack(batch["init_latents"][i], (channels, lh, lw)) for i in idx])
            init = upload(init, self.device, dtype)  # (n, C, h, w)
        if task == "img2img":
            # diffusers scales the encoded image by init_noise_sigma (1 for DDIM), then noises it
            # to a timestep of its own schedule, independent of the sampler's.
            # Rows of one group share their start step, not always their strength: one timestep each.
            t = [int(self.scheduler_config["num_train_timesteps"] * float(batch["strength"][i])) - 2 for i in idx]
            alpha = upload(self.noise_table[t].view(n, 1, 1, 1), self.device, dtype)  # (n, 1, 1, 1)
            latents = alpha ** 0.5 * (init * schedule.init_noise_sigma) + (1 - alpha) ** 0.5 * noise[0]
        elif task == "inpaint":
            keep = upload(np.stack([unpack(batch["keep_mask"][i], (1, lh, lw)) for i in idx]), self.device, dtype)
            # (n, 1, h, w): 1 = keep the source
            extra = torch.cat([init * keep, keep], dim=1)  # (n, C + 1, h, w)
            extra = torch.cat([extra] * 2) if cfg else extra
        scales = row_scales([float(batch["guidance_scale"][i]) for i in idx], 4, self.device)  # (n, 1, 1, 1)

        draw = 1
        for k in range(len(schedule.timesteps)):
            model_input = torch.cat([latents] * 2) if cfg else latents
            if extra is not None:
                model_input = torch.cat([model_input, extra], dim=1)  # (.., 2C + 1, h, w)
            pred = self.run_unet(model_input, unet=self.unet, timestep=schedule.model_timesteps[k], hidden=hidden,
                                 cond=cond)  # (B, 2C, h, w)
            pred_noise, pred_variance = pred.split(channels, dim=1)
            if cfg:  # the text half's variance, as diffusers
                eps, var = guide(pred_noise[:n], pred_noise[n:], scales, dtype), pred_variance[n:]
            else:
                eps, var = pred_noise, pred_variance
            model_output = torch.cat([eps, var], dim=1) if self.learned_variance else eps
            latents = schedule.step(k, model_output, latents, noise[draw] if noisy[k] else None)
            draw += noisy[k]
        self.noise.note("queued", spec)
        return latents


def unet21_forward(x, unet, timestep, hidden, cond):
    """One U-Net call as Kandinsky 2.1's pipelines make it: (B, C', h, w) -> (B, 2C, h, w)."""
    return unet(sample=x, timestep=timestep, encoder_hidden_states=hidden, added_cond_kwargs=cond, return_dict=False)[0]
