"""Every shipped job config fits the GPUs its deployment names: each stage's estimated peak (the
stage memory model, kandinsky_engine/memory.py) within its cap with MARGIN to spare, the stage
sections equal to what `kandinsky-batch plan --gpu-type` writes for that cluster, and the driver's
refusal of a config that does not fit. Offline: architectures on the meta device, no weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.infra_rules import ROOT, load_docs

GIB = 2**30


def k8s_gpu() -> tuple[str, int]:
    """(Ray's GPU type, GPUs) of the KubeRay forms: NVIDIA GPU feature discovery's product label
    through Ray's own name mapping, times settings.yaml's GPU workers and GPUs per worker."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    job = load_docs(ROOT / "infra" / "k8s" / "rayjob.yaml")[0]
    pod = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    product = pod["nodeSelector"]["nvidia.com/gpu.product"].replace("-", " ")
    settings = yaml.safe_load((ROOT / "infra" / "k8s" / "settings" / "settings.yaml").read_text())
    return (NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(product),
            settings["gpuWorkers"] * settings["gpusPerWorker"])


def launcher_gpu(name: str) -> tuple[str, int]:
    """(GPU type, GPUs) of a `ray up` file: its GPU workers' accelerator_type resource x their count."""
    cfg = yaml.safe_load((ROOT / "infra" / "ray-cluster" / name).read_text())
    workers = cfg["available_node_types"]["gpu-workers"]
    assert workers["min_workers"] == workers["max_workers"]  # the engine plans against the GPUs up at start
    (kind,) = [k.split(":", 1)[1] for k in workers["resources"] if k.startswith("accelerator_type:")]
    return kind, workers["min_workers"] * workers["resources"]["GPU"]


SHIPPED = {  # job config -> where its GPUs are named
    "infra/k8s/settings/job.yaml": k8s_gpu,
    "infra/ray-cluster/jobs/aws-a10g.yaml": lambda: launcher_gpu("aws.yaml"),
    "infra/ray-cluster/jobs/gcp-l4.yaml": lambda: launcher_gpu("gcp.yaml"),
}


def shipped(path: str):
    """A shipped config as the driver sees it, its model URLs (your bucket's, unreachable here) in a
    folder that does not exist: the memory model then takes the released architectures, as it does
    for any model whose config files it cannot read."""
    from kandinsky_engine.config import load_config

    config = load_config(ROOT / path)
    absent = str(ROOT / "tests" / "data" / "no-such-model")
    model = config.model.model_copy(update={"prior": absent, "decoder": absent})
    return config.model_copy(update={"tasks": ["text2img"], "model": model})


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_config_fits_its_gpus_with_margin(path):
    from kandinsky_engine.pipelines.generate import check_resources
    from kandinsky_engine.pipelines.memory_fit import GPU_MEMORY, MARGIN, stage_fits

    config = shipped(path)
    gpu, gpus = SHIPPED[path]()
    assert gpu in GPU_MEMORY and config.model.family == "kandinsky22"
    fits = stage_fits(config, ["prior", "decoder", "movq"], gpu)
    for fit in fits:
        assert fit.need.peak <= (1 - MARGIN) * fit.cap, (path, gpu, fit.stage, fit.need.describe(), fit.cap / GIB)
    # Each GPU holds one actor running every stage (fused: one fit, the decoder section's whole GPU).
    assert config.fuse_stages and [f.stage for f in fits] == ["decoder (fused stages)"]
    assert (config.decoder.actors, config.decoder.num_gpus) == (gpus, 1.0)  # the workers scale the actors
    cluster = {"CPU": 8 * gpus, "GPU": gpus, f"accelerator_type:{gpu}": gpus}
    check_resources(config, SimpleNamespace(tasks={"text2img"}), cluster)  # the driver's own checks pass


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_stage_sections_are_the_plan(path, tmp_path, capsys):
    """The stage sections are what `kandinsky-batch plan --from-flops --gpu-type` writes for the
    deployment's GPU type and count (so a changed GPU count or type must be planned again)."""
    from kandinsky_engine.jobs.cli import main

    gpu, gpus = SHIPPED[path]()
    out = tmp_path / "plan.yaml"
    assert main(["plan", str(ROOT / path), "--gpus", str(gpus), "--from-flops", "--gpu-type", gpu,
                 "--write", str(out)]) == 0
    capsys.readouterr()
    planned = yaml.safe_load(out.read_text())
    config = yaml.safe_load((ROOT / path).read_text())
    assert {name: config[name] for name in planned} == planned


def old_config():
    """infra/k8s/settings/job.yaml as it was shipped before the memory model: the prior at num_gpus
    0.1 (4.5 GiB of an L40S) for 6.6 GiB of weights, the MoVQ decoding 8 rows at 768 in 0.1."""
    config = shipped("infra/k8s/settings/job.yaml")
    update = {"prior": {"batch_size": 16, "num_gpus": 0.1}, "decoder": {"batch_size": 8, "num_gpus": 0.8},
              "movq": {"batch_size": 8, "num_gpus": 0.1}}
    return config.model_copy(update={"fuse_stages": False, **{name: getattr(config, name).model_copy(update=fields)
                                                              for name, fields in update.items()}})


def test_driver_refuses_a_config_that_does_not_fit_naming_stage_estimate_and_cap():
    from kandinsky_engine.pipelines.generate import check_resources

    cluster = {"CPU": 8, "GPU": 1, "accelerator_type:L40S": 1}
    with pytest.raises(ValueError) as refused:
        check_resources(old_config(), SimpleNamespace(tasks={"text2img"}), cluster)
    message = str(refused.value)
    assert "out of GPU memory on L40S" in message
    assert "prior: estimated peak 7.8 GiB" in message and "> cap 4.5 GiB" in message
    assert "movq: estimated peak 14.5 GiB" in message
    assert "decoder:" not in message  # 5.1 GiB in 36: fits
    # An unknown GPU type is not checked (a warning), and a CPU job never is.
    check_resources(old_config(), SimpleNamespace(tasks={"text2img"}), {"CPU": 8, "GPU": 1, "accelerator_type:X9": 1})


def test_memory_model_figures():
    """Parameter counts of the real architectures and what the model adds on top."""
    from kandinsky_engine.memory import (CUDA_CONTEXT, WORKSPACE, _module, estimate_stage, json,
                                         reference_specs)

    def params(family, part):
        return sum(p.numel() for p in _module(json.dumps(reference_specs(family)[part], sort_keys=True),
                                              "float16").parameters())

    prior = sum(params("kandinsky22", part) for part in ("prior_transformer", "text_encoder", "image_encoder"))
    assert 3.5e9 < prior < 3.6e9  # the prior stage: prior, CLIP bigG text and image encoders
    assert round(params("kandinsky3", "text_encoder") / 1e9, 2) == 8.72 and round(
        params("kandinsky21", "decoder_unet") / 1e6) == 1229
    est = estimate_stage("prior", "kandinsky22", reference_specs("kandinsky22"), dtype="float16", batch_size=16,
                         width=768, height=768, steps=50)
    assert round(est.weights / GIB, 1) == 6.6 and est.peak > est.weights + CUDA_CONTEXT + WORKSPACE
    # Activations grow with the batch and the size; the decoder holds every step's noise.
    small, large = (estimate_stage("movq", "kandinsky22", reference_specs("kandinsky22"), dtype="float16",
                                   batch_size=b, width=s, height=s, steps=50) for b, s in ((1, 512), (4, 768)))
    assert large.activations > 8 * small.activations
    decoder = estimate_stage("decoder", "kandinsky22", reference_specs("kandinsky22"), dtype="float16",
                             batch_size=8, width=768, height=768, steps=50)
    assert decoder.held == 51 * 8 * 4 * 96 * 96 * 2


def test_attention_is_traced_as_the_gpu_runs_it():
    """No (L, L) score matrix: memory-efficient SDPA keeps only its output."""
    import torch
    import torch.nn.functional as F

    from kandinsky_engine.memory import trace_peak

    def attend():
        q, k, v = (torch.empty(1, 1, 4096, 64, device="meta", dtype=torch.float16) for _ in range(3))
        F.scaled_dot_product_attention(q, k, v)

    assert trace_peak(attend) == 4 * 4096 * 64 * 2  # q, k, v and the output; the scores would be 32 MiB

    def freed():
        x = torch.empty(1024, 1024, device="meta")  # 4 MiB, dropped before the next
        del x
        y = torch.empty(512, 1024, device="meta")
        return y

    assert trace_peak(freed) == 4 * 2**20


def test_every_family_is_modelled_and_kandinsky3_needs_a_gpu_for_its_t5():
    """Kandinsky 3's T5 encoder (16.2 GiB in bf16) fits a whole 22.5 GiB card and not half of one;
    Kandinsky 2.1's and 2.0's stages are modelled too (2.0's inpainting U-Net with its 9 channels)."""
    from kandinsky_engine.config import JobConfig
    from kandinsky_engine.pipelines.memory_fit import stage_fits

    config = JobConfig.model_validate({
        "input": {"manifest": "m"}, "output": {"path": "o"}, "tasks": ["text2img"],
        "model": {"decoder": "/no/such/k3", "family": "kandinsky3", "device": "cuda", "dtype": "bfloat16"},
        "defaults": {"width": 1024, "height": 1024, "num_inference_steps": 25},
        "text_encoder": {"batch_size": 8, "num_gpus": 1.0}, "decoder": {"batch_size": 2, "num_gpus": 0.5},
        "movq": {"batch_size": 1, "num_gpus": 0.5}})
    fits = {f.stage: f for f in stage_fits(config, ["text_encoder", "decoder", "movq"], "A10G")}
    assert all(f.fits for f in fits.values()) and 16 < fits["text_encoder"].need.weights / GIB < 16.5
    half = config.model_copy(update={"text_encoder": config.text_encoder.model_copy(update={"num_gpus": 0.5})})
    assert not stage_fits(half, ["text_encoder"], "A10G")[0].fits
    k21 = config.model_copy(update={"model": config.model.model_copy(update={"family": "kandinsky21"})})
    assert {f.stage for f in stage_fits(k21, ["prior", "decoder", "movq"], "L40S")} == {"prior", "decoder", "movq"}
    k20 = config.model_copy(update={"model": config.model.model_copy(update={"family": "kandinsky20"})})
    fits = {f.stage: f for f in stage_fits(k20, ["text_encoder", "encode", "decoder", "movq"], "L4")}
    assert all(f.fits for f in fits.values()) and 1.3 < fits["text_encoder"].need.weights / GIB < 1.35
    inpaint = k20.model_copy(update={"tasks": ["inpaint"]})
    assert stage_fits(inpaint, ["decoder"], "L4")[0].need.weights > fits["decoder"].need.weights


def test_gpu_type_from_the_cluster():
    from kandinsky_engine.pipelines.memory_fit import gpu_type

    assert gpu_type({"GPU": 2, "accelerator_type:L4": 1, "accelerator_type:L40S": 1}) == "L4"  # the smallest
    assert gpu_type({"GPU": 1}) is None and gpu_type({"GPU": 1, "accelerator_type:Z1": 1}) is None


def test_job_specs_read_the_jobs_own_architecture(model_cache, tmp_path):
    """The driver estimates the models the job loads (here the tiny model: a few MiB), not the released
    ones, when their config files can be read; unreadable ones fall back to the released architecture."""
    from kandinsky_engine.config import JobConfig
    from kandinsky_engine.memory import estimate_job, job_specs

    config = JobConfig.model_validate({
        "input": {"manifest": "m"}, "output": {"path": "o"}, "tasks": ["text2img"],
        "model": {"prior": "tiny", "decoder": "tiny", "family": "kandinsky22", "cache_dir": model_cache}})
    tiny = estimate_job(config, "kandinsky22", ["prior", "decoder"], job_specs(config, "kandinsky22"))
    assert tiny["prior"].weights < 16 * 2**20 and tiny["decoder"].weights < 16 * 2**20
    remote = config.model_copy(update={"model": config.model.model_copy(update={"prior": str(tmp_path / "none")})})
    released = estimate_job(remote, "kandinsky22", ["prior"], job_specs(remote, "kandinsky22"))
    assert released["prior"].weights > 6 * GIB
    k20 = config.model_copy(update={"model": config.model.model_copy(update={"decoder": "tiny-k20", "family": "kandinsky20"})})
    specs = job_specs(k20, "kandinsky20")
    assert set(specs) == {"text_encoder", "text_encoder_2", "text_head", "decoder_unet", "vae"}
    tiny = estimate_job(k20, "kandinsky20", ["text_encoder", "decoder", "movq"], specs)
    assert all(need.weights < 64 * 2**20 for need in tiny.values())  # its own config files, read
    assert Path(model_cache).exists()
