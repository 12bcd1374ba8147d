from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kandinsky_engine.config import JobConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_config_loads_and_resolves_relative_paths():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.input.manifest == str(REPO / "configs" / "demo_manifest.parquet")
    assert cfg.output.path == str(REPO / "out" / "demo")
    assert cfg.model.prior == "tiny" and cfg.decoder.num_cpus == 0.5


def test_set_overrides_parse_against_field_types(tmp_path):
    path = write_yaml(tmp_path / "job.yaml", {"input": {"manifest": "m.parquet"}, "output": {"path": "out"}})
    cfg = load_config(path, ["decoder.batch_size=8", "defaults.guidance_scale=7.5", "output.image_format=jpeg",
                             "input.rows_per_block=null", "output.path=s3://bucket/out"])
    assert cfg.decoder.batch_size == 8 and cfg.defaults.guidance_scale == 7.5
    assert cfg.output.image_format == "jpeg" and cfg.input.rows_per_block is None
    assert cfg.output.path == "s3://bucket/out"  # URLs are not resolved as local paths
    assert cfg.input.manifest == str(tmp_path / "m.parquet")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["decoder.batch_sise=8"], "batch_sise"),  # typo: extra keys are errors
        (["decoder.batch_size=0"], "batch_size"),
        (["model.dtype=float16", "model.device=cpu"], "needs a cuda device"),
        (["output.image_format=gif"], "image_format"),
        (["defaults.num_inference_steps=0"], "num_inference_steps"),
        (["decoder"], "key.sub=value"),
    ],
)
def test_bad_configs_are_rejected(tmp_path, overrides, message):
    path = write_yaml(tmp_path / "job.yaml", {"input": {"manifest": "m.parquet"}, "output": {"path": "out"}})
    with pytest.raises((ValidationError, ValueError), match=message):
        load_config(path, overrides)


def test_missing_sections_are_reported():
    with pytest.raises(ValidationError, match="output"):
        JobConfig.model_validate({"input": {"manifest": "m.parquet"}})


def test_torch_threads_follow_num_cpus_unless_set():
    cfg = JobConfig.model_validate({"input": {"manifest": "m"}, "output": {"path": "o"},
                                    "decoder": {"num_cpus": 3}, "prior": {"num_cpus": 0.25, "torch_threads": 2}})
    assert cfg.decoder.threads() == 3 and cfg.prior.threads() == 2 and cfg.movq.threads() == 1


@pytest.mark.parametrize("name", ["img2img", "inpaint", "mix", "variation", "controlnet"])
def test_example_configs_are_valid_and_cover_their_task(name, model_cache):
    from kandinsky_engine.manifest import validate_manifest

    cfg = load_config(REPO / "configs" / "examples" / f"{name}.yaml", [f"model.cache_dir={model_cache}"])
    manifest = validate_manifest(cfg)
    assert name in manifest.tasks and manifest.num_rows >= 2
