"""KL-VAE stages (Kandinsky 2.0's LDM KL-f8 autoencoder, diffusers `AutoencoderKL`): input images of img2img and
inpaint rows -> the posterior's moments (`KLEncodeStage`, section `encode`), and final latents -> images
(`KLDecodeStage`, section `movq`: the decode stage's section whatever the decoder).

The original's preprocessing (`utils.prepare_image`: bicubic resize with reducing_gap=1, x / 127.5 - 1) and
post-processing (`process_images`: ((x + 1) * 127.5).round().clamp(0, 255)). The latent scale is the
config's `scaling_factor` (0.0512 for 2.0): encode gives sample x 0.0512, decode takes z / 0.0512.
"""

from __future__ import annotations


import numpy as np
from PIL import Image

from ..config import JobConfig
from ..device import stage_device
from ..images import decode_input, fit_and_pad
from ..inputs import pack
from ..models import load_module, model_dir
from ..rows import working_size
from .inpaint import image_tensor, keep_mask
from .movq import MovqStage
from .movq_encode import image_inputs


class KLEncodeStage:
    """Adds `init_moments` (packed float32 (2C, H/8, W/8): the posterior's mean and std, the std from its
    clamped log-variance as LDM's DiagonalGaussianDistribution) for img2img and inpaint rows, and `keep_mask`
    (packed (1, H/8, W/8)) for inpaint rows; drops the input bytes. The sample itself is drawn by the U-Net
    stage from the row's own noise stream, where the original draws it (first, from the global generator)."""

    def __init__(self, config: JobConfig, sources: dict | None = None):
        import torch
        from diffusers import AutoencoderKL

        torch.set_num_threads(config.encode.threads())
        self.device = stage_device(config.model, config.encode)
        self.vae = load_module(AutoencoderKL, config.model, model_dir(config, "decoder", sources), "vae", self.device)
        self.scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.max_pixels = config.input.max_image_pixels
        self.pad = config.output.size_policy == "crop"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        moments = np.full(len(batch["id"]), None, dtype=object)
        pixels, masks, by_shape = image_inputs(batch, self._prepare, "KLEncodeStage")
        with torch.inference_mode():
            for rows in by_shape.values():
                x = torch.cat([pixels[i] for i in rows]).to(self.device, self.vae.dtype)
                posterior = self.vae.encode(x).latent_dist
                stacked = torch.cat([posterior.mean, posterior.std], dim=1).float().cpu().numpy()  # (n, 2C, h, w)
                for i, m in zip(rows, stacked):
                    moments[i] = pack(m)
        out = {k: v for k, v in batch.items() if k not in ("image_bytes", "mask_bytes")}
        out["init_moments"], out["keep_mask"] = moments, masks
        return out

    def _prepare(self, batch, i: int):
        """-> ((1, 3, H, W) pixels in [-1, 1], packed keep mask or None) for row i, at the row's working size
        (the original resizes every input to 512 x 512; see docs/kandinsky20.md). With size_policy crop the
        input is resized to the requested size and padded, as MovqEncodeStage does."""
        h, w = int(batch["height"][i]), int(batch["width"][i])
        work_h, work_w = working_size(h, w, self.scale_factor)
        pad = self.pad and (h, w) != (work_h, work_w)
        image = decode_input(batch["image_bytes"][i], "image", max_pixels=self.max_pixels)
        if pad:  # image_tensor's own resample; its resize to the padded size is then a copy
            image = fit_and_pad(image, (w, h), (work_w, work_h), Image.Resampling.BICUBIC, reducing_gap=1)
        if batch["task"][i] != "inpaint":
            return image_tensor(image, work_w, work_h), None
        mask = decode_input(batch["mask_bytes"][i], "mask", max_pixels=self.max_pixels, mask=True)
        if pad:
            mask = fit_and_pad(mask, (w, h), (work_w, work_h), Image.Resampling.LANCZOS, fill=0)
        # White = repaint (the engine's convention); the original takes 1 = keep. keep_mask grows the repaint
        # region by one latent pixel with the original's `prepare_mask` pattern.
        mask = keep_mask(mask, work_w, work_h, (work_h // self.scale_factor, work_w // self.scale_factor))
        return image_tensor(image, work_w, work_h), pack(mask.numpy())


def original_uint8(images) -> np.ndarray:
    """Decoder output in [-1, 1], (B, 3, H, W) -> (B, H, W, 3) uint8, as the original's `process_images`."""
    import torch

    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().permute(0, 2, 3, 1).numpy()


def original_device_uint8(images):
    """`original_uint8` where the images are (a GPU's tensor, copied back by the stage): (B, H, W, 3) uint8."""
    import torch

    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def vae_decode(z, movq):
    """Scaled latents (B, C, H/8, W/8) -> images (B, 3, H, W): z / scaling_factor through post_quant_conv and
    the decoder (`AutoencoderKL.decode`, the original's `image_encoder.decode(samples / scale)`)."""
    return movq.decode(z / movq.config.scaling_factor).sample


class KLDecodeStage(MovqStage):
    """MovqStage with the KL VAE as its decoder: decodes `latents`, applies the size policy, encodes `image`."""

    to_uint8 = staticmethod(original_uint8)
    device_uint8 = staticmethod(original_device_uint8)

    def __init__(self, config: JobConfig, encode: bool = True, sources: dict | None = None):
        import torch
        from diffusers import AutoencoderKL

        torch.set_num_threads(config.movq.threads())
        self.device = stage_device(config.model, config.movq)
        # `movq`: the module MovqStage.__call__ decodes with (here the KL VAE).
        self.movq = load_module(AutoencoderKL, config.model, model_dir(config, "decoder", sources), "vae", self.device)
        self.scale_factor = 2 ** (len(self.movq.config.block_out_channels) - 1)
        self.output, self.encode = config.output, encode
        self.keep = set()
        self.decode = vae_decode
