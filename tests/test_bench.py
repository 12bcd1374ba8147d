"""`kandinsky-batch bench`'s arithmetic: the steady window from per-unit commit times (neither fill
nor drain, no unit computed before the window) and Ray Data's per-operator wall and CPU times.
The benchmark itself runs on the CPU with its figures in docs/performance.md, not as a test."""

from __future__ import annotations

import os

from kandinsky_engine.jobs.bench import operator_times, steady_rate


def test_steady_window_counts_the_units_committed_between_the_first_and_third_quarter(tmp_path):
    # 8 units of 32 rows: a burst of commits as the pipeline fills, then one every 2 s, a slow last one.
    times = [10.0, 10.5, 11.0, 13.0, 15.0, 17.0, 19.0, 25.0]
    shards = []
    for i, t in enumerate(times):
        path = tmp_path / "data" / f"u{i}.parquet"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (t, t))
        shards.append({"file": f"data/u{i}.parquet", "rows": 32})
    steady = steady_rate(str(tmp_path), shards[::-1])  # any order: sorted by commit time
    # From the commit at 11.0 (2nd quarter's start) to the one at 19.0: 4 units committed in 8 s.
    assert steady == {"images_per_s": 16.0, "window_units": 4, "window_rows": 128, "window_s": 8.0}
    # Counting from the first commit, as before, would credit the fill's burst: 224 rows in 15 s.
    assert steady_rate(str(tmp_path), shards[:3])["images_per_s"] is None  # too few units for a window


STATS = """Operator 1 ReadManifestUnits->MapBatches(prepare_units): 12 tasks executed, 12 blocks produced in 2.1s
* Remote wall time: 10.1ms min, 95.3ms max, 57.5ms mean, 690.33ms total
* Remote cpu time: 9.8ms min, 80.1ms max, 50.2ms mean, 602.4ms total
Operator 2 MapBatches(Fused): 12 tasks executed, 12 blocks produced in 30.1s
* Remote wall time: 2.01s min, 4.42s max, 2.95s mean, 35.3s total
* Remote cpu time: 1.99s min, 4.4s max, 2.9s mean, 34.85s total
"""


def test_operator_wall_and_cpu_times_are_read_from_ray_data_stats():
    assert operator_times(STATS) == {"ReadManifestUnits->MapBatches(prepare_units)": 0.69, "MapBatches(Fused)": 35.3}
    assert operator_times(STATS, "cpu") == {"ReadManifestUnits->MapBatches(prepare_units)": 0.602,
                                            "MapBatches(Fused)": 34.85}
