"""Input images of the image tasks, fetched from URIs (`fetch_inputs`: plain I/O, a Ray task step),
and the latent packing that stages share. A row whose input cannot be read is marked failed with the
reason and skips later stages; stages/movq_encode.py encodes the images.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .config import JobConfig
from .images import ImageInputError, read_uri
from .rows import failed, is_null, mark_failed, object_column
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
        # A redirect is checked hop by hop: an allowed URL must not lead outside the policy.
        return read_uri(target, self.storage_options, max_bytes=self.max_bytes, timeout_s=self.timeout_s,
                        redirect_check=self.policy.check)


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
