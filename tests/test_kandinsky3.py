"""Kandinsky 3: stage outputs equal diffusers' Kandinsky3Pipeline / Kandinsky3Img2ImgPipeline (loaded with
from_pretrained from the same tiny directory), a row never depends on its batch-mates (where diffusers'
batched call does), and one whole job with a poison row and a resume."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from kandinsky_engine.families import resolve_family
from kandinsky_engine.stages.kandinsky3 import Kandinsky3UNetStage
from kandinsky_engine.stages.movq import MovqStage
from kandinsky_engine.stages.movq_encode import MovqEncodeStage
from kandinsky_engine.stages.text_encoder import T5EncoderStage
from tests.conftest import batch_of, make_config, write_manifest
from tests.reference import decode, max_diff

REPO = Path(__file__).resolve().parents[1]
K3 = {"decoder": "tiny-k3"}
SHORT, LONG = "a cat", "a red lighthouse in a storm at night, lightning over the sea, oil painting"


def scene(width: int, height: int, hue: int = 0) -> bytes:
    """An input picture: a vertical gradient with a bright square, as PNG bytes."""
    y = np.linspace(0, 1, height)[:, None, None]
    pixels = (np.array([90 + hue, 150, 230]) * (1 - y) + np.array([30, 110, 40]) * y).repeat(width, axis=1)
    pixels[height // 4 : height // 2, width // 2 : 3 * width // 4] = 240
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def k3(model_cache, tiny_root, tmp_path_factory):
    """(config, stages by name, diffusers pipelines by task), one thread on both sides."""
    from diffusers import Kandinsky3Img2ImgPipeline, Kandinsky3Pipeline

    torch.set_num_threads(1)  # thread count changes float results: the same on both sides
    config, family = resolve_family(make_config(model_cache, "unused.parquet", str(tmp_path_factory.mktemp("out")),
                                                model=K3))
    assert family.name == "kandinsky3"
    stages = {"text": T5EncoderStage(config), "encode": MovqEncodeStage(config), "unet": Kandinsky3UNetStage(config),
              "movq": MovqStage(config)}
    pipes = {"text2img": Kandinsky3Pipeline.from_pretrained(tiny_root / "decoder-k3")}
    pipes["img2img"] = Kandinsky3Img2ImgPipeline(**pipes["text2img"].components)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return config, stages, pipes


def run(k3, rows):
    config, s, _ = k3
    return s["movq"](s["unet"](s["encode"](s["text"](batch_of(rows, config)))))


def reference(k3, row: dict, prompt=None) -> np.ndarray:
    """The row's own diffusers call (a fresh generator seeded with the row's seed) -> uint8 (H, W, 3).
    `prompt`: a list of prompts for a batched call instead (the row's image is then the first)."""
    _, _, pipes = k3
    negative = None if row["negative_prompt"] is None else str(row["negative_prompt"])
    args = dict(num_inference_steps=int(row["num_inference_steps"]), guidance_scale=float(row["guidance_scale"]),
                generator=torch.Generator("cpu").manual_seed(int(row["seed"])), output_type="np")
    if row["task"] == "img2img":  # the pipeline takes no size: its output is the input image's
        image = Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")
        images = pipes["img2img"](str(row["prompt"]), image=image, strength=float(row["strength"]),
                                  negative_prompt=negative, **args).images
    else:
        images = pipes["text2img"](prompt or str(row["prompt"]), negative_prompt=negative, height=int(row["height"]),
                                   width=int(row["width"]), **args).images
    return (images[0] * 255).round().astype(np.uint8)


ROWS = [
    {"id": "square", "prompt": "a red cat, 4k photo"},
    {"id": "wide-negative", "prompt": LONG, "negative_prompt": "blurry", "width": 128, "height": 64},
    {"id": "tall-unguided", "prompt": "Медведь в лесу", "width": 64, "height": 128, "guidance_scale": 1.0},
    {"id": "empty-negative", "prompt": "山水画 🚀", "negative_prompt": "", "guidance_scale": 5.5, "seed": 3},
    {"id": "img2img", "prompt": "a watercolor", "task": "img2img", "image_bytes": scene(64, 64), "strength": 0.75,
     "num_inference_steps": 4},
    {"id": "img2img-wide", "prompt": "Пейзаж", "task": "img2img", "image_bytes": scene(128, 64, 40), "width": 128,
     "height": 64, "strength": 1.0, "negative_prompt": "low quality, blurry and dark"},
]


def test_each_row_alone_matches_diffusers(k3):
    config = k3[0]
    for row in ROWS:
        resolved = {k: v[0] for k, v in batch_of([row], config).items()}
        ours = decode(run(k3, [row])["image"][0])
        ref = reference(k3, resolved)
        assert ours.shape == ref.shape == (resolved["height"], resolved["width"], 3)
        assert max_diff(ours, ref) <= 1, row["id"]  # measured 0 on CPU, float32


def test_mixed_batch_equals_each_rows_own_call_where_diffusers_batch_differs(k3):
    """A batch of prompts of different lengths (plus img2img rows), run as one U-Net call per size and
    task with the contexts padded: every row equals its own one-prompt
    diffusers call. diffusers' own batched call cuts the short prompt to the long one's length, and the
    U-Net's unmasked mean pooling then changes the short prompt's image."""
    config = k3[0]
    rows = ROWS + [{"id": "short", "prompt": SHORT}, {"id": "long", "prompt": LONG}]
    resolved = batch_of(rows, config)
    calls = []  # (rows, context length) of each U-Net call
    hook = k3[1]["unet"].unet.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(tuple(kwargs["encoder_hidden_states"].shape[:2])), with_kwargs=True)
    try:
        out = run(k3, rows)
    finally:
        hook.remove()
    # square, empty-negative, short and long (four lengths, 64x64 text2img with guidance) share one
    # call of 2 x 4 rows, padded to the longest; the other rows differ in size or task.
    texts = k3[1]["text"](batch_of(rows, config))
    group = [0, 3, 6, 7]
    assert len({int(texts["context_length"][i]) for i in group}) == 4
    assert (8, max(int(texts["context_length"][i]) for i in group)) in calls
    diffs = {}
    for i, row_id in enumerate(out["id"]):
        diffs[row_id] = max_diff(decode(out["image"][i]), reference(k3, {k: v[i] for k, v in resolved.items()}))
    print(f"\nmax |diff| per row in a mixed batch of {len(rows)} (in 1/255): {diffs}")
    assert max(diffs.values()) <= 1  # measured 1 (float rounding of padded contexts and batched MoVQ)
    short = {k: v[-2] for k, v in resolved.items()}
    batched = reference(k3, short, prompt=[SHORT, LONG])  # diffusers, both prompts in one call
    assert max_diff(batched, decode(out["image"][-2])) > 10
    # ... and the prompt reaches the image at all (the tiny U-Net's text path is live).
    assert max_diff(decode(out["image"][-2]), decode(out["image"][-1])) > 10


def test_text_encoder_cuts_each_row_to_its_own_length(k3):
    config, s, pipes = k3
    rows = [{"id": "short", "prompt": SHORT, "negative_prompt": LONG},  # a negative longer than the prompt
            {"id": "long", "prompt": LONG},  # no negative prompt: zeros, no T5 call
            {"id": "empty-negative", "prompt": SHORT, "negative_prompt": ""},
            {"id": "unguided", "prompt": SHORT, "negative_prompt": "x", "guidance_scale": 1.0}]
    out = s["text"](batch_of(rows, config))
    tokenizer = pipes["text2img"].tokenizer
    tokens = [len(tokenizer(r["prompt"]).input_ids) for r in rows]  # with </s>
    assert tokens[0] < tokens[1] and list(out["prompt_tokens"]) == tokens
    assert list(out["context_length"]) == [t + 1 for t in tokens]  # diffusers: mask.sum() + 1
    # The negative is cut to the prompt's length; "" is one token (</s>); unguided rows encode none.
    assert list(out["negative_prompt_tokens"]) == [tokens[0] + 1, 0, 1, 0]
    assert out["negative_prompt_embeds"][1] is None and out["negative_prompt_embeds"][3] is None
    # The embeddings equal diffusers' encode_prompt of the row alone (cut, padding zeroed).
    embeds, negative, mask, _ = pipes["text2img"].encode_prompt(SHORT, True, negative_prompt=LONG, _cut_context=True)
    dim = embeds.shape[-1]
    ours = np.frombuffer(out["prompt_embeds"][0], np.float32).reshape(-1, dim)
    assert ours.shape == embeds.shape[1:] and mask[0].tolist() == [1] * tokens[0] + [0]
    assert np.abs(ours - embeds[0].numpy()).max() <= 1e-6
    assert np.abs(np.frombuffer(out["negative_prompt_embeds"][0], np.float32).reshape(-1, dim) - negative[0].numpy()).max() <= 1e-6
    # Unknown characters become <unk>, yet every prompt tokenizes.
    assert tokenizer.unk_token_id in tokenizer("山水画 🚀").input_ids


def test_example_config_is_valid(model_cache):
    from kandinsky_engine.config import load_config
    from kandinsky_engine.manifest import validate_manifest

    config = load_config(REPO / "configs" / "examples" / "kandinsky3.yaml", [f"model.cache_dir={model_cache}"])
    manifest = validate_manifest(config)
    assert manifest.tasks == {"text2img", "img2img"} and manifest.num_rows >= 4


# -- one whole job on Ray ----------------------------------------------------------------------------

JOB_ROWS = [
    {"id": "t-short", "prompt": SHORT},
    {"id": "t-long", "prompt": LONG, "negative_prompt": "blurry", "width": 128},
    {"id": "t-unguided", "prompt": "Медведь", "guidance_scale": 1.0},
    {"id": "i-square", "prompt": "a watercolor", "task": "img2img", "image_bytes": scene(64, 64), "strength": 1.0},
    {"id": "i-wide", "prompt": "Пейзаж", "task": "img2img", "image_bytes": scene(128, 64), "width": 128, "strength": 0.5},
    {"id": "bad-image", "prompt": "x", "task": "img2img", "image_bytes": b"not an image", "strength": 1.0},  # MovqEncodeStage
    {"id": "bad-task", "prompt": "x", "task": "inpaint", "image_bytes": scene(64, 64), "mask_bytes": scene(64, 64)},
]


@pytest.fixture(scope="module")
def job(ray_cluster, model_cache, tmp_path_factory):
    """The job, then the same command again on its output: (config, first summary, second summary,
    the data shards after the first run)."""
    from kandinsky_engine.jobs.run import run_job

    tmp = tmp_path_factory.mktemp("k3job")
    manifest = write_manifest(tmp / "manifest.parquet", JOB_ROWS)
    config = make_config(model_cache, manifest, str(tmp / "out"), model=K3, input={"rows_per_block": 4},
                         text_encoder={"batch_size": 3}, decoder={"batch_size": 2})
    first = run_job(config)
    shards = {p: p.read_bytes() for p in sorted((tmp / "out" / "data").rglob("*.parquet"))}
    return config, first, run_job(config), shards


@pytest.mark.ray
def test_job_writes_every_good_row_once_and_the_poison_rows_to_errors(job, k3):
    from kandinsky_engine.jobs.verify import verify

    config, first, second, shards = job
    out = Path(config.output.path)
    rows = {r["id"]: r for r in pq.read_table(out / "data").to_pylist()}
    errors = {r["id"]: r for p in (out / "errors").rglob("*.parquet") for r in pq.read_table(p).to_pylist()}
    assert sorted(rows) == ["i-square", "i-wide", "t-long", "t-short", "t-unguided"]
    assert sorted(errors) == ["bad-image", "bad-task"]
    assert errors["bad-image"]["stage"] == "MovqEncodeStage" and "image" in errors["bad-image"]["message"]
    assert errors["bad-task"]["stage"] == "validate" and "'inpaint' needs another decoder" in errors["bad-task"]["message"]
    assert {e["attempt"] for e in errors.values()} == {2}  # the rerun retried the bad rows, and only them
    for row in rows.values():
        assert decode(row["image"]["bytes"]).shape == (row["height"], row["width"], 3)
        assert row["prior_model"] is None and row["decoder_model"].startswith("tiny-k3@")
    # A job row is its own diffusers call, whatever its batch-mates were (t-short shared a unit with t-long).
    resolved = {k: v[0] for k, v in batch_of([JOB_ROWS[0]], k3[0]).items()}
    assert max_diff(decode(rows["t-short"]["image"]["bytes"]), reference(k3, resolved)) <= 1
    # The rerun resumes: nothing good is recomputed, and the output verifies.
    assert (first["rows"], second["rows_skipped"], second["rows_computed"]) == (5, 5, 2)  # the 2 bad rows only
    assert {p: p.read_bytes() for p in sorted((out / "data").rglob("*.parquet"))} == shards
    check = verify(config.output.path)
    assert check.ok, check.problems
    assert (check.rows, check.failed_rows) == (5, 2)
