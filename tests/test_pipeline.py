"""Scheduling pieces of pipelines/ without a cluster: units of work and sub-batching."""

import numpy as np
import pyarrow as pa
import pytest

from kandinsky_engine.config import GenerationDefaults
from kandinsky_engine.rows import derive_seed, numpy_batch
from pipelines.generate import Chunked, concat
from pipelines.prepare import UNIT, prepare_unit


class Recorder:
    """A stage that records the ids of every batch it is given and adds a column."""

    calls: list = []

    def __init__(self, **kwargs):
        pass

    def __call__(self, batch):
        Recorder.calls.append(list(batch["id"]))
        return {**batch, "n": np.full(len(batch["id"]), len(batch["id"]))}


def prepare(table, unit=0, todo=None, row_errors=None, **kwargs):
    todo = {unit: (1, None)} if todo is None else todo
    ids = table["id"].to_pylist()
    return prepare_unit(table, units={ids[0]: unit} if ids else {}, todo=todo, digests={unit: "d" * 16},
                        row_errors=row_errors or {}, defaults=kwargs.pop("defaults", GenerationDefaults()),
                        passthrough=kwargs.pop("passthrough", []))


def block(ids, unit=0, todo=None, row_errors=None):
    table = pa.table({"id": pa.array(ids, pa.string()), "prompt": pa.array(["p"] * len(ids), pa.string())})
    return numpy_batch(prepare(table, unit, todo, row_errors))


def test_units_are_split_the_same_way_even_when_ray_merges_blocks():
    a, b = block([f"a{i}" for i in range(6)]), block([f"b{i}" for i in range(6)], unit=1)
    merged = {k: concat([a[k], b[k]]) for k in a}
    Recorder.calls = []
    out = Chunked(Recorder, batch_size=4)(merged)
    # Chunks of 4 never straddle the two units: 6 rows -> 4 + 2 per unit.
    assert Recorder.calls == [["a0", "a1", "a2", "a3"], ["a4", "a5"], ["b0", "b1", "b2", "b3"], ["b4", "b5"]]
    assert list(out["id"]) == list(merged["id"]) and list(out["n"]) == [4, 4, 4, 4, 2, 2] * 2
    Recorder.calls = []
    Chunked(Recorder, batch_size=4)(a)
    assert Recorder.calls[:2] == [["a0", "a1", "a2", "a3"], ["a4", "a5"]]  # the same split alone


def test_prepare_keeps_only_the_rows_still_to_do():
    ids = ["a", "b", "c", "d"]
    assert list(block(ids, unit=3)[UNIT]) == [3, 3, 3, 3]
    assert block(ids, todo={}).get("id").size == 0  # a committed unit: nothing left
    retry = block(ids, todo={0: (2, ["b", "d"])}, row_errors={"d": "m.parquet: column 'width' must be >= 1"})
    assert list(retry["id"]) == ["b", "d"] and list(retry["_attempt"]) == [2, 2] and list(retry["_unit_rows"]) == [2, 2]
    assert list(retry["error_stage"]) == ["", "validate"] and "'width'" in retry["error_message"][1]
    with pytest.raises(RuntimeError, match="not at a unit boundary"):
        prepare_unit(pa.table({"id": ["b", "c"]}), units={"a": 0}, todo={}, digests={}, row_errors={},
                     defaults=GenerationDefaults(), passthrough=[])
    assert Chunked(Recorder, batch_size=2)(block(["x"], todo={}))["id"].size == 0


def test_ids_compare_as_exact_strings():
    """`a` and `a\x00` are two ids: a retry of one must not pick up the other (numpy's fixed-width
    strings drop trailing NULs, so `np.isin` on them matches both)."""
    retry = block(["a", "a\x00", "b"], todo={0: (2, ["a\x00"])})
    assert list(retry["id"]) == ["a\x00"]


def test_seeds_stay_exact_next_to_nulls():
    """An int64 column with nulls becomes float64 in numpy: 63-bit seeds would be rounded."""
    seed = 491747412733530295
    table = pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "seed": pa.array([seed, None], pa.int64())})
    out = numpy_batch(prepare(table, defaults=GenerationDefaults(seed=3)))
    assert out["seed"].dtype == np.int64 and out["seed"].tolist() == [seed, derive_seed(3, "b")]


def test_a_seed_outside_int64_is_a_row_error_not_a_crash():
    table = pa.table({"id": ["ok", "huge"], "prompt": ["p", "q"], "seed": pa.array([1, 2**63], pa.uint64())})
    out = numpy_batch(prepare(table))
    assert list(out["error_stage"]) == ["", "resolve"] and "outside the int64 range" in out["error_message"][1]
    assert out["seed"].tolist() == [1, 0]


def test_passthrough_columns_travel_as_arrow():
    from kandinsky_engine.columns import unpack_passthrough

    table = pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "big": pa.array([2**62 + 1, None], pa.int64()),
                      "tag": pa.array([None, None], pa.string())})
    fields = [table.schema.field("big"), table.schema.field("tag")]
    out = prepare(table, passthrough=fields)
    blobs = [b for b in out["_passthrough"].to_pylist() if b is not None]
    assert len(blobs) == 1  # one blob per unit
    back = unpack_passthrough(blobs)
    assert back["big"].to_pylist() == [2**62 + 1, None] and back.schema.field("tag").type == pa.string()


class Fragile:
    """A stage that runs out of memory on more than 2 rows and fails on the row 'poison'; like the
    real stages, it passes rows already marked failed through untouched."""

    def __init__(self, **kwargs):
        pass

    def __call__(self, batch):
        if len(batch["id"]) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ok = [m == "" for m in batch["error_message"]]
        if "poison" in [i for i, good in zip(batch["id"], ok) if good]:
            raise ValueError("the model raised on this row")
        return {**batch, "n": np.array([len(batch["id"]) if good else 0 for good in ok])}


def test_failing_chunks_are_halved_down_to_one_row():
    ids = ["a", "b", "c", "d", "poison", "f", "g", "h"]
    out = Chunked(Fragile, batch_size=8)(block(ids))
    assert list(out["id"]) == ids
    # 8 -> 4 + 4 (OOM) -> 2 + 2 each (OOM); the pair with the poison row splits again (not an OOM).
    assert int(out["_oom_splits"].sum()) == 3
    assert list(out["n"]) == [2, 2, 2, 2, 0, 1, 2, 2]
    assert list(out["error_stage"]) == ["", "", "", "", "Fragile", "", "", ""]
    assert out["error_type"][4] == "ValueError" and out["error_message"][4] == "the model raised on this row"
    one_oom = Chunked(Fragile, batch_size=1)
    one_oom.stage = type("AlwaysOOM", (), {"__call__": lambda self, b: (_ for _ in ()).throw(MemoryError())})()
    failed = one_oom(block(["x"]))
    assert failed["error_type"][0] == "MemoryError" and failed["error_message"][0].startswith("out of memory at batch size 1")


def test_object_columns_stay_one_dimensional():
    from kandinsky_engine.rows import object_column

    # np.array(..., dtype=object) would make these (2, 2): every row holds a list of two
    column = object_column([[1, 2], [3, 4]])
    assert column.shape == (2,) and column[1] == [3, 4]
    assert concat([column, object_column([[5, 6]])]).shape == (3,)


class OomOnce:
    """A stage whose first call allocates its "activations", keeps them in its frame and runs out of
    memory; later calls record whether those activations were still alive when they started."""

    def __init__(self, **kwargs):
        self.finalizer, self.alive_at_retry = None, []

    def __call__(self, batch):
        import weakref

        import torch

        if self.finalizer is None:
            activations = torch.ones(1024, 1024)
            self.finalizer = weakref.finalize(activations, lambda: None)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 MiB")
        self.alive_at_retry.append(self.finalizer.alive)
        return batch


def test_failed_attempt_is_released_before_the_halves_run():
    """Out of memory: the half-size retries start only once the failed call's tensors are gone (the
    retries used to run inside the `except` block, whose traceback kept that call's frames alive)."""
    chunked = Chunked(OomOnce, batch_size=4)
    out = chunked(block(["a", "b", "c", "d"]))
    assert chunked.stage.alive_at_retry == [False, False]
    assert list(out["id"]) == ["a", "b", "c", "d"] and int(out["_oom_splits"].sum()) == 1
    assert list(out["error_message"]) == [""] * 4
