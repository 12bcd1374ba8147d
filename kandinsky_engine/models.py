"""Resolve a model source once, find its files on a node, and load components.

Sources: 'tiny' (built once into the local cache), a local diffusers-layout directory, a remote
directory (s3://, gs://, any fsspec URL: mirrored once per node into the cache, see
model_cache.py), or a hub id. The driver resolves each source the job reads once (`check_source`)
into a `ResolvedSource`: checked, listed (a remote directory: one LIST), named without credentials
and identified (its weights digest, identity.py). The fingerprint takes its digest, and the stages'
actors take the value itself: they find its files on their node (`local_dir`: a remote directory
is mirrored at the listed version, without listing it again) and load from that folder. Weights are
always loaded with `use_safetensors=True`: a pickle checkpoint is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .config import TINY, JobConfig, ModelConfig
from .device import device_name
from .hub import is_hub_id, snapshot
from .identity import weights_digest
from .model_cache import ResolvedSource, is_remote, mirror, read_json, remote_source
from .storage import redact_url


# Builds (once) and returns the tiny model's root: kandinsky_engine.families.tiny.ensure_tiny_model,
# handed over by the family registry when it is imported (which importing kandinsky_engine does).
_tiny_root = None


def use_tiny_model(ensure) -> None:
    global _tiny_root
    _tiny_root = ensure


def ensure_tiny_model(cache_dir: str):
    if _tiny_root is None:
        raise RuntimeError("the tiny model's builder is registered by kandinsky_engine.families: import it first")
    return _tiny_root(cache_dir)


def _tiny_dir(source: str, part: str, cache_dir: str) -> str:
    """'tiny' names the tiny model's directory for `part`; 'tiny-inpaint', 'tiny-controlnet'... its
    other decoders. Built into `cache_dir` on first use on each machine."""
    folder = ensure_tiny_model(cache_dir) / f"{part}{source[len(TINY):]}"
    if not folder.exists():
        raise ValueError(f"unknown tiny model variant {source!r} for model.{part}")
    return str(folder)


def locate_source(source: str, part: str, cache_dir: str, storage_options: dict | None = None) -> ResolvedSource:
    """`source` (a `model.<part>` value; `part` is 'prior', 'decoder' or 'depth') resolved, not yet
    identified: a remote directory is listed (once), 'tiny' built, a local directory checked. A hub
    id is only recognised here (check_source reads its configs; local_dir its weights)."""
    name = redact_url(source)
    if is_remote(source):
        return remote_source(source, part, storage_options)
    source_path = source.removeprefix("file://")
    if source_path == TINY or source_path.startswith(TINY + "-"):
        return ResolvedSource(source, part, "tiny", _tiny_dir(source_path, part, cache_dir), name)
    path = Path(source_path).expanduser()
    if path.exists():
        if part != "depth" and not (path / "model_index.json").exists():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
        return ResolvedSource(source, part, "local", str(path), name)
    if not is_hub_id(source_path):  # a path that is not there: not a hub id to look up either
        raise FileNotFoundError(f"model.{part}: no such directory: {source_path}")
    return ResolvedSource(source, part, "hub", "", name)


def check_source(source: str, part: str, cache_dir: str, storage_options: dict | None = None, *,
                 revision: str | None = None, max_age_s: float = 86400.0, rehash: bool = False,
                 hub_configs: bool = True) -> ResolvedSource:
    """The driver's one resolution of a model source, which fails fast: `locate_source`, a hub id's
    configs downloaded (hub.snapshot without weights; not with `hub_configs=False`: verify needs its
    commit only), and the weights identified (identity.py: `revision`, `max_age_s` and `rehash` are
    the model config's and verify's). A remote directory is only listed, not downloaded: the driver
    may be a laptop submitting to a cluster."""
    located = locate_source(source, part, cache_dir, storage_options)
    if located.kind == "hub" and hub_configs:
        located = replace(located, path=snapshot(source, weights=False))
    return replace(located, digest=weights_digest(located, cache_dir, max_age_s, rehash, revision))


def resolve_sources(model: ModelConfig, parts: tuple[str, ...], storage_options: dict | None = None,
                    rehash: bool = False, hub_configs: bool = True,
                    resolved: dict[str, ResolvedSource] | None = None) -> dict[str, ResolvedSource]:
    """{part: ResolvedSource} of the model parts a job reads (families.Family.used_parts), each resolved
    once (check_source): those in `resolved` (the decoder, resolved before the family it names) as they are."""
    resolved = resolved or {}
    return {part: resolved.get(part) or check_source(getattr(model, part), part, model.cache_dir, storage_options,
                                                     revision=model.revision, max_age_s=model.digest_max_age_s,
                                                     rehash=rehash, hub_configs=hub_configs) for part in parts}


def local_dir(source: ResolvedSource, cache_dir: str, storage_options: dict | None = None, weights: bool = True) -> str:
    """The folder on this machine that `from_pretrained` reads for `source`: a remote directory mirrored
    into `cache_dir` at its resolved listing (downloaded once per node, verified on every call), the
    tiny model built there, a hub id downloaded at its commit into the Hugging Face cache (`weights=False`:
    its configs only)."""
    if source.kind == "remote":
        return mirror(source, cache_dir, storage_options).path
    if source.kind == "tiny":  # this machine's own build (the driver's may be on another)
        return _tiny_dir(source.spec.removeprefix("file://"), source.part, cache_dir)
    if source.kind == "hub":
        return snapshot(source.spec, weights)
    return source.path


def resolve_source(source: str, part: str, cache_dir: str, storage_options: dict | None = None,
                   weights: bool = True) -> str:
    """The local folder of a bare `model.<part>` value (`locate_source`, then `local_dir`): for callers
    that hold no resolved source (a stage used alone, the benchmark's diffusers loop)."""
    return local_dir(locate_source(source, part, cache_dir, storage_options), cache_dir, storage_options, weights)


def model_dir(config: JobConfig, part: str, sources: dict[str, ResolvedSource] | None = None) -> str:
    """The local folder of `config.model.<part>` that a stage loads from: the driver's
    resolution (`sources`, as the job builder hands it to every stage) where given, else resolved here
    (a stage used alone: tests, benchmarks, `reproduce`)."""
    model = config.model
    if sources is None:
        return resolve_source(getattr(model, part), part, model.cache_dir, config.storage_options)
    return local_dir(sources[part], model.cache_dir, config.storage_options)


def torch_dtype(name: str):
    import torch

    if name == "auto":  # resolved by the driver (device.resolve_auto); a stage used alone decides here
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_module(cls, model: ModelConfig, folder: str, subfolder: str, device=None):
    """Load a torch module (U-Net, MoVQ, encoders...) from `folder` (model_dir) in eval mode on `device`
    (default model.device). Convolutional modules (U-Net, MoVQ) take model.channels_last."""
    import torch

    module = cls.from_pretrained(
        folder, subfolder=subfolder, torch_dtype=torch_dtype(model.dtype), use_safetensors=True
    )
    module = module.to(device or device_name(model)).eval()
    if model.channels_last and subfolder in ("unet", "movq"):
        module = module.to(memory_format=torch.channels_last)
    return module


def load_asset(cls, folder: str, subfolder: str):
    """Load a weightless component (tokenizer, scheduler or image processor) from `folder` (model_dir)."""
    return cls.from_pretrained(folder, subfolder=subfolder)


def unet_config(model: ModelConfig, storage_options: dict | None = None) -> dict:
    """model.decoder's U-Net config alone (no weights loaded; for a remote decoder only
    unet/config.json is read, nothing is mirrored)."""
    from diffusers import UNet2DConditionModel

    if is_remote(model.decoder):
        return read_json(model.decoder, "unet/config.json", storage_options)
    return UNet2DConditionModel.load_config(resolve_source(model.decoder, "decoder", model.cache_dir, weights=False),
                                            subfolder="unet")
