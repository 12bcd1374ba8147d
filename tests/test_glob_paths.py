"""Glob characters in output paths: refused up front, and every delete or move the engine makes
touches exactly the object or prefix it names, even when handed such a path (moto S3 and local disk).

s3fs expands `* ? [` in the paths given to rm and mv: `s3://b/jobs/*` with a sibling `jobs/sibling/`
used to lose the sibling's files on `--overwrite`, and a first run wrote `jobs/*/_RUN.json/<tag>-_RUN.json`."""

from __future__ import annotations

import pytest

from kandinsky_engine.jobs.output_guard import OutputRefused, check_output, remove_owned
from kandinsky_engine.jobs.run import read_reports, run_job
from kandinsky_engine.jobs.status import read_status
from kandinsky_engine.jobs.verify import verify
from kandinsky_engine.storage import move_file, remove_file, remove_tree
from kandinsky_engine.pipelines.output import Shard, put_bytes, put_json
from kandinsky_engine.pipelines.reconcile import Inspection, _remove_unit, reconcile
from tests.conftest import make_config, put_manifest

ENTRIES = ("data/k/part-a1.parquet", "_RUN.json", "_SUCCESS.json", "_tmp/t-x", "_runs/r1.json", "errors/k/e.parquet")


def payload(name: str, folder: str) -> bytes:
    """What `jobs/{folder}/{name}` holds: a report that says whose it is, or bytes that do."""
    return f'{{"finished_at": "{folder}"}}'.encode() if name.startswith("_runs/") else f"{folder} {name}".encode()


@pytest.fixture(params=["s3", "local"])
def store(request, tmp_path):
    """(fs, parent folder holding `jobs/sibling/...` and `jobs/*/...`) on moto S3 and on local disk."""
    if request.param == "s3":
        fs, _ = request.getfixturevalue("s3")
        parent = f"kandinsky/glob-{tmp_path.name}"
    else:
        from fsspec.implementations.local import LocalFileSystem

        fs, parent = LocalFileSystem(auto_mkdir=True), str(tmp_path)
    for name in ENTRIES:
        for folder in ("sibling", "*"):
            fs.pipe_file(f"{parent}/jobs/{folder}/{name}", payload(name, folder))
    fs.invalidate_cache()
    return fs, parent


def sibling_intact(fs, parent) -> bool:
    fs.invalidate_cache()
    return all(fs.cat_file(f"{parent}/jobs/sibling/{name}") == payload(name, "sibling") for name in ENTRIES)


def test_output_paths_with_glob_characters_are_refused(model_cache, s3, tmp_path):
    fs, options = s3
    put_manifest(fs, "kandinsky/globm/m.parquet", [{"id": "a", "prompt": "p"}])
    for path in ("s3://kandinsky/jobs/*", "s3://kandinsky/jobs/run?", "s3://kandinsky/jobs/[ab]", str(tmp_path / "o*")):
        config = make_config(model_cache, "s3://kandinsky/globm/m.parquet", path).model_copy(
            update={"storage_options": options})
        for overwrite in (False, True):
            with pytest.raises(OutputRefused, match="has the glob character"):
                run_job(config, overwrite=overwrite)
        with pytest.raises(ValueError, match="has the glob character"):
            read_status(path, options)
        with pytest.raises(ValueError, match="has the glob character"):
            verify(path, config=config)
    assert not fs.exists("kandinsky/jobs")  # nothing written anywhere


# Each call site that deletes or moves under the output root, handed the root `jobs/*`.

def site_remove_owned(fs, root):
    remove_owned(fs, root)
    return ["data/k/part-a1.parquet", "_RUN.json", "_tmp/t-x", "_runs/r1.json"]  # all gone


def site_put_bytes(fs, root):
    put_bytes(fs, root, "_RUN.json", b"new", "tag")
    put_json(fs, root, "_runs/r2.json", {"finished_at": "y"}, "tag")
    assert fs.cat_file(f"{root}/_RUN.json") == b"new" and fs.cat_file(f"{root}/_runs/r2.json")
    return []


def site_reconcile(fs, root):
    found = Inspection(has_tmp=True)
    shard = Shard("data/k/part-a1.parquet", f"{root}/data/k/part-a1.parquet", "k", 0, "0" * 16, 1, 12)
    found.damaged.append(shard)
    found.data[shard.unit].append(shard)
    reconcile(fs, root, [], [], 4, found, "tag")  # removes _tmp/, moves the shard to _damaged/
    assert fs.cat_file(f"{root}/_damaged/tag/data/k/part-a1.parquet") == payload("data/k/part-a1.parquet", "*")
    return ["_tmp/t-x", "data/k/part-a1.parquet"]


def site_remove_unit(fs, root):
    found = Inspection()
    found.errors["k/0"].append(Shard("errors/k/e.parquet", f"{root}/errors/k/e.parquet", "k", 0, "0" * 16, None, 3))
    _remove_unit(fs, found, "k/0")
    return ["errors/k/e.parquet"]


def site_primitives(fs, root):
    """What the sink (errors shard), the run (_SUCCESS.json, final _tmp/) and the report use."""
    remove_file(fs, f"{root}/_SUCCESS.json")
    remove_file(fs, f"{root}/_SUCCESS.json")  # already gone: nothing happens
    assert remove_tree(fs, f"{root}/_tmp") == 1
    move_file(fs, f"{root}/_RUN.json", f"{root}/_RUN.moved")
    return ["_SUCCESS.json", "_tmp/t-x", "_RUN.json"]


def site_read_reports(fs, root):
    reports, _ = read_reports(fs, root)
    assert [r["finished_at"] for r in reports] == ["*"]  # its own report only, not the sibling's
    return []


@pytest.mark.parametrize("site", [site_remove_owned, site_put_bytes, site_reconcile, site_remove_unit,
                                  site_primitives, site_read_reports])
def test_each_delete_and_move_touches_exactly_its_own_path(store, site):
    fs, parent = store
    root = f"{parent}/jobs/*"
    gone = site(fs, root)
    assert sibling_intact(fs, parent)
    fs.invalidate_cache()
    for name in gone:
        assert not fs.exists(f"{root}/{name}"), name


def test_check_output_refuses_glob_before_touching_the_store(model_cache, tmp_path):
    config = make_config(model_cache, str(tmp_path / "m.parquet"), str(tmp_path / "out[1]"))
    with pytest.raises(OutputRefused, match=r"out\[1\] has the glob character '\['"):
        check_output(config, overwrite=True)
