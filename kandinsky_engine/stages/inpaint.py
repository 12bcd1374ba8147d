"""Inpainting inputs, as `KandinskyV22InpaintPipeline` prepares them, one row at a time.

Mask convention: white (1) = repaint, black (0) = keep, the diffusers convention since 0.19
(the original Kandinsky code used the inverse). Internally, like diffusers, the mask is inverted
to a *keep* mask: 1 where the source image is kept.
"""

from __future__ import annotations

import numpy as np

# diffusers' `prepare_mask` zeroes, around every repaint position (i, j), the keep-mask entries at
# (i-1, j), (i, j-1), (i-1, j-1), (i+1, j), (i, j+1), (i+1, j+1): six of the eight neighbours
# (the anti-diagonal pair is missed, probably by accident). We match it exactly, since that is
# what the weights are used with, but as one convolution instead of a Python loop over pixels.
# As a cross-correlation kernel over the repaint mask, the offsets above read:
DILATION = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=np.float32)


def image_tensor(image, width: int, height: int):
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]: bicubic resize, x / 127.5 - 1 (diffusers' formula)."""
    import torch
    from PIL import Image

    image = image.resize((width, height), resample=Image.BICUBIC, reducing_gap=1)
    array = np.array(image.convert("RGB"))[None].transpose(0, 3, 1, 2)
    return torch.from_numpy(array).to(dtype=torch.float32) / 127.5 - 1.0


def keep_mask(mask, width: int, height: int, latent_hw: tuple[int, int]):
    """Single-channel PIL mask (white = repaint) -> (1, 1, h, w) keep mask at latent size.

    Lanczos resize to the image size, binarise at 0.5, invert, nearest-resize to the latent grid,
    then widen the repaint region by one latent pixel (diffusers' `prepare_mask`).
    """
    import torch
    import torch.nn.functional as F
    from PIL import Image

    mask = mask.resize((width, height), resample=Image.LANCZOS)
    repaint = (np.array(mask.convert("L"), dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)
    keep = 1 - torch.from_numpy(repaint)[None, None]  # (1, 1, H, W)
    keep = F.interpolate(keep, latent_hw, mode="nearest")  # (1, 1, h, w)
    grown = F.conv2d(1 - keep, torch.from_numpy(DILATION)[None, None], padding=1)
    return keep * (grown == 0)
