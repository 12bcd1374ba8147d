"""The CPU side of a GPU stage overlaps the device: the next chunk's noise is drawn on a background
thread while the current chunk runs, the results are those of drawing it in place, and the GPU
actor's torch threads. (The GPU's idle time itself is measured by jobs/bench_gpu.py's profiler.)"""

from __future__ import annotations

import torch

from kandinsky_engine import DecoderStage, PriorStage
from kandinsky_engine.config import GPU_THREADS, StageConfig
from kandinsky_engine.pipelines.chunked import Chunked
from tests.conftest import batch_of, make_config

ROWS = [{"id": f"r{i}", "prompt": f"a lighthouse, study {i}", "seed": 10 + i} for i in range(4)]


def test_next_chunk_noise_is_ready_before_the_current_chunk_finishes(model_cache, tmp_path):
    torch.set_num_threads(1)
    config = make_config(model_cache, "m.parquet", str(tmp_path), decoder={"batch_size": 2},
                         defaults={"num_inference_steps": 10})
    block = PriorStage(config)(batch_of(ROWS, config))
    chunked = Chunked(DecoderStage, batch_size=2, config=config)
    out = chunked(block)
    events = list(chunked.stage.noise.events)
    first, second = [spec for event, spec, _, _ in events if event == "taken"]
    assert first.seeds == (10, 11) and second.seeds == (12, 13)
    when = {(event, spec): (t, thread) for event, spec, t, thread in events}
    ready, thread = when[("ready", second)]
    assert thread.startswith("noise-prefetch")  # drawn off the thread that runs the model
    # On the CPU a stage's operations run as they are queued: 'queued' is when the first chunk finished.
    assert ready < when[("queued", first)][0], "the second chunk's noise was drawn only after the first chunk"
    assert not chunked.stage.noise.pending  # nothing left behind for the next block

    # The same latents as drawing each group's noise in place, chunk by chunk without prefetching.
    plain = DecoderStage(config)
    expected = [plain({k: v[a:b] for k, v in block.items()})["latents"] for a, b in ((0, 2), (2, 4))]
    assert [bytes(v) for v in out["latents"]] == [bytes(v) for part in expected for v in part]
    assert all(thread == "MainThread" for event, _, _, thread in plain.noise.events if event == "ready")


def test_gpu_actors_get_threads_for_their_cpu_work():
    assert StageConfig(num_cpus=0.2).threads() == 1  # a CPU actor: its Ray share
    assert StageConfig(num_cpus=0.2, num_gpus=0.5).threads() == GPU_THREADS == 4
    assert StageConfig(num_cpus=8, num_gpus=1).threads() == 8
    assert StageConfig(num_gpus=1, torch_threads=2).threads() == 2  # set explicitly: as set
