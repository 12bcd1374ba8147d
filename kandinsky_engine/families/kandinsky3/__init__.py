"""Kandinsky 3: no prior. A T5 encoder (flan-UL2's, 8.7B parameters) embeds the prompt, a text-conditioned
U-Net (`Kandinsky3UNet`, ~3B) denoises MoVQ latents with a DDPM scheduler, and the MoVQ decodes them.
diffusers: Kandinsky3Pipeline (text2img), Kandinsky3Img2ImgPipeline (img2img).

Weights: model.decoder alone, one pipeline directory (tokenizer, text_encoder, unet, scheduler, movq),
e.g. kandinsky-community/kandinsky-3, or 'tiny-k3'. The prior_* columns are not used.
"""

from __future__ import annotations

from ...config import JobConfig, ModelConfig
from ...stages.kandinsky3 import Kandinsky3UNetStage
from ...stages.movq import MovqStage
from ...stages.movq_encode import MovqEncodeStage
from ...stages.text_encoder import T5EncoderStage
from .. import Family
from .tiny import write_tiny

TASKS = ("text2img", "img2img")


def tasks(model: ModelConfig, storage_options: dict | None = None) -> tuple[str, ...]:
    return TASKS  # one U-Net runs both


def stages(config: JobConfig, job_tasks: set[str]) -> list:
    """T5 -> [MoVQ encode] -> U-Net -> MoVQ. The encoder's img2img preprocessing is the Kandinsky 3
    img2img pipeline's (the same VaeImageProcessor: bicubic, reducing_gap=1, [-1, 1]); it runs only
    when some row is img2img."""
    plan = [("text_encoder", T5EncoderStage, {})]
    if "img2img" in job_tasks:
        plan.append(("encode", MovqEncodeStage, {}))
    return plan + [("decoder", Kandinsky3UNetStage, {}), ("movq", MovqStage, {})]


FAMILY = Family(
    name="kandinsky3",
    title="Kandinsky 3",
    pipelines=("Kandinsky3Pipeline", "Kandinsky3Img2ImgPipeline"),
    parts=("decoder",),
    tasks=tasks,
    stages=stages,
    write_tiny=write_tiny,
    # Kandinsky3Pipeline's call defaults; img2img's strength default (0.3) is already the engine's.
    defaults={"num_inference_steps": 25, "guidance_scale": 3.0, "width": 1024, "height": 1024},
    sections=("text_encoder", "encode", "decoder", "movq"),
)
