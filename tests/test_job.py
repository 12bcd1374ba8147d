"""Whole jobs on a local Ray cluster: exactly-once output, reproducibility, parity, CLI."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
import torch

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.jobs.run import run_job
from tests.conftest import TINY_YAML, make_config, write_manifest
from tests.reference import Reference, decode, max_diff

pytestmark = pytest.mark.ray

PROMPTS = ["a red cat", "Красный кот на крыше", "一只红色的猫", "🐱🚀 cat astronaut", "a quiet harbour", "", "x" * 500]
SIZES = [(64, 64), (128, 64), (64, 128), (128, 128)]


def manifest_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        rows.append({"id": f"row-{i:03d}", "prompt": PROMPTS[i % len(PROMPTS)], "width": width, "height": height,
                     "negative_prompt": "blurry" if i % 3 == 0 else None})
    return rows


def read_output(path: str) -> dict[str, dict]:
    table = pq.read_table(f"{path}/data")
    rows = table.to_pylist()
    return {r["id"]: r for r in rows}, len(rows)


@pytest.fixture(scope="module")
def first_run(ray_cluster, model_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    manifest = write_manifest(tmp / "manifest.parquet", manifest_rows(14))
    # Blocks of 6 rows, split by the stages into 2s, 4s and 3s: the rerun test below then shows
    # that a row's batch-mates (and so its pixels) do not depend on how Ray bundles blocks.
    config = make_config(model_cache, manifest, str(tmp / "out"), fuse_stages=False,  # a pool per stage, the default
                         input={"rows_per_block": 6}, prior={"batch_size": 2}, movq={"batch_size": 3})
    summary = run_job(config)
    return config, summary, *read_output(config.output.path)


def test_every_row_exactly_once_with_requested_size(first_run):
    config, summary, rows, count = first_run
    expected = {r["id"]: r for r in manifest_rows(14)}
    assert count == len(rows) == len(expected) == summary["rows"]
    assert set(rows) == set(expected)
    for row_id, row in rows.items():
        want = expected[row_id]
        assert decode(row["image"]["bytes"]).shape == (want["height"], want["width"], 3)
        assert (row["width"], row["height"]) == (want["width"], want["height"])
        assert row["prompt"] == want["prompt"] and row["negative_prompt"] == want["negative_prompt"]
        assert row["num_inference_steps"] == 2 and row["guidance_scale"] == 4.0 and row["seed"] >= 0
        assert re.fullmatch(r"tiny@[0-9a-f]{16}", row["prior_model"]) and row["decoder_model"].startswith("tiny@")


def test_summary_is_written_last_and_lists_every_shard(first_run):
    config, summary, rows, count = first_run
    on_disk = json.loads(open(f"{config.output.path}/_SUCCESS.json").read())
    # _SUCCESS.json stays small: counts and one line per manifest file; the shard records are in _index.parquet.
    assert (on_disk["rows"], on_disk["shards"], on_disk["index"]) == (14, 3, "_index.parquet")
    assert [(f["file"], f["rows"], f["units"], f["complete"]) for f in on_disk["files"]] == [("manifest.parquet", 14, 3, True)]
    index = pq.read_table(f"{config.output.path}/_index.parquet").to_pylist()
    shards = [r for r in index if r["file"].startswith("data/")]
    assert [s["rows"] for s in shards] == [6, 6, 2]  # one shard per unit
    listed = {s["file"] for s in shards}
    root = config.output.path.rstrip("/") + "/"
    assert listed == {p.removeprefix(root) for p in pq.ParquetDataset(f"{config.output.path}/data").files}
    import hashlib

    for shard in shards:
        payload = open(f"{config.output.path}/{shard['file']}", "rb").read()
        assert (len(payload), hashlib.sha256(payload).hexdigest()) == (shard["bytes"], shard["sha256"])
    assert on_disk["images_per_s"] > 0 and on_disk["config"]["defaults"]["num_inference_steps"] == 2


def test_output_reads_with_hugging_face_datasets(first_run):
    import datasets

    config = first_run[0]
    ds = datasets.load_dataset("parquet", data_files=f"{config.output.path}/data/*/*.parquet", split="train")
    assert ds.num_rows == 14 and {"id", "image", "prompt", "seed"} <= set(ds.column_names)
    # The image column is an HF Image feature: rows hold PIL images of the requested size.
    assert ds.features["image"] == datasets.Image() and ds[1]["image"].size == (128, 64)


def test_rerun_gives_byte_identical_images(first_run):
    config, _, rows, _ = first_run
    run_job(config, overwrite=True)
    again, count = read_output(config.output.path)
    assert count == 14
    assert {k: r["image"] for k, r in again.items()} == {k: r["image"] for k, r in rows.items()}


def test_fused_stages_on_two_actors_give_the_same_bytes(first_run):
    """fuse_stages: every model stage in one actor pool (two actors here); same units, same batch
    sizes and thread counts as the pooled run, so the same bytes, whichever actor took a unit."""
    config, _, rows, _ = first_run
    fused = config.model_copy(update={"fuse_stages": True, "decoder": config.decoder.model_copy(update={"actors": 2}),
                                      "output": config.output.model_copy(update={"path": config.output.path + "-fused"})})
    summary = run_job(fused)
    again, count = read_output(fused.output.path)
    assert count == summary["rows"] == 14
    assert {k: r["image"] for k, r in again.items()} == {k: r["image"] for k, r in rows.items()}
    assert "MapBatches(Fused)" in summary["ray_data_stats"] and "PriorStagePool" not in summary["ray_data_stats"]
    assert "MapBatches(PriorStagePool)" in first_run[1]["ray_data_stats"]


def test_rerun_resumes_and_a_changed_job_is_refused(first_run):
    from kandinsky_engine.jobs.resume import FingerprintMismatch

    config = first_run[0]
    summary = run_job(config)  # the same command again: everything is committed, nothing runs
    assert (summary["rows"], summary["rows_skipped"], summary["rows_computed"]) == (14, 14, 0)
    changed = config.model_copy(update={"defaults": config.defaults.model_copy(update={"guidance_scale": 5.0})})
    with pytest.raises(FingerprintMismatch, match=r"(?s)another run.*defaults.guidance_scale: 4.0 -> 5.0.*--new-run"):
        run_job(changed)
    beside = run_job(changed, new_run=True)
    assert beside["output"].startswith(config.output.path + "-") and beside["rows"] == 14
    assert read_output(config.output.path)[1] == 14  # the first run is untouched


def test_job_images_equal_diffusers(ray_cluster, model_cache, tiny_root, tmp_path):
    """Through Ray, at batch size 1 with one torch thread on both sides: within 1/255."""
    torch.set_num_threads(1)
    rows = manifest_rows(4)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    one = {"batch_size": 1}
    config = make_config(model_cache, manifest, str(tmp_path / "out"), prior=one, decoder=one, movq=one)
    run_job(config)
    out, _ = read_output(config.output.path)
    reference = Reference(tiny_root)
    for row in rows:
        got = out[row["id"]]
        assert max_diff(decode(got["image"]["bytes"]), reference.image(got)) <= 1, row["id"]


def test_cli_run_and_unschedulable_plan(ray_cluster, model_cache, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(3))
    (tmp_path / "job.yaml").write_text(
        f"input: {{manifest: {manifest}}}\noutput: {{path: out}}\nmodel: {{cache_dir: {model_cache}, {TINY_YAML}}}\n"
        "defaults: {num_inference_steps: 2, prior_num_inference_steps: 2, width: 64, height: 64}\n"
    )
    assert main(["run", str(tmp_path / "job.yaml"), "--limit", "2", "--set", "input.rows_per_block=2"]) == 0
    assert "done: 2 rows" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "out" / "data").num_rows == 2

    # Actors reserving every CPU would stall Ray Data silently: refused up front instead.
    code = main(["run", str(tmp_path / "job.yaml"), "--overwrite", "--set", "decoder.num_cpus=2",
                 "--set", "input.rows_per_block=2"])
    assert code == 2
    assert "stage actors reserve 2.4 CPUs (prior 1x0.2, decoder 1x2.0, movq 1x0.2)" in capsys.readouterr().err
    assert pq.read_table(tmp_path / "out" / "data").num_rows == 2  # --overwrite deleted nothing


def test_mixed_tasks_from_uris_and_bytes_with_bad_rows(ray_cluster, model_cache, tmp_path):
    """text2img and img2img rows in one job; images by URI and inline; bad images go to errors/."""
    import io

    from PIL import Image

    def png(color, size=(80, 48)):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="PNG")
        return buf.getvalue()

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blue.png").write_bytes(png("blue"))
    (tmp_path / "in" / "broken.png").write_bytes(png("red")[:40])
    rows = [
        {"id": "t2i", "prompt": "a cat"},
        {"id": "by-uri", "prompt": "a cat", "task": "img2img", "image_uri": str(tmp_path / "in" / "blue.png"),
         "strength": 0.5, "num_inference_steps": 4},
        {"id": "by-file-url", "prompt": "a dog", "task": "img2img",
         "image_uri": (tmp_path / "in" / "blue.png").as_uri(), "strength": 0.5, "num_inference_steps": 4},
        {"id": "inline", "prompt": "Кот", "task": "img2img", "image_bytes": png("green"), "strength": 0.5,
         "num_inference_steps": 4, "width": 128},
        # strength 0.5 x 2 steps runs one step: these rows fail on their inputs only
        {"id": "missing", "prompt": "x", "task": "img2img", "image_uri": str(tmp_path / "in" / "nope.png"),
         "strength": 0.5},
        {"id": "truncated", "prompt": "x", "task": "img2img", "image_uri": str(tmp_path / "in" / "broken.png"),
         "strength": 0.5},
        {"id": "empty", "prompt": "x", "task": "img2img", "image_bytes": b"", "strength": 0.5},
        {"id": "variation", "prompt": "a cat", "task": "variation", "image_uri": str(tmp_path / "in" / "blue.png"),
         "strength": 0.5, "prior_num_inference_steps": 4},
        {"id": "mix", "prompt": "cat and blue", "task": "mix",
         "mix": [{"text": "a cat", "weight": 0.4}, {"image_uri": str(tmp_path / "in" / "blue.png"), "weight": 0.6}]},
        {"id": "mix-missing", "prompt": "x", "task": "mix",
         "mix": [{"image_uri": str(tmp_path / "in" / "gone.png"), "weight": 1.0}]},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = make_config(model_cache, manifest, str(tmp_path / "out"))
    summary = run_job(config)
    assert summary["rows"] == 6 and summary["failed_rows"] == 4
    data = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    assert set(data) == {"t2i", "by-uri", "by-file-url", "inline", "variation", "mix"}
    assert ["image_bytes" in item for item in data["mix"]["mix"]] == [False, False]  # recipe kept, bytes dropped
    assert data["mix"]["mix"][1]["image_uri"].endswith("blue.png")
    assert decode(data["inline"]["image"]["bytes"]).shape == (64, 128, 3)
    assert data["by-uri"]["task"] == "img2img" and data["by-uri"]["strength"] == 0.5
    assert "image_bytes" not in data["inline"]
    errors = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "errors").to_pylist()}
    assert set(errors) == {"missing", "truncated", "empty", "mix-missing"}
    assert errors["mix-missing"]["message"].startswith("mix image_uri: file not found")
    assert errors["missing"]["stage"] == "fetch_inputs" and "file not found" in errors["missing"]["message"]
    assert "nope.png" in errors["missing"]["message"]
    assert errors["truncated"]["stage"] == "MovqEncodeStage" and "not a decodable image" in errors["truncated"]["message"]
    assert "empty file" in errors["empty"]["message"] and errors["empty"]["task"] == "img2img"
    # No negative_prompt column at all: nulls in the output, not the string "nan".
    assert {r["negative_prompt"] for r in data.values()} == {None}


def test_inpaint_job_with_masks_by_uri_and_inline(ray_cluster, model_cache, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    photo = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    (tmp_path / "mask.png").write_bytes(png(mask))
    rows = [
        {"id": "uri-mask", "prompt": "a hat", "task": "inpaint", "image_bytes": photo,
         "mask_uri": str(tmp_path / "mask.png")},
        {"id": "inline-mask", "prompt": "a dog", "task": "inpaint", "image_bytes": photo, "mask_bytes": png(mask.T)},
        {"id": "bad-mask", "prompt": "x", "task": "inpaint", "image_bytes": photo, "mask_bytes": b"\x89PNG broken"},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = make_config(model_cache, manifest, str(tmp_path / "out"), model={"decoder": "tiny-inpaint"})
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"]) == (2, 1)
    data = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    assert {k: decode(v["image"]["bytes"]).shape for k, v in data.items()} == {"uri-mask": (64, 64, 3), "inline-mask": (64, 64, 3)}
    assert data["uri-mask"]["decoder_model"].startswith("tiny-inpaint@")
    error = pq.read_table(tmp_path / "out" / "errors").to_pylist()[0]
    assert error["id"] == "bad-mask" and error["message"].startswith("mask: not a decodable image")


def test_controlnet_job_with_given_and_estimated_hints(ray_cluster, model_cache, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    (tmp_path / "hint.png").write_bytes(png(1))
    rows = [
        {"id": "hint-uri", "prompt": "a robot", "task": "controlnet", "hint_uri": str(tmp_path / "hint.png")},
        {"id": "depth", "prompt": "a cat", "task": "controlnet", "image_bytes": png(2)},
        {"id": "c-img2img", "prompt": "a dog", "task": "controlnet_img2img", "image_bytes": png(3), "strength": 1.0},
        {"id": "no-hint-file", "prompt": "x", "task": "controlnet", "hint_uri": str(tmp_path / "gone.png")},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = make_config(model_cache, manifest, str(tmp_path / "out"), model={"decoder": "tiny-controlnet"})
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"]) == (3, 1)
    data = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    assert set(data) == {"hint-uri", "depth", "c-img2img"}
    assert all(decode(r["image"]["bytes"]).shape == (64, 64, 3) for r in data.values())
    error = pq.read_table(tmp_path / "out" / "errors").to_pylist()[0]
    assert error["id"] == "no-hint-file" and error["message"].startswith("hint_uri: file not found")


def test_hostile_ids_never_form_paths(ray_cluster, model_cache, tmp_path):
    """Ids are data, never path parts: shard names come from the unit's position and attempt only."""
    ids = ["../escape", "/abs/path", "a/../../b", "%2e%2e%2fx", "nul\x00byte", "x" * 5000, "..", "C:\\win", "é/ü"]
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": "p"} for i in ids])
    out = tmp_path / "job" / "out"
    run_job(make_config(model_cache, manifest, str(out)))
    assert sorted(pq.read_table(out / "data").column("id").to_pylist()) == sorted(ids)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents and p.name != "m.parquet"]
    assert outside == []
    inside = {p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file()}
    assert inside == {"data", "_runs", "_RUN.json", "_SUCCESS.json", "_index.parquet", "_files.parquet", "README.md",
                      "shards.txt"}
