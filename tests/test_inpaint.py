"""Inpainting: parity with KandinskyV22InpaintPipeline at batch size 1, and per-row correctness in batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky_engine import DecoderStage, MovqStage, PriorStage
from kandinsky_engine.inputs import unpack
from kandinsky_engine.stages.movq_encode import MovqEncodeStage
from tests.conftest import batch_of, make_config
from tests.conftest import run_chain as run
from tests.reference import Reference, decode, max_diff
from tests.test_img2img import init_image, png


def mask_image(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Black (keep) with a white (repaint) rectangle."""
    mask = np.zeros((height, width), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def stages(model_cache, tmp_path_factory):
    torch.set_num_threads(1)
    config = make_config(model_cache, "unused.parquet", str(tmp_path_factory.mktemp("out")),
                         model={"decoder": "tiny-inpaint"})
    return config, [PriorStage(config), MovqEncodeStage(config), DecoderStage(config), MovqStage(config)]


@pytest.fixture(scope="module")
def pipe(tiny_root, stages):
    from diffusers import KandinskyV22InpaintPipeline

    reference = Reference(tiny_root)
    inpaint = KandinskyV22InpaintPipeline.from_pretrained(tiny_root / "decoder-inpaint")
    inpaint.set_progress_bar_config(disable=True)
    return reference, inpaint



def reference_images(pipe, resolved_rows, images, masks):
    """diffusers' inpainting, all rows in one call (one generator per row)."""
    reference, inpaint = pipe
    embeds = [reference.embeds(r) for r in resolved_rows]
    first = resolved_rows[0]
    out = inpaint(
        image=images, mask_image=masks,
        image_embeds=torch.cat([e.image_embeds for e in embeds]),
        negative_image_embeds=torch.cat([e.negative_image_embeds for e in embeds]),
        height=int(first["height"]), width=int(first["width"]),
        num_inference_steps=int(first["num_inference_steps"]), guidance_scale=float(first["guidance_scale"]),
        generator=[torch.Generator("cpu").manual_seed(int(r["seed"])) for r in resolved_rows], output_type="np",
    ).images
    return [(im * 255).round().astype(np.uint8) for im in out]


def row(i: int, size: int = 64, box=(8, 16, 40, 48), steps: int = 3) -> tuple[dict, Image.Image, Image.Image]:
    image, mask = init_image(size, size, seed=i), mask_image(size, size, box)
    return ({"id": f"r{i}", "prompt": ["a hat", "a dog", "Шляпа"][i % 3], "task": "inpaint", "width": size,
             "height": size, "image_bytes": png(image), "mask_bytes": png(mask), "num_inference_steps": steps,
             "seed": 100 + i}, image, mask)


def resolved(stages, rows):
    batch = batch_of(rows, stages[0])
    return [{k: v[i] for k, v in batch.items()} for i in range(len(rows))]


@pytest.mark.parametrize("size, box", [(64, (8, 16, 40, 48)), (128, (0, 0, 64, 128)), (64, (30, 30, 34, 34))])
def test_inpaint_matches_diffusers_at_batch_size_1(stages, pipe, size, box):
    r, image, mask = row(0, size, box)
    ours = run(stages, [r])
    assert ours["error_message"][0] == ""
    ref = reference_images(pipe, resolved(stages, [r]), [image], [mask])[0]
    assert max_diff(decode(ours["image"][0]), ref) <= 1


def test_white_is_repainted_and_black_is_kept(stages):
    """In latent space the kept region is exactly the source latents; the white region is new."""
    r, _, _ = row(0, 64, (0, 0, 32, 64))  # left half white = repaint
    encoded = run(stages, [r], until=2)
    final = unpack(stages[1][2](encoded)["latents"][0], (4, 8, 8))
    source = unpack(encoded["init_latents"][0], (4, 8, 8))
    keep = unpack(encoded["keep_mask"][0], (1, 8, 8))[0]
    assert keep[:, :4].sum() == 0 and keep[:, 5:].all()  # repaint region widened by one latent pixel
    np.testing.assert_array_equal(final[:, :, 5:], source[:, :, 5:])
    assert np.abs(final[:, :, :4] - source[:, :, :4]).max() > 0.1


def test_keep_mask_equals_diffusers_prepare_mask():
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask

    from kandinsky_engine.stages.inpaint import DILATION

    rng = np.random.default_rng(0)
    for shape in [(8, 8), (8, 16), (13, 7), (32, 32)]:
        for density in (0.05, 0.3, 0.7):
            keep = torch.from_numpy((rng.random(shape) > density).astype(np.float32))[None, None]
            expected = prepare_mask(keep.clone())
            grown = torch.nn.functional.conv2d(1 - keep, torch.from_numpy(DILATION)[None, None], padding=1)
            assert torch.equal(keep * (grown == 0), expected), (shape, density)


def test_batch_of_different_rows_equals_each_row_alone(stages, pipe):
    rows = [row(0, box=(8, 16, 40, 48)), row(1, box=(32, 0, 64, 64)), row(2, box=(0, 40, 64, 64))]
    batch = run(stages, [r for r, _, _ in rows])
    for i, (r, _, _) in enumerate(rows):
        alone = decode(run(stages, [r])["image"][0])
        assert max_diff(decode(batch["image"][i]), alone) <= 1, r["id"]
    # diffusers, given the same three rows in one call, blends rows 2 and 3 with row 1's image and
    # mask (image[:1], mask_image[:1]): its second row is far from that row alone.
    ref_batch = reference_images(pipe, resolved(stages, [r for r, _, _ in rows]), [im for _, im, _ in rows],
                                 [m for _, _, m in rows])
    assert max_diff(ref_batch[1], decode(batch["image"][1])) > 10


def test_inpaint_rows_need_the_inpaint_decoder(model_cache, tmp_path):
    import re

    from kandinsky_engine.manifest import validate_manifest
    from tests.conftest import write_manifest

    r, _, _ = row(0)
    manifest = write_manifest(tmp_path / "m.parquet", [r, {"id": "t", "prompt": "x"}])
    errors = validate_manifest(make_config(model_cache, manifest, str(tmp_path / "o"))).row_errors
    assert list(errors) == ["r0"]
    assert re.search(r"task': 'inpaint' needs another decoder than model.decoder='tiny'.*id 'r0'", errors["r0"])
    config = make_config(model_cache, manifest, str(tmp_path / "o"), model={"decoder": "tiny-inpaint"})
    errors = validate_manifest(config).row_errors
    assert list(errors) == ["t"] and re.search(r"'text2img' needs another decoder .*id 't'", errors["t"])
