"""Manifest validation as Ray tasks: one task per file, then one task per hash bucket.

`check_with_ray` is the `checker` that `validate_manifest` takes in a job. Each file task streams
its file (kandinsky_engine.manifest.check_file) and returns its findings plus its id hashes split
into buckets, each bucket a separate object; each bucket task gets that bucket from every file and
returns the hashes seen twice. The hashes never reach the driver, which only holds references:
its memory stays flat in the manifest's rows (see docs/jobs.md, Scale).
"""

from __future__ import annotations

import numpy as np
import ray

from kandinsky_engine.manifest import FileCheck, ManifestFile, bucket_of, check_file, colliding

# Light I/O tasks: a fraction of a CPU, so that they run beside actors that hold whole CPUs.
CHECK_CPUS = 0.5


def buckets_for(files: list[ManifestFile]) -> int:
    """Buckets of about 2M hashes (16 MB) each, 1 to 64: one task's share of the id check."""
    return int(min(64, max(1, sum(f.num_rows for f in files) // 2_000_000 + 1)))


@ray.remote(num_cpus=CHECK_CPUS)
def _check(file: ManifestFile, config, allowed, buckets: int):
    check = check_file(file, config, allowed)
    hashes, check.hashes = check.hashes, np.zeros(0, np.uint64)
    which = bucket_of(hashes) % buckets
    return (check, *[hashes[which == b] for b in range(buckets)])


@ray.remote(num_cpus=CHECK_CPUS)
def _collide(*hashes: np.ndarray) -> np.ndarray:
    return colliding(list(hashes))


def check_with_ray(files: list[ManifestFile], config, allowed) -> tuple[list[FileCheck], np.ndarray]:
    buckets = buckets_for(files)
    refs = [_check.options(num_returns=buckets + 1).remote(f, config, allowed, buckets) for f in files]
    checks = ray.get([r[0] for r in refs])
    collisions = ray.get([_collide.remote(*[r[b + 1] for r in refs]) for b in range(buckets)]) if refs else []
    return checks, np.concatenate(collisions) if collisions else np.zeros(0, np.uint64)
