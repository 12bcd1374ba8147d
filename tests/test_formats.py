"""Dataset outputs: WebDataset shards beside Parquet, the Parquet image as an HF Image feature, and
the opt-in per-row signals (image_embeds, clip_score, sha256, phash).

Stage-level checks run on plain dict batches; the Ray jobs are few and each checks several things."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kandinsky_engine import DecoderStage, MovqStage, PriorStage
from kandinsky_engine.columns import HF_METADATA, SIGNAL_TYPES
from kandinsky_engine.stages.movq import encode_images
from kandinsky_engine.stages.score import ClipScoreStage
from kandinsky_engine.pipelines.shards import TarShards, image_path, sample_key
from tests.conftest import batch_of, make_config, png, put_manifest, write_manifest

SIGNALS = list(SIGNAL_TYPES)
# Ids that must stay unique and safe as tar member names: traversal, separators, dots (webdataset
# splits a key at its first dot), case-only and sanitizer-only differences, unicode, NUL, length.
HOSTILE = ["../x", "a/b", ".", "..", "a.b", "a_b", "a-b", "Case", "case", "é/ü", "nul\x00byte", " ", "y" * 300]


def test_sample_keys_are_safe_and_unique():
    keys = [sample_key(i) for i in HOSTILE]
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", k) and len(k) <= 65 for k in keys), keys
    assert len({k.lower() for k in keys}) == len(HOSTILE)  # unique even on a case-insensitive disk
    assert keys[0].startswith("x-") and sample_key("row-001").startswith("row-001-")  # readable
    assert image_path("a", "jpeg").endswith(".jpg") and sample_key("a") == sample_key("a")


def test_tar_shard_is_deterministic_and_reads_with_webdataset(tmp_path):
    import webdataset as wds

    rows = [{"id": i, "prompt": f"p{n}", "seed": n, "image": {"bytes": bytes([n]) * 10, "path": image_path(i, "png")},
             "blob": b"\x00\xff", "mix": None} for n, i in enumerate(HOSTILE)]
    table = pa.Table.from_pylist(rows)
    payload = TarShards().encode(table)
    assert payload == TarShards().encode(table)  # byte-identical reruns
    members = tarfile.open(fileobj=io.BytesIO(payload)).getmembers()
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) for m in members} == {(0, 0, 0, 0o644, "", "")}
    assert all("/" not in m.name and m.name.count(".") == 1 for m in members)
    (tmp_path / "s.tar").write_bytes(payload)
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [json.loads(s["json"])["id"] for s in samples] == HOSTILE  # exact ids, in order, each once
    assert [s["png"] for s in samples] == [r["image"]["bytes"] for r in rows]
    meta = json.loads(samples[1]["json"])
    assert meta == {"id": "a/b", "prompt": "p1", "seed": 1, "blob": "AP8=", "mix": None}  # binary as base64
    assert TarShards().decode(payload)[:2] == (len(HOSTILE), HOSTILE)


def test_tar_json_is_strict_json_with_nan_and_infinity_as_null():
    rows = [{"id": "x", "image": {"bytes": b"i", "path": image_path("x", "png")}, "score": float("nan"),
             "embeds": [0.5, float("inf"), float("-inf")], "note": {"v": float("nan")}}]
    tar = tarfile.open(fileobj=io.BytesIO(TarShards().encode(pa.Table.from_pylist(rows))))
    text = next(tar.extractfile(m).read() for m in tar if m.name.endswith(".json"))

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    assert json.loads(text, parse_constant=refuse) == {"id": "x", "score": None, "embeds": [0.5, None, None],
                                                       "note": {"v": None}}


def test_hf_metadata_is_what_datasets_writes():
    import datasets

    ours = json.loads(HF_METADATA[b"huggingface"])
    theirs = json.loads(datasets.Features({"image": datasets.Image()}).arrow_schema.metadata[b"huggingface"])
    assert ours == theirs


def test_signals_match_direct_computations(model_cache, tiny_root, tmp_path):
    """The chain as the pipeline runs it (MoVQ without encoding, scoring, CPU encoding), each signal
    against its own direct computation: the prior's embedding, transformers' CLIP on the stored PNG,
    hashlib and imagehash."""
    import imagehash
    import torch
    from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionModelWithProjection)

    config = make_config(model_cache, "m.parquet", str(tmp_path), output={"columns": ["phash", "clip_score", "sha256",
                                                                                     "image_embeds"]})
    assert config.output.columns == SIGNALS  # one order, whatever the YAML's
    rows = [{"id": "a", "prompt": "a red cat"}, {"id": "b", "prompt": "a lighthouse at night", "width": 128}]
    prior = PriorStage(config)(batch_of(rows, config))
    pixels = MovqStage(config, encode=False)(DecoderStage(config)(prior))
    import time

    stage = ClipScoreStage(config)
    started = time.perf_counter()
    scored = stage(pixels)
    per_image = (time.perf_counter() - started) / len(rows)
    out = encode_images(scored, config.output)
    assert np.array_equal(np.stack(out["image_embeds"]), prior["image_embeds"])  # kept through decoder and MoVQ

    prior_dir = tiny_root / "prior"
    tokenizer = CLIPTokenizer.from_pretrained(prior_dir, subfolder="tokenizer")
    text_model = CLIPTextModelWithProjection.from_pretrained(prior_dir, subfolder="text_encoder").eval()
    vision = CLIPVisionModelWithProjection.from_pretrained(prior_dir, subfolder="image_encoder").eval()
    processor = CLIPImageProcessor.from_pretrained(prior_dir, subfolder="image_processor")
    for i, row in enumerate(rows):
        stored = Image.open(io.BytesIO(out["image"][i]))
        with torch.no_grad():
            tokens = tokenizer(row["prompt"], padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            text = text_model(tokens.input_ids).text_embeds[0]
            image = vision(processor(stored.convert("RGB"), return_tensors="pt").pixel_values).image_embeds[0]
        want = float(torch.nn.functional.cosine_similarity(text, image, dim=0))
        assert abs(float(out["clip_score"][i]) - want) < 1e-5, (out["clip_score"][i], want)
        assert out["sha256"][i] == hashlib.sha256(out["image"][i]).hexdigest()
        assert out["phash"][i] == str(imagehash.phash(stored)) and len(out["phash"][i]) == 16
    assert out["clip_score"][0] != out["clip_score"][1]
    # The plan schedules the scoring stage last among the model stages (its own pool unless fused).
    from types import SimpleNamespace

    from kandinsky_engine.pipelines.generate import model_stages

    manifest = SimpleNamespace(tasks={"text2img"})
    assert [name for name, *_ in model_stages(config, manifest)] == ["prior", "decoder", "movq", "score"]
    plain = config.model_copy(update={"output": config.output.model_copy(update={"columns": ["sha256"]})})
    assert "score" not in [name for name, *_ in model_stages(plain, manifest)]
    print(f"\nclip-score stage on the tiny model: {per_image * 1000:.1f} ms per image (batch of {len(rows)})")


# --- jobs ---------------------------------------------------------------------------------------

def wds_rows(tars: list) -> list[dict]:
    """Every sample of the tar shards, read with the webdataset library."""
    import webdataset as wds

    return [{**json.loads(s["json"]), "image": s["png"], "__key__": s["__key__"]}
            for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False)]


def test_webdataset_and_parquet_outputs_hold_the_same_rows(ray_cluster, model_cache, tmp_path):
    """One manifest of hostile ids, all signals: a Parquet job, and a WebDataset job run with --limit
    and then resumed (fused stages: the scoring stage is one of the fused actor's). Both verify, every
    row is in each exactly once, with the same image bytes and metadata."""
    import datasets

    from kandinsky_engine.jobs.run import run_job
    from kandinsky_engine.jobs.verify import verify

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": f"a lighthouse {n}", "note": n}
                                                       for n, i in enumerate(HOSTILE)])
    sections = dict(input={"rows_per_block": 4}, output={"columns": SIGNALS})
    parquet = make_config(model_cache, manifest, str(tmp_path / "parquet"), **sections)
    assert run_job(parquet)["rows"] == len(HOSTILE)
    wds_out = tmp_path / "wds"
    tar = make_config(model_cache, manifest, str(wds_out), input=sections["input"],
                      output={**sections["output"], "format": "webdataset"})
    assert run_job(tar, limit=4)["rows"] == 4
    summary = run_job(tar)
    assert (summary["rows"], summary["rows_skipped"], summary["rows_computed"]) == (len(HOSTILE), 4, len(HOSTILE) - 4)
    assert verify(str(tmp_path / "parquet")).ok and verify(str(wds_out)).ok
    # A resume with other columns is another job (the fingerprint has them).
    with pytest.raises(RuntimeError, match="output.columns"):
        run_job(tar.model_copy(update={"output": tar.output.model_copy(update={"columns": ["sha256"]})}))

    table = pq.read_table(tmp_path / "parquet" / "data")
    images = table["image"].combine_chunks().field("bytes").to_pylist()  # pyarrow readers get the encoded bytes
    by_id = {r["id"]: {**r, "image": b} for r, b in zip(table.drop_columns(["image"]).to_pylist(), images)}
    tars = sorted((wds_out / "data").rglob("*.tar"))
    assert len(tars) == 4 and not list((wds_out / "data").rglob("*.parquet"))
    samples = wds_rows(tars)
    assert sorted(s["id"] for s in samples) == sorted(HOSTILE)  # every row exactly once
    for sample in samples:
        want = by_id[sample["id"]]
        assert sample["__key__"] == sample_key(sample["id"]) and sample["image"] == want["image"]
        # image_embeds, clip_score... alike; created_at is when each job wrote the row (ISO 8601 in the json)
        assert datetime.fromisoformat(sample.pop("created_at")).tzinfo is not None and want.pop("created_at")
        assert {k: v for k, v in sample.items() if k != "__key__"} == want
        assert hashlib.sha256(sample["image"]).hexdigest() == sample["sha256"]

    hf_parquet = datasets.load_dataset("parquet", data_files=str(tmp_path / "parquet" / "data" / "*" / "*.parquet"),
                                       split="train")
    assert isinstance(hf_parquet[0]["image"], Image.Image) and hf_parquet[0]["image"].size == (64, 64)
    assert sorted(hf_parquet["id"]) == sorted(HOSTILE)
    hf_tar = datasets.load_dataset("webdataset", data_files=[str(t) for t in tars], split="train")
    assert sorted(r["id"] for r in hf_tar["json"]) == sorted(HOSTILE)
    assert isinstance(hf_tar[0]["png"], Image.Image)

    # The report's contact sheet samples tar shards as it does Parquet ones (jobs/samples.py).
    from kandinsky_engine.jobs.samples import sample_rows
    from kandinsky_engine.storage import url_to_fs

    for out in (tmp_path / "parquet", wds_out):
        shown = sample_rows(*url_to_fs(str(out), {}), max_rows=6)
        assert len(shown) == 6 and all(by_id[r["id"]]["image"] == r["image"] for r in shown)
        assert all(r["clip_score"] == by_id[r["id"]]["clip_score"] for r in shown)


def test_webdataset_resumes_on_s3(ray_cluster, model_cache, s3):
    """A --limit run then the full run against the S3 API: tar shards under the layout, each row
    once, the index records every shard, verify passes. Then a row whose input was missing is retried
    (attempt 2: a `-a2.tar`), and a damaged tar is set aside and its unit recomputed."""
    from kandinsky_engine.jobs.run import run_job
    from kandinsky_engine.jobs.verify import verify

    fs, options = s3
    ids = [f"r{i}" for i in range(6)]
    put_manifest(fs, "kandinsky/wds/m.parquet", [{"id": i, "prompt": "a fox"} for i in ids] + [
        {"id": "late", "prompt": "a fox", "task": "img2img", "image_uri": "s3://kandinsky/wds/in/late.png",
         "strength": 0.5}])
    ids.append("late")
    config = make_config(model_cache, "s3://kandinsky/wds/m.parquet", "s3://kandinsky/wds-out",
                         input={"rows_per_block": 2}, output={"format": "webdataset", "columns": ["sha256"]})
    config = config.model_copy(update={"storage_options": options})
    assert run_job(config, limit=2)["rows"] == 2
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"], summary["rows_skipped"]) == (6, 1, 2)  # late.png is missing
    fs.pipe("kandinsky/wds/in/late.png", png("orange"))
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"], summary["rows_retried"]) == (7, 0, 1)
    assert verify("s3://kandinsky/wds-out", config=config).ok
    fs.invalidate_cache()
    keys = sorted(k.removeprefix("kandinsky/wds-out/") for k in fs.find("kandinsky/wds-out/data"))
    assert len(keys) == 5 and sum(k.endswith("-a2.tar") for k in keys) == 1
    assert all(re.fullmatch(r"data/[\w-]+/part-\d{12}-[0-9a-f]{16}-a[12]\.tar", k) for k in keys)
    assert {s["file"] for s in summary["shards"]} == set(keys)
    got = [json.loads(tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"kandinsky/wds-out/{k}"))).extractfile(m).read())
           for k in keys for m in tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"kandinsky/wds-out/{k}")))
           if m.name.endswith(".json")]
    assert sorted(r["id"] for r in got) == sorted(ids) and all(len(r["sha256"]) == 64 for r in got)
    torn = f"kandinsky/wds-out/{keys[0]}"
    fs.pipe(torn, fs.cat_file(torn)[:700])  # a tar cut short
    fs.invalidate_cache()
    assert not verify("s3://kandinsky/wds-out", config=config).ok
    summary = run_job(config)
    assert summary["runs"][-1]["damaged"] == [keys[0]] and summary["rows_computed"] == 2
    assert verify("s3://kandinsky/wds-out", config=config).ok
    fs.invalidate_cache()
    assert fs.exists(f"kandinsky/wds-out/_damaged/{summary['runs'][-1]['run']}/{keys[0]}")
