"""The forward calls each model stage makes, on meta tensors: what the stage memory model traces
(kandinsky_engine/memory.py: the live bytes of the largest call) and the FLOP count runs
(kandinsky_engine/flops.py: the operations of one row). A call takes (module, rows, latent h, w) and
feeds the module inputs of the shapes the stage gives it; `recipe` says which calls a stage makes
and which models its actor keeps loaded. No Ray, no weights.
"""

from __future__ import annotations

import functools

PROMPT_TOKENS = {"clip": 77, "t5": 128}  # the tokenizers' padded lengths the stages use
DEPTH_SIZE = 384  # the DPT image processor's input side


def meta_mode(efficient_attention: bool):
    """A TorchFunctionMode under which the calls run on meta tensors. A data-dependent branch
    (transformers: "is every token real?") takes the unpadded case, the one with the most to compute.
    With `efficient_attention` (the memory model), `scaled_dot_product_attention` returns an output of
    its shape without computing: flash / memory-efficient SDPA keeps no (L, L) score matrix, which the
    meta device's math path would count; the FLOP count lets it run, to count its products."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class MetaMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if efficient_attention and func is F.scaled_dot_product_attention:
                # (B, H, L, E) x (B, H, S, Ev) -> (B, H, L, Ev)
                query, value = args[0], args[2] if len(args) > 2 else kwargs["value"]
                return query.new_empty((*query.shape[:-1], value.shape[-1]))
            if func is torch.Tensor.__bool__ and args[0].is_meta:
                return True
            return func(*args, **(kwargs or {}))

    return MetaMode()


def _empty(*shape, dtype=None):
    import torch

    return torch.empty(*shape, device="meta", dtype=dtype or torch.long)


def _timestep():
    import torch

    return torch.tensor(1, device="meta")


# One forward call of each kind of part, as the stages make it: (module, rows, latent h, w) -> run.
def _clip_text(m, n, h, w):
    m(_empty(n, PROMPT_TOKENS["clip"]))


def _clip_image(m, n, h, w):
    size = m.config.image_size
    m(_empty(n, 3, size, size, dtype=m.dtype))


def _prior(m, n, h, w):
    import torch

    d, c = m.config.embedding_dim, m.config.num_embeddings
    m(_empty(n, d, dtype=m.dtype), timestep=_timestep(), proj_embedding=_empty(n, d, dtype=m.dtype),
      encoder_hidden_states=_empty(n, c, d, dtype=m.dtype), attention_mask=_empty(n, c, dtype=torch.bool))


def _unet(m, n, h, w, text: int = 0, hint: bool = False):
    cfg = m.config
    cond = {"image_embeds": _empty(n, cfg.encoder_hid_dim if not text else cfg.cross_attention_dim, dtype=m.dtype)}
    hidden = None
    if text:  # Kandinsky 2.1: pooled text + hidden states of the MultilingualCLIP
        cond["text_embeds"] = _empty(n, cfg.cross_attention_dim, dtype=m.dtype)
        hidden = _empty(n, PROMPT_TOKENS["clip"], cfg.encoder_hid_dim, dtype=m.dtype)
    if hint:  # ControlNet: the hint image at pixel size (8 x the latent)
        cond["hint"] = _empty(n, 3, 8 * h, 8 * w, dtype=m.dtype)
    m(sample=_empty(n, cfg.in_channels, h, w, dtype=m.dtype), timestep=_timestep(),
      encoder_hidden_states=hidden, added_cond_kwargs=cond, return_dict=False)


def _unet3(m, n, h, w):
    tokens, cfg = PROMPT_TOKENS["t5"], m.config
    m(_empty(n, cfg.in_channels, h, w, dtype=m.dtype), _timestep(),
      encoder_hidden_states=_empty(n, tokens, cfg.encoder_hid_dim, dtype=m.dtype),
      encoder_attention_mask=_empty(n, tokens, dtype=m.dtype), return_dict=False)


def _unet20(m, n, h, w):
    """Kandinsky 2.0 (stages/kandinsky20.py): the text head's context over 77 XLM-R + 77 mT5 positions, and its
    pooled embedding added to the time embedding (`class_labels`)."""
    cfg = m.config
    pooled = cfg.time_embedding_dim or 4 * cfg.block_out_channels[0]
    m(_empty(n, cfg.in_channels, h, w, dtype=m.dtype), _timestep(),
      encoder_hidden_states=_empty(n, 2 * PROMPT_TOKENS["clip"], cfg.cross_attention_dim, dtype=m.dtype),
      class_labels=_empty(n, pooled, dtype=m.dtype), return_dict=False)


def _text_tokens(m, n, h, w, tokens="clip"):
    m(_empty(n, PROMPT_TOKENS[tokens]), attention_mask=_empty(n, PROMPT_TOKENS[tokens]))


def _text_head(m, n, h, w):
    """Kandinsky 2.0's head: XLM-R states, M-CLIP's pooled output and mT5 states -> context, pooled."""
    c, tokens = m.config, PROMPT_TOKENS["clip"]
    m(_empty(n, tokens, c.text_dim1, dtype=m.dtype), _empty(n, c.pooled_dim1, dtype=m.dtype),
      _empty(n, tokens, c.text_dim2, dtype=m.dtype))


def _movq_decode(m, n, h, w):
    m.decode(_empty(n, m.config.latent_channels, h, w, dtype=m.dtype), force_not_quantize=True)


def _vae_decode(m, n, h, w):  # Kandinsky 2.0's KL VAE (stages/vae.py)
    m.decode(_empty(n, m.config.latent_channels, h, w, dtype=m.dtype))


def _image_encode(m, n, h, w):  # the MoVQ's or the KL VAE's encoder: pixels at 8 x the latent
    m.encode(_empty(n, m.config.in_channels, 8 * h, 8 * w, dtype=m.dtype))


def _depth(m, n, h, w):
    m(pixel_values=_empty(n, 3, DEPTH_SIZE, DEPTH_SIZE, dtype=m.dtype))


_unet_text = functools.partial(_unet, text=1)
_unet_hint = functools.partial(_unet, hint=True)
_t5 = functools.partial(_text_tokens, tokens="t5")

# (parts an actor of the stage keeps loaded, [(part, rows per unit of batch size, call)]) where a
# family's stage differs from the shared ones in `recipe`.
BY_FAMILY = {
    # Kandinsky 3's T5: prompts and negative prompts in one call
    ("kandinsky3", "text_encoder"): (["text_encoder"], [("text_encoder", 2, _t5)]),
    ("kandinsky3", "decoder"): (["decoder_unet"], [("decoder_unet", 2, _unet3)]),
    ("kandinsky21", "decoder"): (["decoder_unet", "decoder_text_encoder"],
                                 [("decoder_text_encoder", 2, _text_tokens), ("decoder_unet", 2, _unet_text)]),
    # Kandinsky 2.0: prompts and negative prompts through both encoders, then the head, in one actor
    ("kandinsky20", "text_encoder"): (["text_encoder", "text_encoder_2", "text_head"],
                                      [("text_encoder", 2, _text_tokens), ("text_encoder_2", 2, _text_tokens),
                                       ("text_head", 2, _text_head)]),
    ("kandinsky20", "decoder"): (["decoder_unet"], [("decoder_unet", 2, _unet20)]),
    ("kandinsky20", "encode"): (["vae"], [("vae", 1, _image_encode)]),
    ("kandinsky20", "movq"): (["vae"], [("vae", 1, _vae_decode)]),
}


def recipe(family: str, stage: str, tasks: set[str]) -> tuple[list[str], list[tuple[str, int, object]]]:
    """(parts an actor of `stage` keeps loaded, [(part, rows per unit of batch size, call)]): the
    forward calls at their largest. Rows scale with the stage's batch size B: classifier-free
    guidance doubles the U-Net's and the text encoders' rows; the prior runs a row with a negative
    prompt as two items, each guided (4B); images are encoded one at a time (0: a batch of 1)."""
    if (family, stage) in BY_FAMILY:
        return BY_FAMILY[family, stage]
    if stage == "prior":
        return (["prior_transformer", "text_encoder", "image_encoder"],  # the image encoder until init ends
                [("text_encoder", 2, _clip_text), ("prior_transformer", 4, _prior), ("image_encoder", 0, _clip_image)])
    if stage == "score":
        return ["text_encoder", "image_encoder"], [("text_encoder", 1, _clip_text), ("image_encoder", 1, _clip_image)]
    if stage == "hint":
        return ["depth"], [("depth", 0, _depth)]
    if stage == "encode":
        return ["movq"], [("movq", 1, _image_encode)]
    if stage == "movq":
        return ["movq"], [("movq", 1, _movq_decode)]
    if stage == "decoder" and family == "kandinsky22":
        hinted = any(task.startswith("controlnet") for task in tasks)
        return ["decoder_unet"], [("decoder_unet", 2, _unet_hint if hinted else _unet)]
    raise ValueError(f"no memory model for stage {stage!r} of {family}")
