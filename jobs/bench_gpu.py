"""`kandinsky-batch bench --full-size` (or `python -m kandinsky_engine.jobs.bench_gpu`): the stage classes on one GPU
with the real Kandinsky 2.2 architectures and random bf16 weights. No Ray, no download.

At 768x768, 50 decoder and 25 prior steps, guidance 4 on both, `--rows` rows per stage call, it
measures in each mode (eager; compiled, one inductor graph per stage at the call's shape, the
prior's as CUDA graphs; fp8, torchao float8 linear layers, where the GPU and torchao allow):
- each stage's seconds per call and peak GPU memory;
- end to end: two chunks of rows through prior, U-Net and MoVQ (to uint8 pixels) back to back as a
  fused actor runs them (pipelines/chunked.py, noise of the next chunk prefetched), wall time with
  every host-side step but image encoding, which the Ray job runs on other CPUs (timed apart,
  `png_encode_ms_per_image`: random-weight images, content-dependent);
- GPU-only: the same rows over the GPU's busy time (the union of its kernels and copies, from the
  PyTorch profiler), and the idle fraction between them, with and without the prefetch (eager);
- model-FLOPs utilisation of both rates against the datasheet's dense bf16 peak and against a
  measured bf16 GEMM peak (FLOPs per image by torch's FlopCounterMode);
- fp8's distance from bf16 on the same rows (max and mean |diff| of the pixels, CLIP-score delta
  with the random-weight CLIP encoders);
and writes `stage_costs` (seconds per row and memory share per stage, the best mode) that
`kandinsky-batch plan --from-measured FILE` plans with. The JSON is rewritten after each phase;
phases that would not finish within `--budget-s` are skipped and named. Without CUDA it says so
and exits 0; `--smoke` runs the same code on the CPU at tiny sizes (tests/test_bench_gpu.py).

It imports torch, transformers, diffusers, numpy and the stage modules (pydantic, PyYAML, Pillow,
pyarrow, fsspec); not Ray. scripts/gpu_check.sh runs it on a GPU box.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np

from kandinsky_engine.jobs.gpu_measure import (copy, counted, gemm_peak, idle, log, mfu, peak_memory, per_image_flops,  # noqa: F401
                               spec_tflops, sync, timed)
from kandinsky_engine.jobs.gpu_modes import NEEDS_S, compile_stages, fallbacks, fp8_mode

PROMPTS = ["a red cat", "Красный кот", "一只猫", "🐱 in space", "a harbour at dawn", "abstract bauhaus poster"]


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kandinsky-batch bench --full-size", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny widths, 64x64, 2 decoder + 2 prior steps: the "
                        "code path in seconds, on the CPU if there is no GPU")
    parser.add_argument("--rows", type=int, default=8, help="rows per stage call (the batch size of every stage)")
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--decoder-steps", type=int, default=50)
    parser.add_argument("--prior-steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per stage, after one warm-up call")
    parser.add_argument("--scheduler", default="ddpm", help="defaults.scheduler of the decoder")
    parser.add_argument("--channels-last", action="store_true", help="model.channels_last")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled mode")
    parser.add_argument("--no-fp8", dest="fp8", action="store_false", help="skip the fp8 mode")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                        "--smoke: eager, which traces without generating code)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip phases that would end later than this "
                        "many seconds after the start (default 420: scripts/gpu_check.sh's 8 minutes with its tests)")
    parser.add_argument("--output", metavar="FILE", help="also write the figures (JSON) to FILE, after each phase")


def bench_batch(n: int, size: int, steps: int, prior_steps: int) -> dict:
    """n text2img rows as the prior stage receives them (resolved columns, no errors), one unit."""
    from kandinsky_engine.rows import object_column

    return {
        "id": object_column(f"bench-{i:05d}" for i in range(n)), "task": object_column(["text2img"] * n),
        "prompt": object_column(PROMPTS[i % len(PROMPTS)] for i in range(n)), "negative_prompt": object_column([None] * n),
        "seed": np.arange(n, dtype=np.int64), "width": np.full(n, size), "height": np.full(n, size),
        "num_inference_steps": np.full(n, steps), "guidance_scale": np.full(n, 4.0),
        "prior_num_inference_steps": np.full(n, prior_steps), "prior_guidance_scale": np.full(n, 4.0),
        "strength": np.full(n, 0.3), "_unit": object_column(["bench/0"] * n), "_splits": np.zeros(n, np.int64),
        **{c: object_column([""] * n) for c in ("error_stage", "error_type", "error_message")},
    }


def chain(chunked: list, block: dict) -> dict:
    for stage in chunked:
        block = stage(copy(block))
    return block


def measure(stages: dict, args, device, flops: float, spec, peak: float, prefetch_off: bool) -> dict:
    """One mode: per-stage times and peaks at one chunk, then two chunks end to end and profiled."""
    from kandinsky_engine.pipelines.chunked import Chunked

    rows = args.rows
    chunked = [Chunked.wrapping(stage, rows) for stage in stages.values()]
    block = bench_batch(2 * rows, args.size, args.decoder_steps, args.prior_steps)
    inputs, batch = {}, {k: v[:rows] for k, v in block.items()}
    for name, stage in stages.items():  # warm-up: cuBLAS/cuDNN heuristics, allocator, lazy inits
        inputs[name], batch = batch, stage(copy(batch))
    figures = {}
    for name, stage in stages.items():
        (seconds, _), memory = peak_memory(device, lambda: timed(lambda: stage(copy(inputs[name])), device,
                                                                 args.repeats))
        figures[name] = {"s_per_call": round(seconds, 3), "rows_per_s": round(rows / seconds, 3), "peak_gib": memory}
    seconds, out = timed(lambda: chain(chunked, block), device, 1)
    e2e = 2 * rows / seconds
    profiled, _ = idle(lambda: chain(chunked, block), device)
    gpu = 2 * rows / profiled["busy_s"] if profiled["busy_s"] else None
    result = {"stages": figures, "end_to_end_images_per_s": round(e2e, 3),
              "gpu_images_per_s": None if gpu is None else round(gpu, 3), "profile": profiled,
              "mfu_end_to_end": mfu(flops, e2e, spec, peak), "mfu_gpu_only": mfu(flops, gpu, spec, peak)}
    if prefetch_off:  # the same without drawing the next chunk's noise ahead: what the overlap saves
        stages["decoder"].prefetch = None
        result["profile_without_prefetch"], _ = idle(lambda: chain(chunked, block), device)
        del stages["decoder"].prefetch
    return result, out, inputs


def run(args) -> dict:
    import torch

    from kandinsky_engine import DecoderStage, JobConfig, MovqStage, PriorStage, compiled, gpu_identity
    from kandinsky_engine.attention import attention_backends, summary
    from kandinsky_engine.families.kandinsky22 import fullsize
    from kandinsky_engine.memory import CUDA_CONTEXT
    from kandinsky_engine.stages.movq import encode_image

    started = time.perf_counter()
    deadline = started + args.budget_s
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda", torch.cuda.current_device()), torch.bfloat16) if cuda else \
        (torch.device("cpu"), torch.float32)
    if args.smoke:
        args.size, args.decoder_steps, args.prior_steps, args.rows, args.repeats = 64, 2, 2, 2, 1
    compiled.BACKEND = args.compile_backend or ("eager" if args.smoke else "inductor")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    spec = spec_tflops(name) if cuda else None
    result = {"device": name, "gpu": gpu_identity.record(), "dtype": str(dtype), "smoke": args.smoke,
              "torch": torch.__version__, "size": f"{args.size}x{args.size}",
              "settings": {"size": args.size, "rows": args.rows, "decoder_steps": args.decoder_steps,
                           "prior_steps": args.prior_steps, "guidance": 4.0, "scheduler": args.scheduler,
                           "channels_last": args.channels_last, "compile_backend": compiled.BACKEND},
              "spec_bf16_dense_tflops": spec, "modes": {}, "skipped": {}}
    save = lambda: write(args.output, {**result, "total_s": round(time.perf_counter() - started, 1)})  # noqa: E731
    peak = gemm_peak(device, dtype, 256 if args.smoke else 8192)
    result["gemm_peak_tflops"] = round(peak / 1e12, 1)
    log(f"{name} {dtype}: GEMM peak {peak / 1e12:.1f} TFLOP/s (datasheet {spec}); building the components")
    built = time.perf_counter()
    prior_parts, decoder_parts = fullsize.components(device, dtype, smoke=args.smoke)
    clip = {k: prior_parts[k] for k in ("tokenizer", "text_encoder", "image_encoder", "image_processor")}
    config = JobConfig.model_validate({
        "input": {"manifest": "unused.parquet"}, "output": {"path": tempfile.mkdtemp(prefix="bench-gpu-")},
        "model": {"device": device.type, "dtype": str(dtype).split(".")[1], "channels_last": args.channels_last,
                  "cache_dir": tempfile.gettempdir() + "/kandinsky-bench-cache"},
        "defaults": {"width": args.size, "height": args.size, "num_inference_steps": args.decoder_steps,
                     "prior_num_inference_steps": args.prior_steps, "scheduler": args.scheduler},
        **{s: {"batch_size": args.rows, "num_gpus": 1.0 if cuda else 0.0} for s in ("prior", "decoder", "movq")},
        "tasks": ["text2img"],
    })
    if args.channels_last:
        for module in (decoder_parts["unet"], decoder_parts["movq"]):
            module.to(memory_format=torch.channels_last)
    stages = {"prior": PriorStage(config, prior_parts), "decoder": DecoderStage(config, decoder_parts),
              "movq": MovqStage(config, {"movq": decoder_parts["movq"]}, encode=False)}
    del prior_parts
    if not (args.fp8 and cuda):
        clip = None  # the image encoder (1.85B parameters) is kept only for fp8's CLIP-score delta
    result["build_s"] = round(time.perf_counter() - built, 1)

    log("counting the FLOPs of one image")
    one = lambda steps, prior_steps: bench_batch(1, args.size, steps, prior_steps)  # noqa: E731
    with torch.inference_mode():
        by_stage = {"prior": per_image_flops(lambda k: stages["prior"](one(1, k)), args.prior_steps)}
        prior_out = stages["prior"](one(1, args.prior_steps))
        by_stage["decoder"] = per_image_flops(
            lambda k: stages["decoder"]({**copy(prior_out), "num_inference_steps": np.full(1, k)}), args.decoder_steps)
        by_stage["movq"], _ = counted(lambda: stages["movq"](stages["decoder"](copy(prior_out))))
    flops = sum(by_stage.values())
    result.update(tflop_per_image=round(flops / 1e12, 2), tflop_per_image_by_stage={k: round(v / 1e12, 3)
                                                                                   for k, v in by_stage.items()},
                  reference_tflop_per_image=None if args.smoke else fullsize.configs()["_flops_768"]["per_image_tflop_50_steps_cfg"])

    log("eager: stages, end to end, profiled with and without the prefetch")
    eager, out, inputs = measure(stages, args, device, flops, spec, peak, prefetch_off=True)
    result["modes"]["eager"] = eager
    images = [np.frombuffer(b, np.uint8).reshape(args.size, args.size, 3) for b in out["pixels"]]
    started_png = time.perf_counter()
    for image in images:
        encode_image(image, "png", 95)
    result["png_encode_ms_per_image"] = round(1e3 * (time.perf_counter() - started_png) / len(images), 1)
    reference = stages["decoder"](copy(inputs["decoder"]))  # bf16 eager latents of the fixed rows (fp8's baseline)
    reference = stages["movq"](reference)
    save()

    if not args.compile:
        result["skipped"]["compiled"] = "--no-compile"
    elif time.perf_counter() + (0 if args.smoke else NEEDS_S["compiled"]) > deadline:
        result["skipped"]["compiled"] = f"needs about {NEEDS_S['compiled']} s; the budget had less left"
    else:
        log(f"compiling ({compiled.BACKEND})")
        try:
            compiles = compile_stages(stages, args, config)
            mode, _, _ = measure(stages, args, device, flops, spec, peak, prefetch_off=False)
            result["modes"]["compiled"] = {**mode, "compile": compiles, "fallback_calls": fallbacks(stages)}
        except Exception as exc:  # reported, and the phases after it still run
            if args.smoke:
                raise
            result["skipped"]["compiled"] = f"failed: {type(exc).__name__}: {str(exc)[:1000]}"
        save()

    if not args.fp8:
        result["skipped"]["fp8"] = "--no-fp8"
    elif time.perf_counter() + (0 if args.smoke else NEEDS_S["fp8"]) > deadline:
        result["skipped"]["fp8"] = "the budget had no time left"
    else:
        try:
            from kandinsky_engine import fp8

            fp8.check_device(device, dtype)
            log("fp8: fidelity against bf16, speed")
            result["modes"]["fp8"] = fp8_mode(config, decoder_parts, stages, inputs, reference, clip, args, device,
                                              deadline)
        except ValueError as exc:  # this GPU, dtype or installation cannot run it: the reason
            result["skipped"]["fp8"] = str(exc)
        except Exception as exc:
            result["skipped"]["fp8"] = f"failed: {type(exc).__name__}: {str(exc)[:1000]}"
        save()

    best = "compiled" if "compiled" in result["modes"] else "eager"
    figures, total = result["modes"][best]["stages"], torch.cuda.get_device_properties(device).total_memory if cuda else None
    result["stage_costs_mode"] = best
    result["stage_costs"] = {
        name: {"seconds_per_row": figures[name]["s_per_call"] / args.rows, "batch_size": args.rows,
               "memory_share": None if total is None else round((figures[name]["peak_gib"] * 2**30 + CUDA_CONTEXT) / total, 4)}
        for name in ("prior", "decoder", "movq")}
    result["headline"] = {"mode": best, **{k: result["modes"][best][k] for k in ("gpu_images_per_s",
                                                                               "end_to_end_images_per_s")}}
    unet, text = decoder_parts["unet"], stages["prior"].text_encoder
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(2, 4, args.size // 8, args.size // 8, device=device, dtype=dtype, generator=g)
    cond = {"image_embeds": torch.randn(2, unet.config.encoder_hid_dim, device=device, dtype=dtype, generator=g)}
    tokens = stages["prior"].tokenizer([""] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    movq = decoder_parts["movq"]
    result["attention_kernels"] = {
        "unet": summary(attention_backends(unet, lambda: unet(x, torch.tensor(999, device=device),
                                                              encoder_hidden_states=None, added_cond_kwargs=cond))),
        "text_encoder": summary(attention_backends(text, lambda: text(tokens.to(device)))),
        "movq": summary(attention_backends(movq, lambda: movq.decode(x[:1], force_not_quantize=True)))}
    result["total_s"] = round(time.perf_counter() - started, 1)
    sync(device)
    return result


def write(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench --full-size: no CUDA device here, skipped (exit 0); --smoke runs the same code on the CPU "
              "at tiny sizes")
        return 0
    result = run(args)
    print(json.dumps(result, indent=2))
    write(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
