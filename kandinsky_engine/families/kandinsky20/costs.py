"""Kandinsky 2.0's stages in numbers: parameters and bf16 weight memory of the released configuration (the
real classes built on the meta device: nothing is allocated or downloaded), and the FLOPs of one row, for
`plan --from-flops` and the docs. `stage_costs()` recomputes them; STAGE_COSTS holds its figures."""

from __future__ import annotations

# The released hyper-parameters (the original's CONFIG_2_0 and its text encoders' config.json files).
XLMR_LARGE = dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
MT5_SMALL = dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False)
UNET = dict(channels=(384, 768, 1152, 1536), layers=3, context_dim=768, head_dim=64)
VAE = dict(channels=(128, 256, 512, 512), layers=2)
HEAD = dict(text_dim1=1024, pooled_dim1=640, text_dim2=512, model_dim=768, time_embed_dim=1536, pooling_heads=8)

# FLOPs at 512 x 512 (64 x 64 latents), counted by torch.utils.flop_counter.FlopCounterMode on the meta-device
# models of build_meta() (diffusers 0.42.1): one U-Net forward of one sample, one VAE decode / encode. The text
# encoders' are 2 x their non-embedding parameters x 77 tokens (XLM-R large 303 M, mT5-small encoder 19 M).
GFLOP_512 = {"unet_forward": 869.7, "vae_decode": 2514.5, "vae_encode": 1116.7, "text": 2 * (303e6 + 19e6) * 77 / 1e9}


def flop_costs(config) -> dict[str, float]:
    """GFLOP per row of each stage at the job's defaults (`plan --from-flops`): the U-Net x 2 with guidance x
    steps, the VAE by pixels at the 64-rounded working size, the text encoders once (the "" negative is
    encoded once per actor); `encode` only for img2img and inpaint rows."""
    import math

    d = config.defaults
    pixels = (64 * math.ceil(d.width / 64)) * (64 * math.ceil(d.height / 64)) / 512**2
    guided = 2 if d.guidance_scale > 1 else 1
    return {"text_encoder": GFLOP_512["text"], "encode": GFLOP_512["vae_encode"] * pixels,
            "decoder": guided * GFLOP_512["unet_forward"] * d.num_inference_steps * pixels,
            "movq": GFLOP_512["vae_decode"] * pixels}


def build_meta():
    """{name: module} of the released configuration on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
    from transformers import MT5Config, MT5EncoderModel

    from .text_head import Kandinsky20TextHead
    from .tiny import unet_config, vae_config

    with torch.device("meta"):
        return {
            "m_clip": MultilingualCLIP(MCLIPConfig(transformerDimSize=1024, imageDimSize=640, **XLMR_LARGE)),
            "mt5_encoder": MT5EncoderModel(MT5Config(**MT5_SMALL)),
            "text_head": Kandinsky20TextHead(**HEAD),
            "unet": UNet2DConditionModel(**unet_config(4, **UNET)),
            "unet_inpaint": UNet2DConditionModel(**unet_config(9, **UNET)),
            "vae": AutoencoderKL(**vae_config(**VAE)),
        }


def stage_costs() -> dict:
    """{stage: {"parameters": n, "bf16_gib": weights in bf16}} of the released configuration."""
    modules = build_meta()
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    vae = modules["vae"]
    encoder = sum(p.numel() for m in (vae.encoder, vae.quant_conv) for p in m.parameters())
    stages = {
        "text_encoder": count["m_clip"] + count["mt5_encoder"] + count["text_head"],
        "decoder": count["unet"],
        "decoder (inpaint)": count["unet_inpaint"],
        "encode": encoder,
        "movq": count["vae"] - encoder,
    }
    parts = {**count, **stages}
    return {name: {"parameters": n, "bf16_gib": round(n * 2 / 2**30, 2)} for name, n in parts.items()}
