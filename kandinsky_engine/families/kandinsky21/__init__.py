"""Kandinsky 2.1: the multilingual model. A CLIP ViT-L diffusion prior (the same pipeline shape as 2.2's),
then a U-Net decoder conditioned on the image embedding *and* the prompt (XLM-R `MultilingualCLIP`:
pooled text embedding + hidden states), sampled with DDIM, then the MoVQ. diffusers: KandinskyPriorPipeline
(+ `interpolate`), KandinskyPipeline, -Img2Img, -Inpaint (and the combined ones).

Weights: model.prior (prior pipeline dir: CLIP text and image encoders, prior), model.decoder (XLM-R
tokenizer and text encoder, U-Net, DDIM scheduler, MoVQ; a 9-channel U-Net is the inpainting decoder).
"""

from __future__ import annotations

from ...config import JobConfig, ModelConfig
from ...inputs import IMAGE_TASKS
from ...models import unet_config
from ...stages.decoder21 import Decoder21Stage
from ...stages.movq import MovqStage
from ...stages.movq_encode import MovqEncodeStage
from ...stages.prior import PriorStage
from .. import Family
from .tiny import write_tiny

# Tasks, by decoder (a job loads one; the inpainting U-Net takes 9 input channels). No `variation`:
# diffusers has no 2.1 emb2emb prior pipeline.
DECODER_TASKS = {"standard": ("text2img", "img2img", "mix"), "inpaint": ("inpaint",)}


def tasks(model: ModelConfig, storage_options: dict | None = None) -> tuple[str, ...]:
    return DECODER_TASKS["inpaint" if unet_config(model, storage_options).get("in_channels") == 9 else "standard"]


def stages(config: JobConfig, job_tasks: set[str]) -> list:
    """prior -> [MoVQ encode] -> decoder (with its text encoder) -> MoVQ. The prior is 2.2's stage:
    KandinskyPriorPipeline's call, `_encode_prompt` and, per row, `interpolate` are the same code."""
    plan = [("prior", PriorStage, {})]
    if job_tasks & set(IMAGE_TASKS):
        plan.append(("encode", MovqEncodeStage, {}))  # 2.1's img2img / inpaint preprocessing is 2.2's
    return plan + [("decoder", Decoder21Stage, {}), ("movq", MovqStage, {})]


FAMILY = Family(
    name="kandinsky21",
    title="Kandinsky 2.1",
    pipelines=("KandinskyPipeline", "KandinskyImg2ImgPipeline", "KandinskyInpaintPipeline",
               "KandinskyCombinedPipeline", "KandinskyImg2ImgCombinedPipeline", "KandinskyInpaintCombinedPipeline"),
    parts=("prior", "decoder"),
    tasks=tasks,
    stages=stages,
    write_tiny=write_tiny,
    defaults={"scheduler": "ddim"},  # the decoder's own DDIMScheduler (eta 0)
    task_defaults={"img2img": {"guidance_scale": 7.0}},  # KandinskyImg2ImgPipeline's default
    sections=("prior", "encode", "decoder", "movq"),
)
