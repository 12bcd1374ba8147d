"""ControlNet (depth hints): parity with the diffusers ControlNet pipelines and the depth stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky_engine import DecoderStage, MovqStage, PriorStage
from kandinsky_engine.stages.hint import HintStage
from kandinsky_engine.stages.movq_encode import MovqEncodeStage
from tests.conftest import batch_of, make_config
from tests.conftest import run_chain as run
from tests.reference import Reference, decode, max_diff
from tests.test_img2img import init_image, png


@pytest.fixture(scope="module")
def stages(model_cache, tmp_path_factory):
    torch.set_num_threads(1)
    config = make_config(model_cache, "unused.parquet", str(tmp_path_factory.mktemp("out")),
                         model={"decoder": "tiny-controlnet"})
    return config, [PriorStage(config), HintStage(config), MovqEncodeStage(config), DecoderStage(config),
                    MovqStage(config)]


@pytest.fixture(scope="module")
def pipes(tiny_root, stages):
    from diffusers import KandinskyV22ControlnetImg2ImgPipeline, KandinskyV22ControlnetPipeline

    reference = Reference(tiny_root)
    controlnet = KandinskyV22ControlnetPipeline.from_pretrained(tiny_root / "decoder-controlnet")
    img2img = KandinskyV22ControlnetImg2ImgPipeline(**controlnet.components)
    for pipe in (controlnet, img2img):
        pipe.set_progress_bar_config(disable=True)
    return reference, controlnet, img2img



def hint_tensor(image: Image.Image) -> torch.Tensor:
    """diffusers' make_hint on an RGB image: (1, 3, H, W) float in [0, 1]."""
    return (torch.from_numpy(np.array(image)).float() / 255.0).permute(2, 0, 1)[None]


def reference(pipes, stages, row, hint: Image.Image, image: Image.Image | None = None, swap: bool = False):
    ref, controlnet, img2img = pipes
    r = {k: v[0] for k, v in batch_of([row], stages[0]).items()}
    emb = ref.embeds(r)
    height, width = int(r["height"]), int(r["width"])
    args = dict(image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds, hint=hint_tensor(hint),
                height=width if swap else height, width=height if swap else width, output_type="np",
                num_inference_steps=int(r["num_inference_steps"]), guidance_scale=float(r["guidance_scale"]),
                generator=torch.Generator("cpu").manual_seed(int(r["seed"])))
    if image is None:
        out = controlnet(**args).images[0]
    else:
        out = img2img(image=image, strength=float(r["strength"]), **args).images[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("size", [64, 128])
def test_controlnet_matches_diffusers(stages, pipes, size):
    hint = init_image(size, size, seed=5)
    row = {"id": "c", "prompt": "a robot", "task": "controlnet", "hint_bytes": png(hint), "width": size,
           "height": size, "num_inference_steps": 3}
    ours = run(stages, [row])
    assert ours["error_message"][0] == ""
    assert max_diff(decode(ours["image"][0]), reference(pipes, stages, row, hint)) <= 1


def test_controlnet_img2img_matches_diffusers_square(stages, pipes):
    hint, image = init_image(64, 64, seed=6), init_image(80, 72, seed=7)
    row = {"id": "ci", "prompt": "a robot", "task": "controlnet_img2img", "hint_bytes": png(hint),
           "image_bytes": png(image), "strength": 0.5, "num_inference_steps": 4}
    ours = decode(run(stages, [row])["image"][0])
    assert max_diff(ours, reference(pipes, stages, row, hint, image)) <= 1


def test_controlnet_img2img_non_square_keeps_orientation(stages, pipes):
    hint, image = init_image(128, 64, seed=8), init_image(128, 64, seed=9)
    row = {"id": "wide", "prompt": "a robot", "task": "controlnet_img2img", "hint_bytes": png(hint),
           "image_bytes": png(image), "width": 128, "height": 64, "strength": 0.5, "num_inference_steps": 4}
    ours = decode(run(stages, [row])["image"][0])
    assert ours.shape == (64, 128, 3)
    # diffusers' swapped preprocess: with the swap undone it computes what we do.
    assert max_diff(ours, reference(pipes, stages, row, hint, image, swap=True)) <= 1


def test_depth_hint_is_make_hint_of_the_depth_pipeline(stages, tiny_root):
    from transformers import pipeline

    from kandinsky_engine.stages.hint import hint_from_depth

    image = init_image(64, 64, seed=10)
    row = {"id": "d", "prompt": "a robot", "task": "controlnet", "image_bytes": png(image)}
    hints = run(stages, [row], until=2)["hint_pixels"]
    depth = pipeline("depth-estimation", model=str(tiny_root / "depth"), device="cpu")(image)["depth"]
    expected = hint_from_depth(depth)
    assert expected.shape == (64, 64, 3) and expected.std() > 0
    np.testing.assert_array_equal(np.frombuffer(hints[0], np.uint8).reshape(64, 64, 3), expected)


def test_rows_in_one_batch_equal_rows_alone(stages):
    rows = [
        {"id": "h", "prompt": "a robot", "task": "controlnet", "hint_bytes": png(init_image(64, 64, seed=11))},
        {"id": "d", "prompt": "a cat", "task": "controlnet", "image_bytes": png(init_image(64, 64, seed=12))},
        {"id": "i", "prompt": "a dog", "task": "controlnet_img2img", "image_bytes": png(init_image(64, 64, seed=13)),
         "strength": 1.0},
        {"id": "bad", "prompt": "x", "task": "controlnet", "hint_bytes": b"junk"},
    ]
    together = run(stages, rows)
    for i, r in enumerate(rows[:3]):
        assert max_diff(decode(together["image"][i]), decode(run(stages, [r])["image"][0])) <= 1, r["id"]
    assert together["error_stage"][3] == "HintStage" and together["error_message"][3].startswith("hint: not a decodable")


def test_depth_of_a_flat_image_is_defined():
    """A constant depth map has no range: transformers' pipeline divides 0 by 0 (NaN, then garbage
    as uint8); the engine maps it to 0. Other maps scale exactly as the pipeline scales them."""
    from kandinsky_engine.stages.hint import depth_to_uint8

    flat = depth_to_uint8(np.full((8, 8), 3.25, np.float32))
    assert flat.dtype == np.uint8 and not flat.any()
    ramp = np.linspace(-1, 5, 64, dtype=np.float32).reshape(8, 8)
    expected = ((ramp - ramp.min()) / (ramp.max() - ramp.min()) * 255).astype("uint8")  # the pipeline's formula
    np.testing.assert_array_equal(depth_to_uint8(ramp), expected)
    assert depth_to_uint8(ramp).max() == 255


def test_depth_runs_in_float32_whatever_the_model_dtype(stages):
    """model.dtype bfloat16 (here on the CPU, which the config refuses but the stage does not care
    about): transformers' depth pipeline would call .numpy() on a bfloat16 tensor and fail; the hint
    stage runs depth in float32 and gives the float32 hints."""
    config = stages[0]
    half = config.model_copy(update={"model": config.model.model_copy(update={"dtype": "bfloat16"})})
    stage = HintStage(half)
    assert stage.model.dtype == torch.float32
    row = {"id": "d", "prompt": "a robot", "task": "controlnet", "image_bytes": png(init_image(64, 64, seed=10))}
    ours = stage(batch_of([row], config))["hint_pixels"][0]
    assert ours == stages[1][1](batch_of([row], config))["hint_pixels"][0]
