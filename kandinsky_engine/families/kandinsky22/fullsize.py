"""Full-size Kandinsky 2.2 components with random weights, for benchmarks: nothing is downloaded.

The hyper-parameters are those of the public checkpoints, as diffusers and transformers class
arguments (reference/kandinsky22_configs.json, copied from shared/reference; see its `_notes` for
what was inferred). Each module is built on the meta device (no memory, no init kernels),
materialised on the target device in the target dtype with `to_empty`, and every parameter drawn
there from N(0, 0.02): never zeros (PriorTransformer initialises clip_std to zeros, which would
collapse every embedding). The few buffers get their real values (`init_random`).

`smoke=True` keeps the classes and the code path but shrinks the widths (SMOKE), so that the
benchmark runs on a CPU in seconds (tests/test_bench_gpu.py).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

CONFIGS = Path(__file__).parent / "reference" / "kandinsky22_configs.json"

# Tiny widths for --smoke. Each keeps the constraints between components: CLIP projection dim =
# prior embedding dim = U-Net encoder_hid_dim; the text encoder's width = the prior's embedding dim
# (its encoder_hid_proj is Linear(embedding_dim, inner_dim)).
SMOKE = {
    "prior_transformer": dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=32),
    "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         projection_dim=32),
    "image_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                          projection_dim=32),
    "decoder_unet": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, attention_head_dim=8,
                         addition_embed_type_num_heads=4, cross_attention_dim=32, encoder_hid_dim=32),
    "movq": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8, num_vq_embeddings=12),
}


def configs() -> dict:
    return json.loads(CONFIGS.read_text())


def _class(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def init_random(module, seed: int = 0, std: float = 0.02) -> None:
    """Parameters ~ N(0, std) drawn on their device; buffers set to the values their class gives them."""
    import torch

    device = next(module.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, std, generator=generator)
        for name, buffer in module.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "position_ids":  # CLIP embeddings: (1, positions) = arange
                buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
            elif leaf == "causal_attention_mask":  # PriorTransformer: -10000 above the diagonal
                buffer.copy_(torch.full_like(buffer, -10000.0).triu_(1))
            else:
                raise ValueError(f"{type(module).__name__}: no initialiser for buffer {name!r}")


def build(name: str, device, dtype, smoke: bool = False, seed: int = 0):
    """The component `name` of the JSON (prior_transformer, text_encoder, image_encoder, decoder_unet,
    movq) with random weights on `device` in `dtype`, in eval mode."""
    import torch

    spec = configs()[name]
    kwargs = {**spec["kwargs"], **(SMOKE.get(name, {}) if smoke else {})}
    cls = _class(spec["class"])
    with torch.device("meta"):
        module = cls(_class(spec["config"])(**kwargs)) if "config" in spec else cls(**kwargs)
    # nn.Module.to, not diffusers' override, which warns about casting outside from_pretrained.
    module = torch.nn.Module.to(module, dtype)
    if torch.device(device).type != "meta":  # on meta: shapes only (parameter and FLOP counts)
        module = module.to_empty(device=device)
        init_random(module, seed)
    return module.requires_grad_(False).eval()


def scheduler(name: str):
    """prior_scheduler or decoder_scheduler, built from_config (which ignores keys the class lacks)."""
    spec = configs()[name]
    return _class(spec["class"]).from_config(spec["kwargs"])


def components(device, dtype, smoke: bool = False) -> tuple[dict, dict]:
    """({prior pipeline components}, {decoder pipeline components}) as the stages take them."""
    from transformers import CLIPImageProcessor

    from .tiny import build_tokenizer

    size = configs()["image_encoder"]["kwargs"]["image_size"]
    prior = {
        "prior": build("prior_transformer", device, dtype, smoke, seed=1),
        "text_encoder": build("text_encoder", device, dtype, smoke, seed=2),
        "image_encoder": build("image_encoder", device, dtype, smoke, seed=3),
        "scheduler": scheduler("prior_scheduler"),
        # Byte-level BPE (tiny.py): any prompt tokenizes, no download; token ids do not change the cost.
        "tokenizer": build_tokenizer(),
        "image_processor": CLIPImageProcessor(crop_size=size, size=size, resample=3, do_center_crop=True,
                                              image_mean=[0.48145466, 0.4578275, 0.40821073],
                                              image_std=[0.26862954, 0.26130258, 0.27577711]),
    }
    decoder = {"unet": build("decoder_unet", device, dtype, smoke, seed=4), "scheduler": scheduler("decoder_scheduler"),
               "movq": build("movq", device, dtype, smoke, seed=5)}
    return prior, decoder
