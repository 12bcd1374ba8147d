"""Scheduling pieces of pipelines/ without a cluster: units of work and sub-batching."""

import numpy as np
import pytest

from pipelines.generate import Chunked, concat, tag_unit
from pipelines.sink import UNIT


class Recorder:
    """A stage that records the ids of every batch it is given and adds a column."""

    calls: list = []

    def __init__(self, **kwargs):
        pass

    def __call__(self, batch):
        Recorder.calls.append(list(batch["id"]))
        return {**batch, "n": np.full(len(batch["id"]), len(batch["id"]))}


def block(ids, unit=0, todo=None, row_errors=None):
    todo = {unit: (1, None)} if todo is None else todo
    return tag_unit({"id": np.array(ids, dtype=object), "x": np.arange(len(ids))},
                    units={ids[0]: unit} if ids else {}, todo=todo, row_errors=row_errors or {})


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


def test_tag_unit_keeps_only_the_rows_still_to_do():
    ids = ["a", "b", "c", "d"]
    assert list(block(ids, unit=3)[UNIT]) == [3, 3, 3, 3]
    assert block(ids, todo={}).get("id").size == 0  # a committed unit: nothing left
    retry = block(ids, todo={0: (2, ["b", "d"])}, row_errors={"d": "m.parquet: column 'width' must be >= 1"})
    assert list(retry["id"]) == ["b", "d"] and list(retry["_attempt"]) == [2, 2] and list(retry["_unit_rows"]) == [2, 2]
    assert list(retry["error_stage"]) == ["", "validate"] and "'width'" in retry["error_message"][1]
    with pytest.raises(RuntimeError, match="not at a unit boundary"):
        tag_unit({"id": np.array(["b", "c"], dtype=object)}, units={"a": 0}, todo={}, row_errors={})
    assert Chunked(Recorder, batch_size=2)(block([]))["id"].size == 0


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
