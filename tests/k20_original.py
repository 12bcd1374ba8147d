"""Tiny Kandinsky 2.0 weights in the original repository's formats, for the converter's tests (CI has no checkout
of the original). Written from the original's layout, independently of convert.py: each component of the tiny
model (families/kandinsky20/tiny.py) is exported under the original's names (guided-diffusion's U-Net with its
text head, LDM's autoencoder in a Lightning checkpoint, M-CLIP and the full mT5 state dicts), so a conversion
must give back the tiny model's tensors. The key sets equal those of the original classes at these sizes
(checked against ai-forever/Kandinsky-2 at aeefc1c with scripts/parity_kandinsky20.py's builder).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

from kandinsky_engine.families.kandinsky20 import tiny

HEAD = 32  # the tiny U-Net's channels per attention head


def _resnet(src: dict, new: str, orig: str) -> dict:
    names = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
             "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    return {f"{orig}.{o}.{p}": src[f"{new}.{n}.{p}"] for n, o in names.items() for p in ("weight", "bias")
            if f"{new}.{n}.weight" in src}


def _attention(src: dict, new: str, orig: str) -> dict:
    """diffusers q/k/v (and add_k/add_v) -> one conv1d whose rows are, head by head, [q, k, v] ([k, v])."""
    out = {f"{orig}.norm.{p}": src[f"{new}.group_norm.{p}"] for p in ("weight", "bias")}
    for key, parts in (("qkv", ("to_q", "to_k", "to_v")), ("encoder_kv", ("add_k_proj", "add_v_proj"))):
        for p in ("weight", "bias"):
            blocks = [src[f"{new}.{name}.{p}"] for name in parts]  # each (C, ...) = heads x HEAD rows
            per_head = [b.reshape(-1, HEAD, *b.shape[1:]) for b in blocks]  # (heads, HEAD, ...)
            merged = torch.stack(per_head, dim=1).reshape(-1, *blocks[0].shape[1:])  # (heads * len(parts) * HEAD, ...)
            out[f"{orig}.{key}.{p}"] = merged[..., None] if p == "weight" else merged
    out[f"{orig}.proj_out.weight"] = src[f"{new}.to_out.0.weight"][..., None]
    out[f"{orig}.proj_out.bias"] = src[f"{new}.to_out.0.bias"]
    return out


def original_unet(unet, head) -> dict:
    """The original Text2ImUNet state dict (torso and text head) holding `unet`'s and `head`'s tensors."""
    src, out = unet.state_dict(), {}
    out.update({f"time_embed.{o}.{p}": src[f"time_embedding.linear_{n}.{p}"] for n, o in ((1, 0), (2, 2))
                for p in ("weight", "bias")})
    out.update({f"input_blocks.0.0.{p}": src[f"conv_in.{p}"] for p in ("weight", "bias")})
    out.update({f"out.0.{p}": src[f"conv_norm_out.{p}"] for p in ("weight", "bias")})
    out.update({f"out.2.{p}": src[f"conv_out.{p}"] for p in ("weight", "bias")})
    block = 1
    for level, down in enumerate(unet.down_blocks):
        for r in range(len(down.resnets)):
            out.update(_resnet(src, f"down_blocks.{level}.resnets.{r}", f"input_blocks.{block}.0"))
            if hasattr(down, "attentions"):
                out.update(_attention(src, f"down_blocks.{level}.attentions.{r}", f"input_blocks.{block}.1"))
            block += 1
        if down.downsamplers is not None:
            out.update(_resnet(src, f"down_blocks.{level}.downsamplers.0", f"input_blocks.{block}.0"))
            block += 1
    out.update(_resnet(src, "mid_block.resnets.0", "middle_block.0"))
    out.update(_attention(src, "mid_block.attentions.0", "middle_block.1"))
    out.update(_resnet(src, "mid_block.resnets.1", "middle_block.2"))
    block = 0
    for u, up in enumerate(unet.up_blocks):
        attention = hasattr(up, "attentions")
        for r in range(len(up.resnets)):
            out.update(_resnet(src, f"up_blocks.{u}.resnets.{r}", f"output_blocks.{block}.0"))
            if attention:
                out.update(_attention(src, f"up_blocks.{u}.attentions.{r}", f"output_blocks.{block}.1"))
            if up.upsamplers is not None and r == len(up.resnets) - 1:
                out.update(_resnet(src, f"up_blocks.{u}.upsamplers.0", f"output_blocks.{block}.{1 + attention}"))
            block += 1
    out.update(head.state_dict())  # the text head's layers keep the original's names
    return {k: v.clone() for k, v in out.items()}


def original_vae(vae) -> dict:
    """LDM's AutoencoderKL state dict (encoder.down.i.block.j, mid.block_1, mid.attn_1 as 1x1 convs, ...)."""
    out = {}
    for key, value in vae.state_dict().items():
        k = key
        for a, b in (("down_blocks.", "down."), ("up_blocks.", "up."), (".resnets.", ".block."),
                     (".downsamplers.0.", ".downsample."), (".upsamplers.0.", ".upsample."), ("conv_shortcut", "nin_shortcut"),
                     ("conv_norm_out", "norm_out"), ("mid_block.attentions.0.", "mid.attn_1."), ("group_norm", "norm"),
                     ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(a, b)
        if "mid_block.block." in k:
            index = int(k.split("mid_block.block.")[1].split(".")[0])
            k = k.replace(f"mid_block.block.{index}.", f"mid.block_{index + 1}.")
        if k.startswith("decoder.up."):  # LDM numbers the decoder's levels from the bottom
            level = int(k.split(".")[2])
            k = ".".join(["decoder", "up", str(len(vae.decoder.up_blocks) - 1 - level), *k.split(".")[3:]])
        if ".attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[k] = value.clone()
    return out


def write_lightning_ckpt(path: Path, state: dict) -> None:
    """A Lightning checkpoint as LDM's training saved it: the state dict with the training loss's keys, trainer
    state, and the callbacks keyed by the ModelCheckpoint class (pickled by name; a stand-in module provides it)."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    saved = {n: sys.modules.get(n) for n in names}
    module = types.ModuleType(names[-1])
    checkpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    module.ModelCheckpoint = checkpoint
    for n in names:
        sys.modules[n] = module
    try:
        torch.save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.4.2",
                    "state_dict": {**state, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2, 3)},
                    "callbacks": {checkpoint: {"best_model_score": torch.tensor(0.25)}},
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}]}, path)
    finally:
        for n, m in saved.items():
            sys.modules.pop(n) if m is None else sys.modules.__setitem__(n, m)


def write_original(root: Path, in_channels: int = 4) -> dict:
    """The tiny model's components in the original files under `root`; returns the components."""
    from transformers import MT5ForConditionalGeneration, XLMRobertaConfig

    parts = tiny.components(in_channels)
    root.mkdir(parents=True, exist_ok=True)
    name = "Kandinsky-2-0.pt" if in_channels == 4 else "Kandinsky-2-0-inpainting.pt"
    torch.save(original_unet(parts["unet"], parts["text_head"]), root / name)
    write_lightning_ckpt(root / "vae.ckpt", original_vae(parts["vae"]))
    enc1 = root / "text_encoder1"
    parts["tokenizer"].save_pretrained(enc1)
    config = {k: v for k, v in parts["text_encoder"].config.to_dict().items()
              if k not in ("model_type", "transformerDimensions", "numDims", "architectures")}
    XLMRobertaConfig(**config).save_pretrained(enc1)
    torch.save(parts["text_encoder"].state_dict(), enc1 / "pytorch_model.bin")
    enc2 = root / "text_encoder2"
    parts["tokenizer_2"].save_pretrained(enc2)
    full = MT5ForConditionalGeneration(parts["text_encoder_2"].config)  # the released file holds the whole mT5
    full.load_state_dict(parts["text_encoder_2"].state_dict(), strict=False)
    full.config.save_pretrained(enc2)
    torch.save(full.state_dict(), enc2 / "pytorch_model.bin")
    return parts
