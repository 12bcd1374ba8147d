"""model.compile beyond Kandinsky 2.2 (tests/test_options.py has 2.2's stages): the 2.1 and 3 U-Nets
compiled per bucket, a job's calls compiling nothing more, and the real inductor once, on the tiny
MoVQ, with its cache reused by a second actor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kandinsky_engine import compiled
from kandinsky_engine.families import resolve_family
from kandinsky_engine.inputs import unpack
from tests.conftest import batch_of, make_config
from tests.reference import decode, max_diff


def configs(model_cache, tmp_path, decoder: str):
    plain, _ = resolve_family(make_config(model_cache, "m.parquet", str(tmp_path), model={"decoder": decoder},
                                          prior={"batch_size": 2}, text_encoder={"batch_size": 2},
                                          decoder={"batch_size": 2}))
    return plain, plain.model_copy(update={"model": plain.model.model_copy(update={"compile": True})})


ROWS = [{"id": "short", "prompt": "a cat"},
        {"id": "long", "prompt": "a red lighthouse in a storm at night, lightning over the sea", "seed": 3},
        {"id": "plain", "prompt": "a ship", "guidance_scale": 1.0, "seed": 4}]  # no guidance: a batch of 1


@pytest.mark.parametrize("decoder", ["tiny-k21", "tiny-k3"])
def test_kandinsky21_and_3_unets_compile_per_bucket_and_match_eager(model_cache, tmp_path, counted, decoder):
    from kandinsky_engine.stages.decoder21 import Decoder21Stage
    from kandinsky_engine.stages.kandinsky3 import Kandinsky3UNetStage
    from kandinsky_engine.stages.prior import PriorStage
    from kandinsky_engine.stages.text_encoder import T5EncoderStage

    torch.set_num_threads(1)
    torch._dynamo.reset()
    plain, config = configs(model_cache, tmp_path, decoder)
    first, unet_stage = ((PriorStage, Decoder21Stage) if decoder == "tiny-k21" else (T5EncoderStage, Kandinsky3UNetStage))
    upstream = first(plain)(batch_of(ROWS, plain))
    ours = unet_stage(config)
    warm = len(counted)
    assert ours.run_unet.sizes == [2, 4] and warm >= 2  # guidance doubles a batch of 2: 2 and 4 rows
    chunks = ((0, 2), (2, 3))  # the batch size, as a job runs it
    run = lambda stage: np.stack([unpack(v, (4, 8, 8)) for a, b in chunks  # noqa: E731
                                  for v in stage({k: v[a:b] for k, v in upstream.items()})["latents"]])
    out = run(ours)
    # Kandinsky 3: prompts of different lengths share one graph (contexts padded to 128 tokens).
    assert len(counted) == warm and ours.run_unet.fallback_calls == 0
    diff = np.abs(out - run(unet_stage(plain))).max()
    print(f"\n{decoder}: compiled (graphs run as captured) vs eager, max |latent diff| {diff:.2e}")
    assert diff < 1e-4  # padding rows and, for 3, padded contexts: float rounding only


@pytest.mark.slow  # 40 s of C++ compilation: in `make test`, not in the quick `make check`
def test_real_inductor_compiles_the_tiny_movq_once_per_node(model_cache, tmp_path, monkeypatch):
    """inductor's C++ backend on the CPU, one bucket (a decode batch of 1); a second actor on the node
    (dynamo reset: a new process as far as compiling goes) finds the first one's code in the cache."""
    from torch._dynamo.utils import counters

    from kandinsky_engine.stages.movq import MovqStage

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch.set_num_threads(1)
    torch._dynamo.reset()
    plain = make_config(model_cache, "m.parquet", str(tmp_path), movq={"batch_size": 1})
    config = plain.model_copy(update={"model": plain.model.model_copy(update={"compile": True,
                                                                             "cache_dir": model_cache})})
    rng = np.random.default_rng(0)
    batch = {**batch_of(ROWS[:1], plain), "latents": np.array([rng.standard_normal((4, 8, 8)).astype(np.float32)
                                                               .tobytes()], dtype=object)}
    counters.clear()
    first = MovqStage(config)
    assert first.decode.sizes == [1] and counters["inductor"]["fxgraph_cache_miss"] >= 1
    assert compiled.use_cache_dir(None).startswith(model_cache)  # the node's model cache
    torch._dynamo.reset()
    counters.clear()
    second = MovqStage(config)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0
    images = [decode(stage(dict(batch))["image"][0]) for stage in (first, second, MovqStage(plain))]
    assert max_diff(images[0], images[1]) == 0
    assert max_diff(images[0], images[2]) <= 1  # fused kernels: float rounding
