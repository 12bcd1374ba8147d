"""`kandinsky-batch bench --full-size` (or `python -m kandinsky_engine.jobs.bench_gpu`): the stage classes on one GPU
with the real Kandinsky 2.2 architectures and random bf16 weights. No Ray, no download.

It measures, at 768x768 with 50 decoder and 25 prior steps and classifier-free guidance on both
(guidance 4, as diffusers' defaults): each stage's rows/s and peak GPU memory, the end-to-end
images/s of the three stages back to back on the one GPU, the FLOPs of one image (torch's
FlopCounterMode over the stages), a measured bf16 GEMM peak, and from them the model-FLOPs
utilisation; and which SDPA kernel each attention module runs (kandinsky_engine/attention.py).
Without CUDA it says so and exits 0; `--smoke` runs the same code on the CPU at tiny sizes.

It imports torch, transformers, diffusers, numpy and the stage modules (pydantic, PyYAML, Pillow,
fsspec); not Ray, pyarrow or the pipelines. scripts/gpu_check.sh runs it on a GPU box.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

PROMPTS = ["a red cat", "Красный кот", "一只猫", "🐱 in space", "a harbour at dawn", "abstract bauhaus poster"]


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kandinsky-batch bench --full-size", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny widths, 64x64, 1 decoder + 2 prior steps: the "
                        "code path in seconds, on the CPU if there is no GPU")
    parser.add_argument("--rows", type=int, default=8, help="rows per stage call (the batch size of every stage)")
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--decoder-steps", type=int, default=50)
    parser.add_argument("--prior-steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per stage, after one warm-up call")
    parser.add_argument("--scheduler", default="ddpm", help="defaults.scheduler of the decoder")
    parser.add_argument("--compile", action="store_true", help="model.compile (adds the warm-up compile time)")
    parser.add_argument("--channels-last", action="store_true", help="model.channels_last")
    parser.add_argument("--output", metavar="FILE", help="also write the figures (JSON) to FILE")


def bench_batch(n: int, size: int, steps: int, prior_steps: int) -> dict:
    """n text2img rows as the prior stage receives them (resolved columns, no errors)."""
    import numpy as np

    from kandinsky_engine.rows import object_column

    return {
        "id": object_column(f"bench-{i:05d}" for i in range(n)), "task": object_column(["text2img"] * n),
        "prompt": object_column(PROMPTS[i % len(PROMPTS)] for i in range(n)), "negative_prompt": object_column([None] * n),
        "seed": np.arange(n, dtype=np.int64), "width": np.full(n, size), "height": np.full(n, size),
        "num_inference_steps": np.full(n, steps), "guidance_scale": np.full(n, 4.0),
        "prior_num_inference_steps": np.full(n, prior_steps), "prior_guidance_scale": np.full(n, 4.0),
        "strength": np.full(n, 0.3),
        **{c: object_column([""] * n) for c in ("error_stage", "error_type", "error_message")},
    }


def log(message: str) -> None:
    print(f"bench_gpu: {message}", file=sys.stderr, flush=True)


def copy(batch: dict) -> dict:
    return {k: v.copy() for k, v in batch.items()}  # stages mark failed rows in place


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak(device, dtype, n: int) -> float:
    """Measured dense matmul FLOP/s (n x n x n, best of 10 after warm-up): the denominator of MFU."""
    import torch

    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * n**3 / best


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Mean seconds per call of fn() over `repeats` calls (after the caller's warm-up), and the last output."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(device)
    return (time.perf_counter() - start) / repeats, out


def peak_memory(device, fn):
    """fn()'s output and the peak GPU memory (GiB) allocated while it ran (None on the CPU)."""
    import torch

    if device.type != "cuda":
        return fn(), None
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    return out, round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def counted(fn) -> tuple[int, object]:
    """(FLOPs of fn() by torch's FlopCounterMode: matmuls, convolutions, attention; fn()'s output)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


def run(args) -> dict:
    import torch

    from kandinsky_engine import DecoderStage, JobConfig, MovqStage, PriorStage
    from kandinsky_engine.families.kandinsky22 import fullsize
    from kandinsky_engine.attention import attention_backends, summary
    from kandinsky_engine.stages.movq import movq_decode
    from kandinsky_engine.rows import latent_size

    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda", torch.cuda.current_device()), torch.bfloat16) if cuda else \
        (torch.device("cpu"), torch.float32)
    if args.smoke:
        args.size, args.decoder_steps, args.prior_steps, args.rows, args.repeats = 64, 1, 2, 2, 1
    peak = gemm_peak(device, dtype, 256 if args.smoke else 8192)
    log(f"{device} {dtype}: GEMM peak {peak / 1e12:.1f} TFLOP/s; building the components")
    built = time.perf_counter()
    prior_parts, decoder_parts = fullsize.components(device, dtype, smoke=args.smoke)
    build_s = time.perf_counter() - built
    stage = {"batch_size": args.rows, "torch_threads": torch.get_num_threads()}
    config = JobConfig.model_validate({
        "input": {"manifest": "unused.parquet"}, "output": {"path": tempfile.mkdtemp(prefix="bench-gpu-")},
        "model": {"device": device.type, "dtype": str(dtype).split(".")[1], "compile": args.compile,
                  "channels_last": args.channels_last},
        "defaults": {"width": args.size, "height": args.size, "num_inference_steps": args.decoder_steps,
                     "prior_num_inference_steps": args.prior_steps, "scheduler": args.scheduler},
        "prior": stage, "decoder": stage, "movq": stage, "tasks": ["text2img"],
    })
    if args.channels_last:
        for module in (decoder_parts["unet"], decoder_parts["movq"]):
            module.to(memory_format=torch.channels_last)
    stages = {"prior": PriorStage(config, prior_parts), "decoder": DecoderStage(config, decoder_parts),
              "movq": MovqStage(config, {"movq": decoder_parts["movq"]})}
    del prior_parts  # the prior freed its image encoder (tasks: text2img)
    ready_s = time.perf_counter() - built

    log(f"stages ready in {ready_s:.1f} s; warm-up call of each stage")
    batch, inputs = bench_batch(args.rows, args.size, args.decoder_steps, args.prior_steps), {}
    for name, st in stages.items():  # warm-up: cuBLAS/cuDNN heuristics, allocator, lazy inits
        inputs[name], batch = batch, st(copy(batch))
    figures = {}
    log(f"timing {args.repeats} calls of each stage")
    for name, st in stages.items():
        (seconds, _), memory = peak_memory(device, lambda: timed(lambda: st(copy(inputs[name])), device, args.repeats))
        figures[name] = {"s_per_call": round(seconds, 3), "rows_per_s": round(args.rows / seconds, 3),
                         "peak_gib": memory}
    latents = torch.stack([torch.frombuffer(bytearray(b), dtype=torch.float32) for b in inputs["movq"]["latents"]])
    shape = (4, *latent_size(args.size, args.size, stages["movq"].scale_factor))
    latents = latents.view(-1, *shape).to(device, stages["movq"].movq.dtype)
    movq = stages["movq"].movq
    with torch.inference_mode():
        movq_decode(latents, movq)
        (seconds, _), memory = peak_memory(device, lambda: timed(lambda: movq_decode(latents, movq), device, args.repeats))
    figures["movq_decode_only"] = {"s_per_call": round(seconds, 3), "rows_per_s": round(args.rows / seconds, 3),
                                   "peak_gib": memory}

    log("counting the FLOPs of one image; attention kernels")
    per_stage, out = {}, {k: v[:1] for k, v in inputs["prior"].items()}  # FLOPs of one image, stage by stage
    with torch.inference_mode():
        for name in ("prior", "decoder"):
            per_stage[name], out = counted(lambda: stages[name](copy(out)))
        per_stage["movq"], _ = counted(lambda: movq_decode(latents[:1], movq))
    flops_per_image = sum(per_stage.values())
    # One GPU runs the three stages back to back: images/s = rows / the sum of their times per call.
    gpu_s = figures["prior"]["s_per_call"] + figures["decoder"]["s_per_call"] + figures["movq_decode_only"]["s_per_call"]
    e2e = args.rows / (gpu_s - figures["movq_decode_only"]["s_per_call"] + figures["movq"]["s_per_call"])

    unet = decoder_parts["unet"]
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(2, 4, *shape[1:], device=device, dtype=dtype, generator=g)
    cond = {"image_embeds": torch.randn(2, unet.config.encoder_hid_dim, device=device, dtype=dtype, generator=g)}
    run_unet = lambda: unet(x, torch.tensor(999, device=device), encoder_hidden_states=None, added_cond_kwargs=cond)
    text = stages["prior"].text_encoder
    tokens = stages["prior"].tokenizer([""] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    attention = {"unet": summary(attention_backends(unet, run_unet)),
                 "text_encoder": summary(attention_backends(text, lambda: text(tokens.to(device)))),
                 "movq": summary(attention_backends(movq, lambda: movq_decode(latents[:1], movq)))}
    reference = fullsize.configs()["_flops_768"]
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype), "smoke": args.smoke,
        "torch": torch.__version__, "size": f"{args.size}x{args.size}", "rows_per_call": args.rows,
        "decoder_steps": args.decoder_steps, "prior_steps": args.prior_steps, "guidance": 4.0,
        "scheduler": args.scheduler, "compile": args.compile, "channels_last": args.channels_last,
        "build_s": round(build_s, 1), "stages_ready_s": round(ready_s, 1),
        "gemm_peak_tflops": round(peak / 1e12, 3),
        "stages": figures,
        "end_to_end_images_per_s": round(e2e, 3),
        "end_to_end_gpu_images_per_s": round(args.rows / gpu_s, 3),  # MoVQ without its PNG encoding (CPU)
        "flop_per_image": flops_per_image,
        "tflop_per_image": round(flops_per_image / 1e12, 2),
        "tflop_per_image_by_stage": {k: round(v / 1e12, 3) for k, v in per_stage.items()},
        "reference_tflop_per_image": None if args.smoke else reference["per_image_tflop_50_steps_cfg"],
        "mfu": round(flops_per_image * e2e / peak, 3),
        "mfu_gpu": round(flops_per_image * (args.rows / gpu_s) / peak, 3),  # without the PNG encoding
        "attention_kernels": attention,
        "total_s": round(time.perf_counter() - started, 1),
    }


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench --full-size: no CUDA device here, skipped (exit 0); --smoke runs the same code on the CPU "
              "at tiny sizes")
        return 0
    result = json.dumps(run(args), indent=2)
    print(result)
    if args.output:
        with open(args.output, "w") as f:
            f.write(result + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
