"""An output folder is a dataset: the card that `datasets.load_dataset(OUT)` reads, WebDataset json
of one schema, the shard list and caption members, per-row provenance and per-unit compute time,
`push`, and the documentation's loading snippets run as written.

One manifest (text2img rows only in the first unit, so its nullable columns are all null there;
img2img and mix rows later; one row that fails) runs twice, as Parquet and as WebDataset, once for
the module; the card's features are also compared with `datasets`' own on a wide schema without Ray."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.jobs.push import HIDDEN, PUSHED, pushed_files
from kandinsky_engine.columns import SIGNAL_TYPES, output_schema
from kandinsky_engine.pipelines.card import MARKER, features
from kandinsky_engine.pipelines.shards import json_type
from tests.conftest import make_config, png, write_manifest

REPO = Path(__file__).resolve().parent.parent
GOOD = ["t0", "t1", "i0", "t2", "m0"]


def manifest_rows(blue: Path, missing: Path) -> list[dict]:
    return [
        {"id": "t0", "prompt": "a red cat"},  # unit 0: negative_prompt, image_uri, mix, note... all null
        {"id": "t1", "prompt": "Красный кот"},
        {"id": "i0", "prompt": "a blue cat", "task": "img2img", "image_uri": str(blue), "strength": 0.5,
         "negative_prompt": "blurry", "note": "from a photo"},
        {"id": "t2", "prompt": "一只猫", "negative_prompt": "", "note": "x"},
        {"id": "m0", "prompt": "cat and blue", "task": "mix",
         "mix": [{"text": "a cat", "weight": 0.4}, {"image_uri": str(blue), "weight": 0.6}]},
        {"id": "bad", "prompt": "x", "task": "img2img", "image_uri": str(missing), "strength": 0.5},
    ]


@pytest.fixture(scope="module")
def outputs(ray_cluster, model_cache, tmp_path_factory):
    """(tmp, rows by id, {format: config}, started, ended): out/demo (Parquet) and out/demo-wds under tmp."""
    from kandinsky_engine.jobs.run import run_job

    tmp = tmp_path_factory.mktemp("outputs")
    (tmp / "in").mkdir()
    (tmp / "in" / "blue.png").write_bytes(png("blue"))
    rows = manifest_rows(tmp / "in" / "blue.png", tmp / "in" / "nope.png")
    manifest = write_manifest(tmp / "m.parquet", rows)
    configs = {fmt: make_config(model_cache, manifest, str(tmp / "out" / name), input={"rows_per_block": 2},
                                output={"format": fmt})
               for fmt, name in (("parquet", "demo"), ("webdataset", "demo-wds"))}
    started = datetime.now(timezone.utc)
    for config in configs.values():
        summary = run_job(config)
        assert (summary["rows"], summary["failed_rows"]) == (5, 1)
    return tmp, {r["id"]: r for r in rows}, configs, started, datetime.now(timezone.utc)


def card(out: Path) -> dict:
    text = (out / "README.md").read_text()
    assert MARKER in text
    return yaml.safe_load(text.split("---\n")[1])


def tar_members(out: Path) -> list[tuple[str, list[str], dict]]:
    """(shard, member names, {key: json}) of every tar of the output, in shard order."""
    found = []
    for shard in sorted((out / "data").rglob("*.tar")):
        tar = tarfile.open(shard)
        metas = {m.name.split(".")[0]: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")}
        found.append((str(shard.relative_to(out)), tar.getnames(), metas))
    return found


def test_card_features_are_what_datasets_derives():
    """Every Arrow type a column can have, engine columns, signals and pass-through: the card's
    features equal `datasets.Features.from_arrow_schema(...)._to_yaml_list()`, and the WebDataset
    json's equal those of the json's own types."""
    import datasets

    manifest = pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("note", pa.string()), ("n", pa.int32()), ("f16", pa.float16()),
        ("day", pa.date32()), ("price", pa.decimal128(10, 2)), ("blob", pa.binary()), ("big", pa.large_string()),
        ("tags", pa.list_(pa.string())), ("xyz", pa.list_(pa.float32(), 3)), ("ll", pa.large_list(pa.int64())),
        ("nested", pa.struct([("a", pa.int8()), ("b", pa.list_(pa.struct([("c", pa.bool_())])))])),
        ("at", pa.timestamp("ms")), ("t", pa.time64("us")), ("took", pa.duration("s")),
        ("cat", pa.dictionary(pa.int32(), pa.string())), ("nothing", pa.null())])
    schema = output_schema(manifest, list(SIGNAL_TYPES))
    assert features(schema, "parquet", "png") == datasets.Features.from_arrow_schema(schema)._to_yaml_list()
    wds = features(schema, "webdataset", "webp")
    assert [f["name"] for f in wds] == ["__key__", "webp", "txt", "json"] and wds[1] == {"name": "webp", "dtype": "image"}
    json_schema = pa.schema([("json", pa.struct([(f.name, json_type(f.type)) for f in schema if f.name != "image"]))])
    assert wds[3] == datasets.Features.from_arrow_schema(json_schema)._to_yaml_list()[0]


def test_model_stages_time_and_stamp_each_unit():
    """Two stages over a block of two units: each unit's seconds add up on its first row, and its
    rows carry the time the last stage finished it."""
    import time

    import numpy as np

    from kandinsky_engine.pipelines.generate import Chunked, concat
    from tests.test_pipeline import Recorder, block

    a, b = block([f"a{i}" for i in range(6)]), block([f"b{i}" for i in range(6)], unit=1)
    began = time.time()
    first = Chunked(Recorder, batch_size=4)({k: concat([a[k], b[k]]) for k in a})
    second = Chunked(Recorder, batch_size=4)(first)
    compute, created = second["_compute_s"], second["_created_at"]
    assert compute[0] > first["_compute_s"][0] > 0 and compute[6] > 0 and not np.any(compute[[1, 2, 3, 4, 5, 7]])
    assert set(created[:6]) == {created[0]} and set(created[6:]) == {created[6]}
    assert began <= first["_created_at"][0] <= created[0] <= created[6] <= time.time()


@pytest.mark.ray
def test_output_folder_loads_as_a_dataset(outputs, tmp_path):
    import datasets

    tmp, rows, configs, *_ = outputs
    out, wds_out = tmp / "out" / "demo", tmp / "out" / "demo-wds"
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path))
    assert list(ds) == ["train"] and sorted(ds["train"]["id"]) == sorted(GOOD)  # each row once, no record file
    train = ds["train"]
    assert isinstance(train[0]["image"], Image.Image) and train.features["image"] == datasets.Image()
    # The card's features are those `datasets` reads in the shards' own schema.
    shard = next((out / "data").rglob("*.parquet"))
    assert card(out)["dataset_info"]["features"] == datasets.Features.from_arrow_schema(pq.read_schema(shard))._to_yaml_list()
    assert card(out)["configs"][0]["data_files"] == [{"split": "train", "path": "data/*/*.parquet"}]
    for name in ("README.md", "shards.txt"):  # written after _SUCCESS.json, never before
        assert (out / name).stat().st_mtime_ns >= (out / "_SUCCESS.json").stat().st_mtime_ns
    assert str(train.features["created_at"].dtype) == "timestamp[us, tz=UTC]"
    by_id = {r["id"]: r for r in train}
    assert by_id["i0"]["negative_prompt"] == "blurry" and by_id["t0"]["negative_prompt"] is None
    assert by_id["m0"]["mix"][1]["weight"] == 0.6

    tars = datasets.load_dataset(str(wds_out), split="train", cache_dir=str(tmp_path))
    assert sorted(r["id"] for r in tars["json"]) == sorted(GOOD)
    assert set(tars.column_names) == {"__key__", "png", "txt", "json"} and isinstance(tars[0]["png"], Image.Image)
    assert {r["id"]: t for r, t in zip(tars["json"], tars["txt"])} == {i: rows[i]["prompt"] for i in GOOD}
    assert card(wds_out)["configs"][0]["data_files"] == [{"split": "train", "path": "data/*/*.tar"}]
    # pyarrow reads data/; the folder itself holds the card (and errors/ shards of another schema).
    assert pq.read_table(out / "data").num_rows == len(GOOD)
    with pytest.raises(pa.ArrowInvalid, match="README.md"):
        pq.read_table(out)


@pytest.mark.ray
def test_webdataset_json_has_one_schema_across_the_output(outputs, tmp_path):
    """Same keys in every sample, one JSON type per key; the first unit has only nulls in columns
    that later rows fill, and the card's features load every shard with the webdataset builder."""
    import datasets

    tmp, rows, configs, *_ = outputs
    wds_out = tmp / "out" / "demo-wds"
    shards = tar_members(wds_out)
    metas = [meta for _, _, by_key in shards for meta in by_key.values()]
    schema = pq.read_schema(next((tmp / "out" / "demo" / "data").rglob("*.parquet")))
    assert all(list(meta) == [n for n in schema.names if n != "image"] for meta in metas)
    for name in schema.names:
        kinds = {type(meta[name]).__name__ for meta in metas if meta.get(name) is not None}
        assert len(kinds) <= 1, (name, kinds)
    first = list(shards[0][2].values())
    later = [meta for _, _, by_key in shards[1:] for meta in by_key.values()]
    for name in ("negative_prompt", "image_uri", "image_sha256", "mix", "note"):
        assert all(m[name] is None for m in first) and any(m[name] is not None for m in later), name
    features = datasets.load_dataset_builder(str(wds_out), cache_dir=str(tmp_path)).info.features
    loaded = datasets.load_dataset("webdataset", data_files=[str(wds_out / s) for s, _, _ in shards], features=features,
                                   split="train", cache_dir=str(tmp_path))
    got = {r["id"]: r for r in loaded["json"]}
    assert sorted(got) == sorted(GOOD)
    assert got["i0"]["negative_prompt"] == "blurry" and got["i0"]["note"] == "from a photo" and got["t0"]["note"] is None
    assert got["m0"]["mix"][1]["image_uri"] == rows["m0"]["mix"][1]["image_uri"]


@pytest.mark.ray
def test_shard_list_and_caption_members(outputs):
    import webdataset as wds

    tmp, rows, *_ = outputs
    for name in ("demo", "demo-wds"):
        out = tmp / "out" / name
        index = pq.read_table(out / "_index.parquet").to_pylist()
        with_rows = sorted(r["file"] for r in index if r["file"].startswith("data/") and r["rows"])
        assert (out / "shards.txt").read_text().split() == with_rows and all((out / s).is_file() for s in with_rows)
    out = tmp / "out" / "demo-wds"
    names = [f"{out}/{line}" for line in (out / "shards.txt").read_text().split()]
    samples = list(wds.WebDataset(names, shardshuffle=False).decode("pil"))
    assert sorted(s["json"]["id"] for s in samples) == sorted(GOOD)
    assert all(s["txt"] == rows[s["json"]["id"]]["prompt"] and isinstance(s["png"], Image.Image) for s in samples)
    for _, members, by_key in tar_members(out):  # per sample: image, caption, metadata
        assert members == [f"{k}.{ext}" for k in by_key for ext in ("png", "txt", "json")]


@pytest.mark.ray
def test_rows_and_units_record_provenance(outputs):
    from kandinsky_engine.identity import model_identity

    tmp, _, configs, started, ended = outputs
    out = tmp / "out" / "demo"
    table = pq.read_table(out / "data")
    run = json.loads((out / "_RUN.json").read_text())
    weights = {part: m["weights"] for part, m in run["inputs"]["models"].items()}
    assert set(table["model_revision"].to_pylist()) == {model_identity(configs["parquet"].model, weights)["model_revision"]}
    assert re.fullmatch(r"[0-9a-f]{16}", table["model_revision"][0].as_py())
    assert set(table["engine_version"].to_pylist()) == {metadata.version("kandinsky-engine")}
    for shard in (out / "data").rglob("*.parquet"):  # one time per unit, while the job ran
        times = set(pq.read_table(shard, columns=["created_at"])["created_at"].to_pylist())
        assert len(times) <= 1 and all(started <= t <= ended and t.tzinfo is not None for t in times)
    index = pq.read_table(out / "_index.parquet").to_pylist()
    data = [r for r in index if r["file"].startswith("data/")]
    assert len(data) == 3 and all(r["compute_s"] > 0 for r in data)
    assert all(r["compute_s"] is None for r in index if r["file"].startswith("errors/"))
    report = next(json.loads(p.read_text()) for p in (out / "_runs").glob("*.json"))
    assert report["compute_s"] == pytest.approx(sum(r["compute_s"] for r in data), abs=0.01)
    stamped = [m["created_at"] for _, _, by_key in tar_members(tmp / "out" / "demo-wds") for m in by_key.values()]
    assert all(started <= datetime.fromisoformat(t) <= ended for t in stamped)


@pytest.mark.ray
def test_push_sends_the_dataset_only(outputs, tmp_path, capsys):
    """What `push` uploads (huggingface_hub's own filter, no network) loads as the folder does; bad
    input is one line naming the folder, file or repo id."""
    import datasets

    tmp, *_ = outputs
    out = tmp / "out" / "demo"
    files = pushed_files(str(out))
    data = sorted(str(p.relative_to(out)) for p in (out / "data").rglob("*") if p.is_file())
    assert files == sorted(["README.md", "shards.txt", *data])
    copy = tmp_path / "pushed"
    for name in files:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / name, copy / name)
    here = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "a"))
    there = datasets.load_dataset(str(copy), split="train", cache_dir=str(tmp_path / "b"))
    raw = datasets.Image(decode=False)
    assert sorted(zip(there["id"], [i["bytes"] for i in there.cast_column("image", raw)["image"]])) == \
        sorted(zip(here["id"], [i["bytes"] for i in here.cast_column("image", raw)["image"]]))

    assert main(["push", str(out), "me/kandinsky-demo", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "README.md" in printed and f"{len(files)} file(s) would go to dataset me/kandinsky-demo" in printed
    unfinished = tmp_path / "unfinished"
    shutil.copytree(copy, unfinished)
    for argv, named in (([str(tmp_path / "nowhere"), "me/x"], "nowhere"), ([str(unfinished), "me/x"], "_SUCCESS.json"),
                        ([str(out), "not a repo//id"], "not a repo//id")):
        assert main(["push", *argv, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.ray
def test_documented_snippets_run_as_written(outputs, monkeypatch, tmp_path):
    """docs/outputs.md's, docs/jobs.md's and the README's Python examples (but its quick start's), in a folder where out/demo and
    out/demo-wds are this module's outputs. The upload example needs the network: its patterns
    are compared with `push`'s instead."""
    tmp, *_ = outputs
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    readme = re.sub(r"## Your own prompts\n.*?\n## ", "## ", (REPO / "README.md").read_text(), flags=re.S)  # test_readme.py
    blocks = (python_blocks(REPO / "docs" / "outputs.md") + python_blocks(REPO / "docs" / "jobs.md")
              + re.findall(r"```python\n(.*?)```", readme, flags=re.S))
    upload = [b for b in blocks if "upload_folder" in b]
    assert len(upload) == 1 and len(blocks) >= 7
    call = upload[0][upload[0].index("upload_folder"):]
    patterns = {k: eval(v) for k, v in re.findall(r"(\w+_patterns)=(\[[^\]]*\])", call)}  # noqa: S307 (our own docs)
    assert patterns == {"allow_patterns": PUSHED, "ignore_patterns": HIDDEN, "delete_patterns": ["data/**"]}
    for block in blocks:
        if block not in upload:
            exec(compile(block, "snippet", "exec"), {})  # noqa: S102 (our own docs)
