"""FLOPs per row of each model stage, for `kandinsky-batch plan --from-flops` (jobs/plan.py) and the
GPU layout a job gets by default (pipelines/auto_layout.py).

Counted, not typed: torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add, matmuls,
convolutions and attention) on the family's released architecture built on the meta device (each
family's reference/*.json, through the stage memory model: kandinsky_engine/memory.py), running the
forward calls the stage makes (kandinsky_engine/stage_calls.py) on one row at the job's working
size (the next multiple of 64). Nothing is allocated or downloaded; a few seconds per family, once
per process. A stage's FLOPs per row are each call's count times the forwards it makes per row
(`forwards_per_row`). For Kandinsky 2.2 at 768x768 these are the counts its reference file states
(`_flops_768`: U-Net 1992.5, MoVQ decode 4885.5, prior 164.6, CLIP text 97.9 GFLOP; tests/test_plan.py).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=64)
def forward_gflop(family: str, part: str, call, h: int, w: int) -> float:
    """GFLOP of one `call` of the released `part` on one row at the latent grid h x w."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .memory import released_module
    from .stage_calls import meta_mode

    module = released_module(family, part)
    with torch.inference_mode(), meta_mode(efficient_attention=False), FlopCounterMode(display=False) as counter:
        call(module, 1, h, w)
    return counter.get_total_flops() / 1e9


def forwards_per_row(stage: str, part: str, defaults) -> float:
    """One-row forwards of `part` that `stage` runs for each text2img row without a negative prompt."""
    guided = 2 if defaults.guidance_scale > 1 else 1  # the unconditional half of classifier-free guidance
    prior_guided = 2 if defaults.prior_guidance_scale > 1 else 1
    if part == "decoder_unet":
        return guided * defaults.num_inference_steps
    if part == "prior_transformer":
        return prior_guided * defaults.prior_num_inference_steps
    if stage == "prior" and part == "text_encoder":
        return prior_guided  # the prompt and "": the prior pipelines encode the negative with every row
    if part == "image_encoder":
        return 0  # the zero-image embedding: once per actor
    # Once per row: the other text encoders (2.1's decoder and 2.0 encode "" once per actor; Kandinsky
    # 3's null negative is no T5 call), the MoVQ or KL VAE.
    return 1


def stage_gflop(config, family: str, stages: list[str]) -> dict[str, float]:
    """GFLOP per row of each of `stages` at the job's defaults (size, steps, guidance) on the family's
    released architecture."""
    from .stage_calls import recipe

    d = config.defaults
    h, w = -(-d.height // 64) * 8, -(-d.width // 64) * 8  # latent grid of the working size (x8 in every family)
    out = {}
    for stage in stages:
        _, calls = recipe(family, stage, {"text2img"})  # the U-Net of text2img rows
        out[stage] = sum(forward_gflop(family, part, call, h, w) * n for part, _, call in calls
                         if (n := forwards_per_row(stage, part, d)))
    return out
