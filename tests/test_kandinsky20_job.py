"""A whole Kandinsky 2.0 job on a local Ray cluster: text2img and img2img rows (and a row of a task the decoder
cannot run, and a poison input) in one job; the rerun resumes (nothing good recomputed) and verify finds no
problem. Inpainting, which needs the 9-channel decoder, is covered at stage level (tests/test_kandinsky20.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import png
from tests.family_jobs import bad_rows, check_every_row_once_then_resumed, family_job, made_rows

pytestmark = pytest.mark.ray

GOOD = [
    {"id": "t2i", "prompt": "a red cat, 4k photo", "negative_prompt": "blurry"},
    {"id": "t2i-wide", "prompt": "Медведь в лесу", "width": 128},
    {"id": "i2i", "prompt": "a watercolor", "task": "img2img", "image_bytes": png("teal", (80, 64)), "strength": 0.6},
    {"id": "t2i-noguide", "prompt": "山水画", "guidance_scale": 1.0},
]
BAD = {**bad_rows("KLEncodeStage"),
       "no-step": ({"prompt": "x", "task": "img2img", "image_bytes": png("red"), "strength": 0.01,
                    "num_inference_steps": 27}, "validate", "leaves no step")}


@pytest.fixture(scope="module")
def job(ray_cluster, model_cache, tmp_path_factory):
    rows = GOOD[:2] + [{"id": k, **v[0]} for k, v in BAD.items()] + GOOD[2:]
    return family_job(tmp_path_factory, model_cache, "k20", rows, model={"decoder": "tiny-k20"},
                      defaults={"scheduler": "ddpm"}, input={"rows_per_block": 4}, decoder={"batch_size": 3})


def test_k20_job_every_row_once_then_resumes(job):
    check_every_row_once_then_resumed(job, GOOD, BAD)
    for want, row in made_rows(job, GOOD):
        assert row["guidance_scale"] == want.get("guidance_scale", 7.0)  # the family's default: the original's 7
        assert row["decoder_model"].startswith("tiny-k20@") and row["prior_model"] is None
    run = json.loads((job["out"] / "_RUN.json").read_text())
    assert run["inputs"]["family"] == "kandinsky20" and set(run["inputs"]["models"]) == {"decoder"}
    assert run["inputs"]["defaults"]["scheduler"] == "ddpm" and run["inputs"]["defaults"]["ddim_eta"] == 0.05


def test_k20_job_images_match_the_stages(job):
    """The job's image of a row is what the stages make of it alone (batch shape within 1/255)."""
    from kandinsky_engine.families import resolve_family
    from kandinsky_engine.stages.kandinsky20 import Kandinsky20UNetStage
    from kandinsky_engine.stages.kandinsky20_text import Kandinsky20TextStage
    from kandinsky_engine.stages.vae import KLDecodeStage, KLEncodeStage
    from tests.conftest import assert_rows_match_stages

    config, _ = resolve_family(job["config"])
    assert_rows_match_stages(config, job["out"], [Kandinsky20TextStage, KLEncodeStage, Kandinsky20UNetStage,
                                                  KLDecodeStage], [GOOD[1], GOOD[2]], tolerance=1)
