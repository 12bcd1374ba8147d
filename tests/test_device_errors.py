"""Fatal device errors (a CUDA error other than out of memory) on the CPU, with a stage that raises
torch's CUDA error type: never split into row errors in a broken process, the actor restarted by
Ray and the unit retried, and a fault that repeats bounded by the crash ledger."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from kandinsky_engine.pipelines.chunked import FATAL_LIMIT, Chunked, CrashLedger, is_fatal_device_error, is_oom
from tests.test_pipeline import block

ILLEGAL = "CUDA error: an illegal memory access was encountered"


class Broken:
    """A stage that hits a CUDA error whenever the row 'bad' is in its batch (not failed upstream)."""

    calls: list = []

    def __init__(self, **kwargs):
        pass

    def __call__(self, batch):
        ok = [m == "" for m in batch["error_message"]]
        Broken.calls.append([i for i, good in zip(batch["id"], ok) if good])
        if "bad" in Broken.calls[-1]:
            raise torch.AcceleratorError(ILLEGAL)
        return {**batch, "n": np.array([len(batch["id"]) if good else 0 for good in ok])}


class Restarted(Exception):
    """Stands for the actor process exiting (os._exit) and Ray starting a new one."""


def test_cuda_errors_are_told_from_out_of_memory():
    assert is_fatal_device_error(torch.AcceleratorError(ILLEGAL))
    assert is_fatal_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_fatal_device_error(RuntimeError("cuBLAS: CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_oom(oom) and not is_fatal_device_error(oom)
    assert not is_fatal_device_error(RuntimeError("CUDA error: out of memory"))  # an OOM: split, as ever
    assert not is_fatal_device_error(ValueError("the model raised on this row"))
    assert not is_fatal_device_error(RuntimeError("CUDNN_STATUS_NOT_SUPPORTED"))  # a shape, not the device


def test_without_ray_a_fatal_error_is_raised_not_split():
    Broken.calls = []
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        Chunked(Broken, batch_size=4)(block(["a", "bad", "c", "d"]))
    assert Broken.calls == [["a", "bad", "c", "d"]]  # nothing else ran in the broken process


def test_a_repeating_fault_is_bounded_and_ends_as_one_row_error(monkeypatch):
    """Each attempt is a new actor process (a new Chunked) of the same plan (scope). The chunk that keeps
    breaking the device is split only after FATAL_LIMIT restarts, down to the row, which then fails
    without running again; its batch-mates are computed."""
    def exit_for_restart(name, message):
        raise Restarted(message)

    monkeypatch.setattr(Chunked, "exit_for_restart", staticmethod(exit_for_restart))
    scope, Broken.calls = f"test-{uuid.uuid4().hex}", []
    restarts = 0
    while True:
        try:
            out = Chunked(Broken, batch_size=4, fatal_scope=scope)(block(["a", "bad", "c", "d"]))
            break
        except Restarted as exc:
            assert "illegal memory access" in str(exc)
            restarts += 1
            assert restarts < 20, "no end to the restarts"
    # 4 rows: twice whole, twice [a, bad], twice [bad]; then [bad] fails unrun.
    assert restarts == 3 * FATAL_LIMIT
    assert list(out["id"]) == ["a", "bad", "c", "d"]
    assert list(out["error_stage"]) == ["", "Broken", "", ""]
    assert out["error_type"][1] == "FatalDeviceError"
    assert out["error_message"][1].startswith(f"fatal device error at batch size 1 ({FATAL_LIMIT} actor restarts)")
    assert "illegal memory access" in out["error_message"][1]
    assert list(out["n"]) == [1, 0, 2, 2]
    assert ["bad"] not in Broken.calls[-3:]  # the last attempt never ran it
    ledger = CrashLedger(scope)
    assert ledger.crashes(ledger.key("Broken", ["bad"]))[0] == FATAL_LIMIT
    for path in ledger.folder.iterdir():
        path.unlink()
    ledger.folder.rmdir()


@pytest.mark.ray
def test_ray_restarts_the_actor_and_retries_the_unit(ray_cluster, tmp_path):
    """A real actor pool: the first call on each unit hits a CUDA error, once. The actor exits, Ray
    restarts it and resubmits the block, and every row comes out computed, none as an error."""
    import ray

    from kandinsky_engine.config import StageConfig
    from kandinsky_engine.pipelines.generate import pool_class, stage_args
    from tests.conftest import make_config
    from tests.faults import stage_actors

    marks = tmp_path / "marks"
    marks.mkdir()

    class FlakyDevice:  # defined here: Ray pickles it by value for the actor
        def __init__(self, marks: str, **kwargs):
            self.marks = Path(marks)

        def __call__(self, batch):
            mark = self.marks / str(batch["_unit"][0]).replace("/", "_")
            if not mark.exists():
                mark.write_text("broke once")
                raise torch.AcceleratorError(ILLEGAL)
            return {**batch, "done": np.ones(len(batch["id"]), np.int64)}

    units = [block([f"{u}{i}" for i in range(3)], unit=f"f/{u}") for u in ("x", "y")]
    ds = ray.data.from_items([{k: v[i] for k, v in unit.items()} for unit in units for i in range(3)])
    ds = ds.repartition(2)  # one block per unit
    config = make_config("unused", "m.parquet", str(tmp_path))
    args = stage_args(FlakyDevice, StageConfig(batch_size=3, num_cpus=0.25), config, fatal_scope=uuid.uuid4().hex,
                      marks=str(marks))
    rows = ds.map_batches(pool_class(FlakyDevice), **args).take_all()
    assert sorted(r["id"] for r in rows) == ["x0", "x1", "x2", "y0", "y1", "y2"]
    assert all(r["done"] == 1 and r["error_message"] == "" for r in rows)
    assert sorted(p.name for p in marks.iterdir()) == ["f_x", "f_y"]
    restarts = [a["NumRestarts"] for a in stage_actors("FlakyDevice", states=("ALIVE", "DEAD"))]
    assert sum(restarts) >= 1, restarts  # the same actor, restarted after each fault
