"""Kandinsky 2.0 stages on the tiny model, without Ray: the text head against a direct computation, the VAE
against diffusers' AutoencoderKL, the samplers' schedules, rows independent of their batch-mates (the
threshold per row), inpainting keeping its known region. Parity with the original repository's code itself is
measured by scripts/parity_kandinsky20.py (docs/kandinsky20.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kandinsky_engine.families import resolve_family
from kandinsky_engine.stages.kandinsky20 import Kandinsky20UNetStage
from kandinsky_engine.stages.kandinsky20_sampling import (DDIMSampler, PSampler, check_steps, dynamic_threshold,
                                                          img2img_start,
                                                          linear_betas)
from kandinsky_engine.stages.kandinsky20_text import Kandinsky20TextStage
from kandinsky_engine.stages.vae import KLDecodeStage, KLEncodeStage
from tests.conftest import make_config, png, run_chain
from tests.reference import decode

ROWS = [
    {"id": "a", "prompt": "a red cat, 4k photo", "seed": 1},
    {"id": "b", "prompt": "Медведь в лесу", "seed": 2, "guidance_scale": 3.0, "negative_prompt": "blurry"},
    {"id": "c", "prompt": "山水画", "seed": 3, "guidance_scale": 1.0},
]


def noise_png(size=64) -> bytes:
    """A seeded random RGB picture (a flat colour would make the random VAE's group norms divide by ~0)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def chain(model_cache, decoder="tiny-k20", **defaults):
    config = make_config(model_cache, "m.parquet", "out", model={"decoder": decoder},
                         defaults={"num_inference_steps": 4, **defaults})
    config, _ = resolve_family(config)
    return config, [Kandinsky20TextStage(config), KLEncodeStage(config), Kandinsky20UNetStage(config), KLDecodeStage(config)]


def test_text_head_equals_a_direct_computation():
    """The head, written as the original's get_text_emb, against the same formulas written directly here."""
    import torch.nn.functional as F

    from kandinsky_engine.families.kandinsky20.tiny import build_text_head

    head = build_text_head()
    g = torch.Generator().manual_seed(0)
    full1, pooled1, full2 = torch.randn(2, 77, 32, generator=g), torch.randn(2, 16, generator=g), torch.randn(2, 77, 512, generator=g)
    with torch.no_grad():
        context, pooled = head(full1, pooled1, full2)
        p = dict(head.named_parameters())
        lin = lambda x, name: F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])  # noqa: E731
        ln = lambda x, name: F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])  # noqa: E731
        # attention pooling: 8 heads of 64 over all 77 positions, unmasked; the output at position 0
        q, k, v = (lin(full2, f"proj2.{n}_linear").view(2, 77, 8, 64) for n in "qkv")
        weights = torch.einsum("bqhd,bkhd->bhqk", q, k).div(8.0).softmax(dim=-1)
        attended = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 77, 512)
        want_pooled = ln(lin(pooled1, "proj"), "ln_model2") + ln(lin(attended, "proj2.out")[:, 0], "ln_model3")
        want_context = ln(torch.cat([lin(full1, "to_model_dim"), lin(full2, "to_model_dim2")], dim=1), "ln_model1")
    assert context.shape == (2, 154, 32) and pooled.shape == (2, 128)
    torch.testing.assert_close(context, want_context, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-5)


def test_vae_stages_equal_diffusers_autoencoder_kl(model_cache, tiny_root):
    """Decode: AutoencoderKL.decode(z / 0.0512), then the original's ((x + 1) * 127.5).round().clamp(0, 255).
    Encode: the posterior's mean and std, as AutoencoderKL.encode gives them."""
    from diffusers import AutoencoderKL

    config, stages = chain(model_cache)
    vae = AutoencoderKL.from_pretrained(tiny_root / "decoder-k20", subfolder="vae").eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.05
    batch = {"id": np.array(["a", "b"], dtype=object), "width": np.array([64, 64]), "height": np.array([64, 64]),
             "latents": np.array([z[0].numpy().tobytes(), z[1].numpy().tobytes()], dtype=object),
             **{c: np.array(["", ""], dtype=object) for c in ("error_stage", "error_type", "error_message")}}
    out = stages[3](batch)
    with torch.no_grad():
        want = ((vae.decode(z / 0.0512).sample + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert [decode(b).tolist() for b in out["image"]] == [w.tolist() for w in want]
    from kandinsky_engine.images import decode_input
    from kandinsky_engine.stages.inpaint import image_tensor

    picture = noise_png()
    encoded = run_chain((config, stages), [{"id": "i", "prompt": "x", "task": "img2img", "image_bytes": picture}], until=2)
    image = image_tensor(decode_input(picture, "image"), 64, 64)  # the original's prepare_image
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
    moments = np.frombuffer(encoded["init_moments"][0], np.float32).reshape(8, 8, 8)
    np.testing.assert_allclose(moments, torch.cat([posterior.mean, posterior.std], 1)[0].numpy(), atol=1e-6)


def test_sampler_schedules_are_the_originals():
    betas = linear_betas(0.0001, 0.02)
    p = PSampler(betas, 100)
    assert len(p.indices) == 100 and p.model_timesteps()[:3] == [999.0, 989.0, 979.0] and p.model_timesteps()[-1] == 0.0
    ddim = DDIMSampler(betas, 75)  # 1000 // 75 = 13: the original takes 77 steps
    assert len(ddim.model_timesteps()) == 77 and ddim.model_timesteps()[0] == 989.0 and ddim.model_timesteps()[-1] == 1.0
    assert DDIMSampler(betas, 100, start_step=300).model_timesteps()[0] == 291.0  # img2img: timesteps <= start
    # img2img: ours is the share re-run, the original's strength the share kept (its default 0.7 = our 0.3)
    assert img2img_start("ddpm", 100, 0.3) == 30 and img2img_start("ddim", 100, 0.3) == 300
    with pytest.raises(ValueError, match="leaves no step"):
        img2img_start("ddpm", 10, 0.05)
    check_steps("ddim", 75)
    with pytest.raises(ValueError, match=r"ddim with 27 steps: the original's timesteps range\(0, 1000, 37\) \+ 1 reach 1000"):
        check_steps("ddim", 27)


def test_dynamic_threshold_is_per_row():
    """Each row is thresholded by its own 99.5th percentile of |x0|, as the original thresholds its batch
    element 0 (which it then applies to every row): a row's result does not depend on its batch-mates."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([4.0, 0.2, 2.0]).view(3, 1, 1, 1)
    together = dynamic_threshold(x)
    alone = torch.cat([dynamic_threshold(x[i : i + 1]) for i in range(3)])
    assert torch.equal(together, alone)
    s0 = np.percentile(np.abs(x.numpy()), 99.5, axis=(1, 2, 3))  # the original's percentile, per row
    assert torch.equal(together[0], (torch.clip(x[0], -float(s0[0]), float(s0[0])) / float(s0[0])))
    assert not torch.equal(together[2], torch.clip(x[2], -float(s0[0]), float(s0[0])) / float(s0[0]))  # element 0's rule
    assert torch.equal(together[1], x[1])  # below 1: s = 1, nothing clipped


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "plms"])
def test_rows_do_not_depend_on_batch_mates(model_cache, sampler):
    """Three rows (guided with "" and with a negative prompt, unguided) in one batch give each row's image
    alone; DDIM with eta 0.05 draws each row's step noise from its own generator."""
    stages = chain(model_cache, scheduler=sampler)
    together = run_chain(stages, ROWS)
    for i, row in enumerate(ROWS):
        alone = run_chain(stages, [row])
        assert together["error_message"][i] == ""
        diff = np.abs(decode(together["image"][i]).astype(int) - decode(alone["image"][0]).astype(int)).max()
        assert diff <= 1, (row["id"], diff)


def test_img2img_and_inpaint(model_cache):
    """img2img rows whose strength leaves no step fail alone; inpaint keeps its known region: with p_sampler the
    last x0 is the original's denoised_fn output, so the known latents are the input's, exactly; DDIM and PLMS
    blend x0 too (the original at aeefc1c does not: its known region drifts like the rest)."""
    import io

    from PIL import Image

    stages = chain(model_cache)
    i2i = run_chain(stages, [{"id": "i", "prompt": "x", "task": "img2img", "image_bytes": noise_png(), "strength": 0.3},
                             {"id": "j", "prompt": "x", "task": "img2img", "image_bytes": png("teal"), "strength": 0.0}])
    assert i2i["error_message"][0] == "" and "leaves no step" in i2i["error_message"][1]
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255  # white = repaint
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    row = {"id": "p", "prompt": "a cat", "task": "inpaint", "image_bytes": noise_png(), "mask_bytes": buf.getvalue(), "seed": 5}
    for sampler in ("ddpm", "ddim", "plms"):
        config, inpaint = chain(model_cache, decoder="tiny-k20-inpaint", scheduler=sampler)
        encoded = run_chain((config, inpaint), [row], until=2)
        out = inpaint[2](dict(encoded))
        moments = np.frombuffer(encoded["init_moments"][0], np.float32).reshape(8, 8, 8)
        keep = np.frombuffer(encoded["keep_mask"][0], np.float32).reshape(1, 8, 8)
        draw = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))[0].numpy()  # the row's first draw
        init = (moments[:4] + moments[4:] * draw) * 0.0512  # encode(image).sample() * scale
        latents = np.frombuffer(out["latents"][0], np.float32).reshape(4, 8, 8)
        assert keep.sum() > 0 and (1 - keep).sum() > 0
        known = np.abs((latents - init) * keep).max()
        # DDIM and PLMS end at alpha_cumprod[0] (the original's last alpha_prev), not 1: x = 0.99995 x0 + 0.01 eps
        repaint = np.abs((latents - init) * (1 - keep)).max()
        assert known <= (1e-6 if sampler == "ddpm" else 0.05) < repaint, (sampler, known, repaint)


def test_example_config_is_valid(model_cache):
    from pathlib import Path

    from kandinsky_engine.config import load_config
    from kandinsky_engine.manifest import validate_manifest

    path = Path(__file__).resolve().parents[1] / "configs" / "examples" / "kandinsky20.yaml"
    config = load_config(path, [f"model.cache_dir={model_cache}"])
    manifest = validate_manifest(config)
    assert manifest.tasks == {"text2img", "img2img"} and manifest.row_errors == {}
    assert resolve_family(config)[1].name == "kandinsky20"
