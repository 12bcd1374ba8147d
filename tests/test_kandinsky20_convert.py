"""convert-k20: the original Kandinsky 2.0 files (tiny, written by tests/k20_original.py in the original's
formats) -> the converted directory. Every converted tensor equals the original's, key by key; pickles are read
without running code; a missing or unexpected key is an error."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.config import ModelConfig
from kandinsky_engine.families import family_of
from kandinsky_engine.families.kandinsky20.checkpoints import UnsafeCheckpoint
from kandinsky_engine.families.kandinsky20.convert import convert
from tests.k20_original import HEAD, write_lightning_ckpt, write_original


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("k20-convert")
    parts = write_original(tmp / "original", 4)
    assert main(["convert-k20", str(tmp / "original"), str(tmp / "k20"), "--head-channels", str(HEAD)]) == 0
    inpaint_parts = write_original(tmp / "original-inpaint", 9)
    convert(str(tmp / "original-inpaint"), str(tmp / "k20-inpaint"), task="inpainting", head_channels=HEAD)
    return {"tmp": tmp, "parts": parts, "inpaint_parts": inpaint_parts}


def loaded(folder, name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP
    from transformers import MT5EncoderModel

    from kandinsky_engine.families.kandinsky20.text_head import Kandinsky20TextHead

    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_head": Kandinsky20TextHead,
               "text_encoder": MultilingualCLIP, "text_encoder_2": MT5EncoderModel}
    return classes[name].from_pretrained(folder, subfolder=name, use_safetensors=True)


@pytest.mark.parametrize("name", ["unet", "text_head", "vae", "text_encoder", "text_encoder_2"])
def test_converted_components_equal_the_original_tensors(converted, name):
    """Each component of the converted directory holds exactly the tensors the original files held (the U-Net's
    per-head qkv and encoder_kv rows split into q/k/v and add_k/add_v, 1x1 convs as linears, LDM's names)."""
    want = converted["parts"][name].state_dict()
    got = loaded(converted["tmp"] / "k20", name).state_dict()
    assert set(got) == set(want)
    unequal = [k for k in want if not torch.equal(got[k], want[k])]
    assert unequal == []


def test_the_inpainting_unet_and_the_directory(converted):
    """The 9-channel U-Net converts too; model_index.json names the family, which jobs detect from it; the
    tokenizers tokenize as the original's."""
    import json

    from transformers import AutoTokenizer

    want, got = converted["inpaint_parts"]["unet"].state_dict(), loaded(converted["tmp"] / "k20-inpaint", "unet").state_dict()
    assert got["conv_in.weight"].shape[1] == 9 and all(torch.equal(got[k], want[k]) for k in want)
    index = json.loads((converted["tmp"] / "k20" / "model_index.json").read_text())
    assert index["_class_name"] == "Kandinsky20Pipeline" and index["converted_from"]["task"] == "text2img"
    model = ModelConfig(decoder=str(converted["tmp"] / "k20-inpaint"))
    assert family_of(model).name == "kandinsky20" and family_of(model).tasks(model, None) == ("inpaint",)
    for sub, original in (("tokenizer", "text_encoder1"), ("tokenizer_2", "text_encoder2")):
        ours = AutoTokenizer.from_pretrained(converted["tmp"] / "k20" / sub)
        theirs = AutoTokenizer.from_pretrained(converted["tmp"] / "original" / original)
        text = ["a red cat", "Медведь в лесу", ""]
        assert ours(text, max_length=77, padding="max_length").input_ids == theirs(text, max_length=77, padding="max_length").input_ids


def test_missing_and_unexpected_keys_are_errors(converted, tmp_path):
    src = tmp_path / "original"
    shutil.copytree(converted["tmp"] / "original", src)
    sd = torch.load(src / "Kandinsky-2-0.pt", weights_only=True)
    removed = {k: v for k, v in sd.items() if k != "middle_block.1.qkv.bias"}
    torch.save(removed, src / "Kandinsky-2-0.pt")
    with pytest.raises(ValueError, match="Kandinsky-2-0.pt: missing key 'middle_block.1.qkv.bias'"):
        convert(str(src), str(tmp_path / "a"), head_channels=HEAD)
    torch.save({**sd, "input_blocks.1.0.extra.weight": torch.zeros(2)}, src / "Kandinsky-2-0.pt")
    with pytest.raises(ValueError, match=r"neither the U-Net nor the text head has: \['input_blocks.1.0.extra.weight'\]"):
        convert(str(src), str(tmp_path / "b"), head_channels=HEAD)
    torch.save(sd, src / "Kandinsky-2-0.pt")
    mclip = torch.load(src / "text_encoder1" / "pytorch_model.bin", weights_only=True)
    torch.save({**mclip, "transformer.pooler.extra": torch.zeros(1)}, src / "text_encoder1" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"1 unexpected \['transformer.pooler.extra'\]"):
        convert(str(src), str(tmp_path / "c"), head_channels=HEAD)
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing written on failure


class Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_pickled_code_is_refused_with_the_file_named(converted, tmp_path):
    src = tmp_path / "original"
    shutil.copytree(converted["tmp"] / "original", src)
    torch.save({"time_embed.0.weight": Payload()}, src / "Kandinsky-2-0.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"Kandinsky-2-0.pt: refused to unpickle \(Unsupported global: GLOBAL [\w.]*print was not an allowed global"):
        convert(str(src), str(tmp_path / "a"), head_channels=HEAD)
    with open(src / "Kandinsky-2-0.pt", "wb") as f:  # a plain pickle, protocol 4
        pickle.dump({"time_embed.0.weight": Payload()}, f)
    with pytest.raises(UnsafeCheckpoint, match=r"Kandinsky-2-0.pt: refused to unpickle \(Unsupported operand"):
        convert(str(src), str(tmp_path / "a"), head_channels=HEAD)
    shutil.copy(converted["tmp"] / "original" / "Kandinsky-2-0.pt", src / "Kandinsky-2-0.pt")
    # anything but tensors, containers and Lightning's callback names
    write_lightning_ckpt(src / "vae.ckpt", {"encoder.conv_in.weight": Payload()})
    with pytest.raises(UnsafeCheckpoint, match=r"vae.ckpt: refused to unpickle \(Unsupported global: GLOBAL [\w.]*print was not an allowed global"):
        convert(str(src), str(tmp_path / "b"), head_channels=HEAD)
