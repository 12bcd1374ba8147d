"""The GPU in the run fingerprint, on the CPU: what is recorded, what a resume on another GPU model or
library build does (refused unless --allow-device-change, recorded when allowed), and model.fp8's
own fingerprint value and refusals off-Hopper."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from kandinsky_engine.jobs.resume import FingerprintMismatch, choose_output, fingerprint, fingerprint_inputs, with_gpu
from kandinsky_engine import gpu_identity
from kandinsky_engine.config import JobConfig
from tests.conftest import make_config, write_manifest

H100 = {"model": "NVIDIA H100 80GB HBM3", "capability": "9.0", "driver": "580.159.04", "cuda": "12.8",
        "cudnn": "91002", "cublas": "12.8.4"}
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string())])
WEIGHTS = {"prior": "p", "decoder": "d", "depth": "h"}


def test_cpu_jobs_record_no_gpu_and_the_gpu_stays_out_of_the_hash(model_cache, tmp_path):
    config = make_config(model_cache, "m.parquet", str(tmp_path))
    inputs = fingerprint_inputs(config, SCHEMA, WEIGHTS)
    assert with_gpu(config, inputs) == inputs and "gpu" not in inputs  # CPU fingerprints are as before
    assert gpu_identity.record() is None  # no CUDA here
    cuda = config.model_copy(update={"model": config.model.model_copy(update={"device": "cuda"})})
    assert gpu_identity.job_record(cuda) == {"model": None}  # no GPU here or in a cluster: unknown
    assert fingerprint({**inputs, "gpu": H100}) == fingerprint(inputs)  # compared apart (check_device)


def test_another_gpu_model_or_library_build_is_refused_unless_allowed(model_cache, tmp_path):
    config = make_config(model_cache, "m.parquet", str(tmp_path / "out"))
    inputs = {**fingerprint_inputs(config, SCHEMA, WEIGHTS), "gpu": H100}
    out = Path(config.output.path)
    out.mkdir()
    (out / "_RUN.json").write_text(json.dumps({"fingerprint": fingerprint(inputs), "inputs": inputs}))
    assert choose_output(config, inputs, overwrite=False, new_run=False) == (str(out), "resume")
    assert choose_output(config, {**inputs, "gpu": {**H100, "driver": "590.1"}}, overwrite=False,
                         new_run=False)[1] == "resume"  # a driver alone: allowed (and recorded)
    for change in ({"model": "NVIDIA A100-SXM4-80GB", "capability": "8.0"}, {"cublas": "12.9.1"}):
        other = {**inputs, "gpu": {**H100, **change}}
        with pytest.raises(FingerprintMismatch, match=r"was computed on NVIDIA H100 80GB HBM3 .*--allow-device-change"):
            choose_output(config, other, overwrite=False, new_run=False)
        assert choose_output(config, other, overwrite=False, new_run=False, allow_device_change=True)[1] == "resume"
    # An output whose first run's GPU is unknown (a probe that found none) never blocks a resume.
    (out / "_RUN.json").write_text(json.dumps({"fingerprint": fingerprint(inputs), "inputs": {**inputs, "gpu": None}}))
    assert choose_output(config, inputs, overwrite=False, new_run=False)[1] == "resume"


@pytest.mark.ray
def test_a_resume_on_another_gpu_is_refused_then_allowed_and_recorded(ray_cluster, model_cache, tmp_path,
                                                                     monkeypatch):
    """The real run_job and CLI path on the CPU, with the GPU record of the driver replaced: the first run
    records H100; a rerun on an A100 stops before computing; with --allow-device-change it resumes, and
    _RUN.json lists the change."""
    from kandinsky_engine.jobs.cli import main

    seen = {"gpu": H100}
    monkeypatch.setattr(gpu_identity, "job_record", lambda config: seen["gpu"])
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": "a cat"} for i in range(2)])
    config = make_config(model_cache, manifest, str(tmp_path / "out"), input={"rows_per_block": 2})
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    assert main(["run", str(path)]) == 0
    run = json.loads((tmp_path / "out" / "_RUN.json").read_text())
    assert run["inputs"]["gpu"] == H100 and "device_changes" not in run
    seen["gpu"] = {**H100, "model": "NVIDIA A100-SXM4-80GB", "capability": "8.0"}
    assert main(["run", str(path)]) == 2  # refused, nothing changed
    assert json.loads((tmp_path / "out" / "_RUN.json").read_text()) == run
    assert main(["run", str(path), "--allow-device-change"]) == 0
    changes = json.loads((tmp_path / "out" / "_RUN.json").read_text())["device_changes"]
    assert [(c["from"]["model"], c["to"]["model"], c["changed"], c["allowed_by"]) for c in changes] == [
        ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", ["model", "capability"], "--allow-device-change")]
    assert main(["run", str(path)]) == 0  # the output's GPU is now the A100: resumes without the flag


def test_fp8_has_its_own_fingerprint_value_and_is_refused_off_hopper(model_cache, tmp_path):
    from kandinsky_engine import fp8

    data = make_config(model_cache, "m.parquet", str(tmp_path)).model_dump(mode="json")
    with pytest.raises(ValueError, match="model.fp8 needs a cuda device"):
        JobConfig.model_validate({**data, "model": {**data["model"], "fp8": True, "device": "cpu"}})
    with pytest.raises(ValueError, match="set model.dtype: bfloat16"):
        JobConfig.model_validate({**data, "model": {**data["model"], "fp8": True, "device": "cuda", "dtype": "float32"}})
    bf16 = JobConfig.model_validate({**data, "model": {**data["model"], "device": "cuda", "dtype": "bfloat16"}})
    float8 = bf16.model_copy(update={"model": bf16.model.model_copy(update={"fp8": True})})
    options = fingerprint_inputs(float8, SCHEMA, WEIGHTS)["model_options"]
    assert options == {"fp8": fp8.fingerprint_value()} and "torchao" in options["fp8"]
    assert fingerprint(fingerprint_inputs(float8, SCHEMA, WEIGHTS)) != fingerprint(fingerprint_inputs(bf16, SCHEMA, WEIGHTS))
    # The stage's own check, before any layer is touched: the CPU (and any GPU below compute 8.9) is refused.
    with pytest.raises(ValueError, match=r"model.fp8 needs an NVIDIA GPU of compute capability 8.9 or newer.*cpu"):
        fp8.check_device(torch.device("cpu"), torch.bfloat16)
