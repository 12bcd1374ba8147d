"""GPU memory of each model stage, estimated before any actor starts: the stage memory model.

A stage's actor holds its models' weights for the whole job and, at its peak, the activations of
its largest forward call. Both come from the real architectures built on torch's meta device (no
memory, no weights, no GPU): the parameter and buffer bytes of each module in the job's dtype, and
the largest sum of live tensor bytes while the stage's forward calls run on meta inputs of the
configured batch size and image size (`trace_peak`). On top of that:

- attention as the GPU computes it: flash / memory-efficient SDPA keeps no (L, L) score matrix, so
  `F.scaled_dot_product_attention` is replaced by an output of its shape during the trace (the
  meta device would otherwise take the math path and count a matrix the GPU never holds);
- the caching allocator: reserved memory runs above allocated memory by fragmentation (ALLOCATOR on
  the activations) plus cuBLAS / cuDNN workspaces (WORKSPACE);
- the CUDA context of the process (CUDA_CONTEXT), which lies outside torch's allocator and so
  outside its per-process cap, but in the same GPU memory as the other actors' shares. It is
  counted inside each actor's share so that actors whose shares add up to one GPU fit on it.

`estimate_stage(...)` is the figure the driver compares with each actor's cap (pipelines/memory_fit.py)
and `kandinsky-batch plan --gpu-type` sizes the memory caps with. The architectures are the ones
the job loads when their config files can be read (`job_specs`), else the released checkpoints'
(each family's reference/*.json). No Ray here.
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
CUDA_CONTEXT = int(0.6 * GIB)  # torch 2.x, CUDA 12 with lazy module loading: ~0.5 GiB, plus cuBLAS/cuDNN handles
ALLOCATOR = 1.2  # reserved / allocated at the activation peak (block rounding, fragmentation)
WORKSPACE = GIB // 4  # cuBLAS / cuDNN workspaces, from the same allocator
FAMILIES_DIR = Path(__file__).parent / "families"
PROMPT_TOKENS = {"clip": 77, "t5": 128}  # the tokenizers' padded lengths the stages use
DEPTH_SIZE = 384  # the DPT image processor's input side

# Where a reference part lives in the job's model folders: (ModelConfig field, subfolder).
SOURCES = {
    "kandinsky22": {"prior_transformer": ("prior", "prior"), "text_encoder": ("prior", "text_encoder"),
                    "image_encoder": ("prior", "image_encoder"), "decoder_unet": ("decoder", "unet"),
                    "movq": ("decoder", "movq")},
    "kandinsky21": {"prior_transformer": ("prior", "prior"), "text_encoder": ("prior", "text_encoder"),
                    "image_encoder": ("prior", "image_encoder"), "decoder_text_encoder": ("decoder", "text_encoder"),
                    "decoder_unet": ("decoder", "unet"), "movq": ("decoder", "movq")},
    "kandinsky3": {"text_encoder": ("decoder", "text_encoder"), "decoder_unet": ("decoder", "unet"),
                   "movq": ("decoder", "movq")},
}
# The depth estimator of ControlNet rows without a hint: DPTConfig's defaults (the ViT-L DPT, the
# size of Intel/dpt-hybrid-midas), always float32 (stages/hint.py).
DEPTH = {"class": "transformers.DPTForDepthEstimation", "config": "transformers.DPTConfig", "kwargs": {}}


@dataclass(frozen=True)
class StageMemory:
    """One actor's estimated peak GPU memory, in bytes, and what it is made of."""

    stage: str
    weights: int
    activations: int  # the largest forward call's live tensors, before the allocator's overhead
    held: int  # tensors kept across the calls (the decoder's noise for every step)
    context: int = CUDA_CONTEXT

    @property
    def peak(self) -> int:
        return self.context + self.weights + self.held + int(ALLOCATOR * self.activations) + WORKSPACE

    def describe(self) -> str:
        return (f"{self.peak / GIB:.1f} GiB (weights {self.weights / GIB:.1f}, activations "
                f"{ALLOCATOR * self.activations / GIB:.1f} with the allocator's overhead, held {self.held / GIB:.2f}, "
                f"CUDA context and workspaces {(self.context + WORKSPACE) / GIB:.2f})")


# --- the architectures ---------------------------------------------------------------------------


def _class(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@functools.cache
def reference_specs(family: str) -> dict:
    """{part: {class, [config], kwargs}} of the family's released checkpoints."""
    data = json.loads((FAMILIES_DIR / family / "reference" / f"{family}_configs.json").read_text())
    return {name: spec for name, spec in data.items() if isinstance(spec, dict) and "class" in spec}


def meta_module(spec: dict, dtype, kwargs: dict | None = None):
    """The module of `spec` on the meta device in `dtype`, in eval mode: shapes without memory."""
    import torch

    kwargs = spec["kwargs"] if kwargs is None else kwargs
    cls = _class(spec["class"])
    with torch.device("meta"):
        if "config" in spec:
            module = cls(_class(spec["config"])(**kwargs))
        else:  # diffusers: from_config drops the keys a class does not take (_class_name, versions)
            module = cls.from_config(kwargs)
    return torch.nn.Module.to(module, dtype).requires_grad_(False).eval()


def job_specs(config, family: str) -> dict:
    """The reference specs with the kwargs of the job's own models where their config.json can be
    read (local folders, the tiny model, object storage: one small file each); the released
    checkpoint's where not (a hub id, an unreachable URL)."""
    from .model_cache import is_remote, read_json
    from .models import resolve_source

    specs = {}
    for part, spec in reference_specs(family).items():
        if part not in SOURCES[family]:  # the schedulers: no memory
            continue
        field, subfolder = SOURCES[family][part]
        source = getattr(config.model, field)
        try:
            if is_remote(source):
                kwargs = read_json(source, f"{subfolder}/config.json", config.storage_options)
            else:
                folder = Path(resolve_source(source, field, config.model.cache_dir, weights=False))
                kwargs = json.loads((folder / subfolder / "config.json").read_text())
        except Exception:  # not readable from here: the released architecture
            kwargs = None
        if kwargs is not None and "config" in spec:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("architectures", "transformers_version")}
        specs[part] = spec if kwargs is None else {**spec, "kwargs": kwargs}
    return specs


def module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# --- tracing live tensors on the meta device -----------------------------------------------------


def trace_peak(fn) -> int:
    """The peak of live tensor bytes created while `fn()` runs on meta tensors, under inference mode,
    with attention kept as a memory-efficient kernel keeps it (no score matrix)."""
    import torch
    import torch.nn.functional as F
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class EfficientAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:  # (B, H, L, E) x (B, H, S, Ev) -> (B, H, L, Ev)
                query, value = args[0], args[2] if len(args) > 2 else kwargs["value"]
                return query.new_empty((*query.shape[:-1], value.shape[-1]))
            if func is torch.Tensor.__bool__ and args[0].is_meta:
                # A data-dependent branch (transformers: "is every token real?"): the unpadded case,
                # the one with the most to compute.
                return True
            return func(*args, **(kwargs or {}))

    class LiveBytes(TorchDispatchMode):
        """Each op's new storages are counted until they are freed (their weak reference expires)."""

        def __init__(self):
            super().__init__()
            self.storages, self.live, self.peak = {}, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for dead in [key for key, (ref, _) in self.storages.items() if ref.expired()]:
                self.live -= self.storages.pop(dead)[1]
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    if storage._cdata not in self.storages:
                        self.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                        self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            return out

    with torch.inference_mode(), EfficientAttention(), LiveBytes() as live:
        fn()
    return live.peak


def _empty(*shape, dtype=None):
    import torch

    return torch.empty(*shape, device="meta", dtype=dtype or torch.long)


# One forward call of each kind of part, as the stages make it: (module, rows, latent h, w) -> run.
def _clip_text(m, n, h, w):
    m(_empty(n, PROMPT_TOKENS["clip"]))


def _clip_image(m, n, h, w):
    size = m.config.image_size
    m(_empty(n, 3, size, size, dtype=m.dtype))


def _prior(m, n, h, w):
    import torch

    d, c = m.config.embedding_dim, m.config.num_embeddings
    m(_empty(n, d, dtype=m.dtype), timestep=torch.tensor(1, device="meta"), proj_embedding=_empty(n, d, dtype=m.dtype),
      encoder_hidden_states=_empty(n, c, d, dtype=m.dtype), attention_mask=_empty(n, c, dtype=torch.bool))


def _unet(m, n, h, w, text: int = 0, hint: bool = False):
    import torch

    cfg = m.config
    cond = {"image_embeds": _empty(n, cfg.encoder_hid_dim if not text else cfg.cross_attention_dim, dtype=m.dtype)}
    hidden = None
    if text:  # Kandinsky 2.1: pooled text + hidden states of the MultilingualCLIP
        cond["text_embeds"] = _empty(n, cfg.cross_attention_dim, dtype=m.dtype)
        hidden = _empty(n, PROMPT_TOKENS["clip"], cfg.encoder_hid_dim, dtype=m.dtype)
    if hint:  # ControlNet: the hint image at pixel size (8 x the latent)
        cond["hint"] = _empty(n, 3, 8 * h, 8 * w, dtype=m.dtype)
    m(sample=_empty(n, cfg.in_channels, h, w, dtype=m.dtype), timestep=torch.tensor(1, device="meta"),
      encoder_hidden_states=hidden, added_cond_kwargs=cond, return_dict=False)


def _unet3(m, n, h, w):
    import torch

    tokens, cfg = PROMPT_TOKENS["t5"], m.config
    m(_empty(n, cfg.in_channels, h, w, dtype=m.dtype), torch.tensor(1, device="meta"),
      encoder_hidden_states=_empty(n, tokens, cfg.encoder_hid_dim, dtype=m.dtype),
      encoder_attention_mask=_empty(n, tokens, dtype=m.dtype), return_dict=False)


def _text_tokens(m, n, h, w, tokens="clip"):
    m(_empty(n, PROMPT_TOKENS[tokens]), attention_mask=_empty(n, PROMPT_TOKENS[tokens]))


def _movq_decode(m, n, h, w):
    m.decode(_empty(n, m.config.latent_channels, h, w, dtype=m.dtype), force_not_quantize=True)


def _movq_encode(m, n, h, w):
    m.encode(_empty(n, m.config.in_channels, 8 * h, 8 * w, dtype=m.dtype))


def _depth(m, n, h, w):
    m(pixel_values=_empty(n, 3, DEPTH_SIZE, DEPTH_SIZE, dtype=m.dtype))


_unet_text = functools.partial(_unet, text=1)
_unet_hint = functools.partial(_unet, hint=True)
_t5 = functools.partial(_text_tokens, tokens="t5")


def recipe(family: str, stage: str, tasks: set[str]) -> tuple[list[str], list[tuple[str, int, object]]]:
    """(parts an actor of `stage` keeps loaded, [(part, rows per unit of batch size, call)]): the
    forward calls at their largest. Rows scale with the stage's batch size B: classifier-free
    guidance doubles the U-Net's and the text encoders' rows; the prior runs a row with a negative
    prompt as two items, each guided (4B); images are encoded one at a time (0: a batch of 1)."""
    if stage == "prior":
        return (["prior_transformer", "text_encoder", "image_encoder"],  # the image encoder until init ends
                [("text_encoder", 2, _clip_text), ("prior_transformer", 4, _prior), ("image_encoder", 0, _clip_image)])
    if stage == "score":
        return ["text_encoder", "image_encoder"], [("text_encoder", 1, _clip_text), ("image_encoder", 1, _clip_image)]
    if stage == "hint":
        return ["depth"], [("depth", 0, _depth)]
    if stage == "encode":
        return ["movq"], [("movq", 1, _movq_encode)]
    if stage == "movq":
        return ["movq"], [("movq", 1, _movq_decode)]
    if stage == "text_encoder":  # Kandinsky 3's T5: prompts and negative prompts in one call
        return ["text_encoder"], [("text_encoder", 2, _t5)]
    if stage == "decoder" and family == "kandinsky3":
        return ["decoder_unet"], [("decoder_unet", 2, _unet3)]
    if stage == "decoder" and family == "kandinsky21":
        return (["decoder_unet", "decoder_text_encoder"],
                [("decoder_text_encoder", 2, _text_tokens), ("decoder_unet", 2, _unet_text)])
    if stage == "decoder":
        hinted = any(task.startswith("controlnet") for task in tasks)
        return ["decoder_unet"], [("decoder_unet", 2, _unet_hint if hinted else _unet)]
    raise ValueError(f"no memory model for stage {stage!r}")


def _dtype(name: str):
    import torch

    return getattr(torch, name)


@functools.lru_cache(maxsize=32)
def _module(spec_json: str, dtype: str):
    return meta_module(json.loads(spec_json), _dtype(dtype))  # meta: holding it costs no memory


@functools.lru_cache(maxsize=128)
def _activations(spec_json: str, dtype: str, call, rows: int, h: int, w: int) -> int:
    """The activation peak of one call; cached across stages and checks."""
    module = _module(spec_json, dtype)
    return trace_peak(lambda: call(module, rows, h, w))


def decoder_variant(spec: dict, tasks: set[str]) -> dict:
    """The released U-Net of the decoder these tasks load: 9 input channels for inpainting, the image
    hint for the ControlNet tasks (kandinsky22/reference `_notes`)."""
    kwargs = dict(spec["kwargs"])
    if "inpaint" in tasks and kwargs.get("in_channels") == 4:
        kwargs["in_channels"] = 9
    if any(task.startswith("controlnet") for task in tasks) and kwargs.get("addition_embed_type") == "image":
        kwargs.update(in_channels=8, addition_embed_type="image_hint")
    return {**spec, "kwargs": kwargs}


def estimate_stage(stage: str, family: str, specs: dict, *, dtype: str, batch_size: int, width: int, height: int,
                   steps: int, tasks: set[str] = frozenset({"text2img"})) -> StageMemory:
    """One actor's peak for `stage` at `batch_size` rows of width x height (the working size: the next
    multiple of 64) with `steps` denoising steps, its models in `dtype`."""
    h, w = -(-height // 64) * 8, -(-width // 64) * 8  # latent grid of the working size (MoVQ factor 8)
    specs = {**specs, "depth": DEPTH}
    if "decoder_unet" in specs and family == "kandinsky22":
        specs["decoder_unet"] = decoder_variant(specs["decoder_unet"], tasks)
    parts, calls = recipe(family, stage, tasks)
    keys = {part: (json.dumps(specs[part], sort_keys=True), "float32" if part == "depth" else dtype) for part in parts}
    weights = sum(module_bytes(_module(*keys[part])) for part in parts)
    activations = max(_activations(*keys[part], call, max(1, scale * batch_size), h, w) for part, scale, call in calls)
    held = 0
    if stage == "decoder":  # every step's noise, drawn up front and copied to the device (sampling.draw_noise)
        held = (1 + steps) * batch_size * 4 * h * w * _dtype(dtype).itemsize
    return StageMemory(stage, weights, activations, held)


def estimate_job(config, family: str, stages: list[str], specs: dict | None = None) -> dict[str, StageMemory]:
    """Each of `stages` of a job config (whose family is resolved) at its batch size and the job's
    default size and steps."""
    from kandinsky_engine.device import resolve_auto

    d = config.defaults
    config = resolve_auto(config)  # dtype 'auto': what the stages would load (bf16 on GPUs, fp32 on CPU)
    specs = specs if specs is not None else reference_specs(family)
    tasks = set(config.tasks or ["text2img"])
    return {name: estimate_stage(name, family, specs, dtype=config.model.dtype,
                                 batch_size=getattr(config, name).batch_size, width=d.width, height=d.height,
                                 steps=d.num_inference_steps, tasks=tasks)
            for name in stages}
