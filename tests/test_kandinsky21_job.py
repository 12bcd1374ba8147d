"""A whole Kandinsky 2.1 job on a local Ray cluster: its tasks, a poison row and a task its decoder
cannot run land in errors/, the rerun resumes (nothing good recomputed), and verify finds no problem."""

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
    {"id": "i2i-wide", "prompt": "a harbour", "task": "img2img", "image_bytes": png("navy", (128, 64)),
     "width": 128, "strength": 0.5},
    {"id": "mix", "prompt": "a cat", "task": "mix",
     "mix": [{"text": "a cat", "weight": 0.5}, {"image_bytes": png("orange"), "weight": 0.5}]},
    {"id": "t2i-noguide", "prompt": "山水画", "guidance_scale": 1.0},
]
BAD = bad_rows("MovqEncodeStage")


@pytest.fixture(scope="module")
def job(ray_cluster, model_cache, tmp_path_factory):
    rows = GOOD[:3] + [{"id": k, **v[0]} for k, v in BAD.items()] + GOOD[3:]
    return family_job(tmp_path_factory, model_cache, "k21", rows, model={"prior": "tiny-k21", "decoder": "tiny-k21"},
                      input={"rows_per_block": 4}, decoder={"batch_size": 3})


def test_k21_job_every_row_once_then_resumes(job):
    check_every_row_once_then_resumed(job, GOOD, BAD)
    for want, row in made_rows(job, GOOD):
        # The family's defaults: img2img guides at 7.0 (unless the row says), the others at 4.0.
        assert row["guidance_scale"] == want.get("guidance_scale", 7.0 if row["task"] == "img2img" else 4.0)
        assert row["decoder_model"].startswith("tiny-k21@") and row["prior_model"].startswith("tiny-k21@")
    run = json.loads((job["out"] / "_RUN.json").read_text())
    assert run["inputs"]["family"] == "kandinsky21" and set(run["inputs"]["models"]) == {"prior", "decoder"}


def test_k21_job_images_match_the_stages(job):
    """The job's image of a row is what the stages make of it alone (batch shape within 3/255)."""
    from kandinsky_engine import MovqStage, PriorStage
    from kandinsky_engine.families import resolve_family
    from kandinsky_engine.stages.decoder21 import Decoder21Stage
    from kandinsky_engine.stages.movq_encode import MovqEncodeStage
    from tests.conftest import assert_rows_match_stages

    config, _ = resolve_family(job["config"])
    assert_rows_match_stages(config, job["out"], [PriorStage, MovqEncodeStage, Decoder21Stage, MovqStage],
                             [GOOD[1], GOOD[3]], tolerance=3)
