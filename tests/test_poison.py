"""Poison rows: a manifest where some rows of every bad kind hide among good ones.

No bad row may kill the job, vanish, reach data/ or be written twice. Each lands in errors/ once,
with the stage that refused it and a reason naming the column or input. A rerun of the same job
recomputes nothing good, retries the bad rows only (attempt 2, 3...) and leaves data/ byte-identical.
"""

from __future__ import annotations


import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.jobs.run import run_job
from kandinsky_engine.manifest import MIX_ITEM
from tests.conftest import make_config, write_manifest

from tests.reference import decode

pytestmark = pytest.mark.ray

ROWS = 60  # 21 poison rows among 39 good ones of every kind (good_row), over 8 units
MAX_PIXELS = 100 * 100  # good inputs are 64x64; the "bomb" is 128x128
SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("task", pa.string()), ("width", pa.int64()),
    ("seed", pa.int64()), ("strength", pa.float64()), ("num_inference_steps", pa.int64()),
    ("image_uri", pa.string()), ("image_bytes", pa.binary()), ("mask_bytes", pa.binary()),
    ("mix", pa.list_(MIX_ITEM)),
])


def png(color, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def poison(files: Path) -> dict[str, tuple[dict, str, str]]:
    """id -> (row, stage expected in errors/, substring expected in its message)."""
    good, missing = str(files / "blue.png"), str(files / "nope.png")
    truncated = png("red")[:60]
    img2img = {"task": "img2img", "strength": 0.5}
    return {
        # Inputs that cannot be read or decoded.
        "p-missing-file": ({**img2img, "image_uri": missing}, "fetch_inputs", f"image_uri: file not found: {missing}"),
        "p-directory": ({**img2img, "image_uri": str(files)}, "fetch_inputs", "image_uri: cannot read"),
        "p-unknown-protocol": ({**img2img, "image_uri": "nosuchproto://b/x.png"}, "validate",
                               "column 'image_uri': refused by input.allowed_uri_prefixes: nosuchproto://b/x.png"),
        "p-truncated-png": ({**img2img, "image_bytes": truncated}, "MovqEncodeStage", "image: not a decodable image"),
        "p-not-an-image": ({**img2img, "image_bytes": b"%PDF-1.4 not an image at all"}, "MovqEncodeStage",
                           "image: not a decodable image: unrecognised format"),
        "p-empty-bytes": ({**img2img, "image_bytes": b""}, "MovqEncodeStage", "image: empty file (0 bytes)"),
        "p-too-many-pixels": ({**img2img, "image_uri": str(files / "big.png")}, "MovqEncodeStage",
                              f"image: image is 128x128 = 16384 pixels, over the limit of {MAX_PIXELS}"),
        "p-variation-garbage": ({"task": "variation", "strength": 0.5, "image_bytes": b"GIF89a\x00\x01garbage"},
                                "PriorStage", "image: not a decodable image"),
        # Row values the manifest check refuses.
        "p-null-prompt": ({"prompt": None}, "validate", "column 'prompt' is null"),
        "p-width-0": ({"width": 0}, "validate", "column 'width' must be >= 1, got 0"),
        "p-negative-seed": ({"seed": -3}, "validate", "column 'seed' must be >= 0, got -3"),
        "p-unknown-task": ({"task": "upscale"}, "validate", "column 'task' is 'upscale', expected one of"),
        "p-inpaint": ({"task": "inpaint", "image_bytes": png("blue"), "mask_bytes": png("white")}, "validate",
                      "column 'task': 'inpaint' needs another decoder"),
        "p-img2img-no-image": ({"task": "img2img", "strength": 0.5}, "validate",
                               "column 'image_uri': task 'img2img' needs a 'image_uri' or 'image_bytes' value"),
        "p-strength-1.5": ({**img2img, "image_uri": good, "strength": 1.5}, "validate",
                           "column 'strength' must be within [0, 1], got 1.5"),
        "p-mix-two-sources": ({"task": "mix", "mix": [{"text": "a cat", "image_uri": good, "weight": 1.0}]},
                              "validate", "column 'mix' item 0 needs exactly one of"),
        "p-mix-empty": ({"task": "mix", "mix": []}, "validate", "column 'mix': task 'mix' needs a non-empty"),
        "p-strength-no-step": ({**img2img, "image_uri": good, "strength": 0.01, "num_inference_steps": 4},
                               "validate", "column 'strength': 0.01 x 4 num_inference_steps leaves no step to run"),
        # Valid-looking rows that fail inside the pipeline.
        "p-mix-missing-image": ({"task": "mix", "mix": [{"text": "a cat", "weight": 0.5},
                                                        {"image_uri": missing, "weight": 0.5}]},
                                "fetch_inputs", f"mix image_uri: file not found: {missing}"),
        "p-mix-truncated-image": ({"task": "mix", "mix": [{"image_bytes": truncated, "weight": 1.0}]},
                                  "PriorStage", "mix image: not a decodable image"),
    }


def good_row(i: int, files: Path) -> dict:
    """Mostly text2img (task given or left to the default), some img2img and mix rows."""
    kind = i % 10
    if kind in (7, 8):
        source = {"image_uri": str(files / f"{['blue', 'green'][i % 2]}.png")} if kind == 7 else \
            {"image_bytes": png("orange")}
        return {"task": "img2img", "strength": 0.5, **source}
    if kind == 9:
        return {"task": "mix", "mix": [{"text": "a lighthouse", "weight": 0.5},
                                       {"image_uri": str(files / "blue.png"), "weight": 0.5}]}
    return {"task": "text2img" if i % 2 else None}


def sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.parquet"))}


def ids_in(folder: Path) -> Counter:
    return Counter(i for p in folder.rglob("*.parquet") for i in pq.read_table(p, columns=["id"])["id"].to_pylist())


def errors_by_id(out: Path) -> dict[str, dict]:
    rows = [r for p in sorted((out / "errors").rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == len({r["id"] for r in rows}), "an id is in errors/ twice"
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def job(ray_cluster, model_cache, tmp_path_factory):
    """The job run twice on the same output; what each run left."""
    tmp = tmp_path_factory.mktemp("poison")
    files = tmp / "files"
    files.mkdir()
    for color in ("blue", "green"):
        (files / f"{color}.png").write_bytes(png(color))
    (files / "big.png").write_bytes(png("purple", (128, 128)))
    bad = poison(files)
    rows, names = [], iter(bad)
    spots = {round((k + 0.5) * ROWS / len(bad)) for k in range(len(bad))}  # spread over the units
    for i in range(ROWS):
        if i in spots:
            name = next(names)
            rows.append({"id": name, "prompt": "poison", **bad[name][0]})
        else:
            rows.append({"id": f"g-{i:03d}", "prompt": f"a lighthouse, study {i}", **good_row(i, files)})
    assert len(rows) == ROWS and sum(r["id"] in bad for r in rows) == len(bad)
    manifest = write_manifest(tmp / "manifest.parquet", [{k: r.get(k) for k in SCHEMA.names} for r in rows], SCHEMA)
    small = {"batch_size": 2}
    config = make_config(model_cache, manifest, str(tmp / "out"), input={"rows_per_block": 8,
                         "max_image_pixels": MAX_PIXELS}, prior=small, encode=small, decoder=small,
                         movq={"batch_size": 4})
    out = tmp / "out"
    first = run_job(config)
    before = {"data": sha256s(out / "data"), "ids": ids_in(out / "data"), "errors": errors_by_id(out)}
    second = run_job(config)  # the same job again on the same output
    return {"config": config, "out": out, "rows": rows, "bad": bad, "first": first, "second": second,
            "before": before}


def test_every_row_lands_once_where_it_belongs(job):
    rows, bad, out = job["rows"], job["bad"], job["out"]
    good = {r["id"] for r in rows} - set(bad)
    data = job["before"]["ids"]
    assert set(data) == good and set(data.values()) == {1}  # every good row, each once
    errors = job["before"]["errors"]
    assert set(errors) == set(bad)  # every bad row, each once (errors_by_id checks duplicates)
    assert set(data) | set(errors) == {r["id"] for r in rows} and not set(data) & set(errors)
    first = job["first"]
    assert (first["rows"], first["failed_rows"]) == (len(good), len(bad))
    assert (first["rows_skipped"], first["rows_computed"], first["rows_retried"]) == (0, ROWS, 0)
    # Good rows are real images of the requested size, whatever their task.
    sample = pq.read_table(out / "data").to_pylist()
    assert {r["task"] for r in sample} >= {"text2img", "img2img", "mix"}
    assert all(decode(r["image"]["bytes"]).shape == (64, 64, 3) for r in sample)


def test_each_poison_kind_is_explained(job):
    errors, rows = job["before"]["errors"], {r["id"]: r for r in job["rows"]}
    wrong = {}
    for row_id, (_, stage, reason) in job["bad"].items():
        error = errors[row_id]
        if error["stage"] != stage or reason not in error["message"] or error["attempt"] != 1:
            wrong[row_id] = (error["stage"], error["error_type"], error["message"][:300])
        assert error["task"] == (rows[row_id].get("task") or "text2img")
    assert wrong == {}
    validated = [e for e in errors.values() if e["stage"] == "validate"]
    assert {e["error_type"] for e in validated} == {"InvalidRow"}
    assert all(str(job["config"].input.manifest) in e["message"] for e in validated)  # names the file too


def test_rerun_retries_only_the_poison_rows(job):
    out, bad, second = job["out"], job["bad"], job["second"]
    good = ROWS - len(bad)
    assert (second["rows_skipped"], second["rows_computed"], second["rows_retried"]) == (good, len(bad), len(bad))
    assert (second["rows"], second["failed_rows"]) == (good, len(bad))
    # Nothing good was recomputed or rewritten: data/ is byte-identical, no attempt-2 shard appeared.
    assert sha256s(out / "data") == job["before"]["data"]
    assert ids_in(out / "data") == job["before"]["ids"]
    assert {s["file"].split("/")[-1]: s["sha256"] for s in second["shards"]} == job["before"]["data"]
    errors = errors_by_id(out)
    assert set(errors) == set(bad) and {e["attempt"] for e in errors.values()} == {2}
    first = job["before"]["errors"]
    assert {i: (e["stage"], e["message"]) for i, e in errors.items()} == \
        {i: (e["stage"], e["message"]) for i, e in first.items()}  # the same reason, deterministically
    assert not (out / "_tmp").exists() and len(list((out / "_runs").glob("*.json"))) == 2


def test_cli_exits_1_while_rows_fail_with_fail_on_row_errors(job, tmp_path, capsys):
    """The CLI, on the same output with the same config and --fail-on-row-errors: a third attempt,
    exit code 1 (without the flag a finished job with failed rows exits 0: tests/test_operator.py)."""
    out = job["out"]
    config_file = tmp_path / "job.json"  # JSON is YAML
    config_file.write_text(json.dumps(job["config"].model_dump(mode="json")))
    assert main(["run", str(config_file), "--fail-on-row-errors"]) == 1
    captured = capsys.readouterr()
    assert "exit code 1:" in captured.err and "--fail-on-row-errors" in captured.err
    assert f"{len(job['bad'])} row(s) failed: see {out}/errors/" in captured.err
    assert f"{len(job['bad'])} rows computed, {ROWS - len(job['bad'])} already committed" in captured.out
    errors = errors_by_id(out)
    assert set(errors) == set(job["bad"]) and {e["attempt"] for e in errors.values()} == {3}
    assert sha256s(out / "data") == job["before"]["data"]
