"""A new user's first run: their own files and types, as pandas and editors write them.

Relative input paths, pandas' natural column types, CSV/TSV/JSONL manifests, the Python API, a run
without a config file, and what the models default to."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kandinsky_engine.manifest import ManifestError, validate_manifest
from tests.conftest import make_config, png, write_manifest


def test_relative_input_paths_are_relative_to_the_manifest_file(model_cache, tmp_path, monkeypatch):
    """`imgs/red.png` next to the manifest is found from any working directory, and read as
    `<manifest folder>/imgs/red.png`; `..` still cannot step out."""
    from kandinsky_engine.manifest import plan_files
    from kandinsky_engine.pipelines.read import read_units

    job = tmp_path / "job"
    (job / "imgs").mkdir(parents=True)
    (job / "imgs" / "red.png").write_bytes(png("red"))
    rows = [{"id": "rel", "prompt": "p", "task": "img2img", "image_uri": "imgs/red.png", "strength": 0.5},
            {"id": "mix", "prompt": "p", "task": "mix",
             "mix": [{"text": None, "image_uri": "imgs/red.png", "image_bytes": None, "weight": 1.0}]},
            {"id": "up", "prompt": "p", "task": "img2img", "image_uri": "../secret.png", "strength": 0.5}]
    manifest = write_manifest(job / "m.parquet", rows)
    monkeypatch.chdir(tmp_path.parent)  # not the manifest's folder
    config = make_config(model_cache, manifest, str(tmp_path / "out"))
    errors = validate_manifest(config).row_errors
    assert set(errors) == {"up"} and "'..' segment" in errors["up"]
    _, files, _, _ = plan_files(config)
    unit = next(read_units(files[0], [0], {}, 8, {}))
    assert unit["image_uri"].to_pylist()[0] == f"{job}/imgs/red.png"
    assert unit["mix"].to_pylist()[1][0]["image_uri"] == f"{job}/imgs/red.png"


def test_pandas_types_are_read_losslessly_and_the_rest_is_refused_with_a_fix(model_cache, tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"id": [1, 2, 3, 4], "prompt": ["a", "b", "c", "d"],
                          "seed": [7.0, np.nan, 2.5, float(2**63)], "width": [64.0, 64.0, 64.0, 64.0]})
    path = tmp_path / "m.parquet"
    frame.to_parquet(path)
    assert pq.read_schema(path).field("id").type == pa.int64()  # what pandas wrote
    manifest = validate_manifest(make_config(model_cache, str(path), str(tmp_path / "out")))
    assert set(manifest.row_errors) == {"3", "4"}  # ids as text
    assert "column 'seed' must be a whole number within int64, got 2.5" in manifest.row_errors["3"]
    assert "got 9.223372036854776e+18" in manifest.row_errors["4"]
    frame.assign(seed=["1", "2", "3", "4"]).to_parquet(path)
    with pytest.raises(ManifestError, match=r"column 'seed' must be integer, got (large_)?string; write it as numbers, "
                                            r"e.g. df\['seed'\] = pd.to_numeric"):
        validate_manifest(make_config(model_cache, str(path), str(tmp_path / "out")))


def test_csv_tsv_and_jsonl_manifests_are_frozen_and_run_once(ray_cluster, model_cache, tmp_path):
    """A folder of a CSV, a TSV and a JSONL file: each is converted once into a Parquet copy named by
    its content (`_manifests/`), every row runs once, a rerun computes nothing, and a changed source
    is refused like a rewritten Parquet file."""
    from kandinsky_engine.jobs.run import ManifestChanged, run_job
    from kandinsky_engine.jobs.verify import verify

    folder = tmp_path / "manifest"
    folder.mkdir()
    (folder / "a.csv").write_text('id,prompt,seed,note\n001,"a fox, running",7,\n002,a hen,,x\n')
    (folder / "b.tsv").write_text("id\tprompt\tnote\n003\ta kite\ty\n")
    (folder / "c.jsonl").write_text('{"id": "004", "prompt": "a boat", "seed": 9}\n{"id": "005", "prompt": "a bay"}\n')
    out = tmp_path / "out"
    config = make_config(model_cache, str(folder), str(out))
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"]) == (5, 0)
    assert [f["file"] for f in summary["files"]] == ["a.csv", "b.tsv", "c.jsonl"]
    table = pq.read_table(out / "data")
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert set(by_id) == {"001", "002", "003", "004", "005"}  # ids stay text: leading zeros kept
    assert by_id["001"]["prompt"] == "a fox, running" and by_id["001"]["seed"] == 7 and by_id["002"]["note"] == "x"
    frozen = sorted(p.name for p in (out / "_manifests").iterdir())
    assert len(frozen) == 3 and all(name.endswith(".parquet") for name in frozen)
    assert run_job(config)["rows_computed"] == 0 and verify(str(out)).ok
    (folder / "a.csv").write_text('id,prompt,seed,note\n001,"a fox, walking",7,\n002,a hen,,x\n')
    with pytest.raises(ManifestChanged, match=r"a\.csv \(1 committed unit"):
        run_job(config)
    (folder / "d.csv").write_text('id,prompt\n006,a kite,one column too many\n')
    with pytest.raises(ManifestError, match=r"d\.csv: cannot read as CSV"):
        validate_manifest(config)


def fake_hub_repo(cache: str, repo: str, folder: Path, refs: dict[str, str]) -> None:
    """A model folder as the Hugging Face cache holds a download of `repo`: snapshots/<commit>/...
    and refs/<branch or tag> naming the commit."""
    import shutil

    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    for commit in set(refs.values()):
        shutil.copytree(folder, root / "snapshots" / commit, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)


def test_hub_ids_run_pinned_to_their_commit_and_say_so_in_every_row(ray_cluster, model_cache, tiny_root, tmp_path):
    """The default weights are hub ids: the driver resolves each to a commit (here from the local
    cache: tests are offline), every actor loads that commit, and every row names it."""
    from kandinsky_engine.jobs.api import generate
    from tests.conftest import HF_HUB_CACHE

    main, tag = "1" * 40, "2" * 40
    fake_hub_repo(HF_HUB_CACHE, "test-org/prior", tiny_root / "prior", {"main": main, "v1": tag})
    fake_hub_repo(HF_HUB_CACHE, "test-org/decoder", tiny_root / "decoder", {"main": main, "v1": tag})
    rows = [{"id": "h0", "prompt": "a lighthouse"}]
    common = dict(model={"prior": "test-org/prior", "decoder": "test-org/decoder", "cache_dir": model_cache},
                  defaults={"num_inference_steps": 2, "prior_num_inference_steps": 2, "width": 64, "height": 64})
    result = generate(rows, tmp_path / "out", **common)
    row = result.to_table().to_pylist()[0]
    assert row["prior_model"].startswith(f"test-org/prior@{main}@") and row["decoder_model"].startswith(
        f"test-org/decoder@{main}@")
    tagged = generate(rows, tmp_path / "tagged", **{**common, "model": {**common["model"], "revision": "v1"}})
    assert tagged.to_table()["decoder_model"][0].as_py().startswith(f"test-org/decoder@{tag}@")
    from kandinsky_engine.hub import HubUnavailable

    with pytest.raises(HubUnavailable, match=r"'test-org/missing' \(revision 'main'\)"):
        generate(rows, tmp_path / "missing", **{**common, "model": {**common["model"], "decoder": "test-org/missing"}})


def test_the_python_api_takes_dataframes_tables_and_lists_and_resumes(ray_cluster, model_cache, tmp_path,
                                                                     monkeypatch):
    """Rows in memory are written under the output first: calling again with the same rows resumes,
    other rows are refused like a rewritten manifest; relative input paths are the current folder's."""
    import kandinsky_engine as ke
    from kandinsky_engine.jobs.run import ManifestChanged

    pd = pytest.importorskip("pandas")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(png("red"))
    monkeypatch.chdir(tmp_path)
    frame = pd.DataFrame({"id": [1, 2], "prompt": ["a fox", "a hen"], "task": ["text2img", "img2img"],
                          "image_uri": [None, "imgs/red.png"], "strength": [None, 0.5]})
    settings = dict(model={"prior": "tiny", "decoder": "tiny", "cache_dir": model_cache},
                    defaults={"num_inference_steps": 2, "prior_num_inference_steps": 2, "width": 64, "height": 64})
    result = ke.generate(frame, "out", **settings)
    assert (result.rows, result.failed_rows, result.complete) == (2, 0, True)
    assert sorted(result.to_table()["id"].to_pylist()) == ["1", "2"]
    assert result.to_table().to_pylist()[1]["image_uri"] == str(tmp_path / "imgs" / "red.png")
    again = ke.generate(pa.Table.from_pandas(frame, preserve_index=False), "out", **settings)
    assert again.summary["rows_computed"] == 0  # the same rows: resumed
    night = frame.assign(prompt=["a fox, at night", "a hen"])
    with pytest.raises(ManifestChanged, match=r"rows\.parquet"):
        ke.generate(night, "out", **settings)
    replaced = ke.generate(night, "out", recompute_changed=True, **settings)
    assert replaced.rows == 2 and sorted(replaced.to_table()["prompt"].to_pylist()) == ["a fox, at night", "a hen"]


@pytest.mark.smoke
def test_run_without_a_config_file(ray_cluster, model_cache, tmp_path, capsys, monkeypatch):
    from kandinsky_engine.jobs.cli import main

    monkeypatch.setenv("KANDINSKY_CACHE", model_cache)
    (tmp_path / "prompts.csv").write_text("id,prompt\nc1,a red kite\n")
    fast = ["--set", "defaults.num_inference_steps=2", "--set", "defaults.prior_num_inference_steps=2",
            "--set", "defaults.width=64", "--set", "defaults.height=64"]
    assert main(["run", "--manifest", str(tmp_path / "prompts.csv"), "--output", str(tmp_path / "out"),
                 "--model", "tiny", *fast]) == 0
    captured = capsys.readouterr()
    assert "done: 1 rows" in captured.out
    assert captured.err.count("the tiny random model") == 1  # said once
    assert main(["run", "--manifest", str(tmp_path / "prompts.csv")]) == 2
    assert "give a config file, or --manifest M and --output O" in capsys.readouterr().err
    # The default weights are the hub's: offline and not cached, one line says what to do.
    assert main(["run", "--manifest", str(tmp_path / "prompts.csv"), "--output", str(tmp_path / "hub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hub model 'kandinsky-community/kandinsky-2-2-decoder'" in err[0], err
    assert not (tmp_path / "hub").exists()


def test_device_and_dtype_default_to_what_the_stages_reserve(model_cache, tmp_path):
    from kandinsky_engine.device import resolve_auto

    cpu = resolve_auto(make_config(model_cache, "m.parquet", str(tmp_path)))
    assert (cpu.model.device, cpu.model.dtype) == ("cpu", "float32")
    gpu = resolve_auto(make_config(model_cache, "m.parquet", str(tmp_path), decoder={"num_gpus": 1}))
    assert (gpu.model.device, gpu.model.dtype) == ("cuda", "bfloat16")
    pinned = resolve_auto(make_config(model_cache, "m.parquet", str(tmp_path), model={"dtype": "float16"},
                                      decoder={"num_gpus": 1}))
    assert (pinned.model.device, pinned.model.dtype) == ("cuda", "float16")
