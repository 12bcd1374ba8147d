"""The converted Kandinsky 2.0 directory: diffusers layout, one subfolder per component, safetensors weights,
and a model_index.json whose `_class_name` names the family. Written by `convert-k20` and the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

CLASS_NAME = "Kandinsky20Pipeline"
# subfolder -> (library, class) in model_index.json, in the order the components are saved.
COMPONENTS = {
    "tokenizer": ("transformers", "XLMRobertaTokenizerFast"),
    "text_encoder": ("kandinsky", "MultilingualCLIP"),  # diffusers' M-CLIP (pipelines/kandinsky/text_encoder.py)
    "tokenizer_2": ("transformers", "T5TokenizerFast"),
    "text_encoder_2": ("transformers", "MT5EncoderModel"),
    "text_head": ("kandinsky_engine", "Kandinsky20TextHead"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "scheduler": ("diffusers", "DDPMScheduler"),
    "vae": ("diffusers", "AutoencoderKL"),
}


def training_scheduler():
    """The schedule the model was trained with (the original's diffusion_config): linear betas 1e-4..0.02 over
    1000 steps, eps prediction with learned-range variance. The engine's samplers build their tables from it."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                         variance_type="learned_range", prediction_type="epsilon", clip_sample=False)


def save_directory(dest: str | Path, parts: dict, extra_index: dict | None = None) -> Path:
    """Save `parts` ({subfolder: component}) under dest with save_pretrained (safetensors), model_index.json
    last: a directory without it is not a model, so an interrupted write is never taken for one."""
    import diffusers

    dest = Path(dest)
    missing = sorted(set(COMPONENTS) - set(parts))
    if missing:
        raise ValueError(f"Kandinsky 2.0 directory {dest}: no {missing}")
    for name in COMPONENTS:
        part = parts[name]
        if hasattr(part, "save_pretrained") and "tokenizer" not in name and name != "scheduler":
            part.save_pretrained(dest / name, safe_serialization=True)
        else:
            part.save_pretrained(dest / name)
    index = {"_class_name": CLASS_NAME, "_diffusers_version": diffusers.__version__,
             **{name: list(kind) for name, kind in COMPONENTS.items()}, **(extra_index or {})}
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dest
