"""Tiny, seeded, randomly initialised Kandinsky 2.0 components (written under the shared tiny root by
kandinsky_engine/families/tiny.py as `decoder-k20` and `decoder-k20-inpaint`: model.decoder tiny-k20 / tiny-k20-inpaint),
in the layout convert-k20 writes, so jobs load them through the same from_pretrained path as real weights.

The real classes at test sizes, shaped so that the original repository's classes can be built with the same
hyper-parameters (scripts/parity_kandinsky20.py does): GroupNorm has 32 groups there, so widths are multiples
of 32; the original's text head hard-codes the mT5 width (512), so the tiny mT5 keeps it (with one narrow
layer); the KL VAE keeps four levels (x8, as the original's latent size assumes). Tokenizers are built
offline: 2.1's unigram XLM-R vocabulary and 3's T5 vocabulary (ASCII and Cyrillic pieces, `<unk>` for the rest).
"""

from __future__ import annotations

from pathlib import Path

TEXT_DIM = 32  # XLM-R width (the original's text_encoder_in_dim1)
POOLED_DIM = 16  # M-CLIP's LinearTransformation output (text_encoder_in_dim2)
MT5_DIM = 512  # hard-coded in the original Text2ImUNet (proj2, to_model_dim2)
CONTEXT_DIM = 32  # model_dim: the cross-attention width
CHANNELS = (32, 64)  # U-Net model_channels x channel_mult (1, 2)
MAX_LENGTH = 77

# The same hyper-parameters in the original repository's terms (CONFIG_2_0's keys), for the parity script.
ORIGINAL_CONFIG = {
    "model_config": {"image_size": 64, "num_channels": CHANNELS[0], "num_res_blocks": 1, "channel_mult": "1,2",
                     "num_heads": 1, "num_head_channels": 32, "num_heads_upsample": -1, "attention_resolutions": "32",
                     "dropout": 0, "model_dim": CONTEXT_DIM, "use_scale_shift_norm": True, "resblock_updown": True,
                     "use_fp16": False, "cache_text_emb": True, "text_encoder_in_dim1": TEXT_DIM,
                     "text_encoder_in_dim2": POOLED_DIM, "pooling_type": "from_model", "in_channels": 4,
                     "out_channels": 8, "up": False, "inpainting": False},
    "vae_ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
}


def build_text_encoder(vocab_size: int):
    """diffusers' `MultilingualCLIP`: XLM-R, masked mean, Linear(TEXT_DIM -> POOLED_DIM)."""
    import torch
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    torch.manual_seed(0)
    config = MCLIPConfig(transformerDimSize=TEXT_DIM, imageDimSize=POOLED_DIM, hidden_size=TEXT_DIM,
                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2, max_position_embeddings=MAX_LENGTH + 3)
    return MultilingualCLIP(config).eval()


def build_text_encoder_2(vocab_size: int):
    import torch
    from transformers import MT5Config, MT5EncoderModel

    torch.manual_seed(1)
    config = MT5Config(vocab_size=vocab_size, d_model=MT5_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                       relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                       eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    return MT5EncoderModel(config).eval()


def build_text_head():
    import torch

    from .text_head import Kandinsky20TextHead

    torch.manual_seed(2)
    return Kandinsky20TextHead(text_dim1=TEXT_DIM, pooled_dim1=POOLED_DIM, text_dim2=MT5_DIM, model_dim=CONTEXT_DIM,
                               time_embed_dim=4 * CHANNELS[0], pooling_heads=8).eval()


def unet_config(in_channels: int, channels=CHANNELS, layers: int = 1, context_dim: int = CONTEXT_DIM,
                head_dim: int = 32) -> dict:
    """UNet2DConditionModel's config for the original's torso (2.1's, as diffusers' Kandinsky 2.1 conversion
    maps it): no attention at the first level, scale-shift norm, ResBlock up/down-sampling, 64-channel heads
    (32 here), GLIDE attention over [encoder K/V, self K/V]; the text head's pooled embedding is added to the
    time embedding through `class_embed_type="identity"`."""
    levels = len(channels)
    return dict(
        in_channels=in_channels, out_channels=8, block_out_channels=tuple(channels), layers_per_block=layers,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (levels - 1) + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=head_dim,
        cross_attention_dim=context_dim, class_embed_type="identity", resnet_time_scale_shift="scale_shift",
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, encoder_hid_dim_type=None,
        addition_embed_type=None, only_cross_attention=False, upcast_attention=False)


def build_unet(in_channels: int = 4):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    return UNet2DConditionModel(**unet_config(in_channels)).eval()


def vae_config(channels=(32, 32, 32, 32), layers: int = 1) -> dict:
    """AutoencoderKL's config for an LDM KL autoencoder (`ch * ch_mult` wide, `num_res_blocks` layers, attention
    in the middle only), latents scaled by 0.0512 as Kandinsky 2.0's."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
                up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=tuple(channels),
                layers_per_block=layers, latent_channels=4, norm_num_groups=32, scaling_factor=0.0512)


def build_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(4)
    return AutoencoderKL(**vae_config()).eval()


def tokenizers():
    """(XLM-R tokenizer, mT5 tokenizer), offline; saved by save_pretrained they load as the fast classes
    the original's AutoTokenizer resolves to."""
    from ..kandinsky3.tiny import build_tokenizer as t5_tokenizer
    from ..kandinsky21.tiny import build_tokenizer as xlmr_tokenizer

    return xlmr_tokenizer(), t5_tokenizer()


def components(in_channels: int = 4) -> dict:
    from .directory import training_scheduler

    tokenizer, tokenizer_2 = tokenizers()
    return {"tokenizer": tokenizer, "text_encoder": build_text_encoder(len(tokenizer)), "tokenizer_2": tokenizer_2,
            "text_encoder_2": build_text_encoder_2(len(tokenizer_2)), "text_head": build_text_head(),
            "unet": build_unet(in_channels), "scheduler": training_scheduler(), "vae": build_vae()}


def write_tiny(root: Path) -> None:
    """Write `root/decoder-k20` (text2img, img2img) and `root/decoder-k20-inpaint` (9-channel U-Net)."""
    from .directory import save_directory

    for name, in_channels in (("decoder-k20", 4), ("decoder-k20-inpaint", 9)):
        save_directory(root / name, components(in_channels))
