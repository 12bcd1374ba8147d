"""Resolve a model source to something `from_pretrained` can read, and load components.

Sources: 'tiny' (built once into the local cache), a local diffusers-layout directory, or a
hub id. Weights are always loaded with `use_safetensors=True`: a pickle checkpoint is refused.
"""

from __future__ import annotations

from pathlib import Path

from .config import DECODER_TASKS, TINY, ModelConfig
from .tiny import ensure_tiny_model


def resolve_source(source: str, part: str, cache_dir: str) -> str:
    """`part` is 'prior', 'decoder' or 'depth'. 'tiny' names the tiny model's directory for that
    part; 'tiny-inpaint' and 'tiny-controlnet' its other decoders."""
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
    return source  # a hub id; from_pretrained resolves it (needs network or a warm HF cache)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_module(cls, model: ModelConfig, part: str, subfolder: str):
    """Load a torch module (U-Net, MoVQ, encoders...) in eval mode on the configured device."""
    source = resolve_source(getattr(model, part), part, model.cache_dir)
    module = cls.from_pretrained(
        source, subfolder=subfolder, torch_dtype=torch_dtype(model.dtype), use_safetensors=True
    )
    return module.to(model.device).eval()


def load_asset(cls, model: ModelConfig, part: str, subfolder: str):
    """Load a weightless component: tokenizer, scheduler or image processor."""
    return cls.from_pretrained(resolve_source(getattr(model, part), part, model.cache_dir), subfolder=subfolder)


def decoder_kind(model: ModelConfig) -> str:
    """Which decoder `model.decoder` is, from its U-Net config alone (no weights loaded)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(resolve_source(model.decoder, "decoder", model.cache_dir), subfolder="unet")
    if unet.get("in_channels") == 9:
        return "inpaint"
    if unet.get("addition_embed_type") == "image_hint":
        return "controlnet"
    return "standard"


def supported_tasks(model: ModelConfig) -> tuple[str, ...]:
    return DECODER_TASKS[decoder_kind(model)]


def model_identity(model: ModelConfig) -> dict:
    """What is recorded in every output row: which weights produced it."""
    return {"prior_model": model.prior, "decoder_model": model.decoder}
