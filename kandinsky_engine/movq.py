"""MovqStage: latents -> uint8 RGB -> encoded image bytes."""

from __future__ import annotations

import io

import numpy as np

from .config import JobConfig
from .models import load_module, model_identity
from .rows import group_rows

REQUIRED = ("id", "width", "height", "latents")
INTERNAL = ("latents", "image_embeds", "negative_image_embeds")
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def to_uint8(images) -> np.ndarray:
    """MoVQ output in [-1, 1], (B, 3, H, W) -> (B, H, W, 3) uint8.

    Exactly diffusers' `output_type="np"` post-processing followed by `(x * 255).round()`.
    """
    images = (images * 0.5 + 0.5).clamp(0, 1)
    images = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return (images * 255).round().astype(np.uint8)


def centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def encode_image(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    options = {"compress_level": 6} if fmt == "png" else {"quality": quality}
    Image.fromarray(pixels).save(buf, format=PIL_FORMATS[fmt], **options)
    return buf.getvalue()


class MovqStage:
    """Decodes `latents` with the MoVQ, applies the size policy and encodes the `image` column.

    Adds `image` (bytes), `image_width`, `image_height` (the actual size) and the model ids;
    drops the internal tensor columns so only the dataset's columns reach the writer.
    """

    def __init__(self, config: JobConfig):
        import torch
        from diffusers import VQModel

        torch.set_num_threads(config.movq.threads())
        self.device = torch.device(config.model.device)
        self.movq = load_module(VQModel, config.model, "decoder", "movq")
        self.output = config.output
        self.identity = model_identity(config.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [c for c in REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"MovqStage: batch lacks columns {missing}")
        n = len(batch["id"])
        pixels: list = [None] * n
        latents = batch["latents"]
        with torch.inference_mode():
            for shape, idx in group_rows(batch, lambda i: tuple(latents[i].shape)).items():
                z = torch.from_numpy(np.stack(latents[idx])).to(self.device, self.movq.dtype)  # (n, 4, H/8, W/8)
                decoded = self.movq.decode(z, force_not_quantize=True)["sample"]  # (n, 3, H, W)
                for i, image in zip(idx, to_uint8(decoded)):
                    pixels[i] = image
        images, widths, heights = [], [], []
        for i, image in enumerate(pixels):
            if self.output.size_policy == "crop":
                image = centre_crop(image, int(batch["height"][i]), int(batch["width"][i]))
            images.append(encode_image(np.ascontiguousarray(image), self.output.image_format, self.output.quality))
            heights.append(image.shape[0])
            widths.append(image.shape[1])
        out = {k: v for k, v in batch.items() if k not in INTERNAL}
        out["image"] = np.array(images, dtype=object)
        out["image_width"] = np.array(widths, dtype=np.int64)
        out["image_height"] = np.array(heights, dtype=np.int64)
        for key, value in self.identity.items():
            out[key] = np.array([value] * n, dtype=object)
        return out
