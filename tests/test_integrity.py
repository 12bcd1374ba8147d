"""Exactly-once against an adversary: rewritten manifests, changed weights, damaged shards and
reports, --limit, NUL ids, null-only columns, 63-bit seeds, reserved column names, and `verify`.

Each test reproduces a way the output used to end up with duplicated, missing or mislabelled rows
(or unreadable) while the job said it succeeded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.jobs.run import ManifestChanged, run_job
from kandinsky_engine.jobs.verify import verify
from tests.conftest import make_config, png, write_manifest

pytestmark = pytest.mark.ray

UNIT = 4


def rows(n: int, prompt: str = "a lighthouse") -> list[dict]:
    return [{"id": f"r{i:02d}", "prompt": f"{prompt} {i}"} for i in range(n)]


def config_for(model_cache, manifest, out, **sections):
    sections.setdefault("input", {})
    sections["input"] = {"rows_per_block": UNIT, **sections["input"]}
    return make_config(model_cache, str(manifest), str(out), **sections)


def config_file(config, path: Path) -> str:
    """The config as a file for the CLI (JSON is YAML)."""
    path.write_text(json.dumps({**config.model_dump(mode="json"), "storage_options": {}}))
    return str(path)


def data_ids(out: Path) -> list[str]:
    return sorted(pq.read_table(out / "data", columns=["id"])["id"].to_pylist())


def images(out: Path) -> dict[str, bytes]:
    return {r["id"]: r["image"] for r in pq.read_table(out / "data", columns=["id", "image"]).to_pylist()}


def listing(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# --- 1. a rewritten manifest never resumes into duplicates and missing rows ---------------------

def test_reordered_manifest_is_refused_then_recomputed(ray_cluster, model_cache, tmp_path, capsys):
    manifest = tmp_path / "m.parquet"
    write_manifest(manifest, rows(12))
    out = tmp_path / "out"
    job = config_file(config_for(model_cache, manifest, out), tmp_path / "job.json")
    assert main(["run", job, "--limit", "4"]) == 0
    before = listing(out)

    reordered = rows(12)[4:] + rows(12)[:4]  # same ids, same content, another order
    write_manifest(manifest, reordered)
    assert main(["run", job]) == 2
    err = capsys.readouterr().err
    assert "1 manifest file(s) changed since their units were committed" in err and "m.parquet (1 committed unit(s))" in err
    assert listing(out) == before  # a clean refusal changes nothing

    assert main(["run", job, "--recompute-changed"]) == 0
    assert data_ids(out) == sorted(r["id"] for r in reordered)  # each once
    reference = tmp_path / "reference"
    run_job(config_for(model_cache, manifest, reference))
    assert images(out) == images(reference)
    assert verify(str(out)).ok


def test_changed_prompt_under_the_same_id_is_detected(ray_cluster, model_cache, tmp_path):
    manifest = tmp_path / "m.parquet"
    write_manifest(manifest, rows(8))
    out = tmp_path / "out"
    run_job(config_for(model_cache, manifest, out))
    changed = rows(8)
    changed[5]["prompt"] = "a lighthouse at night"
    write_manifest(manifest, changed)
    with pytest.raises(ManifestChanged, match=r"m.parquet \(2 committed unit\(s\)\)"):
        run_job(config_for(model_cache, manifest, out))
    check = verify(str(out))
    assert not check.ok and any("computed from other manifest rows than m.parquet holds now" in p for p in check.problems)
    # A file is identified by its content: every committed unit of the rewritten file runs again.
    summary = run_job(config_for(model_cache, manifest, out), recompute_changed=True)
    assert len(summary["runs"][-1]["recomputed_units"]) == 2 and summary["rows_computed"] == 8
    assert pq.read_table(out / "data").to_pandas().set_index("id").loc["r05", "prompt"] == "a lighthouse at night"
    assert verify(str(out)).ok


# --- 3. changed weights at the same path are another run -----------------------------------------

def test_changed_weights_at_the_same_path_are_refused(ray_cluster, model_cache, tiny_root, tmp_path):
    from safetensors.torch import load_file, save_file

    from kandinsky_engine.jobs.resume import FingerprintMismatch

    models = tmp_path / "models"
    shutil.copytree(tiny_root / "prior", models / "prior")
    shutil.copytree(tiny_root / "decoder", models / "decoder")
    manifest = write_manifest(tmp_path / "m.parquet", rows(4))
    config = config_for(model_cache, manifest, tmp_path / "out",
                        model={"prior": str(models / "prior"), "decoder": str(models / "decoder")})
    run_job(config)
    unet = next((models / "decoder" / "unet").glob("*.safetensors"))
    weights = load_file(unet)
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, unet, metadata={"format": "pt"})
    with pytest.raises(FingerprintMismatch, match=r"models\.decoder\.weights"):
        run_job(config)
    # The row names the weights it was made with.
    row = pq.read_table(tmp_path / "out" / "data").to_pylist()[0]
    assert row["decoder_model"] == f"{models / 'decoder'}@{first_digest(tmp_path / 'out')}"


def first_digest(out: Path) -> str:
    return json.loads((out / "_RUN.json").read_text())["inputs"]["models"]["decoder"]["weights"][:16]


# --- 4. 6. 7. damaged shards and reports; _SUCCESS.json only after the check -------------------

@pytest.fixture(scope="module")
def finished_once(ray_cluster, model_cache, tmp_path_factory):
    """A finished 12-row job (3 units), run once for the tests below."""
    tmp = tmp_path_factory.mktemp("finished")
    manifest = write_manifest(tmp / "m.parquet", rows(12))
    run_job(config_for(model_cache, manifest, tmp / "out"))
    return manifest, tmp / "out"


@pytest.fixture
def finished(finished_once, model_cache, tmp_path):
    """This test's copy of the finished job (its config writes to the copy; the output path is not part
    of a job's fingerprint) and a reference copy."""
    manifest, done = finished_once
    shutil.copytree(done, tmp_path / "out")
    shutil.copytree(done, tmp_path / "reference")
    return config_for(model_cache, manifest, tmp_path / "out"), tmp_path / "out", tmp_path / "reference"


def test_truncated_shard_is_set_aside_and_its_unit_recomputed(finished, caplog):
    config, out, reference = finished
    shard = sorted((out / "data").rglob("part-000000000004-*-a1.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    (out / "_SUCCESS.json").unlink()
    summary = run_job(config)
    assert summary["runs"][-1]["damaged"] == [f"data/{shard.parent.name}/{shard.name}"]
    assert f"data/{shard.parent.name}/{shard.name}" in caplog.text
    assert (summary["rows_skipped"], summary["rows_computed"]) == (8, 4)
    assert len(list((out / "_damaged").rglob(shard.name))) == 1  # kept aside, never read again
    assert images(out) == images(reference) and data_ids(out) == data_ids(reference)
    assert verify(str(out)).ok


def test_damaged_first_attempt_does_not_duplicate_later_attempts(ray_cluster, model_cache, tmp_path):
    """A unit with attempts 1 and 2 whose attempt-1 shard is damaged: its rows are recomputed as a
    whole, and the attempt-2 rows are not written twice."""
    (tmp_path / "in").mkdir()
    good = tmp_path / "in" / "blue.png"
    data = rows(4)
    data[1].update(task="img2img", image_uri=str(good), strength=0.5)
    manifest = write_manifest(tmp_path / "m.parquet", data)
    config = config_for(model_cache, manifest, tmp_path / "out")
    out = tmp_path / "out"
    assert run_job(config)["failed_rows"] == 1  # the image is missing
    good.write_bytes(png("blue"))
    assert run_job(config)["failed_rows"] == 0  # attempt 2 commits it
    assert len(list((out / "data").rglob("*-a2.parquet"))) == 1
    first = next((out / "data").rglob("*-a1.parquet"))
    first.write_bytes(b"PAR1 garbage" + first.read_bytes()[12:])  # same size, unreadable
    (out / "_SUCCESS.json").unlink()
    summary = run_job(config, check_shards=True)
    assert summary["runs"][-1]["damaged"] == [f"data/{first.parent.name}/{first.name}"]
    assert data_ids(out) == ["r00", "r01", "r02", "r03"]  # each once
    assert list((out / "data").rglob("*-a2.parquet")) == []
    assert verify(str(out)).ok


def test_no_success_file_when_the_check_fails(finished, capsys, tmp_path):
    config, out, _ = finished
    # A shard copied under another attempt: every id of the unit is now in data/ twice.
    a1 = next((out / "data").rglob("part-000000000008-*-a1.parquet"))
    shutil.copy(a1, a1.with_name(a1.name.replace("-a1.", "-a2.")))
    (out / "_SUCCESS.json").unlink()
    with pytest.raises(RuntimeError, match="m.parquet rows 8..11: 4 id\\(s\\) more than once") as err:
        run_job(config)
    assert "no _SUCCESS.json was written" in str(err.value)
    assert not (out / "_SUCCESS.json").exists()


def test_torn_reports_are_skipped_and_a_torn_run_file_is_named(finished, caplog):
    config, out, reference = finished
    report = next((out / "_runs").glob("*.json"))
    report.write_text(report.read_text()[:50])
    (out / "_SUCCESS.json").unlink()
    summary = run_job(config)  # the report is skipped, its shards are read back
    assert f"_runs/{report.name}" in summary["runs"][-1]["damaged"]
    assert summary["rows_computed"] == 0 and images(out) == images(reference)
    (out / "_RUN.json").write_text('{"fingerprint": "ab')
    from kandinsky_engine.jobs.resume import FingerprintMismatch

    with pytest.raises(FingerprintMismatch, match="_RUN.json is damaged"):
        run_job(config)


# --- 5. --limit --------------------------------------------------------------------------------

def test_limit_is_validated_and_partial_runs_say_so(ray_cluster, model_cache, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", rows(16))
    out = tmp_path / "out"
    job = config_file(config_for(model_cache, manifest, out), tmp_path / "job.json")
    for bad in ("0", "-5"):
        with pytest.raises(SystemExit) as exit_:
            main(["run", job, "--limit", bad])
        assert exit_.value.code == 2
    assert not out.exists()
    capsys.readouterr()
    assert main(["run", job, "--limit", "5", "--dry-run"]) == 0  # a plan for people, and nothing written
    plan = capsys.readouterr().out.splitlines()
    assert plan[:2] == ["--limit 5 covers 8 rows (whole units of 4)", "dry run: nothing was written"], plan
    assert re.fullmatch(r"  manifest: 16 rows in 1 file\(s\), read by \d+ read task\(s\)", plan[2]), plan
    assert "  scope: 8 rows of 16 (--limit) in 2 unit(s) of up to 4 rows" in plan and "  to run: 8 rows" in plan
    assert not (out / "data").exists()
    assert main(["run", job, "--limit", "5"]) == 0
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert (summary["complete"], summary["limit"], summary["rows"], summary["manifest_rows"]) == (False, 5, 8, 16)
    printed = capsys.readouterr().out
    assert "partial: --limit 5 covered 8 of 16 rows" in printed
    assert printed.startswith("--limit 5 covers 8 rows (whole units of 4)\n"), printed  # said before it runs
    assert verify(str(out)).ok  # the units the limit covered are all there
    assert main(["run", job]) == 0
    assert json.loads((out / "_SUCCESS.json").read_text())["complete"] is True
    assert main(["run", job, "--limit", "4"]) == 0  # after a complete run: nothing to do, still complete
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert (summary["complete"], summary["rows"], summary["rows_computed"]) == (True, 16, 0)


# --- 8. ids that differ only by a trailing NUL ---------------------------------------------------

def test_ids_with_a_trailing_nul_are_two_rows(ray_cluster, model_cache, tmp_path):
    (tmp_path / "in").mkdir()
    image = tmp_path / "in" / "later.png"
    data = [{"id": "a", "prompt": "a cat"},
            {"id": "a\x00", "prompt": "a dog", "task": "img2img", "image_uri": str(image), "strength": 0.5}]
    manifest = write_manifest(tmp_path / "m.parquet", data)
    config = config_for(model_cache, manifest, tmp_path / "out")
    assert run_job(config)["failed_rows"] == 1
    image.write_bytes(png("green"))
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"], summary["rows_retried"]) == (2, 0, 1)
    assert data_ids(tmp_path / "out") == ["a", "a\x00"]


# --- 9. 10. 11. one readable schema; exact seeds; no collisions with engine columns --------------

def test_data_reads_as_one_table_after_mixed_null_units(ray_cluster, model_cache, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "manifest"
    # File 0: `note` null in its first unit, strings in the second; file 1 has no `note`, but `extra`.
    first = [{"id": f"a{i}", "prompt": "p", "note": None if i < UNIT else f"n{i}", "hint_uri": None}
             for i in range(2 * UNIT)]
    write_manifest(folder / "part-0.parquet", first,
                   schema=pa.schema([("id", pa.string()), ("prompt", pa.string()), ("note", pa.string()),
                                     ("hint_uri", pa.string())]))
    write_manifest(folder / "part-1.parquet", [{"id": f"b{i}", "prompt": "q", "extra": i} for i in range(UNIT)])
    out = tmp_path / "out"
    run_job(config_for(model_cache, folder, out))
    table = pq.read_table(out / "data")
    assert table.num_rows == 3 * UNIT
    assert table.schema.field("note").type == pa.string() and table.schema.field("extra").type == pa.int64()
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert by_id["a5"]["note"] == "n5" and by_id["a0"]["note"] is None and by_id["b2"]["extra"] == 2
    loaded = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert len(loaded) == 3 * UNIT and set(loaded.column_names) >= {"note", "extra", "hint_uri", "image"}


def test_63_bit_seeds_stay_exact_next_to_null_seeds(ray_cluster, model_cache, tmp_path):
    seed = 491747412733530295  # not representable in float64
    data = [{"id": "x1", "prompt": "a fox", "seed": seed}, {"id": "y1", "prompt": "a hen", "seed": None},
            {"id": "x2", "prompt": "a fox", "seed": seed}, {"id": "y2", "prompt": "a hen", "seed": 5}]
    manifest = write_manifest(tmp_path / "m.parquet", data)
    single = {s: {"batch_size": 1} for s in ("prior", "decoder", "movq")}  # images depend on the row alone
    run_job(config_for(model_cache, manifest, tmp_path / "out", input={"rows_per_block": 2}, **single))
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    assert out["x1"]["seed"] == out["x2"]["seed"] == seed
    assert out["x1"]["image"]["bytes"] == out["x2"]["image"]["bytes"]


def test_columns_named_like_engine_columns_are_refused(model_cache, tmp_path):
    from kandinsky_engine.manifest import ManifestError, validate_manifest

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p", "image": b"x", "prior_model": "m",
                                                        "_unit": 3, "note": "fine"}])
    with pytest.raises(ManifestError) as err:
        validate_manifest(config_for(model_cache, manifest, tmp_path / "out"))
    message = str(err.value)
    assert "column 'image' is a column the engine writes" in message
    assert "column 'prior_model' is a column the engine writes" in message
    assert "column '_unit' starts with '_'" in message and "'note'" not in message


# --- 12. metadata tells configurations apart -----------------------------------------------------

def test_depth_model_and_weights_are_recorded(ray_cluster, model_cache, tmp_path):
    data = [{"id": "estimated", "prompt": "a robot", "task": "controlnet", "image_bytes": png("blue")},
            {"id": "given", "prompt": "a robot", "task": "controlnet", "hint_bytes": png("white")}]
    manifest = write_manifest(tmp_path / "m.parquet", data)
    run_job(config_for(model_cache, manifest, tmp_path / "out", model={"decoder": "tiny-controlnet"}))
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    run = json.loads((tmp_path / "out" / "_RUN.json").read_text())["inputs"]
    assert out["estimated"]["depth_model"] == f"tiny@{run['models']['depth']['weights'][:16]}"
    assert out["given"]["depth_model"] is None  # its pixels do not depend on the depth model
    assert out["given"]["decoder_model"] == f"tiny-controlnet@{run['models']['decoder']['weights'][:16]}"
    assert set(run["libraries"]) == {"torch", "diffusers", "transformers", "Pillow"}


# --- verify ------------------------------------------------------------------------------------

def test_verify_names_what_is_wrong(finished, capsys):
    config, out, _ = finished
    assert main(["verify", str(out)]) == 0
    assert "ok: " in capsys.readouterr().out
    shard = sorted((out / "data").rglob("*.parquet"))[0]
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # bit rot: same size, other bytes
    shard.write_bytes(bytes(payload))
    (out / "data" / "notes.txt").write_text("x")
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "data/notes.txt: not a file of the output layout" in err
    assert f"data/{shard.parent.name}/{shard.name}: " in err and ("sha256" in err or "unreadable" in err)
    assert main(["verify", str(out), "--quick"]) == 1  # sizes alone miss bit rot, but not the stray file


def test_a_seed_beyond_int64_is_a_row_error_at_validation_and_run(ray_cluster, model_cache, tmp_path):
    """2**63 used to pass validation and crash the job outside the per-row error handling."""
    from kandinsky_engine.manifest import validate_manifest

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.uint64())])
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "ok", "prompt": "p", "seed": 1},
                                                       {"id": "huge", "prompt": "p", "seed": 2**63}], schema=schema)
    config = config_for(model_cache, manifest, tmp_path / "out")
    assert "must be <= 9223372036854775807" in validate_manifest(config).row_errors["huge"]
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"]) == (1, 1)
    assert data_ids(tmp_path / "out") == ["ok"]
