"""The vectorised loops (kandinsky_engine/sampling.py) equal the per-row loops bit for bit on the CPU.

Each stage is run twice on the same batch: as it is, and with its loop swapped for the per-row
reference of tests/per_row.py (the engine's loop before issue 10). Everything around the loop
(grouping, inputs, packing) is the same code, and the U-Net and prior see the same batches, so any
difference comes from the loops: latents and embeddings must be equal (np.array_equal, float32).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from kandinsky_engine import DecoderStage, PriorStage
from kandinsky_engine.stages.hint import HintStage
from kandinsky_engine.stages.movq_encode import MovqEncodeStage
from kandinsky_engine.sampling import SCHEDULERS, AncestralSteps, Schedule, draw_noise, make_scheduler
from tests.conftest import batch_of, make_config
from tests.per_row import per_row_denoise, per_row_prior
from tests.test_img2img import init_image, png
from tests.test_inpaint import mask_image


def config_for(model_cache, tmp_path_factory, decoder="tiny", scheduler="ddpm"):
    return make_config(model_cache, "unused.parquet", str(tmp_path_factory.mktemp("out")),
                       model={"decoder": decoder}, defaults={"scheduler": scheduler})


@pytest.fixture(scope="module")
def prior(model_cache, tmp_path_factory):
    torch.set_num_threads(1)
    return PriorStage(config_for(model_cache, tmp_path_factory))


def decoder_rows(task: str) -> list[dict]:
    """Rows of one decoder's tasks: mixed guidance scales within a group, CFG on and off, two sizes."""
    base = [
        {"id": "a", "prompt": "a cat", "guidance_scale": 4.0},
        {"id": "b", "prompt": "a dog", "negative_prompt": "blur", "guidance_scale": 7.3, "seed": 11},
        {"id": "c", "prompt": "Кот", "guidance_scale": 1.5, "seed": 12},
        {"id": "d", "prompt": "no guidance", "guidance_scale": 1.0, "seed": 13},
        {"id": "e", "prompt": "wide", "width": 128, "guidance_scale": 2.0, "seed": 14},
    ]
    for n, row in enumerate(base):
        row.update(task=task, num_inference_steps=5)
        size = (row.get("width", 64), 64)
        if task in ("img2img", "inpaint", "controlnet_img2img"):
            row.update(image_bytes=png(init_image(*size, seed=n)), strength=0.6)
        if task == "inpaint":
            row["mask_bytes"] = png(mask_image(*size, (8, 8, 40 + n, 48)))
        if task == "controlnet":
            row["hint_bytes"] = png(init_image(*size, seed=20 + n))
    return base


def upstream(config, rows, prior):
    """Rows through the stages before the decoder (hints and MoVQ encoding where the task needs them)."""
    batch = prior(batch_of(rows, config))
    if rows[0]["task"].startswith("controlnet"):
        batch = HintStage(config)(batch)
    return MovqEncodeStage(config)(batch)


def per_row_stage(stage, scheduler_class):
    """The stage's loop replaced by the per-row reference (which returns numpy; the stage reads tensors)."""
    def loop(*args):
        return torch.from_numpy(per_row_denoise(stage, *args, scheduler_class=scheduler_class))
    return loop


# Every sampler on the tasks whose decoder inputs differ (text2img, img2img, inpaint); the ControlNet
# tasks with the default one (a scheduler's step does not depend on the task).
CASES = [(task, decoder, scheduler) for task, decoder in (("text2img", "tiny"), ("img2img", "tiny"),
                                                          ("inpaint", "tiny-inpaint")) for scheduler in SCHEDULERS]
CASES += [("controlnet", "tiny-controlnet", "ddpm"), ("controlnet_img2img", "tiny-controlnet", "ddpm")]


@pytest.mark.parametrize("task, decoder, scheduler", CASES)
def test_decoder_loop_equals_per_row_loop(model_cache, tmp_path_factory, prior, monkeypatch, task, decoder, scheduler):
    config = config_for(model_cache, tmp_path_factory, decoder, scheduler)
    stage = DecoderStage(config)
    batch = upstream(config, decoder_rows(task), prior)
    assert not any(batch["error_message"])
    ours = stage({k: v.copy() for k, v in batch.items()})["latents"]
    import diffusers

    monkeypatch.setattr(stage, "_denoise", per_row_stage(stage, getattr(diffusers, SCHEDULERS[scheduler])))
    reference = stage({k: v.copy() for k, v in batch.items()})["latents"]
    for i, row_id in enumerate(batch["id"]):
        same = np.array_equal(np.frombuffer(ours[i], np.float32), np.frombuffer(reference[i], np.float32))
        assert same, f"{task}/{scheduler}: row {row_id} differs from the per-row loop"


def prior_rows() -> list[dict]:
    image = png(init_image(72, 56, seed=3))
    return [
        {"id": "t1", "prompt": "a cat", "prior_guidance_scale": 4.0},
        {"id": "t2", "prompt": "a dog", "negative_prompt": "blur", "prior_guidance_scale": 7.3, "seed": 5},
        {"id": "t3", "prompt": "山水画", "negative_prompt": "", "prior_guidance_scale": 2.5, "seed": 6},
        {"id": "t4", "prompt": "no guidance", "prior_guidance_scale": 1.0, "seed": 7},
        {"id": "v1", "prompt": "a red cat", "task": "variation", "image_bytes": image, "strength": 0.5},
        {"id": "v2", "prompt": "a blue cat", "task": "variation", "image_bytes": image, "strength": 0.5,
         "negative_prompt": "low quality", "prior_guidance_scale": 6.0, "seed": 8},
        {"id": "m1", "prompt": "unused", "task": "mix", "seed": 9,
         "mix": [{"text": "a cat", "weight": 0.3}, {"image_bytes": image, "weight": 0.4}, {"text": "a hat", "weight": 0.3}]},
        {"id": "m2", "prompt": "unused", "task": "mix", "negative_prompt": "blurry", "prior_guidance_scale": 3.0,
         "mix": [{"text": "a dog", "weight": 0.7}, {"text": "a boat", "weight": 0.6}]},
    ]


def test_prior_loop_equals_per_row_loop(prior, model_cache, tmp_path_factory, monkeypatch):
    """text2img (negatives or not, CFG on and off, mixed scales), variation (emb2emb) and mix (runs that
    continue each row's generator), all in one batch."""
    config = config_for(model_cache, tmp_path_factory)
    rows = [{**r, "prior_num_inference_steps": 4} for r in prior_rows()]
    batch = batch_of(rows, config)
    ours = prior({k: v.copy() for k, v in batch.items()})
    assert not any(ours["error_message"])
    monkeypatch.setattr(prior, "run_prior", functools.partial(per_row_prior, prior, encode_uncond=prior._encode_uncond))
    reference = prior({k: v.copy() for k, v in batch.items()})
    for column in ("image_embeds", "negative_image_embeds"):
        for i, row_id in enumerate(batch["id"]):
            assert np.array_equal(ours[column][i], reference[column][i]), f"{column} of {row_id}"


def test_empty_prompt_cache_is_the_batch_1_encoding(prior):
    """Rows without a negative prompt take "" encoded once at batch size 1 (what diffusers computes for
    one row); the old loop encoded it inside the batch, which may differ by float rounding (measured
    here: 1 ulp, 2.4e-7, on the projection), never more than that."""
    with torch.inference_mode():
        cached = prior._encode_uncond(["", "blur", ""])
        alone, negative = prior._encode([""]), prior._encode(["blur"])
        in_batch = prior._encode(["", "blur", ""])
    for got, one, neg, batched in zip(cached, alone, negative, in_batch):
        assert torch.equal(got[0], one[0]) and torch.equal(got[2], one[0])
        assert torch.equal(got[1], neg[0])  # the negative prompts are encoded in one batch of their own
        if got.dtype != torch.bool:
            torch.testing.assert_close(got, batched, atol=1e-6, rtol=0)


def ancestral_cases():
    ddpm = [dict(variance_type=v, prediction_type=p, clip_sample=c) for v in
            ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
            for p in ("epsilon", "sample", "v_prediction") for c in (False, True)]
    ddpm.append(dict(variance_type="fixed_small", prediction_type="epsilon", thresholding=True))
    unclip = [dict(variance_type=v, prediction_type=p, clip_sample=c, clip_sample_range=10.0)
              for v in ("fixed_small_log", "learned_range") for p in ("epsilon", "sample") for c in (False, True)]
    return [("DDPMScheduler", c) for c in ddpm] + [("UnCLIPScheduler", c) for c in unclip]


@pytest.mark.parametrize("cls, kwargs", ancestral_cases())
def test_ancestral_steps_equal_the_schedulers_step(cls, kwargs):
    """AncestralSteps over a batch of 3 rows, with the noise drawn up front, equals the scheduler's own
    step run row by row with each row's generator, over a whole trajectory (every variance and
    prediction type, clipping, thresholding)."""
    import diffusers

    torch.manual_seed(0)
    unclip, steps, n = cls == "UnCLIPScheduler", 6, 3
    learned = kwargs["variance_type"] in ("learned", "learned_range")
    shape = (n, 4, 8, 8) if not unclip else (n, 32)
    outputs = [torch.randn(n, shape[1] * (2 if learned else 1), *shape[2:]) for _ in range(steps)]
    for out in outputs if learned else []:  # the predicted variance: in [-1, 1] for learned_range, > 0 for learned
        low = -1 if kwargs["variance_type"] == "learned_range" else 0
        out[:, shape[1]:] = low + (1 - low) * torch.rand_like(out[:, shape[1]:])
    start = torch.randn(shape)
    scheduler = getattr(diffusers, cls)(**kwargs)
    scheduler.set_timesteps(steps, device="cpu")
    timesteps = scheduler.timesteps
    reference = []
    for r in range(n):
        g, x = torch.Generator().manual_seed(r), start[r : r + 1]
        for k, t in enumerate(timesteps):
            extra = {"prev_timestep": timesteps[k + 1] if k + 1 < steps else None} if unclip else {}
            x = scheduler.step(outputs[k][r : r + 1], t, x, generator=g, **extra).prev_sample
        reference.append(x)

    schedule = Schedule(getattr(diffusers, cls)(**kwargs), steps, 0, torch.device("cpu"))
    assert isinstance(schedule.ancestral, AncestralSteps)
    noisy = schedule.noise_steps()
    noise = draw_noise([torch.Generator().manual_seed(r) for r in range(n)], [(1, *shape[1:])] * n, sum(noisy),
                       torch.float32, torch.device("cpu"))
    x, draw = start, 0
    for k in range(steps):
        x = schedule.step(k, outputs[k], x, noise[draw] if noisy[k] else None)
        draw += noisy[k]
    assert torch.equal(x, torch.cat(reference)), kwargs


@pytest.mark.parametrize("kind", [k for k in SCHEDULERS if k != "ddpm"])
def test_multistep_state_is_per_group(kind):
    """A scheduler instance per group: two groups stepped in turn equal each group stepped alone (a
    shared multistep scheduler would mix their histories)."""
    from kandinsky_engine.families.kandinsky22.tiny import build_decoder_scheduler

    config = build_decoder_scheduler().config
    torch.manual_seed(0)
    outputs = [torch.randn(2, 4, 8, 8) for _ in range(5)]
    start = torch.randn(2, 4, 8, 8)

    def run(rows):
        schedule = Schedule(make_scheduler(kind, config), 5, 0, torch.device("cpu"))
        x = start[rows]
        for k in range(5):
            x = schedule.step(k, outputs[k][rows], x)
        return x

    a, b = Schedule(make_scheduler(kind, config), 5, 0, torch.device("cpu")), \
        Schedule(make_scheduler(kind, config), 5, 0, torch.device("cpu"))
    xa, xb = start[:1], start[1:]
    for k in range(5):  # interleaved, as groups of one call are
        xa, xb = a.step(k, outputs[k][:1], xa), b.step(k, outputs[k][1:], xb)
    assert torch.equal(xa, run([0])) and torch.equal(xb, run([1]))
    assert torch.equal(torch.cat([xa, xb]), run([0, 1]))  # and a batch is per-row exact
