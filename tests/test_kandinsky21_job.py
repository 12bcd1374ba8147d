"""A whole Kandinsky 2.1 job on a local Ray cluster: its tasks, a poison row and a task its decoder
cannot run land in errors/, the rerun resumes (nothing good recomputed), and verify finds no problem."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from kandinsky_engine.jobs.run import run_job
from kandinsky_engine.jobs.verify import verify
from tests.conftest import make_config, png, write_manifest
from tests.reference import decode
from tests.test_poison import errors_by_id, ids_in, sha256s

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
BAD = {  # id -> (row, stage expected in errors/, substring of its message)
    "poison": ({"prompt": "x", "task": "img2img", "image_bytes": b"not an image", "strength": 0.8}, "MovqEncodeStage",
               "not a decodable image"),
    "inpaint-here": ({"prompt": "x", "task": "inpaint", "image_bytes": png("red"), "mask_bytes": png("white")},
                     "validate", "inpaint"),
}


@pytest.fixture(scope="module")
def job(ray_cluster, model_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("k21")
    rows = GOOD[:3] + [{"id": k, **v[0]} for k, v in BAD.items()] + GOOD[3:]
    manifest = write_manifest(tmp / "manifest.parquet", rows)
    config = make_config(model_cache, manifest, str(tmp / "out"), model={"prior": "tiny-k21", "decoder": "tiny-k21"},
                         input={"rows_per_block": 4}, decoder={"batch_size": 3})
    out = tmp / "out"
    first = run_job(config)
    before = {"data": sha256s(out / "data"), "ids": ids_in(out / "data"), "errors": errors_by_id(out)}
    second = run_job(config)
    return {"config": config, "out": out, "first": first, "second": second, "before": before}


def test_k21_job_every_row_once_then_resumes(job):
    out, first, second, before = job["out"], job["first"], job["second"], job["before"]
    good = {r["id"]: r for r in GOOD}
    assert set(before["ids"]) == set(good) and set(before["ids"].values()) == {1}
    assert {i: (e["stage"], BAD[i][2] in e["message"]) for i, e in before["errors"].items()} == \
        {i: (stage, True) for i, (_, stage, _) in BAD.items()}
    assert (first["rows"], first["failed_rows"], first["rows_computed"]) == (len(GOOD), len(BAD), len(GOOD) + len(BAD))
    # The rerun retries the failed rows only: data/ is byte-identical, nothing good recomputed.
    assert (second["rows_skipped"], second["rows_computed"]) == (len(GOOD), len(BAD))
    assert sha256s(out / "data") == before["data"] and ids_in(out / "data") == before["ids"]
    check = verify(str(out))
    assert check.problems == [] and (check.rows, check.failed_rows) == (len(GOOD), len(BAD))

    rows = {r["id"]: r for r in pq.read_table(out / "data").to_pylist()}
    for row_id, want in good.items():
        row = rows[row_id]
        assert decode(row["image"]["bytes"]).shape == (64, want.get("width", 64), 3)
        # The family's defaults: img2img guides at 7.0 (unless the row says), the others at 4.0.
        assert row["guidance_scale"] == want.get("guidance_scale", 7.0 if row["task"] == "img2img" else 4.0)
        assert row["decoder_model"].startswith("tiny-k21@") and row["prior_model"].startswith("tiny-k21@")
    run = json.loads((out / "_RUN.json").read_text())
    assert run["inputs"]["family"] == "kandinsky21" and set(run["inputs"]["models"]) == {"prior", "decoder"}


def test_k21_job_images_match_the_stages(job):
    """The job's image of a row is what the stages make of it alone (batch shape within 3/255)."""
    import numpy as np

    from kandinsky_engine import MovqStage, PriorStage
    from kandinsky_engine.families import resolve_family
    from kandinsky_engine.stages.decoder21 import Decoder21Stage
    from kandinsky_engine.stages.movq_encode import MovqEncodeStage
    from tests.conftest import run_chain

    config, _ = resolve_family(job["config"])
    chain = (config, [PriorStage(config), MovqEncodeStage(config), Decoder21Stage(config), MovqStage(config)])
    rows = {r["id"]: r for r in pq.read_table(job["out"] / "data").to_pylist()}
    for want in (GOOD[1], GOOD[3]):
        alone = decode(run_chain(chain, [want])["image"][0])
        diff = np.abs(alone.astype(int) - decode(rows[want["id"]]["image"]["bytes"]).astype(int)).max()
        assert diff <= 3, (want["id"], diff)
