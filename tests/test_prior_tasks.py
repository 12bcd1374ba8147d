"""mix (KandinskyV22PriorPipeline.interpolate) and variation (KandinskyV22PriorEmb2EmbPipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kandinsky_engine import DecoderStage, MovqStage, PriorStage
from tests.conftest import batch_of, make_config
from tests.reference import Reference, decode, max_diff
from tests.test_img2img import init_image, png


@pytest.fixture(scope="module")
def stages(model_cache, tmp_path_factory):
    torch.set_num_threads(1)
    config = make_config(model_cache, "unused.parquet", str(tmp_path_factory.mktemp("out")))
    return config, PriorStage(config)


@pytest.fixture(scope="module")
def reference(tiny_root, stages):
    from diffusers import KandinskyV22PriorEmb2EmbPipeline

    ref = Reference(tiny_root)
    ref.emb2emb = KandinskyV22PriorEmb2EmbPipeline(**ref.prior.components)
    ref.emb2emb.set_progress_bar_config(disable=True)
    return ref


def resolved(config, row):
    return {k: v[0] for k, v in batch_of([row], config).items()}


def gen(row):
    return torch.Generator("cpu").manual_seed(int(row["seed"]))


MIXES = [
    [{"text": "a cat", "weight": 0.3}, {"image": 1, "weight": 0.5}, {"text": "Кот 🐱", "weight": 0.2}],
    [{"image": 2, "weight": 1.0}],
    [{"text": "a dog", "weight": 0.7}, {"text": "a hat", "weight": 0.6}],
]


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("negative", [None, "blurry"])
def test_mix_matches_interpolate(stages, reference, mix, negative):
    config, prior = stages
    images = {n: init_image(48 + 16 * n, 40, seed=n) for n in (1, 2)}
    items = [{"text": it["text"], "weight": it["weight"]} if "text" in it
             else {"image_bytes": png(images[it["image"]]), "weight": it["weight"]} for it in mix]
    row = {"id": "m", "prompt": "unused for mix", "task": "mix", "mix": items, "negative_prompt": negative,
           "prior_num_inference_steps": 3}
    ours = prior(batch_of([row], config))
    assert ours["error_message"][0] == ""
    r = resolved(config, row)
    ref = reference.prior.interpolate(
        [it["text"] if "text" in it else images[it["image"]] for it in mix], [it["weight"] for it in mix],
        num_inference_steps=3, generator=gen(r), negative_prior_prompt=negative, guidance_scale=4.0,
    )
    np.testing.assert_allclose(ours["image_embeds"][0], ref.image_embeds[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(ours["negative_image_embeds"][0], ref.negative_image_embeds[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("strength, negative", [(0.3, None), (0.8, "low quality"), (1.0, None)])
def test_variation_matches_emb2emb(stages, reference, strength, negative):
    config, prior = stages
    image = init_image(72, 56, seed=3)
    row = {"id": "v", "prompt": "a red cat", "task": "variation", "image_bytes": png(image), "strength": strength,
           "negative_prompt": negative, "prior_num_inference_steps": 4}
    ours = prior(batch_of([row], config))
    r = resolved(config, row)
    ref = reference.emb2emb("a red cat", image=image, strength=strength, negative_prompt=negative,
                            num_inference_steps=4, guidance_scale=4.0, generator=gen(r))
    np.testing.assert_array_equal(ours["image_embeds"][0], ref.image_embeds[0].numpy())
    np.testing.assert_array_equal(ours["negative_image_embeds"][0], ref.negative_image_embeds[0].numpy())


def test_prior_tasks_end_in_images_that_match_the_reference_decoder(stages, reference):
    """Embeddings -> the standard decoder: same image as diffusers' decoder given diffusers' embeddings."""
    config, prior = stages
    image = init_image(64, 64, seed=4)
    row = {"id": "v", "prompt": "a red cat", "task": "variation", "image_bytes": png(image), "strength": 0.5}
    out = MovqStage(config)(DecoderStage(config)(prior(batch_of([row], config))))
    r = resolved(config, row)
    emb = reference.emb2emb("a red cat", image=image, strength=0.5, num_inference_steps=2, guidance_scale=4.0,
                            generator=gen(r))
    ref = reference.decoder(emb.image_embeds, emb.negative_image_embeds, height=64, width=64, num_inference_steps=2,
                            guidance_scale=4.0, generator=gen(r), output_type="np").images[0]
    assert max_diff(decode(out["image"][0]), (ref * 255).round().astype(np.uint8)) <= 1


def test_prior_task_rows_fail_alone(stages):
    config, prior = stages
    rows = [
        {"id": "ok", "prompt": "a cat"},
        {"id": "bad-image", "prompt": "x", "task": "variation", "image_bytes": b"garbage", "strength": 1.0},
        {"id": "weak", "prompt": "x", "task": "variation", "image_bytes": png(init_image(32, 32)), "strength": 0.01},
        {"id": "bad-mix", "prompt": "x", "task": "mix", "mix": [{"text": "a", "image_bytes": b"x", "weight": 1.0}]},
    ]
    out = prior(batch_of(rows, config))
    assert list(out["error_message"][:1]) == [""]
    assert out["error_message"][1].startswith("image: not a decodable image")
    assert "leaves no step to run" in out["error_message"][2]
    assert "exactly one of text or image" in out["error_message"][3]
