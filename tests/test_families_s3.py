"""Every family on object storage (issue 13): model directories, manifest and output on a real S3 API
(moto's server on loopback). A Kandinsky 3 job whose decoder is an s3:// URL, run with --limit, then
resumed; the Kandinsky 2.1 weights detected and checked from S3 by the driver, without a download."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from kandinsky_engine.jobs.run import run_job
from kandinsky_engine.jobs.verify import verify
from kandinsky_engine.config import ModelConfig
from kandinsky_engine.families import family_of, supported_tasks
from kandinsky_engine.model_cache import ModelSourceError
from kandinsky_engine.models import check_source
from tests.conftest import KEY, SECRET, make_config, png, put_manifest
from tests.reference import decode

MODELS = "kandinsky/models"
PARTS = ("decoder-k3", "prior-k21", "decoder-k21")  # tiny model dirs, as kandinsky_engine/families/tiny.py names them


@pytest.fixture(scope="module")
def remote(s3, tiny_root):
    """The tiny Kandinsky 3 decoder and Kandinsky 2.1 prior and decoder at s3://kandinsky/models/<part>."""
    fs, options = s3
    for part in PARTS:
        fs.put(str(tiny_root / part), f"{MODELS}/{part}", recursive=True)
    return fs, options, {part: f"s3://{MODELS}/{part}" for part in PARTS}


def s3_ids(fs, keys: list[str]) -> list[str]:
    """Every id of the Parquet shards at `keys`, duplicates kept."""
    return [i for k in keys for i in pq.read_table(io.BytesIO(fs.cat_file(k)), columns=["id"])["id"].to_pylist()]


# Units of 2 rows: --limit 3 covers the first two units (whole units), the poison row among them.
K3_ROWS = [
    {"id": "k3-a", "prompt": "a red cat"},
    {"id": "k3-poison", "prompt": "x", "task": "img2img", "image_bytes": b"not an image", "strength": 1.0},
    {"id": "k3-b", "prompt": "Медведь в лесу", "width": 128},
    {"id": "k3-i2i", "prompt": "a watercolor", "task": "img2img", "image_bytes": png("teal"), "strength": 0.5},
    {"id": "k3-c", "prompt": "山水画", "guidance_scale": 1.0},
    {"id": "k3-d", "prompt": "a lighthouse"},
]


@pytest.mark.ray
def test_kandinsky3_job_from_s3_models_limits_resumes_and_keeps_the_poison_row(ray_cluster, remote, tmp_path):
    fs, options, urls = remote
    put_manifest(fs, "kandinsky/k3/m.parquet", K3_ROWS)
    out = "kandinsky/k3-out"
    config = make_config(str(tmp_path / "cache"), "s3://kandinsky/k3/m.parquet", f"s3://{out}",
                         model={"decoder": urls["decoder-k3"]}, input={"rows_per_block": 2})
    config = config.model_copy(update={"storage_options": options})

    first = run_job(config, limit=3)
    assert (first["rows"], first["failed_rows"], first["rows_computed"]) == (3, 1, 4)  # two whole units
    second = run_job(config)  # the resume: the two last units, and the poison row retried
    assert (second["rows"], second["failed_rows"]) == (5, 1)
    assert (second["rows_skipped"], second["rows_computed"], second["rows_retried"]) == (3, 3, 1)

    fs.invalidate_cache()
    data, errors = sorted(fs.find(f"{out}/data")), sorted(fs.find(f"{out}/errors"))
    assert len(data) == 3 and {s["file"] for s in second["shards"]} == {k.removeprefix(f"{out}/") for k in data}
    good = sorted(r["id"] for r in K3_ROWS if r["id"] != "k3-poison")
    assert sorted(s3_ids(fs, data)) == good  # each good row exactly once
    (failed,) = [r for k in errors for r in pq.read_table(io.BytesIO(fs.cat_file(k))).to_pylist()]
    assert (failed["id"], failed["stage"], failed["attempt"]) == ("k3-poison", "MovqEncodeStage", 2)
    check = verify(f"s3://{out}", config=config)
    assert check.ok, check.problems
    assert (check.rows, check.failed_rows) == (5, 1)

    # The family came from the remote model_index.json; rows record the URL as configured.
    assert json.loads(fs.cat(f"{out}/_RUN.json"))["inputs"]["family"] == "kandinsky3"
    rows = {r["id"]: r for k in data for r in pq.read_table(io.BytesIO(fs.cat_file(k))).to_pylist()}
    assert {r["decoder_model"].split("@")[0] for r in rows.values()} == {urls["decoder-k3"]}
    assert all(r["prior_model"] is None for r in rows.values())
    assert decode(rows["k3-b"]["image"]["bytes"]).shape == (64, 128, 3)
    assert len(list((tmp_path / "cache" / "remote").iterdir())) == 1  # the actor's mirror of the URL
    everything = json.dumps(second, default=str) + "".join(fs.cat(k).decode() for k in fs.find(out) if k.endswith(".json"))
    assert KEY not in everything and SECRET not in everything


def test_kandinsky21_weights_are_detected_and_checked_on_s3_without_downloading(remote, tmp_path):
    fs, options, urls = remote
    model = ModelConfig(cache_dir=str(tmp_path), prior=urls["prior-k21"], decoder=urls["decoder-k21"])
    assert family_of(model, options).name == "kandinsky21"  # the remote model_index.json's _class_name
    assert supported_tasks(model, options) == ("text2img", "img2img", "mix")  # unet/config.json: not inpaint
    for part, url in (("prior", urls["prior-k21"]), ("decoder", urls["decoder-k21"])):
        check_source(url, part, str(tmp_path), options)  # the driver's fail-fast check: a listing
    assert not (tmp_path / "remote").exists()  # nothing mirrored by the driver
    # A 2.1 job's prior that is not there fails in the driver, before Ray or any output.
    config = make_config(str(tmp_path), "s3://kandinsky/k21/m.parquet", "s3://kandinsky/k21-out",
                         model={"prior": f"s3://{MODELS}/no-prior", "decoder": urls["decoder-k21"]})
    put_manifest(fs, "kandinsky/k21/m.parquet", [{"id": "a", "prompt": "a cat"}])
    with pytest.raises(ModelSourceError, match="no-prior") as err:
        run_job(config.model_copy(update={"storage_options": options}))
    assert KEY not in str(err.value) and SECRET not in str(err.value)
    assert not fs.exists("kandinsky/k21-out")
