"""Kandinsky 2.0 parity: the engine against the original repository's code (not CI: it needs a checkout of
ai-forever/Kandinsky-2 and its small dependencies: omegaconf, einops, pytorch_lightning, opencv).

    python scripts/parity_kandinsky20.py --original /path/to/Kandinsky-2 [--steps 10] [--json out.json]

1. Builds tiny random weights *with the original's classes* (create_model, its AutoencoderKL, its M-CLIP, and
   transformers' mT5) at the tiny model's sizes (kandinsky_engine/families/kandinsky20/tiny.py, ORIGINAL_CONFIG)
   and saves them in the original formats: U-Net state dicts (.pt), a Lightning vae.ckpt (with a
   ModelCheckpoint callback key and training-loss keys), text_encoder1/ and text_encoder2/ with pytorch_model.bin.
2. Converts them with `convert-k20` (both U-Nets).
3. For each task and sampler, runs the original's `generate_*` at batch size 1 after torch.manual_seed(seed) on
   the CPU, and the engine's stages on one row with that seed, and prints max / mean |delta| in /255.

How the original is run, and nothing else changed: its package __init__ (which imports huggingface_hub's removed
`cached_download` to download weights) is skipped; `model/samplers.py`, which hard-codes the device "cuda", is
loaded with "cuda" replaced by "cpu"; its own torch.load of vae.ckpt is allowed to unpickle Lightning's class
(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, for the file this script wrote). img2img is called as `generate_img2img` on the
text2img model (the head's factory refuses task_type="img2img"). Its strength is the share kept: 1 - ours.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # the original's own torch.load of the vae.ckpt written here

PROMPT = "a red cat, 4k photo"


def load_original(checkout: Path):
    """The original's `kandinsky2` package, imported from the checkout without its __init__."""
    package = types.ModuleType("kandinsky2")
    package.__path__ = [str(checkout / "kandinsky2")]
    sys.modules["kandinsky2"] = package
    path = checkout / "kandinsky2" / "model" / "samplers.py"
    spec = importlib.util.spec_from_loader("kandinsky2.model.samplers", loader=None)
    samplers = importlib.util.module_from_spec(spec)
    exec(compile(path.read_text().replace('"cuda"', '"cpu"'), str(path), "exec"), samplers.__dict__)
    sys.modules["kandinsky2.model.samplers"] = samplers
    import kandinsky2.kandinsky2_model as model  # noqa: E402  (after the stubs above)
    import kandinsky2.model.model_creation as creation
    import kandinsky2.model.text_encoders as text_encoders
    import kandinsky2.vqgan.autoencoder as autoencoder

    return types.SimpleNamespace(Kandinsky2=model.Kandinsky2, create_model=creation.create_model,
                                 AutoencoderKL=autoencoder.AutoencoderKL, MultilingualCLIP=text_encoders.MultilingualCLIP,
                                 DDIMSampler=samplers.DDIMSampler)


def perturb(module, seed: int, scale: float = 0.05):
    """Seeded noise on every parameter: the original zero-initialises its output convolutions, which would make a
    random U-Net predict zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def write_original(orig, out: Path) -> dict:
    """Tiny weights in the original formats under `out`; returns the original's config dict for them."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from transformers import MT5Config, MT5ForConditionalGeneration, XLMRobertaConfig

    from kandinsky_engine.families.kandinsky20 import tiny

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    mc = dict(tiny.ORIGINAL_CONFIG["model_config"])
    torch.save(perturb(orig.create_model(**mc), 1).state_dict(), out / "Kandinsky-2-0.pt")
    torch.save(perturb(orig.create_model(**{**mc, "inpainting": True}), 2).state_dict(), out / "Kandinsky-2-0-inpainting.pt")
    vae = perturb(orig.AutoencoderKL(ddconfig=tiny.ORIGINAL_CONFIG["vae_ddconfig"], embed_dim=4), 3, 0.02)
    state = {**vae.state_dict(), "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}], "lr_schedulers": []},
               out / "vae.ckpt")
    xlmr_tok, t5_tok = tiny.tokenizers()
    enc1 = out / "text_encoder1"
    xlmr_tok.save_pretrained(enc1)
    XLMRobertaConfig(hidden_size=tiny.TEXT_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                     vocab_size=len(xlmr_tok), pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     max_position_embeddings=tiny.MAX_LENGTH + 3).save_pretrained(enc1)
    torch.manual_seed(4)
    mclip = orig.MultilingualCLIP(str(enc1), in_features=tiny.TEXT_DIM, out_features=tiny.POOLED_DIM)
    torch.save(mclip.state_dict(), enc1 / "pytorch_model.bin")
    enc2 = out / "text_encoder2"
    t5_tok.save_pretrained(enc2)
    config = MT5Config(vocab_size=len(t5_tok), d_model=tiny.MT5_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                       relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                       decoder_start_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(5)
    config.save_pretrained(enc2)
    torch.save(MT5ForConditionalGeneration(config).state_dict(), enc2 / "pytorch_model.bin")  # decoder included
    from kandinsky2.configs import CONFIG_2_0

    cfg = copy.deepcopy(CONFIG_2_0)
    cfg["model_config"].update(mc)
    cfg["image_enc_params"]["params"].update(ckpt_path=str(out / "vae.ckpt"), ddconfig=tiny.ORIGINAL_CONFIG["vae_ddconfig"])
    cfg["text_enc_params1"] = {"model_path": str(enc1), "model_name": "multiclip", "in_features": tiny.TEXT_DIM,
                               "out_features": tiny.POOLED_DIM}
    cfg["text_enc_params2"] = {"model_path": str(enc2), "model_name": "MT5EncoderModel"}
    cfg["tokenizer_name1"], cfg["tokenizer_name2"] = str(enc1), str(enc2)
    return cfg


def input_image(size=(96, 80)):
    """A deterministic RGB test image (a colour gradient with a pattern), not the output size: both sides resize it."""
    from PIL import Image

    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([x * 255 // size[0], y * 255 // size[1], ((x // 8 + y // 8) % 2) * 200], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def keep_mask(size=512):
    """The original's img_mask (1 = keep, 0 = repaint) at the working size."""
    mask = np.ones((size, size), np.float32)
    mask[size // 4 : 3 * size // 4, size // 3 : 5 * size // 6] = 0
    return mask


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


LATENTS = {}  # the last run's final latents (before the VAE decode), per side


def run_original(models: dict, case: dict, seed: int) -> np.ndarray:
    model = models["inpainting" if case["task"] == "inpaint" else "text2img"]
    decode = model.image_encoder.decode
    model.image_encoder.decode = lambda z: (LATENTS.__setitem__("original", z * model.scale), decode(z))[1]
    kwargs = dict(num_steps=case["steps"], guidance_scale=7, sampler=case["sampler"], ddim_eta=case.get("eta", 0.05),
                  progress=False)
    torch.manual_seed(seed)
    if case["task"] == "text2img":
        images = model.generate_text2img(PROMPT, h=case["size"][0], w=case["size"][1], **kwargs)
    elif case["task"] == "img2img":
        images = model.generate_img2img(PROMPT, input_image(), strength=case["strength"], **kwargs)
    else:
        images = model.generate_inpainting(PROMPT, input_image(), keep_mask(), **kwargs)
    model.image_encoder.decode = decode
    return np.asarray(images[0])


ENGINE_SAMPLERS = {"p_sampler": "ddpm", "ddim_sampler": "ddim", "plms_sampler": "plms"}


def run_engine(dirs: dict, case: dict, seed: int, cache: str) -> np.ndarray:
    from PIL import Image

    from kandinsky_engine.config import JobConfig
    from kandinsky_engine.families import resolve_family
    from kandinsky_engine.stages.kandinsky20 import Kandinsky20UNetStage
    from kandinsky_engine.stages.kandinsky20_text import Kandinsky20TextStage
    from kandinsky_engine.stages.vae import KLDecodeStage, KLEncodeStage
    from tests.conftest import batch_of

    h, w = case["size"] if case["task"] == "text2img" else (512, 512)
    config = JobConfig.model_validate({
        "input": {"manifest": "unused.parquet"}, "output": {"path": "unused"},
        "model": {"decoder": str(dirs["inpainting" if case["task"] == "inpaint" else "text2img"]), "cache_dir": cache},
        "defaults": {"scheduler": ENGINE_SAMPLERS[case["sampler"]], "ddim_eta": case.get("engine_eta", 0.0),
                     "num_inference_steps": case["steps"], "guidance_scale": 7.0, "width": w, "height": h}})
    config, _ = resolve_family(config)
    row = {"id": "r", "prompt": PROMPT, "seed": seed, "task": case["task"]}
    if case["task"] != "text2img":
        row["image_bytes"] = png(input_image())
    if case["task"] == "img2img":
        row["strength"] = 1 - case["strength"]  # ours is the share re-run, the original's the share kept
    if case["task"] == "inpaint":
        row["mask_bytes"] = png(Image.fromarray(((1 - keep_mask()) * 255).astype(np.uint8)))  # white = repaint
    batch = batch_of([row], config)
    for stage in (Kandinsky20TextStage(config), KLEncodeStage(config), Kandinsky20UNetStage(config), KLDecodeStage(config)):
        if isinstance(stage, Kandinsky20UNetStage) and case["task"] == "inpaint":
            LATENTS["keep"] = torch.from_numpy(np.frombuffer(batch["keep_mask"][0], np.float32).reshape(1, 1, h // 8, w // 8))
        if isinstance(stage, KLDecodeStage):
            LATENTS["engine"] = torch.from_numpy(np.frombuffer(batch["latents"][0], np.float32).reshape(1, 4, h // 8, w // 8))
        batch = stage(batch)
    if batch["error_message"][0]:
        raise RuntimeError(batch["error_message"][0])
    return np.asarray(Image.open(io.BytesIO(batch["image"][0])).convert("RGB"))


def delta(a: np.ndarray, b: np.ndarray) -> dict:
    if a.shape != b.shape:
        return {"shape": [list(a.shape), list(b.shape)]}
    d = np.abs(a.astype(int) - b.astype(int))
    return {"max": int(d.max()), "mean": round(float(d.mean()), 4)}


def cases(steps: int) -> list[dict]:
    out = []
    for sampler in ENGINE_SAMPLERS:
        out.append({"name": f"text2img {sampler}", "task": "text2img", "sampler": sampler, "steps": steps, "size": (64, 64)})
        out.append({"name": f"text2img {sampler} 64x128", "task": "text2img", "sampler": sampler, "steps": steps,
                    "size": (64, 128)})
        out.append({"name": f"img2img {sampler}", "task": "img2img", "sampler": sampler, "steps": steps, "strength": 0.7})
        out.append({"name": f"inpaint {sampler}", "task": "inpaint", "sampler": sampler, "steps": steps})
    out.append({"name": "text2img ddim_sampler 75 steps (runs 77)", "task": "text2img", "sampler": "ddim_sampler",
                "steps": 75, "size": (64, 64)})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True, type=Path, help="checkout of ai-forever/Kandinsky-2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    from kandinsky_engine.families.kandinsky20.convert import convert

    work = args.work or Path(tempfile.mkdtemp(prefix="k20-parity-"))
    orig = load_original(args.original)
    cfg = write_original(orig, work / "original")
    dirs = {}
    for task in ("text2img", "inpainting"):
        dirs[task] = work / f"converted-{task}"
        if not dirs[task].exists():
            convert(str(work / "original"), str(dirs[task]), task=task, head_channels=cfg["model_config"]["num_head_channels"])
    models = {task: orig.Kandinsky2(copy.deepcopy(cfg), str(work / "original" / name), "cpu", task)
              for task, name in (("text2img", "Kandinsky-2-0.pt"), ("inpainting", "Kandinsky-2-0-inpainting.pt"))}
    rows = []
    for case in cases(args.steps):
        theirs, ours = run_original(models, case, args.seed), run_engine(dirs, case, args.seed, str(work / "cache"))
        result = delta(theirs, ours)
        if case["task"] == "inpaint":
            # The known region's final latents against the input's (the original p_sampler's, which blends them
            # back at every step and ends on them exactly), max |delta| over the latent keep mask.
            keep = LATENTS["keep"].bool().expand_as(LATENTS["engine"])
            if case["sampler"] == "p_sampler":
                known_latents = LATENTS["original"][:1].float()
            scale = float(known_latents[keep].abs().max())
            result["known_latents_max_vs_input"] = {
                side: round(float((LATENTS[side][:1].float() - known_latents)[keep].abs().max()) / scale, 4)
                for side in ("original", "engine")} | {"input_latents_max": round(scale, 4)}
        rows.append({"case": case["name"], **result})
        print(json.dumps(rows[-1]), flush=True)
    # DDIM with eta: the original ignores it (runs 0); with the bug fixed (DDIMSampler.sample given the eta that
    # generate_* passes) it is what the engine runs.
    eta_case = {"name": "text2img ddim_sampler eta 0.05", "task": "text2img", "sampler": "ddim_sampler",
                "steps": args.steps, "size": (64, 64), "eta": 0.05, "engine_eta": 0.05}
    ours = run_engine(dirs, eta_case, args.seed, str(work / "cache"))
    as_is = run_original(models, eta_case, args.seed)
    sample = orig.DDIMSampler.sample
    orig.DDIMSampler.sample = lambda self, *a, eta=0.0, **k: sample(self, *a, eta=eta_case["eta"], **k)
    try:
        fixed = run_original(models, eta_case, args.seed)
    finally:
        orig.DDIMSampler.sample = sample
    rows.append({"case": "text2img ddim_sampler eta 0.05, original with eta honoured", **delta(fixed, ours)})
    rows.append({"case": "text2img ddim_sampler eta 0.05, original as is (runs eta 0)", **delta(as_is, ours)})
    for row in rows[-2:]:
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "seed": args.seed, "torch": torch.__version__,
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
