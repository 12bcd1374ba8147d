"""HintStage: the ControlNet hint of each controlnet / controlnet_img2img row.

A row's `hint` image (URI or bytes) is used as given; a row without one gets a depth map of its
`image`, computed by a resident transformers depth estimator. The original Kandinsky ControlNet
notebook, and diffusers' example `make_hint`, ran MiDaS/DPT by hand; here it is part of the job.
"""

from __future__ import annotations

import numpy as np

from .config import JobConfig
from .images import ImageInputError, decode_input, pad_centred
from .rows import failed, is_null, mark_failed, working_size

CONTROLNET_TASKS = ("controlnet", "controlnet_img2img")


def hint_from_depth(depth) -> np.ndarray:
    """Depth map (PIL 'L') -> (H, W, 3) uint8 hint: the grey map on three channels (diffusers' make_hint)."""
    depth = np.array(depth)[:, :, None]
    return np.concatenate([depth, depth, depth], axis=2)


class HintStage:
    """Adds `hint_pixels` (raw uint8 (H, W, 3) at the row's working size) for ControlNet rows."""

    def __init__(self, config: JobConfig):
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation, pipeline

        from .models import resolve_source, torch_dtype

        torch.set_num_threads(config.hint.threads())
        source = resolve_source(config.model.depth, "depth", config.model.cache_dir, config.storage_options)
        model = AutoModelForDepthEstimation.from_pretrained(
            source, use_safetensors=True, dtype=torch_dtype(config.model.dtype)
        ).to(config.model.device).eval()
        # transformers' own depth-estimation pipeline: its resizing and min-max normalisation to
        # an 8-bit map are exactly what diffusers' ControlNet example feeds the model.
        self.depth = pipeline("depth-estimation", model=model, image_processor=AutoImageProcessor.from_pretrained(source),
                              device=config.model.device)
        self.scale_factor = 8  # MoVQ factor of every Kandinsky 2.2 decoder: the hint is at image size
        self.max_pixels = config.input.max_image_pixels
        self.pad = config.output.size_policy == "crop"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        n = len(batch["id"])
        hints = np.full(n, None, dtype=object)
        need_depth = {}
        for i in np.flatnonzero(~failed(batch)):
            if batch["task"][i] not in CONTROLNET_TASKS:
                continue
            h, w = int(batch["height"][i]), int(batch["width"][i])
            work = working_size(h, w, self.scale_factor)
            # With size_policy crop, the hint (or the image its depth comes from) is resized to the
            # requested size and padded to the working size, centred as the output is cropped back,
            # so it stays aligned with the image (see MovqEncodeStage); otherwise it is stretched.
            size = (w, h) if self.pad else work[::-1]  # PIL order
            given = batch.get("hint_bytes", [None] * n)[i]
            kind = "image" if is_null(given) else "hint"
            try:
                image = decode_input(given if kind == "hint" else batch["image_bytes"][i], kind, max_pixels=self.max_pixels)
            except ImageInputError as exc:
                mark_failed(batch, i, "HintStage", exc)
                continue
            if image.size != size:
                image = image.resize(size, resample=Image.BICUBIC)
            if kind == "hint":
                hints[i] = pad_centred(np.asarray(image), *work).tobytes()
            else:
                need_depth[i] = image, work
        if need_depth:
            rows = list(need_depth)
            for i, out in zip(rows, self._estimate([need_depth[i][0] for i in rows])):
                # Depth of the image itself (not of repeated edges), padded like a given hint.
                hints[i] = pad_centred(hint_from_depth(out["depth"]), *need_depth[i][1]).tobytes()
        out = {k: v for k, v in batch.items() if k != "hint_bytes"}
        out["hint_pixels"] = hints
        return out

    def _estimate(self, images: list) -> list[dict]:
        results = self.depth(images)
        return [results] if isinstance(results, dict) else results
