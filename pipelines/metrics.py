"""Prometheus metrics of a job, through Ray's own metrics system (`ray.util.metrics`).

Every Ray node serves its processes' metrics on its metrics export port (`ray start
--metrics-export-port`, KubeRay's `metrics` container port 8080), which a Prometheus PodMonitor
scrapes (infra/k8s/monitoring/). Ray prefixes the names with `ray_`:

| metric | kind | tags | from |
|---|---|---|---|
| `kandinsky_rows_committed` | counter | output | the writer, per unit committed: rows in data/ |
| `kandinsky_rows_failed` | counter | output, stage, error_type | the writer: rows in errors/ |
| `kandinsky_units_committed` | counter | output | the writer |
| `kandinsky_stage_batch_seconds` | histogram | stage | each model stage, per chunk it runs |
| `kandinsky_oom_splits` | counter | stage | a chunk halved after running out of memory |
| `kandinsky_images_per_second` | gauge | output | the driver, over the last minute (what the progress line shows) |
| `kandinsky_lease_renewals` | counter | output | the driver's lease heartbeat |

Metrics are made once per process, on first use; recording never fails a job (a cluster without
Ray's metrics agent simply exports nothing).
"""

from __future__ import annotations

import logging

from kandinsky_engine.storage import redact_url

_made: dict = {}
# Seconds: a tiny model's chunk takes milliseconds, a full-size U-Net chunk tens of seconds.
BATCH_SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250]


def _metric(kind: str, name: str, description: str, tags: tuple[str, ...], **extra):
    if name not in _made:
        from ray.util import metrics

        _made[name] = getattr(metrics, kind)(name, description=description, tag_keys=tags, **extra)
    return _made[name]


def _safely(record):
    try:
        record()
    except Exception as exc:  # noqa: BLE001 (metrics are a view of the job, never a reason to fail it)
        logging.getLogger("kandinsky_engine").debug("metric not recorded: %s", exc)


def unit_committed(output: str, rows: int, failures: dict[str, int]) -> None:
    """A unit committed by the writer: `rows` in data/, `failures` {"stage: error_type": rows}."""
    tags = {"output": redact_url(output)}

    def record():
        _metric("Counter", "kandinsky_units_committed", "units committed", ("output",)).inc(1, tags)
        _metric("Counter", "kandinsky_rows_committed", "rows committed to data/", ("output",)).inc(rows, tags)
        failed = _metric("Counter", "kandinsky_rows_failed", "rows committed to errors/", ("output", "stage", "error_type"))
        for kind, count in failures.items():
            stage, _, error_type = kind.partition(": ")
            failed.inc(count, {**tags, "stage": stage, "error_type": error_type})

    _safely(record)


def stage_batch(stage: str, seconds: float) -> None:
    _safely(lambda: _metric("Histogram", "kandinsky_stage_batch_seconds", "seconds per chunk of a model stage",
                            ("stage",), boundaries=BATCH_SECONDS).observe(seconds, {"stage": stage}))


def oom_split(stage: str) -> None:
    _safely(lambda: _metric("Counter", "kandinsky_oom_splits", "chunks halved after running out of memory",
                            ("stage",)).inc(1, {"stage": stage}))


def images_per_second(output: str, rate: float) -> None:
    _safely(lambda: _metric("Gauge", "kandinsky_images_per_second", "images committed per second, last minute",
                            ("output",)).set(rate, {"output": redact_url(output)}))


def lease_renewed(output: str) -> None:
    _safely(lambda: _metric("Counter", "kandinsky_lease_renewals", "renewals of the output's lease",
                            ("output",)).inc(1, {"output": redact_url(output)}))
