"""GPU-side options, checked where the CPU can: model.compile (buckets compiled at actor start, no
recompiles during a job), model.channels_last, config.tasks, device placement and memory caps."""

from __future__ import annotations

import pytest
import torch

from kandinsky_engine import DecoderStage, MovqStage, PriorStage
from kandinsky_engine import compiled
from kandinsky_engine.compiled import buckets
from tests.conftest import make_config
from tests.conftest import run_chain as run
from tests.reference import decode, max_diff

ROWS = [
    {"id": "a", "prompt": "a cat"},
    {"id": "b", "prompt": "a dog", "guidance_scale": 1.0, "seed": 3},  # no CFG: a U-Net batch of 1
    {"id": "c", "prompt": "a ship", "seed": 4},
    {"id": "wide", "prompt": "a harbour", "width": 128, "seed": 5},  # not the warmed-up size: eager
]


def test_buckets_are_the_full_call_and_half_of_it_in_steps_of_guidance():
    assert buckets(1) == [1]
    assert buckets(8) == [4, 8]  # a MoVQ batch of 8
    assert buckets(16, 2) == [8, 16]  # a U-Net batch of 8 rows with guidance: even sizes only
    assert buckets(2, 2) == [2] and buckets(6, 2) == [4, 6] and buckets(3) == [2, 3]


def test_compiled_stages_warm_up_every_bucket_and_never_recompile(model_cache, tmp_path, counted, caplog):
    torch.set_num_threads(1)
    torch._dynamo.reset()
    plain = make_config(model_cache, "m.parquet", str(tmp_path), prior={"batch_size": 2}, decoder={"batch_size": 2},
                        movq={"batch_size": 2})
    config = plain.model_copy(update={"model": plain.model.model_copy(update={"compile": True})})
    stages = [PriorStage(config), DecoderStage(config), MovqStage(config)]
    warm = len(counted)
    # Prior calls of 4 and 8 items, U-Net calls of 2 and 4 rows (guidance doubles a batch of 2), decodes
    # of 1 and 2: at least one graph each (more where a module breaks the graph).
    unet, movq = stages[1].run_unet, stages[2].decode
    assert (stages[0].prior_call.sizes, unet.sizes, movq.sizes) == ([4, 8], [2, 4], [1, 2])
    assert warm >= 6
    ours = run((config, stages), ROWS)
    assert len(counted) == warm  # the job compiled nothing
    # Shapes no graph holds ran eagerly, logged and counted: the 128-wide row (its 2 U-Net steps, its
    # decode), and the 3 other rows' decode, one call above the largest bucket (this test calls the stage
    # on all 4 rows at once; in a job, pipelines/chunked.py never hands it more than its batch size).
    assert unet.fallback_calls == 2 and movq.fallback_calls == 2
    assert "compiled U-Net (2.2): running a call of shapes" in caplog.text and "no bucket was compiled" in caplog.text
    assert compiled.FALLBACKS["U-Net (2.2)"] >= 2
    reference = run((plain, [stages[0], DecoderStage(plain), MovqStage(plain)]), ROWS)
    for i, row in enumerate(ROWS):  # padded rows change the others only as any batch shape does
        assert max_diff(decode(ours["image"][i]), decode(reference["image"][i])) <= 2, row["id"]  # measured <= 1


def test_channels_last_stays_within_a_level(model_cache, tmp_path):
    torch.set_num_threads(1)
    plain = make_config(model_cache, "m.parquet", str(tmp_path), fuse_stages=False)
    config = plain.model_copy(update={"model": plain.model.model_copy(update={"channels_last": True})})
    prior = PriorStage(plain)
    decoder, movq = DecoderStage(config), MovqStage(config)
    assert decoder.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert movq.movq.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ours = run((config, [prior, decoder, movq]), ROWS)
    reference = run((plain, [prior, DecoderStage(plain), MovqStage(plain)]), ROWS)
    diffs = [max_diff(decode(ours["image"][i]), decode(reference["image"][i])) for i in range(len(ROWS))]
    print(f"\nchannels_last vs contiguous, max |diff| per row (1/255): {diffs}")
    assert max(diffs) <= 2  # measured 1, 0, 1, 1: convolution kernels of another memory format


def test_prior_frees_the_image_encoder_when_no_task_needs_it(model_cache, tmp_path):
    from tests.test_img2img import init_image, png

    text_only = make_config(model_cache, "m.parquet", str(tmp_path)).model_copy(update={"tasks": ["text2img"]})
    prior = PriorStage(text_only)
    assert prior.image_encoder is None and prior.zero_embed.shape == (1, 32)
    full = PriorStage(make_config(model_cache, "m.parquet", str(tmp_path)))
    rows = [{"id": "t", "prompt": "a cat"},
            {"id": "v", "prompt": "a cat", "task": "variation", "image_bytes": png(init_image(64, 64)), "strength": 1.0}]
    from tests.conftest import batch_of

    out, expected = prior(batch_of(rows, text_only)), full(batch_of(rows, text_only))
    assert (out["image_embeds"][0] == expected["image_embeds"][0]).all()
    assert out["error_stage"][1] == "PriorStage" and "freed its image encoder" in out["error_message"][1]
    with_variation = make_config(model_cache, "m.parquet", str(tmp_path)).model_copy(
        update={"tasks": ["text2img", "variation"]})
    assert PriorStage(with_variation).image_encoder is not None


def test_memory_fraction_follows_the_gpu_share():
    from kandinsky_engine.config import StageConfig
    from kandinsky_engine.device import memory_fraction

    assert memory_fraction(StageConfig(num_gpus=0.25)) == 0.25
    assert memory_fraction(StageConfig(num_gpus=1)) == 1.0 and memory_fraction(StageConfig()) == 1.0
    assert memory_fraction(StageConfig(num_gpus=0.25, gpu_memory_fraction=0.5)) == 0.5


def gpu_config(model_cache, tmp_path, device="cuda", **shares):
    """A ControlNet job's config with these GPU shares (prior=0.2, ...)."""
    sections = {name: {"num_gpus": share} for name, share in shares.items()}
    return make_config(model_cache, "m.parquet", str(tmp_path), fuse_stages=False,  # a pool per stage, each its share
                       model={"device": device, "decoder": "tiny-controlnet"}, **sections)


def test_gpu_reservations_add_up_with_a_tolerance(model_cache, tmp_path):
    """0.2 + 0.4 + 0.3 + 0.1 is 1.0000000000000002 in floats: it fits one GPU."""
    from kandinsky_engine.manifest import Manifest
    from kandinsky_engine.pipelines.generate import check_resources

    manifest = Manifest(files=[], tasks={"controlnet"}, filesystem=None)
    config = gpu_config(model_cache, tmp_path, prior=0.2, hint=0.4, decoder=0.3, movq=0.1)
    assert sum(getattr(config, s).num_gpus for s in ("prior", "hint", "decoder", "movq")) > 1
    check_resources(config, manifest, {"CPU": 8, "GPU": 1})
    with pytest.raises(ValueError, match="reserve 1.1 GPUs but the Ray cluster has 1"):
        check_resources(gpu_config(model_cache, tmp_path, prior=0.3, hint=0.4, decoder=0.3, movq=0.1), manifest,
                        {"CPU": 8, "GPU": 1})


def test_cuda_device_must_suit_every_used_stage(model_cache, tmp_path):
    from kandinsky_engine.manifest import Manifest
    from kandinsky_engine.pipelines.generate import check_resources

    text = Manifest(files=[], tasks={"controlnet"}, filesystem=None)
    cluster = {"CPU": 8, "GPU": 2}
    shares = dict(prior=0.2, hint=0.2, decoder=0.4, movq=0.2)
    check_resources(gpu_config(model_cache, tmp_path, **shares), text, cluster)
    check_resources(gpu_config(model_cache, tmp_path, "cuda:0", **shares), text, cluster)
    # encode is not used by this job: its num_gpus 0 does not matter
    assert gpu_config(model_cache, tmp_path, **shares).encode.num_gpus == 0
    with pytest.raises(ValueError, match=r"hint.num_gpus is 0 but model.device is 'cuda'.*without a reservation"):
        check_resources(gpu_config(model_cache, tmp_path, **{**shares, "hint": 0}), text, cluster)
    with pytest.raises(ValueError, match=r"model.device is 'cuda:1'.*use model.device: cuda"):
        check_resources(gpu_config(model_cache, tmp_path, "cuda:1", **shares), text, cluster)
    check_resources(gpu_config(model_cache, tmp_path, "cpu"), text, {"CPU": 8})  # nothing to check on the CPU
    # Fused stages: one pool, scheduled (and checked) by the decoder section alone.
    fused = gpu_config(model_cache, tmp_path, **{**shares, "hint": 0}).model_copy(update={"fuse_stages": True})
    check_resources(fused, text, cluster)
    with pytest.raises(ValueError, match=r"decoder.num_gpus is 0"):
        check_resources(fused.model_copy(update={"decoder": fused.decoder.model_copy(update={"num_gpus": 0})}), text,
                        cluster)


def test_attention_backends_name_the_kernel_of_every_attention_module():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kandinsky_engine.attention import MATH, attention_backends, is_attention
    from kandinsky_engine.families.kandinsky22.tiny import build_unet

    unet = build_unet()
    x, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, 32)
    run_unet = lambda: unet(x, 10, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": embeds})
    names = {n for n, m in unet.named_modules() if is_attention(m)}
    found = attention_backends(unet, run_unet)
    assert set(found) == names and len(names) == 4
    assert set(found.values()) == {"flash (cpu)"}  # float32 on the CPU, measured (torch 2.13)
    with sdpa_kernel(SDPBackend.MATH):
        assert set(attention_backends(unet, run_unet).values()) == {MATH}


def test_options_that_change_bits_are_in_the_run_fingerprint(model_cache, tmp_path):
    """A resumed run must compute like the first one: compile and channels_last change float results,
    so they change the fingerprint; a run without them keeps the fingerprint it always had."""
    import pyarrow as pa

    from kandinsky_engine.jobs.resume import fingerprint, fingerprint_inputs

    manifest = pa.schema([("id", pa.string()), ("prompt", pa.string())])  # the manifest's unified schema
    weights = {"prior": "p", "decoder": "d", "depth": "h"}
    plain = make_config(model_cache, "m.parquet", str(tmp_path), fuse_stages=False)
    inputs = fingerprint_inputs(plain, manifest, weights)
    assert "model_options" not in inputs
    prints = {fingerprint(inputs)}
    for option in ("compile", "channels_last"):
        config = plain.model_copy(update={"model": plain.model.model_copy(update={option: True})})
        prints.add(fingerprint(fingerprint_inputs(config, manifest, weights)))
    scheduler = plain.model_copy(update={"defaults": plain.defaults.model_copy(update={"scheduler": "dpmpp"})})
    prints.add(fingerprint(fingerprint_inputs(scheduler, manifest, weights)))
    fused = plain.model_copy(update={"fuse_stages": True})  # stages at the decoder section's thread count
    prints.add(fingerprint(fingerprint_inputs(fused, manifest, weights)))
    png = plain.model_copy(update={"output": plain.output.model_copy(update={"png_compress_level": 1})})
    prints.add(fingerprint(fingerprint_inputs(png, manifest, weights)))
    assert len(prints) == 6
