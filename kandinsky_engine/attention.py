"""Which scaled-dot-product-attention kernel each attention module of a model actually runs.

`F.scaled_dot_product_attention` picks a kernel per call from the inputs (device, dtype, head
size, mask, layout, the `sdpa_kernel` context): flash, memory-efficient, cuDNN, or the unfused math
fallback. diffusers' attention processors and transformers' "sdpa" attention both call it, so which
kernel runs is only known by watching: `attention_backends` catches every SDPA call while the model
runs, asks `torch._fused_sdp_choice` (the function SDPA asks) which kernel those inputs get, and
attributes it to the innermost attention module that is running (forward hooks). The GPU
benchmark prints it; nothing in a job depends on it.
"""

from __future__ import annotations

from collections import defaultdict

MATH = "math (unfused)"
NO_SDPA = "no SDPA call"  # an attention module whose processor computes attention by hand


def kernel_name(choice: int, device_type: str) -> str:
    """torch.nn.attention.SDPBackend value -> a name ("flash" on the CPU is its own kernel)."""
    from torch.nn.attention import SDPBackend

    name = {"MATH": MATH, "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "memory-efficient",
            "CUDNN_ATTENTION": "cudnn"}.get(SDPBackend(choice).name, SDPBackend(choice).name.lower())
    return f"{name} (cpu)" if device_type == "cpu" and name != MATH else name


def is_attention(module) -> bool:
    """diffusers' `Attention`, transformers' `CLIPAttention`, `DPTSelfAttention`, ... (by class name)."""
    return type(module).__name__.endswith("Attention")


def attention_backends(model, run) -> dict[str, str]:
    """Call `run()` and return {qualified name of each attention module of `model` that ran: its kernels}."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    names = {m: name for name, m in model.named_modules() if is_attention(m)}
    # Innermost attention modules only: an attention block that contains another is not one call.
    inner = {m: n for m, n in names.items() if not any(is_attention(c) for c in m.modules() if c is not m)}
    running, seen = [], defaultdict(set)

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if running and func is torch.ops.aten.scaled_dot_product_attention.default:
                # The kernel SDPA picks for exactly these inputs, by the function SDPA itself asks.
                seen[running[-1]].add(kernel_name(torch._fused_sdp_choice(*args, **kwargs), args[0].device.type))
            return func(*args, **kwargs)

    def enter(name):
        def hook(module, args):
            running.append(name)
            ran.add(name)
        return hook

    def leave(module, args, output):
        running.pop()

    ran, hooks = set(), []
    for module, name in inner.items():
        hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with Recorder(), torch.inference_mode():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: ", ".join(sorted(seen[name])) or NO_SDPA for name in inner.values() if name in ran}


def summary(backends: dict[str, str]) -> dict[str, int]:
    """{kernel: how many attention modules ran on it}."""
    counts: dict[str, int] = defaultdict(int)
    for kernel in backends.values():
        counts[kernel] += 1
    return dict(counts)
