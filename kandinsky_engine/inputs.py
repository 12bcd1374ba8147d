"""Input images of the image tasks: fetched from URIs, then MoVQ-encoded.

`fetch_inputs` is plain I/O (a Ray task step); `MovqEncodeStage` keeps a MoVQ resident (an actor
pool). A row whose image cannot be used is marked failed with the reason and skips later stages.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
from PIL import Image

from .config import JobConfig
from .device import stage_device
from .images import ImageInputError, decode_input, fit_and_pad, read_uri
from .inpaint import image_tensor, keep_mask
from .models import load_module
from .rows import failed, is_null, mark_failed, object_column, working_size
from .uri_policy import UriPolicy, UriRefused

IMAGE_TASKS = ("img2img", "inpaint", "controlnet_img2img")  # tasks whose image the MoVQ encodes
FETCH_TASKS = ("img2img", "inpaint", "variation", "mix", "controlnet", "controlnet_img2img")  # may name files
INPUTS = ("image", "mask", "hint")


def inputs_used(task: str, hint_given: bool) -> tuple[str, ...]:
    """The inputs a row of `task` reads (besides mix items): only these are fetched, checked and hashed.
    A ControlNet row's hint is used when it has one; a controlnet row without one estimates depth
    from its image."""
    if task in ("controlnet", "controlnet_img2img"):
        image = ("image",) if task == "controlnet_img2img" or not hint_given else ()
        return image + (("hint",) if hint_given else ())
    return {"img2img": ("image",), "variation": ("image",), "inpaint": ("image", "mask")}.get(task, ())


class InputReader:
    """Reads input URIs under the job's input policy and limits (config.input)."""

    def __init__(self, config: JobConfig, manifest_file: str):
        self.policy = UriPolicy.for_manifest(config.input.manifest, manifest_file, config.input.allowed_uri_prefixes)
        self.storage_options = config.storage_options
        self.max_bytes = config.input.max_input_bytes
        self.timeout_s = config.input.read_timeout_s

    def bytes_of(self, name: str, uri, data):
        """The bytes of one input, given inline (`data`, which wins) or as a URI; None if neither.
        Errors name the cell: `{name}_bytes: ...` or `{name}_uri: ...`."""
        inline = not is_null(data)
        try:
            if inline:
                if len(data) > self.max_bytes:  # inline bytes are held to the same limit as files
                    raise ImageInputError(f"{len(data)} bytes is larger than input.max_input_bytes={self.max_bytes}")
                return data
            return None if is_null(uri) else self.read(str(uri))
        except ImageInputError as exc:
            raise ImageInputError(f"{name}_{'bytes' if inline else 'uri'}: {exc}") from None

    def read(self, uri: str) -> bytes:
        try:
            target = self.policy.check(uri)  # again here: the worker reads what validation allowed, no more
        except UriRefused as exc:
            raise ImageInputError(str(exc)) from None
        return read_uri(target, self.storage_options, max_bytes=self.max_bytes, timeout_s=self.timeout_s)


def fetch_inputs(batch: dict[str, np.ndarray], config: JobConfig, manifest_file: str) -> dict[str, np.ndarray]:
    """Fill the `{kind}_bytes` that each row's task uses from its `{kind}_uri` (inline bytes win), and
    add `{kind}_sha256`, the sha256 of the bytes used (None where the task uses no such input).
    Mix items get an `image_sha256` key the same way. Inputs a row's task does not use are neither
    read nor checked. `manifest_file` is one file listed from the manifest (see UriPolicy)."""
    reader = InputReader(config, manifest_file)
    n = len(batch["id"])

    def column(name):
        return object_column(batch.get(name, [None] * n))

    hint_given = [not (is_null(u) and is_null(b)) for u, b in zip(column("hint_uri"), column("hint_bytes"))]
    out = dict(batch)
    for kind in INPUTS:
        uris, data, digests = column(f"{kind}_uri"), column(f"{kind}_bytes"), np.full(n, None, dtype=object)
        for i in np.flatnonzero(~failed(batch)):
            if kind in inputs_used(batch["task"][i], hint_given[i]):
                try:
                    data[i] = reader.bytes_of(kind, uris[i], data[i])
                except ImageInputError as exc:
                    mark_failed(batch, i, "fetch_inputs", exc)
                    continue
                digests[i] = _digest(data[i])
        out[f"{kind}_bytes"], out[f"{kind}_sha256"] = data, digests
    if "mix" in batch:
        out["mix"] = object_column(batch["mix"])
        for i in np.flatnonzero(~failed(batch)):
            if batch["task"][i] == "mix" and not is_null(batch["mix"][i]):
                try:
                    out["mix"][i] = [_fetch_mix_item(dict(item), reader) for item in batch["mix"][i]]
                except ImageInputError as exc:
                    mark_failed(batch, i, "fetch_inputs", exc)
    return out


def _fetch_mix_item(item: dict, reader: InputReader) -> dict:
    item["image_bytes"] = reader.bytes_of("mix image", item.get("image_uri"), item.get("image_bytes"))
    item["image_sha256"] = _digest(item["image_bytes"])  # None for a text item
    return item


def _digest(data) -> str | None:
    return None if is_null(data) else hashlib.sha256(data).hexdigest()


def pack(latents: np.ndarray) -> bytes:
    """Latents travel between stages as raw float32 bytes (null for rows without any)."""
    return np.ascontiguousarray(latents, dtype=np.float32).tobytes()


def unpack(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32).reshape(shape)


class MovqEncodeStage:
    """Adds `init_latents` (packed (4, H/8, W/8) float32) for img2img and inpaint rows, and
    `keep_mask` (packed (1, H/8, W/8)) for inpaint rows; drops the input bytes.

    Images are decoded (EXIF applied, any mode to RGB), resized to the row's working size and
    encoded with the MoVQ encoder, each task with its diffusers pipeline's preprocessing.
    """

    def __init__(self, config: JobConfig):
        import torch
        from diffusers import VQModel
        from diffusers.image_processor import VaeImageProcessor

        torch.set_num_threads(config.encode.threads())
        self.device = stage_device(config.model, config.encode)
        self.movq = load_module(VQModel, config.model, "decoder", "movq", config.storage_options, self.device)
        self.scale_factor = 2 ** (len(self.movq.config.block_out_channels) - 1)
        # diffusers' img2img processor: bicubic, reducing_gap=1, output in [-1, 1].
        self.processor = VaeImageProcessor(
            vae_scale_factor=self.scale_factor,
            vae_latent_channels=self.movq.config.latent_channels,
            resample="bicubic",
            reducing_gap=1,
        )
        self.max_pixels = config.input.max_image_pixels
        self.pad = config.output.size_policy == "crop"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["id"])
        init, masks = np.full(n, None, dtype=object), np.full(n, None, dtype=object)
        todo = [i for i in np.flatnonzero(~failed(batch)) if batch["task"][i] in IMAGE_TASKS]
        pixels = {}
        for i in todo:
            try:
                pixels[i], masks[i] = self._prepare(batch, i)
            except ImageInputError as exc:
                mark_failed(batch, i, "MovqEncodeStage", exc)
        by_shape = defaultdict(list)
        for i, x in pixels.items():
            by_shape[tuple(x.shape)].append(i)
        with torch.inference_mode():
            for rows in by_shape.values():
                x = torch.cat([pixels[i] for i in rows]).to(self.device, self.movq.dtype)
                latents = self.movq.encode(x)["latents"].float().cpu().numpy()  # (n, 4, H/8, W/8), unquantised
                for i, lat in zip(rows, latents):
                    init[i] = pack(lat)
        out = {k: v for k, v in batch.items() if k not in ("image_bytes", "mask_bytes")}
        out["init_latents"], out["keep_mask"] = init, masks
        return out

    def _prepare(self, batch, i: int):
        """-> ((1, 3, H, W) pixels in [-1, 1], packed keep mask or None) for row i."""
        # The working size is the 64-rounded output size, as for text2img. With size_policy crop,
        # the input is resized to the requested size and padded to the working size, centred as
        # MovqStage crops it back (images: edges repeated; masks: padding kept, never repainted), so
        # the output keeps the input's borders and scale. Otherwise it is stretched to the working size.
        h, w = int(batch["height"][i]), int(batch["width"][i])
        work_h, work_w = working_size(h, w, self.scale_factor)
        pad = self.pad and (h, w) != (work_h, work_w)
        image = decode_input(batch["image_bytes"][i], "image", max_pixels=self.max_pixels)
        if batch["task"][i] in ("img2img", "controlnet_img2img"):
            if pad:  # the processor's own resample; its resize to the padded size is then a copy
                image = fit_and_pad(image, (w, h), (work_w, work_h), Image.Resampling.BICUBIC, reducing_gap=1)
            # Height and width in the processor's order: diffusers 0.42 calls
            # preprocess(image, width, height) in both img2img pipelines, swapping them for
            # non-square sizes.
            return self.processor.preprocess(image, height=work_h, width=work_w), None
        mask = decode_input(batch["mask_bytes"][i], "mask", max_pixels=self.max_pixels, mask=True)
        if pad:  # inpaint.image_tensor's and keep_mask's resamples, then their resizes are copies
            image = fit_and_pad(image, (w, h), (work_w, work_h), Image.Resampling.BICUBIC, reducing_gap=1)
            mask = fit_and_pad(mask, (w, h), (work_w, work_h), Image.Resampling.LANCZOS, fill=0)
        mask = keep_mask(mask, work_w, work_h, (work_h // self.scale_factor, work_w // self.scale_factor))
        return image_tensor(image, work_w, work_h), pack(mask.numpy())
