"""The prior's image tasks, as `PriorStage` runs them: variation (diffusers'
`KandinskyV22PriorEmb2EmbPipeline`) and mix (the prior pipeline's `interpolate`). Each takes the
stage (its encoders, prior and caches) and returns, per row, (embedding, negative) or the row's error."""

from __future__ import annotations

from collections import defaultdict

from ..images import ImageInputError
from ..rows import generators, is_null, strength_start

IMAGE_INPUT_TASKS = ("mix", "variation")  # the tasks whose rows the CLIP image encoder encodes


def mix_items(value) -> list[dict]:
    """The `mix` column of a row: [{text | image_uri | image_bytes, weight}, ...]."""
    if is_null(value) or len(value) == 0:
        raise ValueError("mix: needs a non-empty list of {text or image, weight}")
    items = [dict(item) for item in value]
    for n, item in enumerate(items):
        sources = [k for k in ("text", "image_bytes") if not is_null(item.get(k))]
        if len(sources) != 1 or is_null(item.get("weight")):
            raise ValueError(f"mix[{n}]: needs exactly one of text or image, and a weight")
    return items



def variation_rows(stage, batch, rows: list[int]) -> list:
    """emb2emb: the row's image embedding, re-noised by `strength`, guided by its prompt."""
    init, starts, results = {}, {}, {}
    for i in rows:
        try:
            starts[i] = strength_start(int(batch["prior_num_inference_steps"][i]), float(batch["strength"][i]))
            init[i] = stage.encode_image(batch["image_bytes"][i], "image")
        except ValueError as exc:  # ImageInputError included
            results[i] = exc
    ok = [i for i in rows if i not in results]
    results.update(zip(ok, stage.prompt_rows(batch, ok, init=init, starts=starts)))
    return [results[i] for i in rows]

def mix_rows(stage, batch, rows: list[int]) -> list:
    """`interpolate`: sum of weight x embedding over the row's texts (each a prior run that
    continues the row's generator, in order) and images (CLIP image embeddings); the negative
    is the zero embedding, or the prior's embedding of the negative prompt."""
    import torch

    results, items, gens = {}, {}, {}
    for i in rows:
        try:
            items[i] = mix_items(batch["mix"][i])
            gens[i] = generators([batch["seed"][i]])[0]
        except ValueError as exc:
            results[i] = exc
    total = {i: torch.zeros(stage.embedding_dim) for i in items}
    steps, guidance = batch["prior_num_inference_steps"], batch["prior_guidance_scale"]
    # Round r runs the r-th text of every row at once; each row's generator advances in order.
    texts = {i: [it for it in items[i] if not is_null(it.get("text"))] for i in items}
    rounds = max((len(t) for t in texts.values()), default=0)
    for r in range(rounds + 1):
        # The last round is diffusers' `out_zero` run on "" with the negative prompt.
        batch_rows = [i for i in items if i not in results and (r < len(texts[i]) or r == rounds)]
        by_key = defaultdict(list)
        for i in batch_rows:
            if r == rounds and stage.negative_of(batch, i) is None:
                continue  # negative = zero embedding; nothing else depends on this generator
            by_key[(int(steps[i]), bool(guidance[i] > 1))].append(i)
        for (num_steps, cfg), group in by_key.items():
            text = lambda i: "" if r == rounds else str(texts[i][r]["text"])
            out = stage.run_prior([text(i) for i in group], [stage.negative_of(batch, i) for i in group],
                                  [gens[i] for i in group], [float(guidance[i]) for i in group], num_steps, cfg)
            for i, (emb, neg) in zip(group, out):
                if r < rounds:
                    total[i] += float(texts[i][r]["weight"]) * torch.from_numpy(emb)
                else:
                    results[i] = neg
    for i in items:
        if isinstance(results.get(i), Exception):
            continue
        try:
            for it in items[i]:
                if is_null(it.get("text")):
                    total[i] += float(it["weight"]) * stage.encode_image(it["image_bytes"], "mix image").float().cpu()
        except ImageInputError as exc:
            results[i] = exc
            continue
        negative = results.get(i)
        results[i] = (total[i].numpy(), stage.zero_embed[0].float().cpu().numpy() if negative is None else negative)
    return [results[i] for i in rows]
