"""Model families: detection from the decoder's model_index.json, explicit model.family, the family's
defaults (job-wide and per task) filling in only what the job's config leaves unset."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest

from kandinsky_engine.config import GenerationDefaults, ModelConfig
from kandinsky_engine.families import FAMILIES, Family, family_of, resolve_family, with_family
from kandinsky_engine.rows import resolve_params
from tests.conftest import make_config


def test_the_tiny_decoders_are_detected_as_kandinsky22(model_cache):
    for decoder in ("tiny", "tiny-inpaint", "tiny-controlnet"):
        assert family_of(ModelConfig(decoder=decoder, cache_dir=model_cache)).name == "kandinsky22"


def test_an_unknown_pipeline_or_family_is_refused_by_name(model_cache, tiny_root, tmp_path):
    decoder = tmp_path / "decoder"
    shutil.copytree(tiny_root / "decoder", decoder)
    index = json.loads((decoder / "model_index.json").read_text())
    (decoder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="'StableDiffusionPipeline' pipeline, which no model family runs"):
        family_of(ModelConfig(decoder=str(decoder), cache_dir=model_cache))
    # An explicit family wins over the directory's class name; a family that does not exist is named.
    assert family_of(ModelConfig(decoder=str(decoder), family="kandinsky22", cache_dir=model_cache)).name == "kandinsky22"
    with pytest.raises(ValueError, match="model.family='kandinsky9'"):
        family_of(ModelConfig(family="kandinsky9", cache_dir=model_cache))


def test_family_defaults_fill_only_what_the_config_leaves_unset(model_cache, tmp_path):
    family = Family(name="kandinsky22", title="test", pipelines=(), parts=("decoder",), tasks=lambda m, o: (),
                    stages=lambda c, t: [], write_tiny=lambda root: None,
                    defaults={"num_inference_steps": 25, "guidance_scale": 3.0},
                    task_defaults={"img2img": {"guidance_scale": 7.0, "strength": 0.5}})
    config = make_config(model_cache, "m.parquet", str(tmp_path), defaults={"guidance_scale": 5.0})
    resolved = with_family(config, family)
    assert resolved.model.family == "kandinsky22"
    assert resolved.defaults.num_inference_steps == 2  # set by the test config (FAST): kept
    assert resolved.defaults.guidance_scale == 5.0  # set: kept, job-wide and for img2img rows alike
    assert resolved.defaults.task_defaults == {"img2img": {"strength": 0.5}}
    unset = with_family(config.model_copy(update={"defaults": GenerationDefaults()}), family)
    assert unset.defaults.num_inference_steps == 25 and unset.defaults.guidance_scale == 3.0
    assert unset.defaults.task_defaults == {"img2img": {"guidance_scale": 7.0, "strength": 0.5}}
    # Applying it again (as verify does with the config recorded in _RUN.json) changes nothing.
    assert with_family(unset, family).defaults == unset.defaults


def test_per_task_defaults_apply_to_that_tasks_rows_without_the_column():
    defaults = GenerationDefaults(guidance_scale=4.0, task_defaults={"img2img": {"guidance_scale": 7.0}})
    table = pa.table({"id": ["a", "b", "c", "d"], "task": ["text2img", "img2img", "img2img", None],
                      "guidance_scale": pa.array([None, None, 2.0, None], pa.float64())})
    out, problems = resolve_params(table, defaults)
    assert problems == {}
    assert out["task"].to_pylist() == ["text2img", "img2img", "img2img", "text2img"]
    assert out["guidance_scale"].to_pylist() == [4.0, 7.0, 2.0, 4.0]  # a row's own value always wins


def test_kandinsky22_fingerprint_has_no_family_or_per_task_fields(model_cache, tmp_path):
    """2.2 runs keep the fingerprint they had before families existed (outputs resume across the change)."""
    from kandinsky_engine.jobs.resume import fingerprint_inputs

    config, family = resolve_family(make_config(model_cache, "m.parquet", str(tmp_path)))
    assert family is FAMILIES["kandinsky22"]
    inputs = fingerprint_inputs(config, pa.schema([("id", pa.string())]), {"prior": "p", "decoder": "d", "depth": "h"})
    assert "family" not in inputs and "task_defaults" not in inputs["defaults"]
    assert set(inputs["models"]) == {"prior", "decoder", "depth"}
    assert set(inputs["batch_size"]) == {"prior", "hint", "encode", "decoder", "movq"}
