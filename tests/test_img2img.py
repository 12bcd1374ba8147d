"""img2img: parity with KandinskyV22Img2ImgPipeline, and the non-square orientation fix."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky_engine import DecoderStage, MovqStage, PriorStage
from kandinsky_engine.stages.movq_encode import MovqEncodeStage
from tests.conftest import batch_of, make_config
from tests.conftest import run_chain as run
from tests.reference import Reference, decode, max_diff


def init_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth gradient plus noise: something the MoVQ encoder has to actually encode."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stages(model_cache, tmp_path_factory):
    torch.set_num_threads(1)
    config = make_config(model_cache, "unused.parquet", str(tmp_path_factory.mktemp("out")))
    return config, [PriorStage(config), MovqEncodeStage(config), DecoderStage(config), MovqStage(config)]


@pytest.fixture(scope="module")
def reference(tiny_root, stages):
    return Reference(tiny_root)



@pytest.mark.parametrize(
    "size, strength, steps",
    [(64, 0.3, 4), (64, 0.75, 4), (128, 0.5, 3), (64, 1.0, 2)],
)
def test_img2img_matches_diffusers_square(stages, reference, size, strength, steps):
    init = init_image(size + 16, size - 8)  # not the output size: exercises the resize too
    row = {"id": "r", "prompt": "a cat", "task": "img2img", "image_bytes": png(init), "width": size, "height": size,
           "strength": strength, "num_inference_steps": steps}
    out = run(stages, [row])
    assert out["error_message"][0] == ""
    resolved = {k: v[0] for k, v in batch_of([row], stages[0]).items()}
    assert max_diff(decode(out["image"][0]), reference.img2img(resolved, init)) <= 1


def test_img2img_non_square_keeps_requested_orientation(stages, reference):
    """diffusers 0.42 swaps height and width in img2img preprocessing; we do not."""
    init = init_image(128, 64)
    row = {"id": "wide", "prompt": "a harbour", "task": "img2img", "image_bytes": png(init), "width": 128,
           "height": 64, "strength": 0.5, "num_inference_steps": 4}
    ours = decode(run(stages, [row])["image"][0])
    assert ours.shape == (64, 128, 3)  # 64 high, 128 wide, as requested
    resolved = {k: v[0] for k, v in batch_of([row], stages[0]).items()}
    buggy = reference.img2img(resolved, init)
    assert buggy.shape == (128, 64, 3)  # diffusers as released: transposed orientation
    # With the swap undone, diffusers computes exactly what we do.
    assert max_diff(ours, reference.img2img(resolved, init, swap_size=True)) <= 1


def test_img2img_and_text2img_rows_share_a_batch(stages):
    init = init_image(64, 64)
    rows = [
        {"id": "t", "prompt": "a cat"},
        {"id": "i", "prompt": "a cat", "task": "img2img", "image_bytes": png(init), "strength": 0.5,
         "num_inference_steps": 4},
        {"id": "bad", "prompt": "a cat", "task": "img2img", "image_bytes": b"not an image"},
        {"id": "weak", "prompt": "a cat", "task": "img2img", "image_bytes": png(init), "strength": 0.1},
    ]
    together = run(stages, rows)
    alone = run(stages, [rows[1]])
    assert max_diff(decode(together["image"][1]), decode(alone["image"][0])) <= 1
    assert together["image"][0] is not None and together["error_message"][0] == ""
    assert together["image"][2] is None and together["error_stage"][2] == "MovqEncodeStage"
    assert "not a decodable image" in together["error_message"][2]
    assert together["image"][3] is None and "leaves no step to run" in together["error_message"][3]
