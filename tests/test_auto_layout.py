"""The layout a job gets when its config sets none (pipelines/auto_layout.py): on CPUs the fused
stages with one single-thread actor per core, on GPUs the stage cost model's layout; a config that
sets its layout keeps it; and one default job on the local cluster runs that way."""

from __future__ import annotations

import json

import pytest

from kandinsky_engine.config import JobConfig
from kandinsky_engine.pipelines.auto_layout import is_unset, resolve
from tests.conftest import FAST, TINY

USED = ["prior", "decoder", "movq"]
GIB = 2**30


def config(model_cache, **extra) -> JobConfig:
    """A job config as a user writes it: no fuse_stages, sections with batch sizes at most."""
    return JobConfig.model_validate({"input": {"manifest": "m.parquet"}, "output": {"path": "out"},
                                     "model": {"cache_dir": model_cache, **TINY}, "defaults": dict(FAST), **extra})


def test_cpu_default_is_fused_one_single_thread_actor_per_core(model_cache):
    plain = config(model_cache, decoder={"batch_size": 8})
    assert is_unset(plain, USED)
    layout = resolve(plain, USED, {"CPU": 2, "memory": 8 * GIB})
    d = layout.decoder
    assert layout.fuse_stages and (d.actors, d.threads(), d.batch_size) == (2, 1, 8)
    assert d.actors * d.num_cpus <= 2 - 1  # one CPU stays free for reading and writing
    assert layout.prior.threads() == plain.prior.threads() == 1  # the threads the fingerprint records
    big = resolve(plain, USED, {"CPU": 64, "memory": 256 * GIB}).decoder
    assert (big.actors, big.num_cpus) == (64, 0.98)
    # The cluster's memory bounds the actors (each holds every stage's models).
    assert resolve(plain, USED, {"CPU": 64, "memory": 1 << 20}).decoder.actors == 1


def test_a_config_that_sets_its_layout_keeps_it(model_cache):
    for extra in ({"fuse_stages": False}, {"decoder": {"actors": 2}}, {"prior": {"num_cpus": 0.5}},
                  {"movq": {"torch_threads": 2}}):
        assert not is_unset(config(model_cache, **extra), USED), extra
    assert is_unset(config(model_cache, encode={"actors": 3}), USED)  # a stage this job does not use


def test_gpu_default_comes_from_the_stage_cost_model(model_cache):
    gpu = config(model_cache, model={"cache_dir": model_cache, **TINY, "device": "cuda", "dtype": "bfloat16"},
                 defaults={"width": 768, "height": 768, "num_inference_steps": 50, "prior_num_inference_steps": 25})
    cluster = {"CPU": 128, "GPU": 8, "accelerator_type:H100": 8}
    layout = resolve(gpu, USED, cluster)
    assert layout.fuse_stages and (layout.decoder.actors, layout.decoder.num_gpus) == (8, 1.0)
    assert layout.decoder.threads() == 4  # a GPU actor's threads
    assert resolve(gpu, USED, {"CPU": 8}) == gpu  # no GPU in the cluster: left for check_resources to refuse


def test_gpu_default_places_every_family_by_its_own_stages(model_cache):
    """Kandinsky 3's T5 and U-Net do not fit one A10G together: each stage gets whole GPUs, by its FLOPs (the
    U-Net two of four at the defaults);
    on an H100 they fit, fused. A T5 that no GPU of the cluster holds leaves the config as written
    (check_resources then refuses it, naming the stage)."""
    from kandinsky_engine.families import resolve_family

    k3, _ = resolve_family(config(model_cache, model={"cache_dir": model_cache, "decoder": "tiny-k3", "device": "cuda",
                                                      "dtype": "bfloat16"}, defaults={}))  # 1024x1024, 25 steps
    stages = ["text_encoder", "decoder", "movq"]
    split = resolve(k3, stages, {"CPU": 64, "GPU": 4, "accelerator_type:A10G": 4})
    assert not split.fuse_stages and all(getattr(split, name).num_gpus == 1.0 for name in stages)
    assert [getattr(split, name).actors for name in stages] == [1, 2, 1]
    fused = resolve(k3, stages, {"CPU": 64, "GPU": 4, "accelerator_type:H100": 4})
    assert fused.fuse_stages and (fused.decoder.actors, fused.decoder.num_gpus) == (4, 1.0)
    assert resolve(k3, stages, {"CPU": 64, "GPU": 4, "accelerator_type:T4": 4}) == k3


@pytest.mark.ray
def test_a_job_without_a_layout_runs_fused_on_every_core(ray_cluster, model_cache, tmp_path):
    from kandinsky_engine.jobs.run import run_job
    from tests.conftest import write_manifest

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": "a cat"} for i in range(4)])
    job = config(model_cache, input={"manifest": manifest, "rows_per_block": 2}, output={"path": str(tmp_path / "o")})
    summary = run_job(job)
    assert summary["rows"] == 4 and summary["failed_rows"] == 0
    assert "MapBatches(Fused)" in summary["ray_data_stats"]
    # _RUN.json keeps the config as written (the layout is resolved on each run): verify recomputes the
    # same fingerprint from it.
    from kandinsky_engine.jobs.verify import verify

    assert "fuse_stages" not in json.loads((tmp_path / "o" / "_RUN.json").read_text())["inputs"]
    check = verify(str(tmp_path / "o"))
    assert check.ok, check.problems
