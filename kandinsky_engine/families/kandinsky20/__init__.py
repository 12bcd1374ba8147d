"""Kandinsky 2.0: the first multilingual model. No prior: two text encoders on the same prompt (M-CLIP, an
XLM-RoBERTa-large with a linear map of its masked mean, and the mT5-small encoder) and a text head make the
conditioning of a GLIDE-style U-Net (eps + learned-range sigma) that denoises the latents of an LDM KL-f8
autoencoder, with the original repository's samplers. diffusers has no pipeline for it: its only
implementation is ai-forever/Kandinsky-2 (`get_kandinsky2(..., model_version="2.0")`), whose weights
`kandinsky-batch convert-k20` turns into a diffusers-style directory (convert.py; docs/kandinsky20.md).

Weights: model.decoder alone, one converted directory (tokenizer, text_encoder, tokenizer_2, text_encoder_2,
text_head, unet, scheduler, vae); a 9-channel U-Net is the inpainting model. The prior_* columns are not used.
"""

from __future__ import annotations

from ...config import JobConfig, ModelConfig
from ...models import unet_config
from ...stages.kandinsky20 import Kandinsky20UNetStage
from ...stages.kandinsky20_text import Kandinsky20TextStage
from ...stages.vae import KLDecodeStage, KLEncodeStage
from .. import Family
from .tiny import write_tiny

from .directory import CLASS_NAME as PIPELINE  # `_class_name` of convert-k20's and the tiny model's model_index.json
DECODER_TASKS = {"standard": ("text2img", "img2img"), "inpaint": ("inpaint",)}


def tasks(model: ModelConfig, storage_options: dict | None = None) -> tuple[str, ...]:
    return DECODER_TASKS["inpaint" if unet_config(model, storage_options).get("in_channels") == 9 else "standard"]


def stages(config: JobConfig, job_tasks: set[str]) -> list:
    """text encoders + head -> [VAE encode] -> U-Net -> VAE decode (section movq)."""
    plan = [("text_encoder", Kandinsky20TextStage, {})]
    if job_tasks & {"img2img", "inpaint"}:
        plan.append(("encode", KLEncodeStage, {}))
    return plan + [("decoder", Kandinsky20UNetStage, {}), ("movq", KLDecodeStage, {})]


FAMILY = Family(
    name="kandinsky20",
    title="Kandinsky 2.0",
    pipelines=(PIPELINE,),
    parts=("decoder",),
    tasks=tasks,
    stages=stages,
    write_tiny=write_tiny,
    # generate_*'s defaults: 512 x 512, 100 steps, guidance 7, ddim_sampler with eta 0.05; img2img keeps 70% of
    # the input (the original's strength=0.7 is the share kept: ours, the share re-run, is 0.3, the engine's own).
    defaults={"num_inference_steps": 100, "guidance_scale": 7.0, "width": 512, "height": 512, "scheduler": "ddim",
              "ddim_eta": 0.05},
    schedulers=("ddpm", "ddim", "plms"),
    sections=("text_encoder", "encode", "decoder", "movq"),
)
