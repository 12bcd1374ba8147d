"""Sizes that are not multiples of 64 keep the input's borders and scale (item 7).

The model works at the size rounded up to 64. With size_policy `crop`, an input is resized to the
requested size and padded to the working size, centred where the output is cropped back, instead
of being stretched to the working size (which zoomed a 100x100 input by 1.28 and cut its border).

The tiny random MoVQ does not reconstruct colours, so the frame cannot be looked for in the output
pixels. Two things are checked instead: what the encoders see (the framed input, unscaled, at the
centre, its frame repeated outwards) and that a 100x100 output is exactly the centre of the 128x128
output for the input padded by hand, a size where the engine equals diffusers (test_img2img.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky_engine.stages.hint import hint_from_depth
from kandinsky_engine.inputs import unpack
from kandinsky_engine.stages.movq_encode import MovqEncodeStage
from tests.conftest import batch_of, make_config
from tests.conftest import run_chain as run
from tests.reference import decode, max_diff

# The stage chains of the parity tests, as fixtures: (config, [stage, ...]) per decoder.
from tests.test_controlnet import stages as controlnet  # noqa: F401
from tests.test_img2img import stages as img2img  # noqa: F401
from tests.test_inpaint import stages as inpaint  # noqa: F401

RED, BLUE = (255, 0, 0), (0, 0, 255)
WORK = 128  # the working size of 72 and 100


def framed(width: int, height: int, frame: int = 10) -> np.ndarray:
    """A blue picture in a red frame, (height, width, 3) uint8."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = RED
    pixels[frame:-frame, frame:-frame] = BLUE
    return pixels


def centred(width: int, height: int) -> tuple[int, int]:
    return (WORK - height) // 2, (WORK - width) // 2


def padded_by_hand(pixels: np.ndarray, fill: int | None = None) -> np.ndarray:
    top, left = centred(pixels.shape[1], pixels.shape[0])
    widths = ((top, WORK - pixels.shape[0] - top), (left, WORK - pixels.shape[1] - left))
    widths += ((0, 0),) * (pixels.ndim - 2)
    return np.pad(pixels, widths, mode="edge") if fill is None else np.pad(pixels, widths, constant_values=fill)


def window(image: np.ndarray, width: int, height: int) -> np.ndarray:
    top, left = centred(width, height)
    return image[top : top + height, left : left + width]


def as_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((pixels[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def i2i_row(pixels: np.ndarray, **extra) -> dict:
    return {"id": "f", "prompt": "a window", "task": "img2img", "image_bytes": png_of(pixels), "strength": 0.25,
            "num_inference_steps": 8, "width": pixels.shape[1], "height": pixels.shape[0], "seed": 3, **extra}


def png_of(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("width, height", [(100, 100), (100, 72)])
def test_img2img_encoder_sees_the_frame_in_place(img2img, width, height):
    config, stages = img2img
    pixels, _ = stages[1]._prepare(batch_of([i2i_row(framed(width, height))], config), 0)
    seen = as_uint8(pixels)
    assert seen.shape == (WORK, WORK, 3)
    np.testing.assert_array_equal(window(seen, width, height), framed(width, height))  # not zoomed
    np.testing.assert_array_equal(seen, padded_by_hand(framed(width, height)))  # the frame repeated outwards


@pytest.mark.parametrize("width, height", [(100, 100), (100, 72)])
def test_img2img_output_is_the_centre_of_the_padded_run(img2img, width, height):
    source = framed(width, height)
    ours = decode(run(img2img, [i2i_row(source)])["image"][0])
    assert ours.shape == (height, width, 3)
    big = decode(run(img2img, [i2i_row(padded_by_hand(source))])["image"][0])
    assert max_diff(ours, window(big, width, height)) <= 1
    # What stretching gives instead (the old behaviour) is far from it: the check can tell.
    stretched = np.asarray(Image.fromarray(source).resize((WORK, WORK), Image.Resampling.BICUBIC, reducing_gap=1))
    old = decode(run(img2img, [i2i_row(stretched)])["image"][0])
    assert max_diff(ours, window(old, width, height)) > 10


def test_round_up_still_stretches_to_the_working_size(model_cache, tmp_path):
    config = make_config(model_cache, "unused.parquet", str(tmp_path), output={"size_policy": "round_up"})
    source = framed(100, 100)
    pixels, _ = MovqEncodeStage(config)._prepare(batch_of([i2i_row(source)], config), 0)
    stretched = Image.fromarray(source).resize((WORK, WORK), Image.Resampling.BICUBIC, reducing_gap=1)
    np.testing.assert_array_equal(as_uint8(pixels), np.asarray(stretched))  # the output is 128x128: nothing lost


def inpaint_row(image: np.ndarray, mask: np.ndarray) -> dict:
    return {"id": "p", "prompt": "a hat", "task": "inpaint", "image_bytes": png_of(image), "mask_bytes": png_of(mask),
            "width": image.shape[1], "height": image.shape[0], "num_inference_steps": 3, "seed": 5}


def test_inpaint_padding_is_kept_never_repainted(inpaint):
    config, stages = inpaint
    repaint_all = np.full((100, 100), 255, np.uint8)
    pixels, keep = stages[1]._prepare(batch_of([inpaint_row(framed(100, 100), repaint_all)], config), 0)
    np.testing.assert_array_equal(window(as_uint8(pixels), 100, 100), framed(100, 100))
    keep = unpack(keep, (1, 16, 16))[0]  # latent pixel i samples image row 8i; the content is rows 14..113
    assert keep[0].all() and keep[:, 0].all()  # padding only: kept
    assert not keep[2:15, 2:15].any()  # content (and, widened by one, its border with the padding): repainted


def test_inpaint_output_is_the_centre_of_the_padded_run(inpaint):
    image, mask = framed(100, 72), np.zeros((72, 100), np.uint8)
    mask[20:50, 30:70] = 255
    ours = decode(run(inpaint, [inpaint_row(image, mask)])["image"][0])
    big = decode(run(inpaint, [inpaint_row(padded_by_hand(image), padded_by_hand(mask, fill=0))])["image"][0])
    assert ours.shape == (72, 100, 3) and max_diff(ours, window(big, 100, 72)) <= 1


def hint_row(hint: np.ndarray) -> dict:
    return {"id": "h", "prompt": "a robot", "task": "controlnet", "hint_bytes": png_of(hint), "width": hint.shape[1],
            "height": hint.shape[0], "num_inference_steps": 3, "seed": 9}


def test_controlnet_hint_is_padded_not_stretched(controlnet):
    hint = framed(100, 72)
    seen = np.frombuffer(run(controlnet, [hint_row(hint)], until=2)["hint_pixels"][0], np.uint8).reshape(WORK, WORK, 3)
    np.testing.assert_array_equal(seen, padded_by_hand(hint))
    ours = decode(run(controlnet, [hint_row(hint)])["image"][0])
    big = decode(run(controlnet, [hint_row(padded_by_hand(hint))])["image"][0])
    assert ours.shape == (72, 100, 3) and max_diff(ours, window(big, 100, 72)) <= 1


def test_depth_is_estimated_at_the_requested_size_then_padded(controlnet, tiny_root):
    from transformers import pipeline

    image = framed(100, 72)
    row = {"id": "d", "prompt": "a robot", "task": "controlnet", "image_bytes": png_of(image), "width": 100,
           "height": 72}
    seen = np.frombuffer(run(controlnet, [row], until=2)["hint_pixels"][0], np.uint8).reshape(WORK, WORK, 3)
    depth = pipeline("depth-estimation", model=str(tiny_root / "depth"), device="cpu")(Image.fromarray(image))["depth"]
    expected = hint_from_depth(depth)
    assert expected.shape == (72, 100, 3) and expected.std() > 0
    np.testing.assert_array_equal(seen, padded_by_hand(expected))
