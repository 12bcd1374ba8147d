"""GPU checks: run where CUDA exists, skip cleanly elsewhere (CI never depends on them).

scripts/gpu_check.sh runs them with the full-size benchmark. Nothing here imports Ray at module
level: the stage checks run on a GPU machine without it, and the Ray job skips there.
"""

import warnings

import numpy as np
import pytest
import torch

from kandinsky_engine import DecoderStage, MovqStage, PriorStage
from kandinsky_engine.stages.hint import HintStage
from kandinsky_engine.stages.movq_encode import MovqEncodeStage
from tests.conftest import batch_of, make_config, write_manifest
from tests.conftest import run_chain as run
from tests.reference import Reference, decode, max_diff
from tests.test_img2img import init_image, png
from tests.test_schedulers import DECODERS, PIPELINES, task_row

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = ["float32", "float16", "bfloat16"]
# Max |diff| (1/255) against diffusers run the same way on the GPU: float32 is the CPU bound; the
# half types allow for their rounding inside the two pipelines, which need not match op for op.
BOUND = {"float32": 1, "float16": 8, "bfloat16": 8}


def cuda_config(model_cache, tmp_path, dtype, **sections):
    model = {"device": "cuda", "dtype": dtype, **sections.pop("model", {})}
    return make_config(model_cache, "m.parquet", str(tmp_path), model=model, **sections)


def cuda_reference(tiny_root, dtype):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    reference = Reference(tiny_root)
    torch_dtype = getattr(torch, dtype)
    reference.prior = KandinskyV22PriorPipeline.from_pretrained(tiny_root / "prior", torch_dtype=torch_dtype).to("cuda")
    reference.decoder = KandinskyV22Pipeline.from_pretrained(tiny_root / "decoder", torch_dtype=torch_dtype).to("cuda")
    return reference


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_stages_match_diffusers_on_cuda(model_cache, tiny_root, tmp_path, dtype):
    config = cuda_config(model_cache, tmp_path, dtype)
    rows = [{"id": "a", "prompt": "a red cat"}, {"id": "b", "prompt": "a ship", "negative_prompt": "blur", "width": 128}]
    out = MovqStage(config)(DecoderStage(config)(PriorStage(config)(batch_of(rows, config))))
    reference = cuda_reference(tiny_root, dtype)
    resolved = batch_of(rows, config)
    for i in range(len(rows)):
        diff = max_diff(decode(out["image"][i]), reference.image({k: v[i] for k, v in resolved.items()}))
        print(f"{dtype} row {rows[i]['id']}: max |diff| {diff}/255")
        assert diff <= BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("task", ["img2img", "inpaint", "controlnet", "controlnet_img2img"])
def test_task_stages_match_diffusers_on_cuda(model_cache, tiny_root, tmp_path, task, dtype):
    """Every decoder task through its stages (MoVQ encoding, hints, inpainting, ControlNet) on the GPU,
    against the task's diffusers pipeline on the GPU in the same dtype."""
    import diffusers

    config = cuda_config(model_cache, tmp_path, dtype, model={"decoder": DECODERS[task]})
    stages = [PriorStage(config)] + ([HintStage(config)] if task.startswith("controlnet") else [])
    stages += [MovqEncodeStage(config), DecoderStage(config), MovqStage(config)]
    row, given = task_row(task)
    ours = run((config, stages), [row])
    assert ours["error_message"][0] == ""
    resolved = {k: v[0] for k, v in batch_of([row], config).items()}
    reference = cuda_reference(tiny_root, dtype)
    emb = reference.embeds(resolved)
    pipe = getattr(diffusers, PIPELINES[task]).from_pretrained(tiny_root / f"decoder{DECODERS[task][4:]}",
                                                               torch_dtype=getattr(torch, dtype)).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    extra = {"strength": float(resolved["strength"])} if task in ("img2img", "controlnet_img2img") else {}
    if "hint" in given:
        given = {**given, "hint": given["hint"].to("cuda", getattr(torch, dtype))}
    out = pipe(image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds, height=64, width=64,
               num_inference_steps=5, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3),
               output_type="np", **given, **extra).images[0]
    diff = max_diff(decode(ours["image"][0]), (out * 255).round().astype(np.uint8))
    print(f"{task} {dtype}: max |diff| {diff}/255")
    assert diff <= BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_depth_hints_in_every_dtype(model_cache, tmp_path, dtype):
    """Depth runs in float32 whatever model.dtype: no bfloat16 .numpy() crash, no float16 NaN."""
    config = cuda_config(model_cache, tmp_path, dtype, model={"decoder": "tiny-controlnet"})
    cpu = make_config(model_cache, "m.parquet", str(tmp_path), model={"decoder": "tiny-controlnet"})
    rows = [{"id": "d", "prompt": "a robot", "task": "controlnet", "image_bytes": png(init_image(64, 64, seed=10))},
            {"id": "flat", "prompt": "a wall", "task": "controlnet", "image_bytes": png(init_image(64, 64).point(lambda v: 128))}]
    ours = HintStage(config)(batch_of(rows, config))
    on_cpu = HintStage(cpu)(batch_of(rows, cpu))
    assert list(ours["error_message"]) == ["", ""]
    hint = np.frombuffer(ours["hint_pixels"][0], np.uint8)
    assert hint.std() > 0  # a real depth map
    assert max_diff(hint, np.frombuffer(on_cpu["hint_pixels"][0], np.uint8)) <= 2  # GPU vs CPU float32 kernels


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_movq_decode_in_half_is_finite_and_close_to_float32(model_cache, tmp_path, dtype):
    """Stated bound: the half-precision MoVQ decode of the same latents stays within 8/255 of float32."""
    from kandinsky_engine.stages.movq import movq_decode

    full = cuda_config(model_cache, tmp_path, "float32")
    rows = [{"id": f"r{i}", "prompt": p, "seed": i} for i, p in enumerate(["a cat", "a ship", "a red wall"])]
    latents = DecoderStage(full)(PriorStage(full)(batch_of(rows, full)))
    half = MovqStage(cuda_config(model_cache, tmp_path, dtype))
    z = torch.from_numpy(np.stack([np.frombuffer(b, np.float32) for b in latents["latents"]])).view(3, 4, 8, 8)
    with torch.inference_mode():
        decoded = movq_decode(z.to("cuda", half.movq.dtype), half.movq)
    assert torch.isfinite(decoded).all()
    ours, reference = half(dict(latents)), MovqStage(full)(dict(latents))
    diffs = [max_diff(decode(ours["image"][i]), decode(reference["image"][i])) for i in range(3)]
    print(f"MoVQ decode {dtype} vs float32: max |diff| {diffs}/255")
    assert max(diffs) <= 8


def test_decoder_loop_syncs_do_not_grow_with_steps(model_cache, tmp_path):
    """No host sync inside the step loop: a group's syncs (its input copies, before the loop) are the
    same at 2 and at 6 steps. torch's sync debug mode warns at every synchronising call."""
    config = cuda_config(model_cache, tmp_path, "float32")
    rows = [{"id": f"r{i}", "prompt": "a cat", "seed": i, "guidance_scale": 2.0 + i} for i in range(3)]
    batch = PriorStage(config)(batch_of(rows, config))
    stage = DecoderStage(config)
    idx = np.arange(3)

    def syncs(steps: int) -> int:
        with torch.inference_mode():
            stage._denoise(batch, idx, 8, 8, steps, True, "text2img", 0)  # warm: lazy inits sync once
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.inference_mode():
                    stage._denoise(batch, idx, 8, 8, steps, True, "text2img", 0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    few, many = syncs(2), syncs(6)
    print(f"host syncs per group: {few} at 2 steps, {many} at 6 steps")
    assert few == many


def test_actor_memory_is_capped_to_its_share(model_cache, tmp_path):
    total = torch.cuda.get_device_properties(0).total_memory
    config = cuda_config(model_cache, tmp_path, "float32", movq={"num_gpus": 0.5})
    try:
        MovqStage(config)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(0.6 * total), dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_small_ray_job_on_the_gpu(model_cache, tmp_path):
    """The whole job on the GPU through Ray (skipped where Ray is not installed)."""
    pytest.importorskip("ray")
    from kandinsky_engine.jobs.run import run_job

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"g{i}", "prompt": "a cat", "seed": i} for i in range(4)])
    shares = {stage: {"num_gpus": 0.25, "batch_size": 2} for stage in ("prior", "decoder", "movq")}
    config = make_config(model_cache, manifest, str(tmp_path / "out"), model={"device": "cuda"}, **shares)
    summary = run_job(config)
    assert summary["rows"] == 4 and summary["failed_rows"] == 0


def test_uint8_conversion_on_the_device_is_the_cpu_conversion():
    """The MoVQ's pixels are made on the GPU now (a quarter of the bytes to copy back): the same bytes
    as the float32 conversion on the CPU, in every dtype."""
    from kandinsky_engine.stages.movq import device_uint8

    g = torch.Generator("cuda").manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(2, 3, 64, 64, device="cuda", generator=g) * 0.7).to(dtype)
        cpu = (x * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        assert np.array_equal(device_uint8(x).cpu().numpy(), (cpu * 255).round().astype(np.uint8)), dtype


def test_prior_cuda_graphs_replay_what_eager_computes(model_cache, tmp_path):
    """model.compile on the GPU: the prior's steps as CUDA graphs (inductor's reduce-overhead mode),
    replayed call after call without a fallback, within float rounding of eager."""
    config = cuda_config(model_cache, tmp_path, "float32", prior={"batch_size": 2})
    graphs = PriorStage(config.model_copy(update={"model": config.model.model_copy(update={"compile": True})}))
    rows = [{"id": f"p{i}", "prompt": f"a lighthouse {i}", "seed": i} for i in range(2)]
    eager = np.stack(PriorStage(config)(batch_of(rows, config))["image_embeds"])
    for _ in range(2):
        ours = np.stack(graphs(batch_of(rows, config))["image_embeds"])
        np.testing.assert_allclose(ours, eager, atol=1e-4, rtol=1e-4)
    assert graphs.prior_call.fallback_calls == 0 and graphs.prior_call.sizes == [4, 8]
