"""`kandinsky-batch plan`: the placement arithmetic (pipelines/placement.py), the FLOP estimate, the
measured path on the tiny model on the CPU (no Ray), and the pinned tasks in flight reaching Ray."""

from __future__ import annotations

import json

import pytest
import yaml

from kandinsky_engine.jobs.plan import flop_costs
from kandinsky_engine.config import JobConfig, StageConfig
from kandinsky_engine.pipelines.placement import (MEMORY_BUDGET, STAGES, StageCost, cpu_layout, dedicated_layout, gpu_layout,
                                 memory_caps)

from .conftest import FAST, TINY, make_config

# The issue's shares of one image's GPU time (U-Net 94%, prior 4%, MoVQ 2%), in seconds per row.
ISSUE = {"prior": StageCost(0.04, 8), "decoder": StageCost(0.94, 8), "movq": StageCost(0.02, 8)}
EPS = 1e-9


def reference_costs() -> dict[str, StageCost]:
    config = JobConfig.model_validate({
        "input": {"manifest": "m.parquet"}, "output": {"path": "out"},
        "model": {"device": "cuda", "dtype": "bfloat16"},
        "defaults": {"width": 768, "height": 768, "num_inference_steps": 50, "prior_num_inference_steps": 25}})
    return flop_costs(config, tflops=100.0)


def test_flop_estimate_matches_the_reference_figures():
    costs = reference_costs()
    tflop = {name: c.seconds_per_row * 100.0 for name, c in costs.items()}  # seconds x 100 TFLOP/s
    assert sum(tflop.values()) == pytest.approx(212.6, abs=0.05)  # the reference file's per-image figure
    shares = {name: t / sum(tflop.values()) for name, t in tflop.items()}
    assert shares == pytest.approx({"prior": 0.0396, "decoder": 0.9374, "movq": 0.0230}, abs=5e-4)


@pytest.mark.parametrize("costs", [ISSUE, reference_costs()], ids=["issue", "reference"])
def test_one_gpu_shares_it_by_stage_time_and_the_unet_sets_the_pace(costs):
    layout = gpu_layout(costs, 1)
    shares = [s.num_gpus for s in layout.stages.values()]
    assert sum(shares) <= 1 + EPS and all(round(x * 100) == pytest.approx(x * 100) for x in shares)
    assert all(s.actors == 1 for s in layout.stages.values())
    decoder = layout.stages["decoder"]
    assert layout.images_per_s == decoder.rows_per_s  # every other pool serves more
    assert layout.ceiling == pytest.approx(1 / sum(c.seconds_per_row for c in costs.values()))
    assert 0.98 * layout.ceiling <= layout.images_per_s <= layout.ceiling
    assert decoder.max_tasks_in_flight == 2 and layout.stages["prior"].max_tasks_in_flight is None
    assert sum(s.gpu_memory_fraction for s in layout.stages.values()) <= 1 + EPS  # not measured: equal shares


@pytest.mark.parametrize("costs, unets64", [(ISSUE, 60), (reference_costs(), 59)], ids=["issue", "reference"])
def test_many_gpus_give_the_unet_whole_gpus_fed_by_prior_and_movq(costs, unets64):
    rates = []
    for gpus, unets in ((8, 7), (64, unets64)):
        layout = gpu_layout(costs, gpus)
        prior, decoder, movq = (layout.stages[name] for name in STAGES)
        assert (decoder.actors, decoder.num_gpus, decoder.gpu_memory_fraction) == (unets, 1.0, None)
        assert prior.actors == movq.actors == gpus - unets  # one of each per prior + MoVQ GPU
        assert prior.num_gpus + movq.num_gpus <= 1 + EPS
        assert prior.gpu_memory_fraction + movq.gpu_memory_fraction <= 1 + EPS
        assert min(prior.rows_per_s, movq.rows_per_s) >= decoder.rows_per_s == layout.images_per_s
        # One U-Net GPU more would starve: the prior + MoVQ GPUs left could not feed it.
        feed = min((prior.actors - 1) * s.num_gpus / costs[name].seconds_per_row
                   for name, s in (("prior", prior), ("movq", movq)))
        assert feed < (unets + 1) / costs["decoder"].seconds_per_row
        rates.append(layout.images_per_s)
        assert layout.images_per_s >= 0.9 * layout.ceiling
    assert gpu_layout(costs, 1).images_per_s < rates[0] < rates[1]


def test_few_gpus_are_shared_like_one_and_slow_feeders_are_the_bottleneck():
    two = gpu_layout(ISSUE, 2)  # a dedicated prior + MoVQ GPU would idle 94% of the time
    assert all(s.actors == 2 and s.num_gpus < 1 for s in two.stages.values())
    assert two.images_per_s == pytest.approx(2 * gpu_layout(ISSUE, 1).images_per_s)
    slow = {**ISSUE, "prior": StageCost(3.0, 8)}  # the prior alone outweighs the U-Net
    layout = dedicated_layout(slow, 4)
    assert layout.stages["decoder"].actors == 1
    assert layout.images_per_s == layout.stages["prior"].rows_per_s < layout.stages["decoder"].rows_per_s


def test_memory_caps_follow_measured_peaks_and_refuse_what_cannot_fit():
    caps = memory_caps({"prior": StageCost(1, 1, memory=0.1), "movq": StageCost(1, 1, memory=0.3)})
    assert caps == {"prior": 0.25, "movq": 0.75}
    with pytest.raises(ValueError, match="need 95% of one GPU's memory"):
        memory_caps({"prior": StageCost(1, 1, memory=0.5), "movq": StageCost(1, 1, memory=MEMORY_BUDGET - 0.45)})


def test_cpu_layout_keeps_one_cpu_free_and_adds_actors_where_rows_wait():
    small = cpu_layout(ISSUE, 2)  # three 1-thread actors on 2 cores: no room for more
    assert all(s.actors == 1 and s.torch_threads == 1 for s in small.stages.values())
    assert sum(s.num_cpus * s.actors for s in small.stages.values()) <= 2 - 1 + EPS
    big = cpu_layout(ISSUE, 64)
    assert sum(s.actors for s in big.stages.values()) == 64
    assert sum(s.num_cpus * s.actors for s in big.stages.values()) <= 64 - 1 + EPS
    assert big.stages["decoder"].actors > 40 and big.images_per_s > 40 * small.images_per_s
    with pytest.raises(ValueError, match="at least 2"):
        cpu_layout(ISSUE, 1)


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
    assert set(sections) == set(STAGES) and sections["decoder"]["batch_size"] == 4
    assert sections["decoder"]["max_tasks_in_flight"] == 2
    job = yaml.safe_load(tiny_job.read_text())
    merged = JobConfig.model_validate({**job, **{name: {**job[name], **sections[name]} for name in STAGES}})
    assert sum(getattr(merged, name).num_cpus * getattr(merged, name).actors for name in STAGES) <= 1 + EPS
    assert merged.decoder.threads() == 1  # the threads it was measured with

    full = tmp_path / "full.yaml"
    assert main(["plan", str(tiny_job), "--gpus", "8", "--from-flops", "--set", "model.device=cuda",
                 *(f"--set=defaults.{key}={value}" for key, value in (("width", 768), ("height", 768),
                                                                     ("num_inference_steps", 50))),
                 "--write", str(full), "--full"]) == 0
    config = JobConfig.model_validate(yaml.safe_load(full.read_text()))
    assert config.model.device == "cuda" and config.input.manifest == "m.parquet"
    assert (config.decoder.actors, config.decoder.num_gpus) == (7, 1.0)
    assert "U-Net on 7 whole GPUs" in capsys.readouterr().out


def test_plan_refuses_a_device_that_does_not_match(tiny_job, capsys):
    from kandinsky_engine.jobs.cli import main

    assert main(["plan", str(tiny_job), "--gpus", "1", "--set", "model.device=cpu"]) == 2
    assert "model.device is 'cpu'" in capsys.readouterr().err
    assert main(["plan", str(tiny_job), "--cpus", "4", "--from-flops"]) == 2
    assert "use it with --gpus" in capsys.readouterr().err
    assert main(["plan", str(tiny_job), "--cpus", "4", "--set", "model.decoder=tiny-k3"]) == 2
    assert "a Kandinsky 3 model, which it does not place yet" in capsys.readouterr().err


def test_stage_args_pass_tasks_in_flight_only_when_set(model_cache, tmp_path):
    from kandinsky_engine import DecoderStage
    from kandinsky_engine.pipelines.generate import stage_args

    config = make_config(model_cache, "m.parquet", str(tmp_path))
    pinned = stage_args(DecoderStage, StageConfig(actors=3, max_tasks_in_flight=2), config)["compute"]
    assert (pinned.min_size, pinned.max_tasks_in_flight_per_actor) == (3, 2)
    assert stage_args(DecoderStage, StageConfig(), config)["compute"].max_tasks_in_flight_per_actor is None
