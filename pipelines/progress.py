"""CommitCounter: where the sink's write tasks say what they committed, so the driver can show progress.

Ray Data hands write results to the driver only when the whole write ends (`on_write_complete`),
so a running job's driver cannot count commits from them. Each write task tells this actor about
every unit it committed, fire-and-forget; the driver polls `snapshot()` (jobs/progress.py).

Counts are kept per unit name: a write task that Ray retries commits the same unit again (same
shard names, same bytes) and is counted once. The actor only observes: nothing in the output
depends on it, and a lost actor only stops the progress display (the summary is computed from
the output itself).
"""

from __future__ import annotations

from collections import Counter

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class CommitCounter:
    def __init__(self):
        # unit name -> (rows committed to data/, rows committed to errors/). A set of units would
        # do for the totals, but a retried unit must not count twice.
        self.units: dict[str, tuple[int, int]] = {}
        self.failures: dict[str, Counter] = {}  # unit -> Counter of "stage: error_type"

    def commit(self, unit: str, rows: int, failed: int, failures: dict[str, int]) -> None:
        self.units[unit] = (rows, failed)
        if failures:
            self.failures[unit] = Counter(failures)
        else:
            self.failures.pop(unit, None)

    def snapshot(self) -> dict:
        """{units, rows, failed, failures: {"stage: error_type": rows}} committed by this run so far."""
        by_error: Counter = Counter()
        for counts in self.failures.values():
            by_error.update(counts)
        return {"units": len(self.units), "rows": sum(r for r, _ in self.units.values()),
                "failed": sum(f for _, f in self.units.values()), "failures": dict(by_error)}
