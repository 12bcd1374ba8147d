"""Scheduling pieces of pipelines/ without a cluster: units of work and sub-batching."""

import numpy as np

from pipelines.generate import UNIT, Chunked, concat, tag_unit


class Recorder:
    """A stage that records the ids of every batch it is given and adds a column."""

    calls: list = []

    def __init__(self, **kwargs):
        pass

    def __call__(self, batch):
        Recorder.calls.append(list(batch["id"]))
        return {**batch, "n": np.full(len(batch["id"]), len(batch["id"]))}


def block(ids):
    return tag_unit({"id": np.array(ids, dtype=object), "x": np.arange(len(ids))})


def test_units_are_split_the_same_way_even_when_ray_merges_blocks():
    a, b = block([f"a{i}" for i in range(6)]), block([f"b{i}" for i in range(6)])
    merged = {k: concat([a[k], b[k]]) for k in a}
    Recorder.calls = []
    out = Chunked(Recorder, batch_size=4)(merged)
    # Chunks of 4 never straddle the two units: 6 rows -> 4 + 2 per unit.
    assert Recorder.calls == [["a0", "a1", "a2", "a3"], ["a4", "a5"], ["b0", "b1", "b2", "b3"], ["b4", "b5"]]
    assert list(out["id"]) == list(merged["id"]) and list(out["n"]) == [4, 4, 4, 4, 2, 2] * 2
    Recorder.calls = []
    Chunked(Recorder, batch_size=4)(a)
    assert Recorder.calls[:2] == [["a0", "a1", "a2", "a3"], ["a4", "a5"]]  # the same split alone


def test_unit_key_depends_on_the_block_not_on_position():
    assert block(["x", "y"])[UNIT][0] == block(["x", "z", "w"])[UNIT][0] != block(["y", "x"])[UNIT][0]
    assert Chunked(Recorder, batch_size=2)(block([]))["id"].size == 0


def test_object_columns_stay_one_dimensional():
    from kandinsky_engine.rows import object_column

    # np.array(..., dtype=object) would make these (2, 2): every row holds a list of two
    column = object_column([[1, 2], [3, 4]])
    assert column.shape == (2,) and column[1] == [3, 4]
    assert concat([column, object_column([[5, 6]])]).shape == (3,)
