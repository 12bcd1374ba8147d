"""`kandinsky-batch stage-model`: a Hugging Face snapshot folder staged to S3 (moto's real server on
loopback) holds exactly what the engine reads, and then loads as `model.prior: s3://...` through
the engine's own check_source / mirror path; what it must refuse, it refuses before uploading."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.model_cache import mirror
from kandinsky_engine.models import check_source

PREFIX = "kandinsky/staged"


def snapshot(src: Path, dest: Path) -> Path:
    """`src` laid out as huggingface_hub's cache does: files are links into blobs/ named by hash.
    Beside them, what a hub repo also has: a pickle copy of a weight, docs, a hidden folder."""
    blobs, snap = dest / "blobs", dest / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        link = snap / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (snap / "text_encoder" / "pytorch_model.bin").write_bytes(b"pickle")
    (snap / "README.md").write_text("model card")
    (snap / ".cache").mkdir()
    (snap / ".cache" / "x.json").write_text("{}")
    return snap


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def options_config(s3, tmp_path) -> str:
    """A job config whose storage_options point at moto (stage-model's --config)."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": {"manifest": "m.parquet"}, "output": {"path": "out"},
                                    "storage_options": s3[1]}))
    return str(path)


def stage(src, name: str, config: str) -> int:
    return main(["stage-model", str(src), f"s3://{PREFIX}/{name}", "--config", config])


def test_snapshot_stages_and_loads_as_an_s3_model(s3, tiny_root, tmp_path, options_config, capsys):
    fs, options = s3
    snap = snapshot(tiny_root / "prior", tmp_path / "hub")
    assert stage(snap, "prior", options_config) == 0
    out = capsys.readouterr().out
    assert "text_encoder/pytorch_model.bin" in out and "README.md" in out  # said, and not copied
    staged = {p[len(f"{PREFIX}/prior/"):]: fs.info(p)["size"] for p in fs.find(f"{PREFIX}/prior")}
    source = files(tiny_root / "prior")
    assert staged == {rel: len(data) for rel, data in source.items()}  # exactly the model files, no more

    url = f"s3://{PREFIX}/prior"
    cache = tmp_path / "cache"
    resolved = check_source(url, "prior", str(cache), options)  # the driver's check
    local = Path(mirror(resolved, str(cache), options).path)  # what an actor loads
    assert {rel: data for rel, data in files(local).items() if not rel.startswith(".")} == source

    from diffusers import PriorTransformer

    loaded = PriorTransformer.from_pretrained(local, subfolder="prior", use_safetensors=True)
    original = PriorTransformer.from_pretrained(tiny_root / "prior", subfolder="prior", use_safetensors=True)
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), original.state_dict().values()))


def test_index_is_uploaded_last(s3, tiny_root, tmp_path, options_config):
    """A copy that stops halfway has no model_index.json, so a job refuses it: the upload order is
    read from moto's own request log."""
    import logging

    puts: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if '"PUT /' in message:
                puts.append(message.split('"PUT /')[1].split(" ")[0])

    logger, handler = logging.getLogger("werkzeug"), Collect()
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        assert stage(tiny_root / "decoder", "decoder-order", options_config) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    uploads = [p for p in puts if "decoder-order/" in p]
    assert len(uploads) == len(files(tiny_root / "decoder"))
    assert uploads[-1].endswith("decoder-order/model_index.json")


def test_transformers_model_stages(s3, tiny_root, tmp_path, options_config):
    fs, options = s3
    assert stage(tiny_root / "depth", "depth", options_config) == 0
    check_source(f"s3://{PREFIX}/depth", "depth", str(tmp_path / "cache"), options)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{PREFIX}/depth")) == sorted(
        p.name for p in (tiny_root / "depth").iterdir())


def test_pickle_only_weights_are_refused_before_uploading(s3, tiny_root, tmp_path, options_config, capsys):
    fs, _ = s3
    src = tmp_path / "pickled"
    shutil.copytree(tiny_root / "prior", src)
    weights = src / "prior" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    assert stage(src, "pickled", options_config) == 2
    assert "pickle weights without safetensors (prior/diffusion_pytorch_model.bin)" in capsys.readouterr().err
    assert not fs.exists(f"{PREFIX}/pickled")


def test_other_model_files_at_the_destination_are_refused(s3, tiny_root, tmp_path, options_config, capsys):
    fs, _ = s3
    fs.pipe(f"{PREFIX}/stale/unet/diffusion_pytorch_model-00002-of-00002.safetensors", b"old shard")
    assert stage(tiny_root / "decoder", "stale", options_config) == 2
    err = capsys.readouterr().err
    assert "unet/diffusion_pytorch_model-00002-of-00002.safetensors" in err and "own prefix" in err
    assert [p.rsplit("/", 1)[1] for p in fs.find(f"{PREFIX}/stale")] == [
        "diffusion_pytorch_model-00002-of-00002.safetensors"]  # nothing uploaded


def test_a_folder_that_is_no_model_is_refused(s3, tmp_path, options_config, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "weights.safetensors").write_bytes(b"x")
    assert stage(tmp_path / "notes", "notes", options_config) == 2
    assert "neither a diffusers pipeline directory" in capsys.readouterr().err


def test_stages_onto_a_shared_volume_folder(tiny_root, tmp_path):
    """A local DEST (the shared read-only volume of infra/k8s/components/shared-weights, filled once):
    its folders are made, and it holds exactly the model files, which load from there."""
    dest = tmp_path / "volume" / "models" / "kandinsky-2-2-prior"  # no folder of it exists yet
    assert main(["stage-model", str(snapshot(tiny_root / "prior", tmp_path / "hub")), str(dest)]) == 0
    assert files(dest) == files(tiny_root / "prior")

    from diffusers import PriorTransformer

    loaded = PriorTransformer.from_pretrained(dest, subfolder="prior", use_safetensors=True)
    assert sum(p.numel() for p in loaded.parameters()) > 0
