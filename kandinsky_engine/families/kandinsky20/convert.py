"""`kandinsky-batch convert-k20 SRC DEST`: the original Kandinsky 2.0 files -> a diffusers-style directory
(directory.py) of safetensors that jobs load as model.decoder.

SRC (a folder, local or on object storage) holds what the original's `get_kandinsky2_0` downloads: the U-Net
(`Kandinsky-2-0.pt`, or `Kandinsky-2-0-inpainting.pt` with `task="inpainting"`), `vae.ckpt`, `text_encoder1/`
and `text_encoder2/`. Nothing pickled is executed (checkpoints.py). Each state dict goes into its class with
every key accounted for: a missing or unexpected key is an error naming it. The only keys dropped are named
here: the VAE checkpoint's training loss (`loss.*`: LPIPS and discriminator), the full mT5 checkpoint's decoder
and LM head (`decoder.*`, `lm_head.weight`; the original loads an MT5EncoderModel, which drops them too), and
the position-ids buffer older transformers versions saved (`*.position_ids`). Tensors keep their dtypes.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoints import lightning_state_dict, local_copy, state_dict

UNET_FILES = {"text2img": "Kandinsky-2-0.pt", "inpainting": "Kandinsky-2-0-inpainting.pt"}
HEAD_PREFIXES = ("to_model_dim.", "to_model_dim2.", "proj.", "proj2.", "ln_model1.", "ln_model2.", "ln_model3.")
HEAD_CHANNELS = 64  # CONFIG_2_0's num_head_channels: the one hyper-parameter the U-Net's weights do not show
BUFFERS = (".position_ids",)  # non-persistent buffers that older transformers versions saved


def load_strict(module, sd: dict, what: str, allowed_missing: tuple[str, ...] = ()) -> None:
    """module.load_state_dict(sd) with every key accounted for (`allowed_missing`: tied copies the class
    re-creates); the error names the file's part and the keys."""
    sd = {k: v.contiguous() for k, v in sd.items() if not k.endswith(BUFFERS)}
    result = module.load_state_dict(sd, strict=False, assign=True)  # assign: the file's dtypes are kept
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing or result.unexpected_keys:
        raise ValueError(f"{what}: {len(missing)} missing key(s) {missing[:8]}, {len(result.unexpected_keys)} "
                         f"unexpected {result.unexpected_keys[:8]}")


# --- U-Net: the original's guided-diffusion names -> UNet2DConditionModel's (written from both models' layouts)

def _resnet(orig: str, new: str, sd: dict) -> dict:
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    return {f"{new}.{n}.{p}": f"{orig}.{o}.{p}" for o, n in names.items() for p in ("weight", "bias")
            if f"{orig}.{o}.{p}" in sd}


def _attention(orig: str, new: str, sd: dict, head: int) -> dict:
    """GLIDE attention: qkv and encoder_kv are 1x1 conv1d weights whose rows are per head [q, k, v] (and [k, v])
    blocks of `head` rows; diffusers' Attention has separate linear q/k/v and add_k/add_v projections."""
    out = {}

    def split(key: str, parts: tuple[str, ...]):
        weight, bias = sd[f"{orig}.{key}.weight"], sd[f"{orig}.{key}.bias"]
        heads = weight.shape[0] // (len(parts) * head)
        w = weight[..., 0].reshape(heads, len(parts), head, weight.shape[1])
        b = bias.reshape(heads, len(parts), head)
        for j, name in enumerate(parts):
            out[f"{new}.{name}.weight"] = w[:, j].reshape(heads * head, weight.shape[1])
            out[f"{new}.{name}.bias"] = b[:, j].reshape(heads * head)
        return [f"{orig}.{key}.weight", f"{orig}.{key}.bias"]

    used = split("qkv", ("to_q", "to_k", "to_v")) + split("encoder_kv", ("add_k_proj", "add_v_proj"))
    for p in ("weight", "bias"):
        out[f"{new}.group_norm.{p}"] = sd[f"{orig}.norm.{p}"]
        out[f"{new}.to_out.0.{p}"] = sd[f"{orig}.proj_out.{p}"][..., 0] if p == "weight" else sd[f"{orig}.proj_out.{p}"]
        used += [f"{orig}.norm.{p}", f"{orig}.proj_out.{p}"]
    return out, used


def unet_layout(sd: dict) -> dict:
    """The original U-Net's hyper-parameters, read off its weights' names and shapes."""
    width = sd["input_blocks.0.0.weight"].shape[0]
    n_out = len({k.split(".")[1] for k in sd if k.startswith("output_blocks.")})
    # Each level but the first ends its output blocks with an upsampling ResBlock: levels x (res blocks + 1).
    first_up = min(int(k.split(".")[1]) for k in sd if k.startswith("output_blocks.") and ".in_layers." in k
                   and k.split(".")[2] in ("1", "2"))
    per_level = first_up + 1
    levels, res = n_out // per_level, per_level - 1
    firsts = [1 + level * per_level for level in range(levels)]  # each level's first input ResBlock
    return {"in_channels": sd["input_blocks.0.0.weight"].shape[1], "out_channels": sd["out.2.weight"].shape[0],
            "channels": tuple(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in firsts),
            "attention": tuple(f"input_blocks.{i}.1.qkv.weight" in sd for i in firsts), "layers": res,
            "context_dim": sd["middle_block.1.encoder_kv.weight"].shape[1], "width": width}


def unet_key_map(sd: dict, layout: dict, head: int) -> tuple[dict, set]:
    """({diffusers key: tensor}, original keys used) for the torso (every key but the text head's)."""
    new, used = {}, set()

    def take(mapping):
        new.update({n: sd[o] for n, o in mapping.items()})
        used.update(mapping.values())

    def attn(orig, dest):
        tensors, keys = _attention(orig, dest, sd, head)
        new.update(tensors)
        used.update(keys)

    take({f"time_embedding.linear_{j}.{p}": f"time_embed.{k}.{p}" for j, k in ((1, 0), (2, 2)) for p in ("weight", "bias")})
    take({f"conv_in.{p}": f"input_blocks.0.0.{p}" for p in ("weight", "bias")})
    take({f"conv_norm_out.{p}": f"out.0.{p}" for p in ("weight", "bias")} | {f"conv_out.{p}": f"out.2.{p}" for p in ("weight", "bias")})
    levels, res, block = len(layout["channels"]), layout["layers"], 1
    for level in range(levels):
        for r in range(res):
            take(_resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{r}", sd))
            if layout["attention"][level]:
                attn(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{r}")
            block += 1
        if level < levels - 1:
            take(_resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.downsamplers.0", sd))
            block += 1
    take(_resnet("middle_block.0", "mid_block.resnets.0", sd))
    attn("middle_block.1", "mid_block.attentions.0")
    take(_resnet("middle_block.2", "mid_block.resnets.1", sd))
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for r in range(res + 1):
            take(_resnet(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{r}", sd))
            if layout["attention"][level]:
                attn(f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{r}")
            if level > 0 and r == res:  # the level's upsampling ResBlock closes its last output block
                take(_resnet(f"output_blocks.{block}.{1 + layout['attention'][level]}", f"up_blocks.{up}.upsamplers.0", sd))
            block += 1
    return new, used


def convert_unet(sd: dict, what: str, head: int = HEAD_CHANNELS):
    """(UNet2DConditionModel, Kandinsky20TextHead) from the original U-Net state dict (torso and text head)."""
    from diffusers import UNet2DConditionModel

    from .text_head import Kandinsky20TextHead
    from .tiny import unet_config

    try:
        layout = unet_layout(sd)
        torso, used = unet_key_map(sd, layout, head)
    except KeyError as exc:
        raise ValueError(f"{what}: missing key {exc} of the original U-Net") from None
    levels = len(layout["channels"])
    config = unet_config(layout["in_channels"], layout["channels"], layout["layers"], layout["context_dim"], head)
    config["down_block_types"] = tuple("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in layout["attention"])
    config["up_block_types"] = tuple("SimpleCrossAttnUpBlock2D" if layout["attention"][lv] else "ResnetUpsampleBlock2D"
                                     for lv in reversed(range(levels)))
    head_sd = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIXES)}
    unused = sorted(set(sd) - used - set(head_sd))
    if unused:
        raise ValueError(f"{what}: {len(unused)} key(s) neither the U-Net nor the text head has: {unused[:8]}")
    unet = UNet2DConditionModel(**config)
    load_strict(unet, torso, f"{what} (U-Net)")
    text_head = Kandinsky20TextHead(
        text_dim1=head_sd["to_model_dim.weight"].shape[1], pooled_dim1=head_sd["proj.weight"].shape[1],
        text_dim2=head_sd["to_model_dim2.weight"].shape[1], model_dim=head_sd["to_model_dim.weight"].shape[0],
        time_embed_dim=head_sd["proj.weight"].shape[0])
    load_strict(text_head, head_sd, f"{what} (text head)")
    return unet, text_head


# --- VAE, text encoders, tokenizers

def convert_vae(sd: dict, what: str):
    """AutoencoderKL from the LDM KL autoencoder's state dict (diffusers' own LDM key conversion)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from .tiny import vae_config

    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}  # the training loss: LPIPS, discriminator
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    channels = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
    layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    config = vae_config(channels, layers) | {"latent_channels": sd["post_quant_conv.weight"].shape[1]}
    converted = convert_ldm_vae_checkpoint(sd, config)
    if len(converted) != len(sd):  # the conversion maps keys one to one; it skips the ones it does not know
        raise ValueError(f"{what}: {len(sd) - len(converted)} key(s) have no place in AutoencoderKL")
    vae = AutoencoderKL(**config)
    load_strict(vae, converted, what)
    return vae


def convert_text_encoder(folder: Path):
    """diffusers' MultilingualCLIP (XLM-R + LinearTransformation) from text_encoder1/ (config.json, state dict)."""
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
    from transformers import XLMRobertaConfig

    sd = state_dict(folder / "pytorch_model.bin")
    xlmr = XLMRobertaConfig.from_pretrained(folder).to_dict()
    kept = {k: v for k, v in xlmr.items() if k not in ("model_type", "architectures", "transformers_version", "_name_or_path")}
    linear = sd["LinearTransformation.weight"]
    model = MultilingualCLIP(MCLIPConfig(transformerDimSize=linear.shape[1], imageDimSize=linear.shape[0], **kept))
    load_strict(model, sd, f"{folder}/pytorch_model.bin")
    return model


def convert_text_encoder_2(folder: Path):
    """MT5EncoderModel from text_encoder2/: the encoder of the (full) mT5 checkpoint."""
    from transformers import MT5Config, MT5EncoderModel

    sd = {k: v for k, v in state_dict(folder / "pytorch_model.bin").items()
          if not k.startswith("decoder.") and k != "lm_head.weight"}
    model = MT5EncoderModel(MT5Config.from_pretrained(folder))
    # encoder.embed_tokens is `shared` (tied); files saved without the copy lack it
    load_strict(model, sd, f"{folder}/pytorch_model.bin", allowed_missing=("encoder.embed_tokens.weight",))
    return model


def convert(src: str, dest: str, task: str = "text2img", head_channels: int = HEAD_CHANNELS,
            storage_options: dict | None = None) -> Path:
    """Convert the original files under `src` into the directory `dest` (which must not exist yet)."""
    from transformers import AutoTokenizer

    from .directory import save_directory, training_scheduler

    if task not in UNET_FILES:
        raise ValueError(f"task={task!r}: one of {sorted(UNET_FILES)}")
    if Path(dest).exists():
        raise FileExistsError(f"{dest} exists: convert-k20 writes a new directory")
    names = (UNET_FILES[task], "vae.ckpt", "text_encoder1", "text_encoder2")
    with local_copy(src, names, storage_options) as root:
        missing = [n for n in names if not (root / n).exists()]
        if missing:
            raise FileNotFoundError(f"{src}: no {missing} (the original Kandinsky 2.0 files: {list(names)})")
        unet, text_head = convert_unet(state_dict(root / UNET_FILES[task]), f"{src}/{UNET_FILES[task]}", head_channels)
        parts = {
            "tokenizer": AutoTokenizer.from_pretrained(root / "text_encoder1"),
            "text_encoder": convert_text_encoder(root / "text_encoder1"),
            "tokenizer_2": AutoTokenizer.from_pretrained(root / "text_encoder2"),
            "text_encoder_2": convert_text_encoder_2(root / "text_encoder2"),
            "text_head": text_head, "unet": unet, "scheduler": training_scheduler(),
            "vae": convert_vae(lightning_state_dict(root / "vae.ckpt"), f"{src}/vae.ckpt"),
        }
    source = {"converted_from": {"files": list(names), "task": task, "head_channels": head_channels}}
    return save_directory(dest, parts, extra_index=source)
