"""Tiny, seeded, randomly initialised Kandinsky 2.2 components for tests, CI and the demo
(written under the shared tiny root by kandinsky_engine/families/tiny.py).

The sizes follow diffusers' own fast tests (`tests/pipelines/kandinsky2_2/`), with one change:
the MoVQ has four blocks so that it downsamples x8 like the real one (latents are 1/8 of the
image side, and sizes round to multiples of 64 exactly as with real weights).

Everything is built offline: the CLIP tokenizer is a byte-level BPE over the 256-symbol byte
alphabet, so any Unicode prompt (Cyrillic, CJK, emoji) tokenizes without an unknown token.
The result is written with `save_pretrained` (safetensors) in diffusers layout, so jobs load it
through the same `from_pretrained` path as real weights.
"""

from __future__ import annotations

from pathlib import Path

EMBED_DIM = 32  # CLIP projection dim == prior embedding dim == U-Net encoder_hid_dim


def build_tokenizer():
    """A CLIPTokenizer whose vocabulary is the byte-level alphabet (no merges needed)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())  # 256 printable stand-ins for the 256 bytes
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513  # highest id, as in OpenAI CLIP (legacy argmax pooling also works)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_prior_components() -> dict:
    """Components of `KandinskyV22PriorPipeline`, each built after `torch.manual_seed(0)`."""
    import torch
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=EMBED_DIM,
            projection_dim=EMBED_DIM,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
        )
    )
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED_DIM, num_layers=1)
    # clip_std is initialised to zeros, which would collapse every embedding to clip_mean
    # (diffusers' tests set it to ones for the same reason).
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=EMBED_DIM,
            image_size=224,
            projection_dim=EMBED_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_channels=3,
            num_hidden_layers=5,
            patch_size=14,
        )
    )
    image_processor = CLIPImageProcessor(
        crop_size=224,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
        size=224,
    )
    scheduler = UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )
    for module in (text_encoder, prior, image_encoder):
        module.eval()  # freshly built modules are in train mode
    return dict(
        prior=prior,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        image_processor=image_processor,
    )


def build_movq():
    """VQModel with four blocks: downsamples x8 like the real MoVQ."""
    import torch
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(
        block_out_channels=[32, 32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        vq_embed_dim=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
    ).eval()


def build_unet(in_channels: int = 4, addition_embed_type: str = "image"):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        in_channels=in_channels,
        out_channels=8,  # mean and learned variance, like the real decoder
        addition_embed_type=addition_embed_type,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=EMBED_DIM,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    ).eval()


def build_decoder_scheduler():
    """The real decoder's DDPMScheduler config (kandinsky-2-2-decoder/scheduler)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )


# Decoder variants: directory name -> U-Net arguments. The inpainting U-Net takes 9 input
# channels (latents, masked-image latents, mask), like kandinsky-2-2-decoder-inpaint; the
# ControlNet U-Net 8 (latents and the 4-channel output of its hint encoder), like
# kandinsky-2-2-controlnet-depth.
DECODER_VARIANTS = {
    "decoder": dict(in_channels=4),
    "decoder-inpaint": dict(in_channels=9),
    "decoder-controlnet": dict(in_channels=8, addition_embed_type="image_hint"),
}


def build_depth_model():
    """A tiny DPT depth estimator and its processor (what the depth-estimation pipeline runs)."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
        patch_size=8, neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
        is_hybrid=False, reassemble_factors=[4, 2, 1, 0.5],
    )
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False, ensure_multiple_of=1)
    return DPTForDepthEstimation(config).eval(), processor


def write_tiny(root: Path) -> None:
    """Write `root/prior`, `root/decoder*` and `root/depth` as diffusers-layout, safetensors directories."""
    from diffusers import (KandinskyV22ControlnetPipeline, KandinskyV22InpaintPipeline, KandinskyV22Pipeline,
                           KandinskyV22PriorPipeline)

    KandinskyV22PriorPipeline(**build_prior_components()).save_pretrained(root / "prior", safe_serialization=True)
    pipelines = {"decoder": KandinskyV22Pipeline, "decoder-inpaint": KandinskyV22InpaintPipeline,
                 "decoder-controlnet": KandinskyV22ControlnetPipeline}
    for name, unet_args in DECODER_VARIANTS.items():
        pipeline = pipelines[name](unet=build_unet(**unet_args), scheduler=build_decoder_scheduler(), movq=build_movq())
        pipeline.save_pretrained(root / name, safe_serialization=True)
    depth, processor = build_depth_model()
    depth.save_pretrained(root / "depth", safe_serialization=True)
    processor.save_pretrained(root / "depth")
