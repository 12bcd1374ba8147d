"""Kandinsky 2.1 stages vs diffusers' KandinskyPriorPipeline, KandinskyPipeline, -Img2Img and -Inpaint
(loaded with from_pretrained from the same tiny dirs), and the diffusers batch bugs the engine avoids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kandinsky_engine import MovqStage, PriorStage
from kandinsky_engine.families import resolve_family
from kandinsky_engine.stages.decoder21 import Decoder21Stage
from kandinsky_engine.stages.movq_encode import MovqEncodeStage
from tests.conftest import batch_of, make_config
from tests.conftest import run_chain as run
from tests.reference import decode, max_diff
from tests.test_img2img import init_image, png
from tests.test_inpaint import mask_image

K21 = {"prior": "tiny-k21", "decoder": "tiny-k21"}


def chain(model_cache, tmp_path_factory, **model):
    torch.set_num_threads(1)  # same threads on both sides: thread count changes float results
    config = make_config(model_cache, "unused.parquet", str(tmp_path_factory.mktemp("out")), model={**K21, **model})
    config, family = resolve_family(config)  # DDIM, img2img guidance 7.0: as the jobs see it
    assert family.name == "kandinsky21" and config.defaults.scheduler == "ddim"
    return config, [PriorStage(config), MovqEncodeStage(config), Decoder21Stage(config), MovqStage(config)]


@pytest.fixture(scope="module")
def stages(model_cache, tmp_path_factory):
    return chain(model_cache, tmp_path_factory)


@pytest.fixture(scope="module")
def inpaint_stages(model_cache, tmp_path_factory):
    return chain(model_cache, tmp_path_factory, decoder="tiny-k21-inpaint")


@pytest.fixture(scope="module")
def ref(tiny_root, stages):
    from diffusers import (KandinskyImg2ImgPipeline, KandinskyInpaintPipeline, KandinskyPipeline,
                           KandinskyPriorPipeline)

    pipes = {"prior": KandinskyPriorPipeline.from_pretrained(tiny_root / "prior-k21"),
             "text2img": KandinskyPipeline.from_pretrained(tiny_root / "decoder-k21"),
             "inpaint": KandinskyInpaintPipeline.from_pretrained(tiny_root / "decoder-k21-inpaint")}
    pipes["img2img"] = KandinskyImg2ImgPipeline(**pipes["text2img"].components)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def resolved(config, row):
    return {k: v[0] for k, v in batch_of([row], config).items()}


def gen(row):
    return torch.Generator("cpu").manual_seed(int(row["seed"]))


def reference(ref, row, task="text2img", **inputs):
    """diffusers' prior then decoder for one resolved row, each with a fresh generator of the row's seed;
    the decoder gets the row's negative prompt (the combined pipelines would not pass it)."""
    prior = ref["prior"](str(row["prompt"]), negative_prompt=row["negative_prompt"], generator=gen(row),
                         num_inference_steps=int(row["prior_num_inference_steps"]),
                         guidance_scale=float(row["prior_guidance_scale"]))
    if task == "img2img":
        inputs["strength"] = float(row["strength"])
    images = ref[task](str(row["prompt"]), image_embeds=prior.image_embeds,
                       negative_image_embeds=prior.negative_image_embeds, negative_prompt=row["negative_prompt"],
                       height=int(row["height"]), width=int(row["width"]), generator=gen(row),
                       num_inference_steps=int(row["num_inference_steps"]),
                       guidance_scale=float(row["guidance_scale"]), output_type="np", **inputs).images
    return (images[0] * 255).round().astype(np.uint8)


TEXT_ROWS = [
    {"id": "square", "prompt": "a red cat, 4k photo"},
    {"id": "wide", "prompt": "a lighthouse in a storm", "negative_prompt": "blurry", "width": 128, "height": 64},
    {"id": "tall", "prompt": "Медведь в лесу", "width": 64, "height": 128, "guidance_scale": 1.0},
    {"id": "empty-negative", "prompt": "山水画 🚀", "negative_prompt": "", "prior_guidance_scale": 1.0},
    {"id": "odd", "prompt": "a robot", "guidance_scale": 7.3, "negative_prompt": "кот", "num_inference_steps": 3},
]


def test_text2img_matches_kandinsky_pipeline(stages, ref):
    config = stages[0]
    diffs = {}
    for row in TEXT_ROWS:
        ours = decode(run(stages, [row])["image"][0])
        r = resolved(config, row)
        expected = reference(ref, r)
        assert ours.shape == expected.shape == (r["height"], r["width"], 3)
        diffs[row["id"]] = max_diff(ours, expected)
    print(f"\nmax |diff| per row at batch size 1 (in 1/255): {diffs}")
    assert max(diffs.values()) <= 1, diffs
    # In a batch of all five, each row is still its batch-1 image (own generator, own prompt).
    together = run(stages, TEXT_ROWS)
    for i, row in enumerate(TEXT_ROWS):
        assert max_diff(decode(together["image"][i]), reference(ref, resolved(config, row))) <= 3, row["id"]


def test_prompt_and_negative_prompt_condition_the_decoder(stages):
    """Same prior embeddings, different decoder text -> different image (2.2's decoder has no text)."""
    config, (prior, _, decoder, movq) = stages
    batch = prior(batch_of([TEXT_ROWS[0], TEXT_ROWS[0]], config))
    batch["prompt"] = np.array(["a red cat, 4k photo", "a blue ship"], dtype=object)
    images = movq(decoder(batch))["image"]
    assert max_diff(decode(images[0]), decode(images[1])) > 10
    batch = prior(batch_of([TEXT_ROWS[0], {**TEXT_ROWS[0], "negative_prompt": ""}], config))
    images = movq(decoder(batch))["image"]  # None and "" negatives: the same "" text, other image embeds
    assert max_diff(decode(images[0]), decode(images[1])) > 0


@pytest.mark.parametrize("size, strength, steps", [(64, 0.3, 4), (128, 0.75, 3), (64, 1.0, 2)])
def test_img2img_matches_square(stages, ref, size, strength, steps):
    init = init_image(size + 16, size - 8)  # not the output size: the resize is compared too
    row = {"id": "r", "prompt": "a cat", "task": "img2img", "image_bytes": png(init), "width": size, "height": size,
           "strength": strength, "num_inference_steps": steps, "negative_prompt": "blurry" if size > 64 else None}
    out = run(stages, [row])
    assert out["error_message"][0] == ""
    r = resolved(stages[0], row)
    assert r["guidance_scale"] == 7.0  # KandinskyImg2ImgPipeline's default, from the family
    assert max_diff(decode(out["image"][0]), reference(ref, r, "img2img", image=init)) <= 1


def test_img2img_non_square_keeps_orientation_where_diffusers_raises(stages, ref):
    """diffusers 0.42 calls preprocess(image, width, height) into a (height, width) signature: a
    non-square input is encoded transposed and the noise no longer fits. We keep the requested size;
    given the input already at that size (so nothing is resized), diffusers computes what we do."""
    from diffusers.image_processor import VaeImageProcessor

    init = init_image(128, 64)
    row = {"id": "wide", "prompt": "a harbour", "task": "img2img", "image_bytes": png(init), "width": 128,
           "height": 64, "strength": 0.5, "num_inference_steps": 4}
    ours = decode(run(stages, [row])["image"][0])
    assert ours.shape == (64, 128, 3)
    r = resolved(stages[0], row)
    with pytest.raises(ValueError, match="Unexpected latents shape"):
        reference(ref, r, "img2img", image=init)
    stock = ref["img2img"].image_processor
    try:
        ref["img2img"].image_processor = VaeImageProcessor(vae_scale_factor=8, do_resize=False)
        expected = reference(ref, r, "img2img", image=stock.resize(init, height=64, width=128))
    finally:
        ref["img2img"].image_processor = stock
    assert max_diff(ours, expected) <= 1


@pytest.mark.parametrize("width, height, negative", [(64, 64, None), (128, 64, "blurry")])
def test_inpaint_matches_kandinsky_inpaint_pipeline(inpaint_stages, ref, width, height, negative):
    image, mask = init_image(width, height, seed=5), mask_image(width, height, (16, 8, 48, 40))
    row = {"id": "p", "prompt": "a hat", "task": "inpaint", "image_bytes": png(image), "mask_bytes": png(mask),
           "width": width, "height": height, "negative_prompt": negative, "num_inference_steps": 3}
    out = run(inpaint_stages, [row])
    assert out["error_message"][0] == ""
    r = resolved(inpaint_stages[0], row)
    expected = reference(ref, r, "inpaint", image=image, mask_image=mask)
    assert max_diff(decode(out["image"][0]), expected) <= 1


def test_mix_matches_interpolate_and_diffusers_batch_bugs(stages, ref):
    """mix is KandinskyPriorPipeline.interpolate per row. diffusers with num_images_per_prompt=2 sums the
    two images' embeddings into one (`sum(dim=0, keepdim=True)`), and the decoder without guidance
    raises (its image embeddings are not repeated); the engine's rows are independent images."""
    config, prior = stages[0], stages[1][0]
    scene = init_image(64, 48, seed=2)
    row = {"id": "m", "prompt": "a cat", "task": "mix", "negative_prompt": "blurry", "prior_num_inference_steps": 3,
           "mix": [{"text": "a cat", "weight": 0.3}, {"image_bytes": png(scene), "weight": 0.7}]}
    ours = prior(batch_of([row], config))
    r = resolved(config, row)
    expected = ref["prior"].interpolate(["a cat", scene], [0.3, 0.7], num_inference_steps=3, generator=gen(r),
                                        negative_prior_prompt="blurry", guidance_scale=4.0)
    np.testing.assert_allclose(ours["image_embeds"][0], expected.image_embeds[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(ours["negative_image_embeds"][0], expected.negative_image_embeds[0].numpy(), atol=1e-5)
    two = ref["prior"].interpolate(["a cat", scene], [0.3, 0.7], num_inference_steps=3, num_images_per_prompt=2,
                                   generator=gen(r), guidance_scale=4.0)
    assert two.image_embeds.shape == (1, prior.embedding_dim)  # two images asked, one summed embedding
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):  # 2 prompts' rows, 1 image embedding
        ref["text2img"]("a cat", image_embeds=expected.image_embeds, negative_image_embeds=expected.image_embeds,
                        num_images_per_prompt=2, guidance_scale=1.0, height=64, width=64, num_inference_steps=2)
    # The engine: a mix row decodes like diffusers' decoder given interpolate's embeddings and the prompt.
    out = run(stages, [row])
    decoded = ref["text2img"]("a cat", image_embeds=expected.image_embeds,
                              negative_image_embeds=expected.negative_image_embeds, negative_prompt="blurry",
                              height=64, width=64, num_inference_steps=2, guidance_scale=4.0, generator=gen(r),
                              output_type="np").images[0]
    assert max_diff(decode(out["image"][0]), (decoded * 255).round().astype(np.uint8)) <= 1


def test_bad_rows_fail_alone(stages):
    rows = [
        {"id": "ok", "prompt": "a cat"},
        {"id": "bad-image", "prompt": "x", "task": "img2img", "image_bytes": b"not an image"},
        {"id": "weak", "prompt": "x", "task": "img2img", "image_bytes": png(init_image(64, 64)), "strength": 0.1},
    ]
    out = run(stages, rows)
    assert out["error_message"][0] == "" and out["image"][0] is not None
    assert out["error_stage"][1] == "MovqEncodeStage" and "not a decodable image" in out["error_message"][1]
    assert out["error_stage"][2] == "Decoder21Stage" and "leaves no step to run" in out["error_message"][2]


def test_tiny_tokenizer_round_trips(tiny_root):
    from transformers import XLMRobertaTokenizer

    from kandinsky_engine.families.kandinsky21.tiny import build_tokenizer

    loaded = XLMRobertaTokenizer.from_pretrained(tiny_root / "decoder-k21", subfolder="tokenizer")
    built = build_tokenizer()
    prompts = ["a red cat", "Медведь в лесу", "山水画 🚀", "A RED CAT", ""]
    ids = [loaded(p).input_ids for p in prompts]
    assert ids == [built(p).input_ids for p in prompts]
    assert len({tuple(i) for i in ids}) == len(prompts)  # different prompts, different ids
    assert loaded.unk_token_id in ids[2] and loaded.unk_token_id not in ids[1]  # 🚀 is unknown, Cyrillic is not
    assert (ids[4], loaded.pad_token_id) == ([0, 2], 1)


def test_example_config_is_a_kandinsky21_job(model_cache):
    from pathlib import Path

    from kandinsky_engine.config import load_config
    from kandinsky_engine.manifest import validate_manifest

    path = Path(__file__).parents[1] / "configs" / "examples" / "kandinsky21.yaml"
    config, family = resolve_family(load_config(path, [f"model.cache_dir={model_cache}"]))
    assert family.name == "kandinsky21" and config.defaults.task_defaults == {"img2img": {"guidance_scale": 7.0}}
    assert {"text2img", "img2img", "mix"} <= set(validate_manifest(config).tasks)
