"""`kandinsky-batch plan`: the placement arithmetic (pipelines/placement.py), the FLOP estimate, the
measured path on the tiny model on the CPU (no Ray), every family's own stages (measured, from FLOPs,
fitted to a GPU type's memory), and the pinned tasks in flight reaching Ray."""

from __future__ import annotations

import json

import pytest
import yaml

from kandinsky_engine.jobs.plan import flop_costs
from kandinsky_engine.config import JobConfig, StageConfig
from kandinsky_engine.pipelines.placement import (MEMORY_BUDGET, StageCost, cpu_layout, gpu_layout, memory_caps,
                                                  pooled_cpu_layout, shared_layout, split_layout)

from .conftest import FAST, TINY, make_config

STAGES = ("prior", "decoder", "movq")  # Kandinsky 2.2's placed stages
# The issue's shares of one image's GPU time (U-Net 94%, prior 4%, MoVQ 2%), in seconds per row.
ISSUE = {"prior": StageCost(0.04, 8), "decoder": StageCost(0.94, 8), "movq": StageCost(0.02, 8)}
EPS = 1e-9


def reference_costs() -> dict[str, StageCost]:
    config = JobConfig.model_validate({
        "input": {"manifest": "m.parquet"}, "output": {"path": "out"},
        "model": {"device": "cuda", "dtype": "bfloat16", "family": "kandinsky22"},
        "defaults": {"width": 768, "height": 768, "num_inference_steps": 50, "prior_num_inference_steps": 25}})
    return flop_costs(config, tflops=100.0)


def test_flop_estimate_matches_the_reference_figures():
    """The FLOPs counted on the meta device (kandinsky_engine/flops.py) are the reference file's, stage by stage."""
    from kandinsky_engine.families.kandinsky22.fullsize import configs

    ref = configs()["_flops_768"]
    costs = reference_costs()
    tflop = {name: c.seconds_per_row * 100.0 for name, c in costs.items()}  # seconds x 100 TFLOP/s
    assert tflop == pytest.approx({"prior": 2 * (25 * ref["prior_forward_gflop"] + ref["clip_text_gflop"]) / 1e3,
                                   "decoder": 2 * 50 * ref["unet_forward_per_sample_gflop"] / 1e3,
                                   "movq": ref["movq_decode_per_image_gflop"] / 1e3}, rel=1e-3)
    assert sum(tflop.values()) == pytest.approx(212.6, abs=0.05)  # the reference file's per-image figure
    shares = {name: t / sum(tflop.values()) for name, t in tflop.items()}
    assert shares == pytest.approx({"prior": 0.0396, "decoder": 0.9374, "movq": 0.0230}, abs=5e-4)


@pytest.mark.parametrize("costs", [ISSUE, reference_costs()], ids=["issue", "reference"])
def test_stages_that_fit_one_gpu_are_fused_on_whole_gpus_at_the_ceiling(costs):
    for gpus in (1, 8, 64):
        layout = gpu_layout(costs, gpus)
        assert layout.fused and layout.overrides()["fuse_stages"] is True
        decoder = layout.stages["decoder"]
        assert (decoder.actors, decoder.num_gpus, decoder.gpu_memory_fraction) == (gpus, 1.0, None)
        assert layout.images_per_s == pytest.approx(layout.ceiling)  # no GPU idles, nothing to pack
        assert layout.ceiling == pytest.approx(gpus / sum(c.seconds_per_row for c in costs.values()))
        assert set(layout.overrides()) == {"fuse_stages", *STAGES}
        # Every stage runs in the decoder section's actors: scheduled as it, each with its own batch size.
        assert layout.overrides()["prior"] == {**layout.overrides()["decoder"], "batch_size": costs["prior"].batch_size}
    # Known memory needs that one GPU cannot hold together: no fused layout.
    heavy = {name: StageCost(c.seconds_per_row, 8, memory=0.4) for name, c in costs.items()}
    assert not gpu_layout(heavy, 8).fused


@pytest.mark.parametrize("costs", [ISSUE, reference_costs()], ids=["issue", "reference"])
def test_one_gpu_shared_by_stage_time_when_the_stages_do_not_fit_one_actor(costs):
    layout = shared_layout(costs, 1)
    shares = [s.num_gpus for s in layout.stages.values()]
    assert sum(shares) <= 1 + EPS and all(round(x * 100) == pytest.approx(x * 100) for x in shares)
    assert all(s.actors == 1 for s in layout.stages.values())
    decoder = layout.stages["decoder"]
    assert layout.images_per_s == decoder.rows_per_s  # every other pool serves more
    assert 0.98 * layout.ceiling <= layout.images_per_s <= layout.ceiling
    assert decoder.max_tasks_in_flight == 2 and layout.stages["prior"].max_tasks_in_flight is None
    assert sum(s.gpu_memory_fraction for s in layout.stages.values()) <= 1 + EPS  # not measured: equal shares


def test_split_layouts_use_whole_gpus_so_no_share_is_stranded():
    """Where the stages cannot share an actor, each pool gets whole GPUs: a fractional prior (0.63) next
    to fractional MoVQs (0.36) could find its GPU taken by two MoVQs (Ray packs best-fit, pools in order)."""
    heavy = {"prior": StageCost(0.15, 8, memory=0.5), "decoder": StageCost(0.94, 8, memory=0.5),
             "movq": StageCost(0.05, 8, memory=0.5)}  # measured-like: prior and MoVQ slow for their FLOPs
    for gpus in (8, 64):
        layout = gpu_layout(heavy, gpus)
        assert not layout.fused and all(s.num_gpus == 1.0 for s in layout.stages.values())
        counts = {name: s.actors for name, s in layout.stages.items()}
        assert sum(counts.values()) == gpus
        # No GPU moved between pools would serve more images/s.
        rate = layout.images_per_s
        for a in STAGES:
            for b in STAGES:
                if a != b and counts[a] > 1:
                    moved = {**counts, a: counts[a] - 1, b: counts[b] + 1}
                    assert min(moved[n] / heavy[n].seconds_per_row for n in STAGES) <= rate + EPS
    assert split_layout(heavy, 64).stages["decoder"].actors == 52 and split_layout(heavy, 64).images_per_s > 52
    slow = {**heavy, "prior": StageCost(3.0, 8, memory=0.5)}  # the prior alone outweighs the U-Net
    layout = split_layout(slow, 4)
    assert layout.images_per_s == layout.stages["prior"].rows_per_s < layout.stages["decoder"].rows_per_s
    with pytest.raises(ValueError, match="cannot share one GPU"):  # too few GPUs for a pool each
        gpu_layout(heavy, 2)


def test_memory_caps_follow_measured_peaks_and_refuse_what_cannot_fit():
    caps = memory_caps({"prior": StageCost(1, 1, memory=0.1), "movq": StageCost(1, 1, memory=0.3)})
    assert caps == {"prior": 0.25, "movq": 0.75}
    with pytest.raises(ValueError, match="need 95% of one GPU's memory"):
        memory_caps({"prior": StageCost(1, 1, memory=0.5), "movq": StageCost(1, 1, memory=MEMORY_BUDGET - 0.45)})


def test_cpu_layout_is_fused_one_single_thread_actor_per_core():
    small = cpu_layout(ISSUE, 2)  # what the benchmark measured fastest on 2 cores
    decoder = small.stages["decoder"]
    assert small.fused and (decoder.actors, decoder.torch_threads) == (2, 1)
    assert decoder.actors * decoder.num_cpus <= 2 - 1 + EPS  # one CPU stays free for reading and writing
    assert small.images_per_s == pytest.approx(small.ceiling)
    big = cpu_layout(ISSUE, 64)
    assert big.stages["decoder"].actors == 64 and big.images_per_s == pytest.approx(32 * small.images_per_s)
    with pytest.raises(ValueError, match="at least 2"):
        cpu_layout(ISSUE, 1)


def test_pooled_cpu_layout_keeps_one_cpu_free_and_adds_actors_where_rows_wait():
    small = pooled_cpu_layout(ISSUE, 2)  # three 1-thread actors on 2 cores: no room for more
    assert all(s.actors == 1 and s.torch_threads == 1 for s in small.stages.values())
    assert sum(s.num_cpus * s.actors for s in small.stages.values()) <= 2 - 1 + EPS
    big = pooled_cpu_layout(ISSUE, 64)
    assert sum(s.actors for s in big.stages.values()) == 64
    assert sum(s.num_cpus * s.actors for s in big.stages.values()) <= 64 - 1 + EPS
    assert big.stages["decoder"].actors > 40 and big.images_per_s > 40 * small.images_per_s
    assert big.images_per_s < cpu_layout(ISSUE, 64).images_per_s  # the fused layout does better


@pytest.fixture
def tiny_job(model_cache, tmp_path):
    path = tmp_path / "job.yaml"
    stage = {"batch_size": 2, "torch_threads": 1}
    path.write_text(yaml.safe_dump({
        "input": {"manifest": "m.parquet"}, "output": {"path": "out"}, "model": {"cache_dir": model_cache, **TINY},
        "defaults": dict(FAST), "prior": stage, "decoder": {**stage, "batch_size": 4}, "movq": stage}))
    return path


def test_measured_plan_on_the_tiny_model_writes_sections_a_job_accepts(tiny_job, tmp_path, capsys):
    from kandinsky_engine.jobs.cli import main

    out = tmp_path / "plan.yaml"
    assert main(["plan", str(tiny_job), "--cpus", "2", "--repeats", "1", "--write", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "cpu" and report["images_per_s"] > 0
    assert all(report["seconds_per_row"][name] > 0 for name in STAGES)
    sections = yaml.safe_load(out.read_text())
    assert set(sections) == {"fuse_stages", *STAGES} and sections["fuse_stages"] is True
    assert sections["decoder"]["batch_size"] == 4 and sections["prior"] == {**sections["decoder"], "batch_size": 2}
    assert sections["decoder"]["max_tasks_in_flight"] == 2 and sections["decoder"]["actors"] == 2
    job = yaml.safe_load(tiny_job.read_text())
    merged = JobConfig.model_validate({**job, "fuse_stages": True,
                                       **{name: {**job[name], **sections[name]} for name in STAGES}})
    assert merged.decoder.num_cpus * merged.decoder.actors <= 1 + EPS  # one fused pool
    assert merged.decoder.threads() == 1  # the threads it was measured with

    full = tmp_path / "full.yaml"
    assert main(["plan", str(tiny_job), "--gpus", "8", "--from-flops", "--set", "model.device=cuda",
                 *(f"--set=defaults.{key}={value}" for key, value in (("width", 768), ("height", 768),
                                                                     ("num_inference_steps", 50))),
                 "--write", str(full), "--full"]) == 0
    config = JobConfig.model_validate(yaml.safe_load(full.read_text()))
    assert config.model.device == "cuda" and config.input.manifest == "m.parquet"
    assert (config.fuse_stages, config.decoder.actors, config.decoder.num_gpus) == (True, 8, 1.0)
    assert "fused stages: one actor per GPU (8)" in capsys.readouterr().out


def test_plan_refuses_a_device_that_does_not_match(tiny_job, capsys):
    from kandinsky_engine.jobs.cli import main

    assert main(["plan", str(tiny_job), "--gpus", "1", "--set", "model.device=cpu"]) == 2
    assert "model.device is 'cpu'" in capsys.readouterr().err
    assert main(["plan", str(tiny_job), "--cpus", "4", "--from-flops"]) == 2
    assert "use it with --gpus" in capsys.readouterr().err
    # bench_gpu.py measures Kandinsky 2.2's stages: another family's plan names what it can use instead.
    assert main(["plan", str(tiny_job), "--gpus", "2", "--from-measured", "none.json", "--set", "model.decoder=tiny-k3",
                 "--set", "model.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "Kandinsky 3 job" in err and "--from-flops" in err


# Each family's tiny model, and the config sections of the stages its plan places, in order.
FAMILY_MODELS = {
    "kandinsky21": ({"prior": "tiny-k21", "decoder": "tiny-k21"}, ("prior", "decoder", "movq")),
    "kandinsky3": ({"decoder": "tiny-k3"}, ("text_encoder", "decoder", "movq")),
    "kandinsky20": ({"decoder": "tiny-k20"}, ("text_encoder", "decoder", "movq")),
}


def family_job(model_cache: str, tmp_path, family: str):
    """A job config file on the family's tiny model, its stage sections with batch sizes only."""
    model, stages = FAMILY_MODELS[family]
    path = tmp_path / f"{family}.yaml"
    sizes = dict(zip(stages, (2, 4, 2)))
    path.write_text(yaml.safe_dump({
        "input": {"manifest": "m.parquet"}, "output": {"path": "out"}, "model": {"cache_dir": model_cache, **model},
        "defaults": dict(FAST), **{name: {"batch_size": size, "torch_threads": 1} for name, size in sizes.items()}}))
    return path


def load_as_family(path, family: str):
    """The job config in `path` as a run resolves it; it must be of `family`."""
    from kandinsky_engine.config import load_config
    from kandinsky_engine.families import resolve_family

    config, resolved = resolve_family(load_config(path))
    assert resolved.name == family
    return config


@pytest.mark.parametrize("family", FAMILY_MODELS)
def test_every_family_is_measured_on_its_own_stages_and_written_as_its_sections(family, model_cache, tmp_path,
                                                                                 capsys):
    from kandinsky_engine.jobs.cli import main

    _, stages = FAMILY_MODELS[family]
    job, out = family_job(model_cache, tmp_path, family), tmp_path / "plan.yaml"
    assert main(["plan", str(job), "--cpus", "2", "--repeats", "1", "--write", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["seconds_per_row"]) == list(stages) and all(t > 0 for t in report["seconds_per_row"].values())
    assert report["kind"] == "cpu" and report["fuse_stages"] is True and report["images_per_s"] > 0
    sections = yaml.safe_load(out.read_text())
    assert list(sections) == ["fuse_stages", *stages]  # the sections this family's config uses
    # Merged into the job's config (the --write header says: they replace the same keys), it is a job of the family.
    data = yaml.safe_load(job.read_text())
    merged = tmp_path / "merged.yaml"
    merged.write_text(yaml.safe_dump({**data, **{k: v if k == "fuse_stages" else {**data[k], **v}
                                                for k, v in sections.items()}}))
    config = load_as_family(merged, family)
    assert config.fuse_stages and (config.decoder.actors, config.decoder.threads()) == (2, 1)
    assert [getattr(config, name).batch_size for name in stages] == [2, 4, 2]  # the job's own, as measured


@pytest.mark.parametrize("family, gpu, gpus, fused", [("kandinsky21", "L4", 8, True), ("kandinsky20", "T4", 8, True),
                                                     ("kandinsky3", "A10G", 4, False)])
def test_every_family_is_placed_from_its_flops_within_a_gpu_types_memory(family, gpu, gpus, fused, model_cache,
                                                                         tmp_path, capsys):
    """The released models' FLOPs and memory: Kandinsky 2.1 and 2.0 fit one GPU fused; Kandinsky 3's T5
    (16.25 GiB) and U-Net do not fit one A10G together, so each stage gets whole GPUs."""
    from kandinsky_engine.jobs.cli import main

    _, stages = FAMILY_MODELS[family]
    job, out = family_job(model_cache, tmp_path, family), tmp_path / "full.yaml"
    assert main(["plan", str(job), "--gpus", str(gpus), "--from-flops", "--gpu-type", gpu, "--set", "model.device=cuda",
                 "--write", str(out), "--full", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["stages"]) == list(stages) and report["fuse_stages"] is fused
    assert all(0 < share < 0.9 for share in report["memory_share"].values())  # each fits a whole GPU
    if not fused:
        assert sum(s["actors"] for s in report["stages"].values()) == gpus
        assert all(s["num_gpus"] == 1.0 for s in report["stages"].values())
        assert sum(report["memory_share"].values()) > 0.9  # why they are not fused
    config = load_as_family(out, family)  # --full: the whole config, a job of the family
    assert config.model.device == "cuda" and config.fuse_stages is fused
    assert config.decoder.actors == (gpus if fused else report["stages"]["decoder"]["actors"])


def test_a_gpu_too_small_for_a_stage_is_refused_naming_it(model_cache, tmp_path, capsys):
    """Kandinsky 3's T5 encoder (17 GiB with its context) fits no T4 (15 GiB): no layout can place it."""
    from kandinsky_engine.jobs.cli import main

    job = family_job(model_cache, tmp_path, "kandinsky3")
    assert main(["plan", str(job), "--gpus", "8", "--from-flops", "--gpu-type", "T4", "--set", "model.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "no layout fits one T4" in err and "text_encoder needs 17." in err
    assert "decoder needs" not in err  # the U-Net fits


def test_flops_of_kandinsky20_are_the_released_models():
    """The counts of the released configuration docs/kandinsky20.md states (512x512, one forward each)."""
    from kandinsky_engine.flops import stage_gflop

    config = JobConfig.model_validate({
        "input": {"manifest": "m"}, "output": {"path": "o"}, "model": {"decoder": "x", "family": "kandinsky20"},
        "defaults": {"width": 512, "height": 512, "num_inference_steps": 1, "guidance_scale": 1.0}})
    gflop = stage_gflop(config, "kandinsky20", ["text_encoder", "encode", "decoder", "movq"])
    assert gflop == pytest.approx({"text_encoder": 50.5, "encode": 1116.7, "decoder": 869.7, "movq": 2514.5}, abs=0.05)


def test_stage_args_pass_tasks_in_flight_only_when_set(model_cache, tmp_path):
    from kandinsky_engine import DecoderStage
    from kandinsky_engine.pipelines.generate import stage_args

    config = make_config(model_cache, "m.parquet", str(tmp_path))
    pinned = stage_args(DecoderStage, StageConfig(actors=3, max_tasks_in_flight=2), config)["compute"]
    assert (pinned.min_size, pinned.max_tasks_in_flight_per_actor) == (3, 2)
    assert stage_args(DecoderStage, StageConfig(), config)["compute"].max_tasks_in_flight_per_actor is None
