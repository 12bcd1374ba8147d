"""Resolve a model source to something `from_pretrained` can read, and load components.

Sources: 'tiny' (built once into the local cache), a local diffusers-layout directory, a remote
directory (s3://, gs://, any fsspec URL: mirrored once per node into the cache, see
model_cache.py), or a hub id. Weights are always loaded with `use_safetensors=True`: a pickle
checkpoint is refused.
"""

from __future__ import annotations

from pathlib import Path

from .config import TINY, ModelConfig
from .device import device_name
from .hub import is_hub_id, snapshot
from .model_cache import is_remote, mirror, read_json, remote_listing


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


def resolve_source(source: str, part: str, cache_dir: str, storage_options: dict | None = None,
                   weights: bool = True) -> str:
    """`part` is 'prior', 'decoder' or 'depth'. 'tiny' names the tiny model's directory for that
    part; 'tiny-inpaint' and 'tiny-controlnet' its other decoders. A remote URL is mirrored into
    `cache_dir` (downloaded once per node, verified on every call) and the local copy returned; a hub
    id is downloaded at its commit into the Hugging Face cache (hub.snapshot; `weights=False`: its
    configs only, for the driver's checks)."""
    if is_remote(source):
        return mirror(source, cache_dir, storage_options, require_index=part != "depth").path
    if source.startswith("file://"):
        source = source[len("file://"):]
    if source == TINY:
        return str(ensure_tiny_model(cache_dir) / part)
    if source.startswith(TINY + "-"):
        variant = ensure_tiny_model(cache_dir) / f"{part}{source[len(TINY):]}"
        if not variant.exists():
            raise ValueError(f"unknown tiny model variant {source!r} for model.{part}")
        return str(variant)
    path = Path(source).expanduser()
    if path.exists():
        if part != "depth" and not (path / "model_index.json").exists():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
        return str(path)
    if not is_hub_id(source):  # a path that is not there: not a hub id to look up either
        raise FileNotFoundError(f"model.{part}: no such directory: {source}")
    return snapshot(source, weights)


def check_source(source: str, part: str, cache_dir: str, storage_options: dict | None = None) -> None:
    """The driver's fail-fast check. A remote directory is only listed (its files, model_index.json,
    no pickle-only weights), not downloaded: the driver may be a laptop submitting to a cluster."""
    if is_remote(source):
        remote_listing(source, storage_options, require_index=part != "depth")
    else:
        resolve_source(source, part, cache_dir, weights=False)  # builds 'tiny' once, checks local dirs, hub configs


def torch_dtype(name: str):
    import torch

    if name == "auto":  # resolved by the driver (device.resolve_auto); a stage used alone decides here
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_module(cls, model: ModelConfig, part: str, subfolder: str, storage_options: dict | None = None,
                device=None):
    """Load a torch module (U-Net, MoVQ, encoders...) in eval mode on `device` (default model.device).
    Convolutional modules (U-Net, MoVQ) take model.channels_last."""
    import torch

    source = resolve_source(getattr(model, part), part, model.cache_dir, storage_options)
    module = cls.from_pretrained(
        source, subfolder=subfolder, torch_dtype=torch_dtype(model.dtype), use_safetensors=True
    )
    module = module.to(device or device_name(model)).eval()
    if model.channels_last and subfolder in ("unet", "movq"):
        module = module.to(memory_format=torch.channels_last)
    return module


def load_asset(cls, model: ModelConfig, part: str, subfolder: str, storage_options: dict | None = None):
    """Load a weightless component: tokenizer, scheduler or image processor."""
    source = resolve_source(getattr(model, part), part, model.cache_dir, storage_options)
    return cls.from_pretrained(source, subfolder=subfolder)


def unet_config(model: ModelConfig, storage_options: dict | None = None) -> dict:
    """model.decoder's U-Net config alone (no weights loaded; for a remote decoder only
    unet/config.json is read, nothing is mirrored)."""
    from diffusers import UNet2DConditionModel

    if is_remote(model.decoder):
        return read_json(model.decoder, "unet/config.json", storage_options)
    return UNet2DConditionModel.load_config(resolve_source(model.decoder, "decoder", model.cache_dir, weights=False),
                                            subfolder="unet")
