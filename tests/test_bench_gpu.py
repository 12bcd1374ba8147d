"""The full-size GPU benchmark (jobs/bench_gpu.py): its code path on the CPU (--smoke), its skip
without CUDA, and the full-size architectures it builds, checked on the meta device against the
reference figures (kandinsky_engine/families/kandinsky22/reference/kandinsky22_configs.json)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kandinsky_engine.jobs import bench_gpu
from kandinsky_engine.families.kandinsky22 import fullsize


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the benchmark would run")
def test_full_size_bench_skips_cleanly_without_cuda(capsys):
    from kandinsky_engine.jobs.cli import main

    assert bench_gpu.main([]) == 0
    assert main(["bench", "--full-size"]) == 0
    assert capsys.readouterr().out.count("no CUDA device here, skipped") == 2


def test_gpu_check_smoke_runs_every_mode_and_writes_what_plan_reads(model_cache, tmp_path, capsys):
    from tests.conftest import TINY

    """scripts/gpu_check.sh --smoke: the GPU script's steps on the CPU at tiny widths (the benchmark in
    eager and compiled mode, a tracing backend; fp8 refused with its reason; the GPU tests, skipped),
    one JSON with every figure, and the stage costs that `plan --from-measured` plans with."""
    import subprocess
    import sys
    from pathlib import Path

    from kandinsky_engine.jobs.cli import main

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", str(tmp_path)], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    assert check["bench_exit"] == 0 and check["gpu_tests"]["exit"] == 0 and "skipped" in check["gpu_tests"]["summary"]
    out, result = tmp_path / "bench.json", check["bench"]
    assert result["smoke"] and result["size"] == "64x64" and result["gpu"] is None
    assert set(result["modes"]) == {"eager", "compiled"} and "compute capability 8.9" in result["skipped"]["fp8"]
    for mode in result["modes"].values():
        assert all(mode["stages"][s]["rows_per_s"] > 0 for s in ("prior", "decoder", "movq"))
        assert mode["end_to_end_images_per_s"] > 0 and mode["mfu_end_to_end"]["measured_gemm_peak"] > 0
    eager, compiled = result["modes"]["eager"], result["modes"]["compiled"]
    assert "profile_without_prefetch" in eager and eager["profile"]["wall_s"] > 0
    assert compiled["fallback_calls"] == {"prior": 0, "decoder": 0, "movq": 0}
    assert set(compiled["compile"]) == {"prior", "decoder", "movq"}
    assert result["headline"]["mode"] == "compiled" and result["stage_costs_mode"] == "compiled"
    assert result["tflop_per_image"] >= 0 and sum(result["tflop_per_image_by_stage"].values()) >= 0
    assert result["png_encode_ms_per_image"] > 0 and result["gemm_peak_tflops"] >= 0
    assert set(result["attention_kernels"]) == {"unet", "text_encoder", "movq"}
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({"input": {"manifest": "m.parquet"}, "output": {"path": "out"},
                                  "model": {"device": "cuda", "dtype": "bfloat16", "cache_dir": model_cache, **TINY},
                                  "defaults": {"width": 64, "height": 64, "num_inference_steps": 2,
                                               "prior_num_inference_steps": 2},
                                  **{s: {"batch_size": 2} for s in ("prior", "decoder", "movq")}}))
    capsys.readouterr()
    assert main(["plan", str(config), "--gpus", "4", "--from-measured", str(out), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fuse_stages"] and plan["source"].startswith("measured on cpu (compiled) by jobs/bench_gpu.py")
    costs = {s: c["seconds_per_row"] for s, c in result["stage_costs"].items()}
    assert plan["seconds_per_row"] == pytest.approx(costs)  # the job's size and steps are the benchmark's


def test_the_gpu_idle_time_is_the_complement_of_its_busy_intervals():
    from kandinsky_engine.jobs.gpu_measure import union

    busy, gaps, window = union([(0, 10), (5, 20), (25, 30), (40, 45)])  # microseconds
    assert (busy, gaps, window) == (30, [5, 10], 45)  # idle fraction 1 - 30 / 45


def test_random_components_are_initialised_never_zero():
    prior, decoder = fullsize.components(torch.device("cpu"), torch.float32, smoke=True)
    for name, module in {**prior, **decoder}.items():
        if isinstance(module, torch.nn.Module):
            for pname, p in module.named_parameters():
                assert p.float().std() > 0.005 or p.numel() == 1, f"{name}.{pname}"
    assert prior["prior"].clip_std.abs().min() > 0  # diffusers initialises it to zeros
    ids = prior["text_encoder"].text_model.embeddings.position_ids
    assert torch.equal(ids[0], torch.arange(ids.shape[-1]))
    mask = prior["prior"].causal_attention_mask[0]
    assert mask[0, 1] == -10000 and mask[1, 0] == 0 and mask[1, 1] == 0


def test_full_size_architectures_match_the_reference_figures():
    """Built on the meta device (shapes only): the parameter counts of the real checkpoints and the
    FLOPs per forward at 768x768 that the reference file lists."""
    from torch.utils.flop_counter import FlopCounterMode

    meta, bf16 = torch.device("meta"), torch.bfloat16
    params = {n: sum(p.numel() for p in fullsize.build(n, meta, bf16).parameters()) / 1e9
              for n in ("decoder_unet", "prior_transformer", "text_encoder", "image_encoder")}
    assert round(params["image_encoder"], 2) == 1.84  # "1.85B" in the issue; 1,844,907,264 here
    assert round(params["decoder_unet"], 2) == 1.25 and round(params["prior_transformer"], 2) == 1.03
    reference = fullsize.configs()["_flops_768"]
    unet, movq = fullsize.build("decoder_unet", meta, bf16), fullsize.build("movq", meta, bf16)
    latents = torch.randn(1, 4, 96, 96, device=meta, dtype=bf16)
    embeds = {"image_embeds": torch.randn(1, 1280, device=meta, dtype=bf16)}
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(latents, torch.tensor(999, device=meta), encoder_hidden_states=None, added_cond_kwargs=embeds)
    assert round(counter.get_total_flops() / 1e9, 1) == reference["unet_forward_per_sample_gflop"]
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        movq.decode(latents, force_not_quantize=True)
    assert round(counter.get_total_flops() / 1e9, 1) == reference["movq_decode_per_image_gflop"]
