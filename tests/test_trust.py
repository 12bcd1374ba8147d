"""Exactly-once against what real users do to manifests and outputs: renamed and copied files,
contents changed under a restored mtime, shards edited in place, stray files in data/.

One finished 12-row job (a folder manifest `md/a.parquet`, 3 units) is computed once per module;
each test gets it restored to that state, at the same paths (they are part of the fingerprint)."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kandinsky_engine.jobs.run import ManifestChanged, run_job
from kandinsky_engine.jobs.verify import verify
from tests.conftest import write_manifest
from tests.test_integrity import config_for, data_ids, images, listing, rows

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def original(ray_cluster, model_cache, tmp_path_factory):
    """The finished job's manifest folder and output, kept pristine under original/."""
    base = tmp_path_factory.mktemp("trust")
    write_manifest(base / "md" / "a.parquet", rows(12))
    run_job(config_for(model_cache, base / "md", base / "out"))
    shutil.copytree(base / "md", base / "original" / "md", copy_function=shutil.copy2)
    shutil.copytree(base / "out", base / "original" / "out")
    return base


@pytest.fixture
def job(original, model_cache):
    """(config, manifest folder, output) of the finished job, restored."""
    for name in ("md", "out"):
        shutil.rmtree(original / name, ignore_errors=True)
        shutil.copytree(original / "original" / name, original / name, copy_function=shutil.copy2)
    return config_for(model_cache, original / "md", original / "out"), original / "md", original / "out"


def folders(out) -> list[str]:
    return sorted(p.name for p in (out / "data").iterdir())


def test_a_renamed_manifest_file_keeps_its_rows_once(job, original):
    config, md, out = job
    (md / "a.parquet").rename(md / "b.parquet")
    summary = run_job(config)
    assert (summary["rows"], summary["rows_computed"], summary["rows_skipped"]) == (12, 0, 12)
    assert summary["runs"][-1]["files_renamed"] == {"a.parquet": "b.parquet"}
    assert data_ids(out) == sorted(r["id"] for r in rows(12))  # each once
    assert [f.split("-")[0] for f in folders(out)] == ["b"]
    assert images(out) == images(original / "original" / "out")  # the same images, moved, not recomputed
    assert verify(str(out)).ok


def test_a_renamed_and_changed_file_is_refused_then_retired(job):
    config, md, out = job
    changed = rows(12)
    changed[0]["prompt"] = "another prompt"
    write_manifest(md / "b.parquet", changed)
    (md / "a.parquet").unlink()
    before = listing(out)
    with pytest.raises(ManifestChanged, match=r"data/a-[0-9a-f]{12}/ holds ids of b.parquet"):
        run_job(config)
    assert listing(out) == before  # refused before anything changed
    summary = run_job(config, recompute_changed=True)
    assert (summary["rows"], summary["rows_computed"]) == (12, 12)
    assert data_ids(out) == sorted(r["id"] for r in changed)
    assert len(list((out / "_retired").rglob("*.parquet"))) == 3 and folders(out)[0].startswith("b-")
    assert verify(str(out)).ok


def test_a_copied_data_folder_fails_verify_and_the_run_naming_both(job):
    config, _, out = job
    (source,) = folders(out)
    shutil.copytree(out / "data" / source, out / "data" / "copy")
    check = verify(str(out))
    assert not check.ok
    assert any(f"in data/copy/part-000000000000-" in p and f"data/{source}/part-000000000000-" in p
               and "in data/ twice" in p for p in check.problems), check.problems
    with pytest.raises(ManifestChanged, match="data/copy/ holds ids of a.parquet"):
        run_job(config)


def test_a_manifest_rewritten_under_a_restored_mtime_is_detected(job):
    """cp -p, rsync -a and tar -x restore mtimes: size and mtime alone do not identify a file."""
    config, md, out = job
    path = md / "a.parquet"
    stat = path.stat()
    swapped = rows(12)
    swapped[4]["prompt"], swapped[5]["prompt"] = swapped[5]["prompt"], swapped[4]["prompt"]
    write_manifest(path, swapped)
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not verify(str(out)).ok  # verify always hashes
    with pytest.raises(ManifestChanged, match=r"a.parquet \(3 committed unit"):
        run_job(config)


def test_a_shard_edited_in_place_is_set_aside_and_recomputed(job, original):
    config, _, out = job
    shard = sorted((out / "data").rglob("part-000000000004-*.parquet"))[0]
    table = pq.read_table(shard)
    image = table["image"].to_pylist()
    image[0] = {**image[0], "bytes": image[1]["bytes"]}  # another row's picture under r04's id
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image",
                                    pa.array(image, table.schema.field("image").type)), shard)
    assert not verify(str(out)).ok
    summary = run_job(config)
    assert summary["runs"][-1]["damaged"] == [f"data/{shard.parent.name}/{shard.name}"]
    assert summary["rows_computed"] == 4 and (out / "_damaged").exists()
    assert images(out) == images(original / "original" / "out")
    assert verify(str(out)).ok


def test_hidden_files_are_ignored_and_foreign_ones_refused_before_any_change(job, capsys):
    config, _, out = job
    for place in ("data", f"data/{folders(out)[0]}", "errors"):
        (out / place).mkdir(exist_ok=True)
        (out / place / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    summary = run_job(config)  # a complete output stays complete
    assert summary["complete"] and summary["rows_computed"] == 0 and (out / "_SUCCESS.json").exists()
    assert verify(str(out)).ok
    (out / "data" / "notes.txt").write_text("mine")
    before = listing(out)
    with pytest.raises(ValueError, match=rf"{out}/data/notes.txt.*move them out of data/"):
        run_job(config)
    assert listing(out) == before and not (out / "_tmp").exists()


def test_status_and_report_name_a_damaged_error_shard_and_go_on(job):
    from kandinsky_engine.jobs.report import write_report
    from kandinsky_engine.jobs.status import format_status, read_status

    _, _, out = job
    (out / "errors" / "k").mkdir(parents=True)
    (out / "errors" / "k" / "part-000000000000-0123456789abcdef.parquet").write_bytes(b"PAR1 torn")
    status = read_status(str(out))
    assert status["failures"]["damaged"][0].startswith("errors/k/part-000000000000-0123456789abcdef.parquet (")
    assert "unreadable error shard (skipped; a rerun rewrites it): errors/k/part-" in format_status(status)
    (out / "_index.parquet").write_bytes(b"torn")  # the contact sheet lists the folders instead
    _, status = write_report(str(out))
    page = (out / "report.html").read_text()
    assert "Unreadable error shard, skipped" in page and page.count("<figure") == 12


def test_a_run_records_only_the_shards_it_wrote(job):
    config, md, out = job
    write_manifest(md / "c.parquet", [{"id": "c0", "prompt": "a new file"}])
    summary = run_job(config)
    records = pq.read_table(out / "_runs" / f"{summary['runs'][-1]['run']}.parquet").to_pylist()
    assert [r["file"].split("/")[1].split("-")[0] for r in records] == ["c"]  # not the 3 shards of a.parquet
    assert len(pq.read_table(out / "_index.parquet")) == 4
    assert verify(str(out)).ok


# --- verify: every way a finished output can be wrong, each named ------------------------------

def shard_of(out, start: int, attempt: int = 1):
    return next((out / "data").rglob(f"part-{start:012d}-*-a{attempt}.parquet"))


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def reindex(out, shard):
    """Record `shard`'s new bytes in _index.parquet, as a run that wrote it would have."""
    from kandinsky_engine.pipelines.output import record_of

    index = pq.read_table(out / "_index.parquet").to_pylist()
    name = str(shard.relative_to(out))
    new = record_of(name, shard.read_bytes(), pq.read_metadata(shard).num_rows)
    kept = [r for r in index if r["file"].split("-a")[0] != name.split("-a")[0]]  # any attempt of that unit
    pq.write_table(pa.Table.from_pylist(kept + [new], schema=pq.read_schema(out / "_index.parquet")),
                   out / "_index.parquet")


def uncommitted(out):
    shard_of(out, 4).unlink()
    return "a.parquet rows 4..7: not committed"


def orphan_attempt(out):
    shard = shard_of(out, 8)
    shard.rename(str(shard).replace("-a1.", "-a2."))
    reindex(out, shard_of(out, 8, attempt=2))
    edit_json(out / "_SUCCESS.json", limit=8, complete=False)  # the run covered rows 0..7 only
    return "a.parquet rows 8..11: shards without its commit mark (attempt 1)"


def schema_drift(out):
    shard = shard_of(out, 0)
    table = pq.read_table(shard)
    pq.write_table(table.append_column("extra", pa.array([1] * table.num_rows)), shard)
    reindex(out, shard)
    return "schema differs from the job's output schema"


def fingerprint_drift(out):
    edit_json(out / "_RUN.json", fingerprint="0" * 16)
    return "_RUN.json: fingerprint 0000000000000000, recomputed"


def wrong_counts(out):
    edit_json(out / "_SUCCESS.json", rows=13)
    return "_SUCCESS.json: says 13 rows and 0 failed; found 12 and 0"


def complete_but_missing(out):
    shard_of(out, 8).unlink()
    edit_json(out / "_SUCCESS.json", rows=8)
    return "_SUCCESS.json: says complete, but not every unit is committed"


def missing_summary(out):
    (out / "_SUCCESS.json").unlink()
    return "no _SUCCESS.json: the job has not finished"


def damaged_summary(out):
    (out / "_SUCCESS.json").write_text('{"rows": 1')
    return "_SUCCESS.json is damaged"


def unreadable_index(out):
    (out / "_index.parquet").write_bytes(b"PAR1 torn")
    return "_index.parquet is unreadable"


def size_differs(out):
    shard = shard_of(out, 4)
    shard.write_bytes(shard.read_bytes() + b"\0")
    return f"data/{shard.parent.name}/{shard.name}: {shard.stat().st_size} bytes, recorded {shard.stat().st_size - 1}"


def unrecorded(out):
    index = pq.read_table(out / "_index.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist([r for r in index if "-000000000000-" not in r["file"]]), out / "_index.parquet")
    return "no record of this shard"


@pytest.mark.parametrize("damage", [uncommitted, orphan_attempt, schema_drift, fingerprint_drift, wrong_counts,
                                    complete_but_missing, missing_summary, damaged_summary, unreadable_index,
                                    size_differs, unrecorded])
def test_verify_fails_naming_each_kind_of_damage(job, damage):
    _, _, out = job
    assert verify(str(out)).ok
    expected = damage(out)
    check = verify(str(out))
    assert not check.ok and any(expected in p for p in check.problems), check.problems


def test_status_says_partial_after_a_limited_run(job):
    from kandinsky_engine.jobs.status import read_status

    config, md, out = job
    write_manifest(md / "c.parquet", [{"id": "c0", "prompt": "later"}])
    summary = run_job(config, limit=12)  # a.parquet's 12 rows, all committed: nothing to compute
    assert (summary["complete"], summary["rows_computed"]) == (False, 0)
    assert read_status(str(out))["state"] == "partial (--limit 12)"


def test_recompute_renders_rows_again_and_catches_a_lying_writer(job, capsys):
    """`verify --recompute`: sampled and named rows rendered again from the output's own record
    are byte-identical here; an image swapped by a writer that also fixed the index (so every
    integrity check passes) is caught."""
    from kandinsky_engine.jobs.cli import main
    from kandinsky_engine.jobs.reproduce import recompute

    _, _, out = job
    result = recompute(str(out), 2, ["r05"])
    assert result.expect_identical and len(result.rows) == 3 and result.ok
    assert {r.status for r in result.rows} == {"identical"} and "r05" in {r.id for r in result.rows}
    shard = shard_of(out, 4)
    table = pq.read_table(shard)
    image = table["image"].to_pylist()
    image[1] = {**image[1], "bytes": image[2]["bytes"]}  # r05 shows r06's picture
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image",
                                    pa.array(image, table.schema.field("image").type)), shard)
    reindex(out, shard)
    assert verify(str(out)).ok  # the lie passes every integrity check
    assert main(["verify", str(out), "--recompute-id", "r05"]) == 1
    err = capsys.readouterr().err
    assert "'r05' (data/a-" in err and ": differs, max |Δ| " in err
