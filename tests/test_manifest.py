"""Manifest problems are found before any model loads, and named by file, column and id."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.manifest import ManifestError, validate_manifest
from tests.conftest import TINY_YAML, make_config, write_manifest

GOOD = [{"id": "a", "prompt": "a cat"}, {"id": "b", "prompt": "a dog"}]


@pytest.fixture
def check(tmp_path, model_cache):
    """Validate `rows` as a one-file manifest (validation also reads the decoder's U-Net config)."""

    def validate(rows, schema=None, **sections):
        path = write_manifest(tmp_path / "m.parquet", rows, schema)
        return validate_manifest(make_config(model_cache, path, str(tmp_path / "out"), **sections))

    return validate


def test_good_manifest(tmp_path, check):
    manifest = check(GOOD)
    assert manifest.num_rows == 2 and [f.path for f in manifest.files] == [str(tmp_path / "m.parquet")]


@pytest.mark.parametrize(
    "rows, schema, expected",
    [
        ([{"id": "a"}], None, ["missing required column 'prompt'"]),
        # Integer ids and whole-number float seeds are cast (test_first_run); these types are not.
        ([{"id": 1.5, "prompt": "x"}], None, ["column 'id' must be string", "double", "astype('string')"]),
        ([{"id": "a", "prompt": "x", "seed": "7"}], None, ["column 'seed' must be integer", "string", "to_numeric"]),
        ([{"id": "a", "prompt": "x", "guidance_scale": "high"}], None, ["column 'guidance_scale' must be number"]),
        ([{"id": None, "prompt": "x"}], pa.schema([("id", pa.string()), ("prompt", pa.string())]),
         ["column 'id' is null or empty at row 0"]),
        ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], None, ["duplicate id 'a'"]),
    ],
)
def test_bad_manifests_name_file_column_and_row(check, rows, schema, expected):
    """Manifest-level problems: the job cannot run, so validation fails before any model loads."""
    with pytest.raises(ManifestError) as err:
        check(rows, schema)
    message = str(err.value)
    assert "m.parquet" in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"id": "a", "prompt": None}, ["column 'prompt' is null at id 'a'"]),
        ({"id": "a", "prompt": "x", "width": 0}, ["column 'width' must be >= 1, got 0 at id 'a'"]),
        ({"id": "a", "prompt": "x", "height": -64}, ["column 'height' must be >= 1"]),
        ({"id": "a", "prompt": "x", "num_inference_steps": 0}, ["column 'num_inference_steps' must be >= 1"]),
        ({"id": "s", "prompt": "x", "prior_num_inference_steps": 0}, ["'prior_num_inference_steps'", "id 's'"]),
        ({"id": "a", "prompt": "x", "seed": -1}, ["column 'seed' must be >= 0"]),
        ({"id": "a", "prompt": "x", "task": "paint"}, ["column 'task' is 'paint', expected one of"]),
        ({"id": "a", "prompt": "x", "task": "img2img"}, ["column 'image_uri': task 'img2img' needs"]),
        ({"id": "a", "prompt": "x", "strength": 1.5}, ["column 'strength' must be within [0, 1], got 1.5"]),
    ],
)
def test_bad_rows_are_row_errors_not_job_failures(check, row, expected):
    """Row-level problems: that row goes to errors/ (with this message), the others run."""
    schema = pa.Table.from_pylist([{**row, "prompt": "p"}]).schema
    manifest = check([{"id": "good", "prompt": "fine"}, row], schema)
    assert manifest.num_rows == 2 and list(manifest.row_errors) == [row["id"]]
    message = manifest.row_errors[row["id"]]
    assert message.startswith(manifest.files[0].path + ": ")
    for part in expected:
        assert part in message
    assert "img2img" not in manifest.tasks  # stages are planned for the valid rows only


def test_ids_that_are_not_utf8_are_named_by_file_column_and_row(tmp_path, model_cache):
    """Parquet does not check what a writer puts in a string column."""
    values = [b"ok", b"\xff\xfebad", b"fine"]
    offsets = pa.array([0, 2, 7, 11], pa.int32()).buffers()[1]
    ids = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"".join(values))])
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": ["a", "b", "c"]}), path)
    with pytest.raises(ManifestError, match=r"m.parquet: column 'id' is not valid UTF-8 text at row\(s\) \[1\]"):
        validate_manifest(make_config(model_cache, str(path), str(tmp_path / "out")))


def test_duplicates_across_files_name_both(tmp_path, check, model_cache):
    write_manifest(tmp_path / "dir" / "part-0.parquet", GOOD)
    write_manifest(tmp_path / "dir" / "part-1.parquet", [{"id": "b", "prompt": "again"}])
    config = make_config(model_cache, str(tmp_path / "dir"), str(tmp_path / "out"))
    with pytest.raises(ManifestError, match=r"part-1.parquet: duplicate id 'b' \(first in .*part-0.parquet\)"):
        validate_manifest(config)


def test_directory_and_glob(tmp_path, check, model_cache):
    for i in range(3):
        write_manifest(tmp_path / "dir" / f"part-{i}.parquet", [{"id": f"r{i}", "prompt": "p"}])
    cfg = make_config(model_cache, str(tmp_path / "dir" / "part-[01].parquet"), str(tmp_path / "out"))
    assert validate_manifest(cfg).num_rows == 2
    cfg = make_config(model_cache, str(tmp_path / "dir"), str(tmp_path / "out"))
    assert validate_manifest(cfg).num_rows == 3


def test_reject_policy_refuses_sizes_off_the_64_grid(check):
    manifest = check([{"id": "a", "prompt": "x", "width": 100}], output={"size_policy": "reject"})
    assert "'width' is 100, not a multiple of 64" in manifest.row_errors["a"]
    assert check([{"id": "a", "prompt": "x", "width": 100}]).row_errors == {}  # the default policy crops instead


def test_missing_and_unreadable_manifests(tmp_path, check, model_cache):
    cfg = make_config(model_cache, str(tmp_path / "nope.parquet"), str(tmp_path / "out"))
    with pytest.raises(ManifestError, match="no such file"):
        validate_manifest(cfg)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    cfg = make_config(model_cache, str(tmp_path / "bad.parquet"), str(tmp_path / "out"))
    with pytest.raises(ManifestError, match="bad.parquet: cannot read as Parquet"):
        validate_manifest(cfg)


@pytest.mark.ray
def test_cli_fails_before_any_model_loads_or_write(ray_cluster, tmp_path, capsys, model_cache):
    """Rows are checked by Ray tasks (one per file, streaming), before the output is touched."""
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    (tmp_path / "job.yaml").write_text(
        f"input: {{manifest: {manifest}}}\noutput: {{path: {tmp_path / 'out'}}}\nmodel: {{cache_dir: {model_cache}, {TINY_YAML}}}\n"
    )
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error: invalid manifest" in err and "duplicate id 'a'" in err
    assert not (tmp_path / "out").exists()


def test_cli_validate_lists_rows_that_would_fail(tmp_path, capsys, model_cache):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "x", "width": 0}, {"id": "b", "prompt": "y"}])
    (tmp_path / "job.yaml").write_text(
        f"input: {{manifest: {manifest}}}\noutput: {{path: {tmp_path / 'out'}}}\nmodel: {{cache_dir: {model_cache}, {TINY_YAML}}}\n"
    )
    assert main(["validate", str(tmp_path / "job.yaml")]) == 1
    captured = capsys.readouterr()
    assert "ok: 2 rows" in captured.out and "1 row(s) would fail" in captured.err and "'width'" in captured.err
