"""GPU memory of each model stage, estimated before any actor starts: the stage memory model.

A stage's actor holds its models' weights for the whole job and, at its peak, the activations of
its largest forward call. Both come from the real architectures built on torch's meta device (no
memory, no weights, no GPU): the parameter and buffer bytes of each module in the job's dtype, and
the largest sum of live tensor bytes while the stage's forward calls run on meta inputs of the
configured batch size and image size (`trace_peak`; the calls each stage makes are in
kandinsky_engine/stage_calls.py, which the FLOP count of `plan --from-flops` runs too). On top of that:

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

from .stage_calls import meta_mode, recipe

GIB = 2**30
CUDA_CONTEXT = int(0.6 * GIB)  # torch 2.x, CUDA 12 with lazy module loading: ~0.5 GiB, plus cuBLAS/cuDNN handles
ALLOCATOR = 1.2  # reserved / allocated at the activation peak (block rounding, fragmentation)
WORKSPACE = GIB // 4  # cuBLAS / cuDNN workspaces, from the same allocator
FAMILIES_DIR = Path(__file__).parent / "families"

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
    "kandinsky20": {"text_encoder": ("decoder", "text_encoder"), "text_encoder_2": ("decoder", "text_encoder_2"),
                    "text_head": ("decoder", "text_head"), "decoder_unet": ("decoder", "unet"), "vae": ("decoder", "vae")},
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
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

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

    with torch.inference_mode(), meta_mode(efficient_attention=True), LiveBytes() as live:
        fn()
    return live.peak


def _dtype(name: str):
    import torch

    return getattr(torch, name)


@functools.lru_cache(maxsize=64)  # every family's parts, in two dtypes
def _module(spec_json: str, dtype: str):
    return meta_module(json.loads(spec_json), _dtype(dtype))  # meta: holding it costs no memory


def released_module(family: str, part: str, dtype: str = "bfloat16"):
    """The released checkpoint's `part` of `family` on the meta device (cached): for parameter and
    FLOP counts."""
    return _module(json.dumps(reference_specs(family)[part], sort_keys=True), dtype)


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
    if "decoder_unet" in specs:  # the inpainting (9 channels) or ControlNet U-Net these tasks load
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
