"""The compiled and fp8 modes of the GPU benchmark (jobs/bench_gpu.py): each stage's model compiled at
the benchmark's call shape, and the U-Net in float8 with its distance from bf16."""

from __future__ import annotations

import copy as copying
import time

import numpy as np

from kandinsky_engine.jobs.gpu_measure import copy, log, timed

# Seconds a phase needs on one H100 at the full size (estimates; a phase starts only with this left).
NEEDS_S = {"compiled": 240, "fp8": 45, "fp8_compiled": 150}


def compile_stages(stages: dict, args, config) -> dict:
    """Each stage's model compiled at this benchmark's call shape only (one bucket each); seconds and
    graph breaks per stage."""
    from kandinsky_engine import compiled
    from kandinsky_engine.stages.decoder import unet_forward
    from kandinsky_engine.stages.movq import movq_decode
    from kandinsky_engine.stages.prior import prior_forward

    rows, cache, out = args.rows, config.model.cache_dir, {}
    prior, decoder, movq = stages["prior"], stages["decoder"], stages["movq"]
    cuda = prior.device.type == "cuda"
    specs = {"prior": ("prior_call", prior_forward, 2 * rows, prior._example, "reduce-overhead" if cuda else None),
             "decoder": ("run_unet", unet_forward, 2 * rows, lambda n: decoder._example(n, config.defaults), None),
             "movq": ("decode", movq_decode, rows, lambda n: movq_example(movq, n, config.defaults), None)}
    for name, (attribute, fn, size, example, mode) in specs.items():
        started = time.perf_counter()
        wrapped = compiled.Bucketed(fn, [size], name, mode=mode, cache_dir=cache)
        wrapped.warm_up(example)
        setattr(stages[name], attribute, wrapped)
        out[name] = {"compile_s": round(time.perf_counter() - started, 1), "graph_breaks": wrapped.graph_breaks}
        log(f"compiled {name} in {out[name]['compile_s']} s ({wrapped.graph_breaks} graph breaks)")
    return out


def movq_example(movq, n: int, defaults):
    import torch

    from kandinsky_engine.rows import latent_size

    shape = (movq.movq.config.latent_channels, *latent_size(defaults.height, defaults.width, movq.scale_factor))
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    return x.to(movq.device, movq.movq.dtype), {"movq": movq.movq}


def fallbacks(stages: dict) -> dict:
    return {name: getattr(getattr(s, a, None), "fallback_calls", 0) for name, s, a in
            (("prior", stages["prior"], "prior_call"), ("decoder", stages["decoder"], "run_unet"),
             ("movq", stages["movq"], "decode"))}


def pixels(batch: dict, size: int) -> np.ndarray:
    return np.stack([np.frombuffer(b, np.uint8).reshape(size, size, 3) for b in batch["pixels"]])


def clip_scores(clip: dict, images: np.ndarray, prompts, device) -> np.ndarray:
    """Cosine similarity of CLIP image and text embeddings (the prior's random-weight encoders)."""
    import torch
    from PIL import Image

    with torch.inference_mode():
        values = clip["image_processor"]([Image.fromarray(i) for i in images], return_tensors="pt").pixel_values
        image = clip["image_encoder"](values.to(device, clip["image_encoder"].dtype)).image_embeds
        tokens = clip["tokenizer"](list(map(str, prompts)), padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
        text = clip["text_encoder"](tokens.to(device)).text_embeds
        return torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1).cpu().numpy()


def fp8_mode(config, decoder_parts, stages, inputs, reference, clip, args, device, deadline) -> dict:
    """The U-Net in float8: its distance from bf16 on the benchmark's rows and its speed."""
    from kandinsky_engine import DecoderStage, fp8

    unet = copying.deepcopy(decoder_parts["unet"])
    layers = fp8.to_float8(unet, device)
    decoder = DecoderStage(config, {**decoder_parts, "unet": unet})
    decoder(copy(inputs["decoder"]))  # warm-up
    seconds, latents = timed(lambda: decoder(copy(inputs["decoder"])), device, args.repeats)
    ours, base = pixels(stages["movq"](latents), args.size), pixels(reference, args.size)
    diff = np.abs(ours.astype(np.int16) - base.astype(np.int16))
    prompts = inputs["decoder"]["prompt"]
    scores = clip_scores(clip, ours, prompts, device) - clip_scores(clip, base, prompts, device)
    result = {"torchao": fp8.torchao_version(), "layers_in_fp8": layers, "decoder_s_per_call_eager": round(seconds, 3),
              "fidelity_vs_bf16": {"rows": len(diff), "max_abs_255": int(diff.max()), "mean_abs_255": round(float(diff.mean()), 3),
                                   "clip_score_delta_mean": round(float(scores.mean()), 5),
                                   "clip_score_delta_max_abs": round(float(np.abs(scores).max()), 5),
                                   "note": "random weights: the CLIP delta shows the change, not image quality"}}
    if time.perf_counter() + NEEDS_S["fp8_compiled"] < deadline and args.compile:
        from kandinsky_engine import compiled
        from kandinsky_engine.stages.decoder import unet_forward

        started = time.perf_counter()
        decoder.run_unet = compiled.Bucketed(unet_forward, [2 * args.rows], "U-Net fp8", cache_dir=config.model.cache_dir)
        decoder.run_unet.warm_up(lambda n: decoder._example(n, config.defaults))
        result["compile_s"] = round(time.perf_counter() - started, 1)
        result["decoder_s_per_call_compiled"] = round(timed(lambda: decoder(copy(inputs["decoder"])), device,
                                                            args.repeats)[0], 3)
    return result
