"""PriorStage: rows -> CLIP image embeddings, with the semantics of `KandinskyV22PriorPipeline`
(text2img and image tasks), its `interpolate` (mix) and `KandinskyV22PriorEmb2EmbPipeline` (variation)."""

from __future__ import annotations


import numpy as np

from ..compiled import Bucketed, buckets
from ..config import JobConfig
from ..images import decode_input
from ..models import load_asset, load_module, model_dir
from ..device import stage_device
from ..rows import failed, generators, group_rows, is_null, mark_failed
from ..sampling import Schedule, draw_noise, guide, row_scales
from .prior_images import IMAGE_INPUT_TASKS, mix_rows, variation_rows

REQUIRED = ("id", "task", "prompt", "negative_prompt", "seed", "prior_num_inference_steps", "prior_guidance_scale")


class PriorStage:
    """Adds `image_embeds` and `negative_image_embeds` (float32, (B, D)) to a batch.

    Loads the CLIP text encoder, tokenizer, prior transformer and CLIP image encoder once. The
    zero-image embedding (the negative of rows without a negative prompt) and the encoding of the
    empty prompt (their unconditional input) are computed once here; diffusers recomputes both on
    every call. The image encoder is then freed if the job's tasks (config.tasks) need no other image.
    """

    def __init__(self, config: JobConfig, components: dict | None = None, sources: dict | None = None):
        """`components`: the modules of `KandinskyV22PriorPipeline` (prior, image_encoder, text_encoder,
        tokenizer, scheduler, image_processor), ready on the stage's device, instead of loading
        config.model.prior (jobs/bench_gpu.py passes randomly initialised full-size ones). `sources`: the
        model sources as the driver resolved them (models.model_dir; None: resolved here)."""
        import torch

        torch.set_num_threads(config.prior.threads())
        self.device = stage_device(config.model, config.prior)
        parts = components or self._load(config, sources)
        self.tokenizer, self.text_encoder, self.prior = parts["tokenizer"], parts["text_encoder"], parts["prior"]
        self.scheduler_config = parts["scheduler"].config
        self.image_encoder, self.image_processor = parts["image_encoder"], parts["image_processor"]
        self.max_pixels = config.input.max_image_pixels
        self.tasks = config.tasks
        self.embedding_dim = self.prior.config.embedding_dim
        size = self.image_encoder.config.image_size
        with torch.inference_mode():
            zero_image = torch.zeros(1, 3, size, size, device=self.device, dtype=self.image_encoder.dtype)
            self.zero_embed = self.image_encoder(zero_image)["image_embeds"]  # (1, D)
            # The unconditional input of rows without a negative prompt, encoded once at batch size 1
            # (what diffusers computes for one row): (1, D), (1, 77, H), (1, 77).
            self.empty_prompt = self._encode([""])
        self.prior_call = prior_forward
        if config.model.compile:
            # Items per call: a row, or two with a negative prompt; guidance doubles them. Buckets: the
            # full call without negative prompts and with them. On a GPU each bucket is a CUDA graph:
            # the prior's 25 steps are many small kernels, launched in one replay each.
            step = 2 if config.defaults.prior_guidance_scale > 1 else 1
            self.prior_call = Bucketed(prior_forward, buckets(2 * step * config.prior.batch_size, step), "prior",
                                      mode="reduce-overhead" if self.device.type == "cuda" else None,
                                      cache_dir=config.model.cache_dir)
            self.prior_call.warm_up(self._example)
        if config.tasks is not None and not set(config.tasks) & set(IMAGE_INPUT_TASKS):
            # Only mix and variation rows encode images (1.85B parameters on the real model).
            self.image_encoder = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _example(self, n: int):
        """Prior inputs of n items (compile warm-up): latents, projection, hidden states, mask."""
        import torch

        g, d = torch.Generator().manual_seed(0), self.embedding_dim
        tokens, width = self.tokenizer.model_max_length, self.text_encoder.config.hidden_size
        to = lambda t: t.to(self.device, self.prior.dtype)  # noqa: E731
        mask = torch.ones(n, tokens, dtype=torch.bool)
        return to(torch.randn(n, d, generator=g)), {
            "prior": self.prior, "timestep": torch.tensor(999, device=self.device),
            "proj": to(torch.randn(n, d, generator=g)), "hidden": to(torch.randn(n, tokens, width, generator=g)),
            "mask": mask.to(self.device)}

    def _load(self, config: JobConfig, sources: dict | None) -> dict:
        from diffusers import PriorTransformer, UnCLIPScheduler
        from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                                  CLIPVisionModelWithProjection)

        folder = model_dir(config, "prior", sources)
        load = lambda cls, subfolder: load_module(cls, config.model, folder, subfolder, self.device)
        asset = lambda cls, subfolder: load_asset(cls, folder, subfolder)
        return {"tokenizer": asset(CLIPTokenizer, "tokenizer"), "text_encoder": load(CLIPTextModelWithProjection, "text_encoder"),
                "prior": load(PriorTransformer, "prior"), "scheduler": asset(UnCLIPScheduler, "scheduler"),
                "image_encoder": load(CLIPVisionModelWithProjection, "image_encoder"),
                "image_processor": asset(CLIPImageProcessor, "image_processor")}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [c for c in REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"PriorStage: batch lacks columns {missing}")
        n = len(batch["id"])
        embeds = np.zeros((n, self.embedding_dim), np.float32)
        negative = np.zeros((n, self.embedding_dim), np.float32)
        todo = np.flatnonzero(~failed(batch))
        with torch.inference_mode():
            plain = [i for i in todo if batch["task"][i] not in ("mix", "variation")]
            for i, (e, ne) in zip(plain, self.prompt_rows(batch, plain)):
                embeds[i], negative[i] = e, ne
            for task, method in (("variation", variation_rows), ("mix", mix_rows)):
                rows = [i for i in todo if batch["task"][i] == task]
                if rows:
                    for i, result in zip(rows, method(self, batch, rows)):
                        if isinstance(result, Exception):
                            mark_failed(batch, i, "PriorStage", result)
                        else:
                            embeds[i], negative[i] = result
        return {**batch, "image_embeds": embeds, "negative_image_embeds": negative}

    # -- one prior run over many rows ------------------------------------------------------

    def run_prior(self, texts, negatives, gens, scales, num_steps: int, cfg: bool, init=None, t_start: int = 0):
        """Run the prior once for several rows; returns [(embedding, negative embedding)] per row.

        Like diffusers, a row with a negative prompt runs two items, [text, negative], whose
        unconditional text is the negative prompt; a row without one runs one item with "" as
        unconditional text and takes the cached zero embedding as its negative. `init` (emb2emb)
        gives each row a (D,) image embedding to start from at timestep index `t_start`. All items
        step together (sampling.py); each row's noise comes from its own generator, in order.
        """
        import torch
        from diffusers import UnCLIPScheduler

        items, uncond, spans = [], [], []
        for text, neg in zip(texts, negatives):
            row_items = [text] + ([] if neg is None else [neg])
            spans.append(slice(len(items), len(items) + len(row_items)))
            items += row_items
            uncond += ["" if neg is None else neg] * len(row_items)
        proj, hidden, mask = self._encode(items)  # (M, D), (M, 77, H), (M, 77)
        if cfg:
            u_proj, u_hidden, u_mask = self._encode_uncond(uncond)
            proj, hidden, mask = torch.cat([u_proj, proj]), torch.cat([u_hidden, hidden]), torch.cat([u_mask, mask])

        schedule = Schedule(UnCLIPScheduler.from_config(self.scheduler_config), num_steps, t_start, self.device)
        noisy = schedule.noise_steps()
        # Row r's draws, each of its (items, D) block: the initial noise, then one per noisy step.
        noise = draw_noise(gens, [(s.stop - s.start, self.embedding_dim) for s in spans], 1 + sum(noisy), proj.dtype,
                           self.device)  # (1 + K, M, D)
        if init is None:
            latents = noise[0] * schedule.init_noise_sigma
        else:  # emb2emb: the raw image embedding, noised to the first kept timestep (no init_noise_sigma)
            start = [e.to(self.device, proj.dtype).expand(s.stop - s.start, -1) for e, s in zip(init, spans)]
            latents = schedule.add_noise(torch.cat(start), noise[0])
        item_scales = row_scales([scale for s, scale in zip(spans, scales) for _ in range(s.stop - s.start)], 2,
                                 self.device)  # (M, 1)

        draw, m = 1, len(items)
        for k in range(len(schedule.timesteps)):
            model_input = torch.cat([latents] * 2) if cfg else latents
            pred = self.prior_call(model_input, prior=self.prior, timestep=schedule.model_timesteps[k], proj=proj,
                                  hidden=hidden, mask=mask)  # (2M or M, D)
            pred = guide(pred[:m], pred[m:], item_scales, pred.dtype) if cfg else pred
            latents = schedule.step(k, pred, latents, noise[draw] if noisy[k] else None)
            draw += noisy[k]

        latents = self.prior.post_process_latents(latents).float().cpu()
        zero = self.zero_embed[0].float().cpu()
        return [(latents[s.start].numpy(), (latents[s.start + 1] if s.stop - s.start == 2 else zero).numpy())
                for s in spans]

    def _encode_uncond(self, texts: list[str]):
        """Unconditional inputs: "" from the actor's cache, the other (negative) prompts encoded together."""
        import torch

        others = [t for t in texts if t != ""]
        encoded = self._encode(others) if others else None
        parts, j = [], 0
        for text in texts:
            if text == "":
                parts.append(self.empty_prompt)
            else:
                parts.append(tuple(x[j : j + 1] for x in encoded))
                j += 1
        return tuple(torch.cat(column) for column in zip(*parts))

    def _encode(self, texts: list[str]):
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        out = self.text_encoder(tokens.input_ids.to(self.device))
        return out.text_embeds, out.last_hidden_state, tokens.attention_mask.bool().to(self.device)

    def encode_image(self, data, kind: str) -> "torch.Tensor":
        """Encoded image bytes -> (D,) CLIP image embedding, through the CLIP image processor."""
        if self.image_encoder is None:
            raise ValueError(f"{kind}: this job's tasks ({', '.join(self.tasks)}) encode no images, so the prior "
                             "freed its image encoder (config.tasks)")
        image = decode_input(data, kind, max_pixels=self.max_pixels)
        pixels = self.image_processor(image, return_tensors="pt").pixel_values
        return self.image_encoder(pixels.to(self.device, self.image_encoder.dtype))["image_embeds"][0]

    # -- tasks ------------------------------------------------------------------------------

    def negative_of(self, batch, i):
        value = batch["negative_prompt"][i]
        return None if is_null(value) else str(value)

    def prompt_rows(self, batch, rows: list[int], init=None, starts=None) -> list:
        """text2img-style rows (and variation rows when `init`/`starts` are given), sub-batched by
        (steps, guidance on/off, start step)."""
        steps, guidance = batch["prior_num_inference_steps"], batch["prior_guidance_scale"]
        starts = starts or {}
        results: dict[int, tuple] = {}
        key = lambda k: (int(steps[rows[k]]), bool(guidance[rows[k]] > 1), starts.get(rows[k], 0))
        for (num_steps, cfg, t_start), ks in group_rows({"id": np.array(rows)}, key).items():
            group = [rows[k] for k in ks]
            out = self.run_prior(
                [str(batch["prompt"][i]) for i in group], [self.negative_of(batch, i) for i in group],
                generators(batch["seed"][group]), [float(guidance[i]) for i in group], num_steps, cfg,
                init=None if init is None else [init[i] for i in group], t_start=t_start,
            )
            results.update(zip(group, out))
        return [results[i] for i in rows]


def prior_forward(x, prior, timestep, proj, hidden, mask):
    """One prior call as `KandinskyV22PriorPipeline` makes it: (B, D) latents -> (B, D) prediction."""
    return prior(x, timestep=timestep, proj_embedding=proj, encoder_hidden_states=hidden,
                 attention_mask=mask).predicted_image_embedding
