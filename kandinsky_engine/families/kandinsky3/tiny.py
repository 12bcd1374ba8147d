"""Tiny, seeded, randomly initialised Kandinsky 3 pipeline for tests, CI and the demo: `<root>/decoder-k3`
(model.decoder: tiny-k3), written by `Kandinsky3Pipeline.save_pretrained` so model_index.json names the
pipeline and jobs load it through the same `from_pretrained` path as the real weights.

Sizes follow diffusers' fast tests (`tests/pipelines/kandinsky3/`), with three changes: the MoVQ is
the 2.2 tiny one (four blocks: x8 like the real MoVQ, which the pipelines hard-code), the U-Net's
widths are a little larger so that its group norms have more than one channel per group, and its
conditional group norms are re-randomised (see `build_unet`). The T5 tokenizer is built offline from a
vocabulary list (no sentencepiece file): ASCII and Cyrillic characters as pieces plus a few words;
anything else (CJK, emoji) becomes `<unk>`, as with the real T5 vocabulary, so every prompt tokenizes.
"""

from __future__ import annotations

from pathlib import Path

TEXT_DIM = 32  # T5 d_model == U-Net encoder_hid_dim
WORDS = ("▁a", "▁the", "▁cat", "▁red", "▁photo", "▁of", "▁in", "▁and")


def build_tokenizer():
    """A T5Tokenizer (Unigram) over single characters and a few words; ids 0-2 are pad, </s>, unk as in T5."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(0x410, 0x450)]  # ASCII, А-я
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(w, -1.0) for w in WORDS] + [(c, -3.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_text_encoder(vocab_size: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-silu",  # flan-UL2's
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def build_unet():
    """Kandinsky3UNet at test size. Its ConditionalGroupNorm MLPs (the only way the timestep and the
    pooled text reach the blocks) are initialised to zeros, so a fresh U-Net would ignore both and no
    test could see a wrong timestep or prompt: they are redrawn here from a seeded normal."""
    import torch
    from diffusers import Kandinsky3UNet
    from diffusers.models.unets.unet_kandinsky3 import Kandinsky3ConditionalGroupNorm

    torch.manual_seed(0)
    unet = Kandinsky3UNet(in_channels=4, time_embedding_dim=16, groups=4, attention_head_dim=4, layers_per_block=2,
                          block_out_channels=(32, 64), cross_attention_dim=16, encoder_hid_dim=TEXT_DIM)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, Kandinsky3ConditionalGroupNorm):
                linear = module.context_mlp[1]
                linear.weight.normal_(0.0, 0.3, generator=generator)
                linear.bias.normal_(0.0, 0.3, generator=generator)
    return unet.eval()


def build_scheduler():
    """DDPMScheduler as in diffusers' Kandinsky 3 fast tests (cosine betas, x0 clipped to [-1, 1])."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="squaredcos_cap_v2",
                         clip_sample=True, thresholding=False)


def write_tiny(root: Path) -> None:
    """Write `root/decoder-k3`: tokenizer, T5 encoder, U-Net, scheduler and MoVQ of `Kandinsky3Pipeline`."""
    from diffusers import Kandinsky3Pipeline

    from ..kandinsky22.tiny import build_movq

    tokenizer = build_tokenizer()
    pipeline = Kandinsky3Pipeline(tokenizer=tokenizer, text_encoder=build_text_encoder(len(tokenizer)),
                                  unet=build_unet(), scheduler=build_scheduler(), movq=build_movq())
    pipeline.save_pretrained(root / "decoder-k3", safe_serialization=True)
