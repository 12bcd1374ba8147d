"""Scheduling pieces of pipelines/ without a cluster: units of work and sub-batching."""

import numpy as np
import pyarrow as pa
import pytest

from kandinsky_engine.config import GenerationDefaults
from kandinsky_engine.rows import derive_seed, numpy_batch
from kandinsky_engine.pipelines.generate import Chunked, concat
from kandinsky_engine.pipelines.prepare import UNIT, prepare_units


class Recorder:
    """A stage that records the ids of every batch it is given and adds a column."""

    calls: list = []

    def __init__(self, **kwargs):
        pass

    def __call__(self, batch):
        Recorder.calls.append(list(batch["id"]))
        return {**batch, "n": np.full(len(batch["id"]), len(batch["id"]))}


def tagged(table: pa.Table, unit: str = "f/0", attempt: int = 1) -> pa.Table:
    """`table` as the read tags a unit (pipelines/read.py)."""
    n = table.num_rows
    for name, value in ((UNIT, unit), ("_attempt", attempt), ("_digest", "d" * 16), ("_unit_rows", n)):
        table = table.append_column(name, pa.array([value] * n))
    return table


def prepare(table, unit="f/0", row_errors=None, **kwargs):
    return prepare_units(tagged(table, unit), row_errors=row_errors or {},
                         defaults=kwargs.pop("defaults", GenerationDefaults()), passthrough=kwargs.pop("passthrough", []))


def block(ids, unit="f/0", row_errors=None):
    table = pa.table({"id": pa.array(ids, pa.string()), "prompt": pa.array(["p"] * len(ids), pa.string())})
    return numpy_batch(prepare(table, unit, row_errors))


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


def read(tmp_path, ids, starts, retry=None, rows_per_block=3, row_group_size=2):
    """Units of a real Parquet file, as a read task yields them."""
    import pyarrow.parquet as pq

    from kandinsky_engine.manifest import ManifestFile, file_stamp
    from kandinsky_engine.storage import url_to_fs
    from kandinsky_engine.pipelines.read import read_units

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": ["p"] * len(ids)}), path, row_group_size=row_group_size)
    file = ManifestFile(str(path), "m.parquet", "sha", path.stat().st_size, len(ids), file_stamp(url_to_fs(str(path))[0], str(path)))
    return list(read_units(file, starts, retry or {}, rows_per_block, {}))


def test_read_yields_one_table_per_unit_across_row_groups(tmp_path):
    ids = [f"r{i}" for i in range(8)]
    units = read(tmp_path, ids, [0, 3, 6])  # units of 3 rows over row groups of 2
    assert [u["id"].to_pylist() for u in units] == [ids[0:3], ids[3:6], ids[6:8]]
    assert [u[UNIT][0].as_py().rsplit("/", 1)[1] for u in units] == ["0", "3", "6"]
    assert [u["_unit_rows"][0].as_py() for u in units] == [3, 3, 2]
    # Only the units asked for, e.g. the ones a resumed run still has to do.
    assert [u["id"].to_pylist() for u in read(tmp_path, ids, [3])] == [ids[3:6]]


def test_each_read_task_is_one_unit_up_to_the_cap(tmp_path, monkeypatch):
    """Ray Data merges what one read task yields into one block: one unit per task keeps one unit
    per block (stages overlap, blocks stay small); above MAX_READ_TASKS units, a task reads a few
    consecutive units of one row group, so the plan stays small."""
    import kandinsky_engine.pipelines.read as read_module
    from kandinsky_engine.pipelines.reconcile import FilePlan

    ids = [f"r{i}" for i in range(20)]
    read(tmp_path, ids, [0], rows_per_block=3, row_group_size=8)  # writes m.parquet: row groups of 8
    from kandinsky_engine.manifest import ManifestFile, file_stamp
    from kandinsky_engine.storage import url_to_fs

    path = tmp_path / "m.parquet"
    file = ManifestFile(str(path), "m.parquet", "sha", path.stat().st_size, 20, file_stamp(url_to_fs(str(path))[0], str(path)))
    plan = FilePlan(file, stop=20, done={3}, retry={})
    tasks = read_module.ManifestUnits([plan], 3, {}).get_read_tasks(1)
    got = [[u["id"].to_pylist() for u in task()] for task in tasks]
    assert got == [[ids[s : s + 3]] for s in (0, 6, 9, 12, 15, 18)]  # unit 3 is done
    monkeypatch.setattr(read_module, "MAX_READ_TASKS", 2)
    tasks = read_module.ManifestUnits([plan], 3, {}).get_read_tasks(1)
    starts = [[int(u[UNIT][0].as_py().rsplit("/", 1)[1]) for u in task()] for task in tasks]
    assert starts == [[0, 6], [9, 12, 15], [18]]  # 3 per task at most, by the row group a unit starts in (0-7, 8-15, 16-19)


def test_a_retried_unit_keeps_only_its_rows_not_in_data(tmp_path):
    ids = ["a", "b", "c", "d"]
    (unit,) = read(tmp_path, ids, [0], retry={0: (2, frozenset({"a", "c"}))}, rows_per_block=4)
    assert unit["id"].to_pylist() == ["b", "d"] and unit["_attempt"].to_pylist() == [2, 2]
    assert unit["_unit_rows"].to_pylist() == [2, 2]
    out = numpy_batch(prepare_units(unit, row_errors={"d": "m.parquet: column 'width' must be >= 1"},
                                    defaults=GenerationDefaults(), passthrough=[]))
    assert list(out["error_stage"]) == ["", "validate"] and "'width'" in out["error_message"][1]
    with pytest.raises(RuntimeError, match="changed while the job ran"):
        path = tmp_path / "m.parquet"
        from kandinsky_engine.manifest import ManifestFile
        from kandinsky_engine.pipelines.read import read_units

        stale = ManifestFile(str(path), "m.parquet", "sha", 1, 4, (1, 0))
        list(read_units(stale, [0], {}, 4, {}))


def test_ids_compare_as_exact_strings(tmp_path):
    """`a` and `a\x00` are two ids: a retry of one must not pick up the other (numpy's fixed-width
    strings drop trailing NULs, so `np.isin` on them matches both)."""
    (unit,) = read(tmp_path, ["a", "a\x00", "b"], [0], retry={0: (2, frozenset({"a", "b"}))}, rows_per_block=3)
    assert unit["id"].to_pylist() == ["a\x00"]


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
