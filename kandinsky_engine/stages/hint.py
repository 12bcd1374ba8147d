"""HintStage: the ControlNet hint of each controlnet / controlnet_img2img row.

A row's `hint` image (URI or bytes) is used as given; a row without one gets a depth map of its
`image`, computed by a resident transformers depth estimator (in float32 whatever model.dtype). The original Kandinsky ControlNet
notebook, and diffusers' example `make_hint`, ran MiDaS/DPT by hand; here it is part of the job.
"""

from __future__ import annotations

import numpy as np

from ..config import JobConfig
from ..images import ImageInputError, decode_input, pad_centred
from ..rows import failed, is_null, mark_failed, working_size

CONTROLNET_TASKS = ("controlnet", "controlnet_img2img")


def depth_to_uint8(depth: np.ndarray) -> np.ndarray:
    """A depth map, min-max scaled to uint8 exactly as transformers' depth-estimation pipeline scales
    it, except that a constant map (no depth range: 0 / 0 there, NaN cast to garbage) is all 0."""
    low, span = depth.min(), depth.max() - depth.min()
    if not span > 0:
        return np.zeros(depth.shape, np.uint8)
    return (((depth - low) / span) * 255).astype("uint8")


def hint_from_depth(depth) -> np.ndarray:
    """Depth map (PIL 'L') -> (H, W, 3) uint8 hint: the grey map on three channels (diffusers' make_hint)."""
    depth = np.array(depth)[:, :, None]
    return np.concatenate([depth, depth, depth], axis=2)


class HintStage:
    """Adds `hint_pixels` (raw uint8 (H, W, 3) at the row's working size) for ControlNet rows."""

    def __init__(self, config: JobConfig, sources: dict | None = None):
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        from ..device import stage_device
        from ..models import model_dir

        torch.set_num_threads(config.hint.threads())
        self.device = stage_device(config.model, config.hint)
        source = model_dir(config, "depth", sources)
        # Always float32, whatever model.dtype: the depth model is small, transformers' depth
        # post-processing calls .numpy() (no bfloat16 there), and in float16 the depth range of a
        # flat image rounds to 0.
        self.model = AutoModelForDepthEstimation.from_pretrained(
            source, use_safetensors=True, dtype=torch.float32
        ).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(source)
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
            for i, depth in zip(rows, self._estimate([need_depth[i][0] for i in rows])):
                # Depth of the image itself (not of repeated edges), padded like a given hint.
                hints[i] = pad_centred(hint_from_depth(depth), *need_depth[i][1]).tobytes()
        out = {k: v for k, v in batch.items() if k != "hint_bytes"}
        out["hint_pixels"] = hints
        return out

    def _estimate(self, images: list) -> list[np.ndarray]:
        """(H, W) uint8 depth maps, one image at a time: the steps of transformers' depth-estimation
        pipeline (its resizing and min-max normalisation to an 8-bit map are what diffusers'
        ControlNet example feeds the model), with the scaling guarded (depth_to_uint8)."""
        import torch
        from transformers.image_utils import load_image

        maps = []
        for image in images:
            image = load_image(image)
            inputs = self.processor(images=image, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                outputs = self.model(**inputs)
            depth = self.processor.post_process_depth_estimation(outputs, [image.size[::-1]])[0]["predicted_depth"]
            maps.append(depth_to_uint8(depth.float().cpu().numpy()))
        return maps
