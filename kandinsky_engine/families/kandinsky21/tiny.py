"""Tiny, seeded, randomly initialised Kandinsky 2.1 components (written under the shared tiny root
by kandinsky_engine/families/tiny.py as `prior-k21`, `decoder-k21` and `decoder-k21-inpaint`).

Sizes follow diffusers' fast tests (`tests/pipelines/kandinsky/test_kandinsky.py`): a 5-layer,
32-wide `MultilingualCLIP`, a U-Net with the 2.1 conditioning (`encoder_hid_dim_type="text_image_proj"`,
`addition_embed_type="text_image"`, learned variance), and the DDIMScheduler of the real decoder.
The prior and the MoVQ are 2.2's tiny ones (same classes; the MoVQ downsamples x8 like the real one).

The XLM-R tokenizer is built offline from a small unigram vocabulary (no sentencepiece file):
Latin, Cyrillic and a few CJK characters, each alone and word-initial (`▁x`), plus a few words;
anything else becomes `<unk>`, as unseen characters do with the real vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from ..kandinsky22.tiny import EMBED_DIM, build_movq, build_prior_components

TEXT_DIM = 32  # MultilingualCLIP width == U-Net encoder_hid_dim; its pooled output is EMBED_DIM wide
MAX_LENGTH = 77  # the decoder pipelines tokenize to 77 tokens

LATIN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"
CYRILLIC = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"
CJK = "一只红色的猫山水画人"
WORDS = ("a", "the", "cat", "red", "photo", "кот", "лес")


def build_tokenizer():
    """An `XLMRobertaTokenizer` over a unigram vocabulary of (piece, log-probability) pairs.
    The special tokens take XLM-R's ids: <s> 0, <pad> 1, </s> 2, <unk> 3."""
    from transformers import XLMRobertaTokenizer

    chars = LATIN + CYRILLIC + CJK
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=512)


def build_text_encoder(vocab_size: int):
    """`MultilingualCLIP`: XLM-R encoder, masked mean pooling, then a linear map to the CLIP width."""
    import torch
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    torch.manual_seed(0)
    config = MCLIPConfig(
        transformerDimSize=TEXT_DIM, imageDimSize=EMBED_DIM, hidden_size=TEXT_DIM, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=5, vocab_size=vocab_size, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, max_position_embeddings=MAX_LENGTH + 3,  # XLM-R positions start after the pad id
    )
    return MultilingualCLIP(config).eval()


def build_unet(in_channels: int = 4):
    """The 2.1 U-Net: cross-attends to projected text hidden states + image embedding tokens, and adds
    a (text pooled, image) embedding to the time embedding."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        in_channels=in_channels,
        out_channels=8,  # mean and learned variance, like the real decoder
        addition_embed_type="text_image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=TEXT_DIM,
        encoder_hid_dim_type="text_image_proj",
        cross_attention_dim=EMBED_DIM,  # also the width of the image and pooled text embeddings
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    ).eval()


def build_scheduler():
    """The real kandinsky-2-1 decoder's DDIMScheduler config (as diffusers' tests build it)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                         thresholding=False)


def write_tiny(root: Path) -> None:
    """Write `root/prior-k21`, `root/decoder-k21` and `root/decoder-k21-inpaint` (diffusers layout, safetensors)."""
    from diffusers import KandinskyInpaintPipeline, KandinskyPipeline, KandinskyPriorPipeline

    KandinskyPriorPipeline(**build_prior_components()).save_pretrained(root / "prior-k21", safe_serialization=True)
    for name, pipeline, in_channels in (("decoder-k21", KandinskyPipeline, 4),
                                        ("decoder-k21-inpaint", KandinskyInpaintPipeline, 9)):
        tokenizer = build_tokenizer()
        pipeline(text_encoder=build_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                 unet=build_unet(in_channels), scheduler=build_scheduler(),
                 movq=build_movq()).save_pretrained(root / name, safe_serialization=True)
