"""The tiny model and the loading path that real weights take."""

import shutil

import pytest
import torch

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.config import ModelConfig
from kandinsky_engine.models import load_module, resolve_source
from kandinsky_engine.families.kandinsky22.tiny import build_tokenizer


def test_tiny_model_cli_writes_loadable_diffusers_dirs(tmp_path):
    from diffusers import (KandinskyV22ControlnetPipeline, KandinskyV22InpaintPipeline, KandinskyV22Pipeline,
                           KandinskyV22PriorPipeline)

    assert main(["tiny-model", str(tmp_path / "tiny")]) == 0
    prior = KandinskyV22PriorPipeline.from_pretrained(tmp_path / "tiny" / "prior")
    decoder = KandinskyV22Pipeline.from_pretrained(tmp_path / "tiny" / "decoder")
    inpaint = KandinskyV22InpaintPipeline.from_pretrained(tmp_path / "tiny" / "decoder-inpaint")
    assert inpaint.unet.config.in_channels == 9
    controlnet = KandinskyV22ControlnetPipeline.from_pretrained(tmp_path / "tiny" / "decoder-controlnet")
    assert controlnet.unet.config.addition_embed_type == "image_hint"
    assert decoder.movq_scale_factor == 8  # four MoVQ blocks, like the real one
    assert not prior.prior.training and not decoder.unet.training
    files = [p for p in (tmp_path / "tiny").rglob("*") if p.is_file()]
    # 2.2's dirs (other families write theirs beside them): 2 encoders and the prior; U-Net and MoVQ
    # for each of the three decoders; the depth model
    own = ("prior", "decoder", "decoder-inpaint", "decoder-controlnet", "depth")
    assert len([p for p in files if p.suffix == ".safetensors" and p.relative_to(tmp_path / "tiny").parts[0] in own]) == 10
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]


def test_tiny_model_is_seeded(tmp_path):
    main(["tiny-model", str(tmp_path / "a")])
    main(["tiny-model", str(tmp_path / "b")])
    for part in ("prior/prior", "decoder/unet", "decoder/movq", "decoder-k3/unet"):
        a = (tmp_path / "a" / part / "diffusion_pytorch_model.safetensors").read_bytes()
        assert a == (tmp_path / "b" / part / "diffusion_pytorch_model.safetensors").read_bytes()


@pytest.mark.parametrize("prompt", ["Красный кот", "一只红色的猫", "🐱🚀✨", "naïve café", "عربى", "\u200b\t\n"])
def test_offline_tokenizer_accepts_any_unicode(prompt):
    tokenizer = build_tokenizer()
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(prompt.split()).lower()


def test_local_directory_source_and_errors(tiny_root, tmp_path):
    from diffusers import VQModel

    model = ModelConfig(decoder=str(tiny_root / "decoder"), cache_dir=str(tmp_path))
    movq = load_module(VQModel, model, resolve_source(model.decoder, "decoder", model.cache_dir), "movq")
    assert not movq.training and movq.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_source(str(tmp_path), "decoder", str(tmp_path))


def test_pickle_weights_are_refused(tiny_root, tmp_path):
    from diffusers import VQModel

    copy = tmp_path / "decoder"
    shutil.copytree(tiny_root / "decoder", copy)
    weights = copy / "movq" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), copy / "movq" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(EnvironmentError):
        load_module(VQModel, ModelConfig(decoder=str(copy), cache_dir=str(tmp_path)), str(copy), "movq")


def test_a_path_that_is_not_there_is_named_not_looked_up_on_the_hub(tmp_path):
    for source in ("./models/prior", str(tmp_path / "missing"), "~/nowhere/decoder"):
        with pytest.raises(FileNotFoundError, match=f"model.prior: no such directory: {source}"):
            resolve_source(source, "prior", str(tmp_path))


def test_hub_ids_are_identified_by_their_commit_or_refused(tmp_path, monkeypatch):
    """A hub id is fingerprinted by the commit its branch names now; one whose commit can be had
    neither from the hub nor from the cache is an error, not an 'unresolved' that would resume
    into other weights."""
    import huggingface_hub.constants

    from kandinsky_engine.hub import HubUnavailable
    from kandinsky_engine.models import check_source

    def weights_digest(source: str, part: str, cache_dir: str) -> str:  # the driver's one resolution identifies it
        return check_source(source, part, cache_dir).digest

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(HubUnavailable, match=r"hub model 'owner/model' \(revision 'main'\).*HF_HUB_OFFLINE is set"):
        weights_digest("owner/model", "prior", str(tmp_path))
    repo = tmp_path / "hub" / "models--owner--model"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    first = weights_digest("owner/model", "prior", str(tmp_path))
    assert weights_digest(f"owner/model@{'a' * 40}", "prior", str(tmp_path)) == first  # the same commit
    (repo / "refs" / "main").write_text("b" * 40)  # upstream moved: another identity
    assert weights_digest("owner/model", "prior", str(tmp_path)) != first
