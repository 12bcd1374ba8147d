"""Run fingerprints: a rerun resumes only the output of the same job, never mixes two.

`_RUN.json` at the output root holds the fingerprint and what it was computed from. Everything
that changes a row's pixels or which rows form a unit is in it; what only changes scheduling
(actor counts, CPUs, GPUs, the Ray address) or where files go is not, so a job can resume on a
bigger cluster.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from kandinsky_engine.config import TINY, JobConfig
from kandinsky_engine.manifest import Manifest
from kandinsky_engine.storage import redact_url, url_to_fs
from kandinsky_engine.tiny import TINY_VERSION
from pipelines.output import RUN_FILE

from .output_guard import OWNED_TEXT, is_empty

STAGES = ("prior", "hint", "encode", "decoder", "movq")


class FingerprintMismatch(RuntimeError):
    pass


def fingerprint_inputs(config: JobConfig, manifest: Manifest, rows_per_block: int) -> dict:
    model = config.model
    sources = {part: getattr(model, part) for part in ("prior", "decoder", "depth")}
    return {
        "models": {p: f"{s} (v{TINY_VERSION})" if s.startswith(TINY) else redact_url(s) for p, s in sources.items()},
        "dtype": model.dtype,
        "device": model.device.split(":")[0],  # cuda:0 and cuda:1 compute alike
        "defaults": config.defaults.model_dump(mode="json"),
        "output": config.output.model_dump(mode="json", include={"image_format", "quality", "size_policy"}),
        "rows_per_block": rows_per_block,
        "batch_size": {s: getattr(config, s).batch_size for s in STAGES},
        "torch_threads": {s: getattr(config, s).threads() for s in STAGES},
        "manifest": {"location": redact_url(config.input.manifest), "rows": manifest.num_rows,
                     "files": [f.rsplit("/", 1)[-1] for f in manifest.files]},
    }


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def read_run(fs, root: str) -> dict | None:
    try:
        with fs.open(f"{root}/{RUN_FILE}", "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def choose_output(config: JobConfig, inputs: dict, *, overwrite: bool, new_run: bool) -> tuple[str, str]:
    """Where this run writes, and how: 'fresh', 'resume' or 'overwrite'. Read-only: nothing is
    changed until the job is known to be able to run.

    - an empty or missing output: fresh;
    - an output of the same fingerprint: resume;
    - --overwrite: replace the tool's entries there (jobs/output_guard.py checks it may);
    - another fingerprint: refused, or with --new-run written beside it at PATH-<fingerprint>;
    - a non-empty folder without _RUN.json (not ours, or older than resume): refused.
    """
    path, fp = config.output.path.rstrip("/"), fingerprint(inputs)
    fs, root = url_to_fs(path, config.storage_options)
    if overwrite:
        return path, "overwrite" if fs.exists(root) else "fresh"
    if is_empty(fs, root):  # missing, empty, or only a console-made folder's marker
        return path, "fresh"
    run = read_run(fs, root)
    if run is None:
        raise FingerprintMismatch(
            f"output {path} is not empty and holds no {RUN_FILE}: not the output of a job run by this tool; "
            f"choose another output.path (--overwrite-unowned would write into it, removing {OWNED_TEXT} there)")
    if run["fingerprint"] == fp:
        return path, "resume"
    changed = "\n  ".join(differences(run["inputs"], inputs)[:20])
    if new_run:
        beside = f"{path}-{fp}"
        return choose_output(config.model_copy(update={"output": config.output.model_copy(
            update={"path": beside})}), inputs, overwrite=False, new_run=False)
    raise FingerprintMismatch(
        f"output {path} holds another run (fingerprint {run['fingerprint']}, this job's is {fp}); changed:\n  "
        f"{changed}\nRerun with the original config to resume it, pass --new-run to write this job beside it "
        f"({path}-{fp}), or --overwrite to replace it")


def write_run(fs, root: str, inputs: dict) -> None:
    record = {"fingerprint": fingerprint(inputs), "inputs": inputs,
              "created_at": datetime.now(timezone.utc).isoformat()}
    with fs.open(f"{root}/{RUN_FILE}", "w") as f:
        json.dump(record, f, indent=2)
