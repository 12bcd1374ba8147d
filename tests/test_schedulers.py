"""defaults.scheduler: each sampler equals the diffusers pipeline with that scheduler swapped in
(`pipe.scheduler = X.from_config(pipe.scheduler.config)`) at batch size 1, for every decoder task.

diffusers 0.42.1's Kandinsky 2.2 pipelines pass `generator=` to `scheduler.step`, which
UniPCMultistepScheduler.step does not take (TypeError): its reference is the pipeline with a
UniPC that accepts and ignores the argument (UniPC draws no noise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kandinsky_engine import DecoderStage, MovqStage, PriorStage
from kandinsky_engine.stages.hint import HintStage
from kandinsky_engine.stages.movq_encode import MovqEncodeStage
from kandinsky_engine.sampling import SCHEDULERS
from tests.conftest import batch_of, make_config
from tests.conftest import run_chain as run
from tests.reference import Reference, decode, max_diff
from tests.test_img2img import init_image, png
from tests.test_inpaint import mask_image

KINDS = [k for k in SCHEDULERS if k != "ddpm"]  # ddpm: tests/test_parity.py and the task tests
DECODERS = {"text2img": "tiny", "img2img": "tiny", "inpaint": "tiny-inpaint", "controlnet": "tiny-controlnet",
            "controlnet_img2img": "tiny-controlnet"}
PIPELINES = {"text2img": "KandinskyV22Pipeline", "img2img": "KandinskyV22Img2ImgPipeline",
             "inpaint": "KandinskyV22InpaintPipeline", "controlnet": "KandinskyV22ControlnetPipeline",
             "controlnet_img2img": "KandinskyV22ControlnetImg2ImgPipeline"}
DIFFS: dict[tuple[str, str], int] = {}


def scheduler_class(kind: str):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[kind])
    if kind != "unipc":
        return cls

    class UniPC(cls):  # see the module docstring
        def step(self, *args, generator=None, **kwargs):
            return super().step(*args, **kwargs)

    return UniPC


@pytest.fixture(scope="module")
def reference(tiny_root):
    torch.set_num_threads(1)
    return Reference(tiny_root)


@pytest.fixture(scope="module")
def chains(model_cache, tmp_path_factory):
    """(config, stages) per (task, scheduler), built on first use."""
    built = {}

    def get(task: str, kind: str):
        if (task, kind) not in built:
            config = make_config(model_cache, "unused.parquet", str(tmp_path_factory.mktemp("out")),
                                 model={"decoder": DECODERS[task]}, defaults={"scheduler": kind})
            stages = [PriorStage(config)] + ([HintStage(config)] if task.startswith("controlnet") else [])
            stages += [MovqEncodeStage(config), DecoderStage(config), MovqStage(config)]
            built[task, kind] = config, stages
        return built[task, kind]

    return get


def pipeline(tiny_root, task: str, kind: str):
    import diffusers

    pipe = getattr(diffusers, PIPELINES[task]).from_pretrained(tiny_root / f"decoder{DECODERS[task][4:]}")
    pipe.scheduler = scheduler_class(kind).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def task_row(task: str) -> tuple[dict, dict]:
    """A row of `task` and the inputs diffusers gets for it."""
    row = {"id": task, "prompt": "a robot in a garden", "task": task, "num_inference_steps": 5, "seed": 3,
           "guidance_scale": 5.0}
    given = {}
    if task in ("img2img", "inpaint", "controlnet_img2img"):
        given["image"] = init_image(64, 64, seed=1) if task == "inpaint" else init_image(80, 72, seed=1)
        row.update(image_bytes=png(given["image"]), strength=0.6)
    if task == "inpaint":
        given["mask_image"] = mask_image(64, 64, (8, 16, 40, 48))
        row["mask_bytes"] = png(given["mask_image"])
    if task.startswith("controlnet"):
        hint = init_image(64, 64, seed=2)
        row["hint_bytes"] = png(hint)
        given["hint"] = (torch.from_numpy(np.array(hint)).float() / 255.0).permute(2, 0, 1)[None]  # make_hint
    return row, given


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("task", list(DECODERS))
def test_scheduler_matches_diffusers_at_batch_size_1(chains, reference, tiny_root, task, kind):
    config, stages = chains(task, kind)
    row, given = task_row(task)
    ours = run((config, stages), [row])
    assert ours["error_message"][0] == ""
    resolved = {k: v[0] for k, v in batch_of([row], config).items()}
    emb = reference.embeds(resolved)
    extra = {"strength": float(resolved["strength"])} if task in ("img2img", "controlnet_img2img") else {}
    out = pipeline(tiny_root, task, kind)(
        image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds, height=64, width=64,
        num_inference_steps=5, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3),
        output_type="np", **given, **extra,
    ).images[0]
    diff = max_diff(decode(ours["image"][0]), (out * 255).round().astype(np.uint8))
    DIFFS[task, kind] = diff
    print(f"\n{task} / {kind}: max |diff| {diff}/255")
    assert diff <= 1


@pytest.mark.parametrize("kind", ["dpmpp", "unipc"])
def test_multistep_row_does_not_depend_on_batch_mates(chains, kind):
    """A multistep scheduler's history is per group and its update elementwise: a row keeps its image
    among other rows (within the batch-shape tolerance) and a different seed changes it."""
    config, stages = chains("text2img", kind)
    rows = [{"id": f"r{i}", "prompt": p, "seed": i, "num_inference_steps": 6, "guidance_scale": 3.0 + i}
            for i, p in enumerate(["a cat", "a dog", "a ship"])]
    alone = decode(run((config, stages), [rows[1]])["image"][0])
    together = run((config, stages), rows)
    assert max_diff(alone, decode(together["image"][1])) <= 1
    assert max_diff(alone, decode(run((config, stages), [{**rows[1], "seed": 99}])["image"][0])) > 10
