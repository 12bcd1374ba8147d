"""Kandinsky 2.2: a CLIP-space diffusion prior, then a U-Net decoder conditioned on the image embedding
alone (no text), then the MoVQ. diffusers: KandinskyV22PriorPipeline (+ Emb2Emb), KandinskyV22Pipeline,
-Img2Img, -Inpaint, -Controlnet(-Img2Img).

Weights: model.prior (prior pipeline dir: CLIP text and image encoders, prior), model.decoder (U-Net,
scheduler, MoVQ; the U-Net decides the tasks: standard, 9-channel inpainting or ControlNet), model.depth
(the depth estimator of ControlNet rows without a hint).
"""

from __future__ import annotations

from ...config import JobConfig, ModelConfig
from ...inputs import IMAGE_TASKS
from ...models import unet_config
from ...stages.decoder import DecoderStage
from ...stages.hint import CONTROLNET_TASKS, HintStage
from ...stages.movq import MovqStage
from ...stages.movq_encode import MovqEncodeStage
from ...stages.prior import PriorStage
from .. import Family
from .tiny import write_tiny

# Tasks, and which decoder runs them (a job loads one decoder, told apart by its U-Net config).
DECODER_TASKS = {
    "standard": ("text2img", "img2img", "mix", "variation"),
    "inpaint": ("inpaint",),
    "controlnet": ("controlnet", "controlnet_img2img"),
}


def decoder_kind(model: ModelConfig, storage_options: dict | None = None) -> str:
    unet = unet_config(model, storage_options)
    if unet.get("in_channels") == 9:
        return "inpaint"
    if unet.get("addition_embed_type") == "image_hint":
        return "controlnet"
    return "standard"


def tasks(model: ModelConfig, storage_options: dict | None = None) -> tuple[str, ...]:
    return DECODER_TASKS[decoder_kind(model, storage_options)]


def stages(config: JobConfig, job_tasks: set[str]) -> list:
    """prior -> [hint] -> [MoVQ encode] -> decoder -> MoVQ: hints and encoding only when some row needs them."""
    plan = [("prior", PriorStage, {})]
    if job_tasks & set(CONTROLNET_TASKS):
        plan.append(("hint", HintStage, {}))
    if job_tasks & set(IMAGE_TASKS):
        plan.append(("encode", MovqEncodeStage, {}))
    return plan + [("decoder", DecoderStage, {}), ("movq", MovqStage, {})]


FAMILY = Family(
    name="kandinsky22",
    title="Kandinsky 2.2",
    pipelines=("KandinskyV22Pipeline", "KandinskyV22Img2ImgPipeline", "KandinskyV22InpaintPipeline",
               "KandinskyV22InpaintCombinedPipeline", "KandinskyV22CombinedPipeline",
               "KandinskyV22Img2ImgCombinedPipeline", "KandinskyV22ControlnetPipeline",
               "KandinskyV22ControlnetImg2ImgPipeline"),
    parts=("prior", "decoder", "depth"),
    tasks=tasks,
    stages=stages,
    write_tiny=write_tiny,
)
