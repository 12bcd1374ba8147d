"""CommitCounter: where the sink's write tasks say what they committed, and the model stages' actors
that their models are loaded, so the driver can show progress.

Ray Data hands write results to the driver only when the whole write ends (`on_write_complete`),
so a running job's driver cannot count commits from them. Each write task tells this actor about
every unit it committed, fire-and-forget; the driver polls `snapshot()` (jobs/progress.py).

Counts are kept per unit name: a write task that Ray retries commits the same unit again (same
shard names, same bytes) and is counted once. The actor only observes: nothing in the output
depends on it, and a lost actor only stops the progress display (the summary is computed from
the output itself).

Before the first commit a job is loading models, which takes up to minutes: the plan builder says
which stages the job runs (`expect`) and each stage's actors say when theirs is loaded (`loaded`,
from pipelines/generate.py's Chunked), so the driver shows `loading models: k/n stages ready`.
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
        self.stages: list[str] = []  # the model stages the job runs (stage class names)
        self.loaded: Counter = Counter()  # stage class name -> actors that finished loading it

    def expect(self, stages: list[str]) -> None:
        self.stages = list(stages)

    def stage_loaded(self, stage: str) -> None:
        self.loaded[stage] += 1  # a restarted actor counts again: only "at least one" is shown

    def commit(self, unit: str, rows: int, failed: int, failures: dict[str, int]) -> None:
        self.units[unit] = (rows, failed)
        if failures:
            self.failures[unit] = Counter(failures)
        else:
            self.failures.pop(unit, None)

    def snapshot(self) -> dict:
        """{units, rows, failed, failures: {"stage: error_type": rows}} committed by this run so far,
        and {stages, stages_ready}: the model stages and how many have at least one actor loaded."""
        by_error: Counter = Counter()
        for counts in self.failures.values():
            by_error.update(counts)
        return {"units": len(self.units), "rows": sum(r for r, _ in self.units.values()),
                "failed": sum(f for _, f in self.units.values()), "failures": dict(by_error),
                "stages": len(self.stages), "stages_ready": sum(1 for s in self.stages if self.loaded[s])}
