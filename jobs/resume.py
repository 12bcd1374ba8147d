"""Run fingerprints: a rerun resumes only the output of the same job, never mixes two.

`_RUN.json` at the output root holds the fingerprint and what it was computed from. Everything
that changes a row's pixels or which rows form a unit is in it; what only changes scheduling
(actor counts, CPUs, GPUs, the Ray address) or where files go is not, so a job can resume on a
bigger cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone

from kandinsky_engine.config import JobConfig
from kandinsky_engine.families import family_for
from kandinsky_engine.identity import library_versions
from kandinsky_engine.storage import redact, redact_url, url_to_fs
from kandinsky_engine.pipelines.output import LAYOUT_VERSION, RUN_FILE

from .output_guard import OWNED_TEXT, is_empty

log = logging.getLogger("kandinsky_engine")


class FingerprintMismatch(RuntimeError):
    pass


def fingerprint_inputs(config: JobConfig, schema, weights: dict[str, str]) -> dict:
    """What a row's pixels and the output's shape depend on besides the row itself. `schema`: the
    manifest's unified schema (it decides the output schema); `weights`: identity.weights_digests of
    the job's model sources as the driver resolved them. The manifest's files and row count are not in it: a
    manifest location that receives new files is the same job, and each file's identity is in its
    units' digests (kandinsky_engine/units.py)."""
    model = config.model
    family = family_for(config)
    # Options that change float results; recorded only when on, so that runs without them keep the
    # fingerprint they had before these options existed.
    options = {name: True for name in ("channels_last", "compile") if getattr(model, name)}
    if model.fp8:  # its own value: the recipe and the torchao version that runs it
        from kandinsky_engine.fp8 import fingerprint_value

        options["fp8"] = fingerprint_value()
    return {
        **({"model_options": options} if options else {}),
        # Fused stages run at the decoder section's thread count: recorded when on, as the options above.
        **({"fuse_stages": True} if config.fuse_stages else {}),
        # Recorded when not 2.2, so that 2.2 runs keep the fingerprint they had before families existed.
        **({"family": family.name} if family.name != "kandinsky22" else {}),
        "models": {p: {"source": redact_url(getattr(model, p)), "weights": digest} for p, digest in weights.items()},
        "libraries": library_versions(),
        "dtype": model.dtype,
        "device": model.device.split(":")[0],  # cuda:0 and cuda:1 compute alike
        "defaults": defaults_of(config),
        # The shard format and the opt-in columns shape the output: a resume that changes them is another job.
        "output": config.output.model_dump(mode="json", include={"image_format", "quality", "png_compress_level",
                                                                 "size_policy", "format", "columns"}),
        # The scoring stage's batch size and threads change clip_score's float results (as the other stages' do
        # their pixels); recorded only when it runs.
        **({"score": {"batch_size": config.score.batch_size, "torch_threads": config.score.threads()}}
           if "clip_score" in config.output.columns else {}),
        "rows_per_block": config.rows_per_block(),
        "layout": LAYOUT_VERSION,  # the columns and members every shard holds
        "batch_size": {s: getattr(config, s).batch_size for s in family.sections},
        "torch_threads": {s: getattr(config, s).threads() for s in family.sections},
        "manifest": {"location": manifest_location_id(config.input.manifest),
                     "schema": [[f.name, str(f.type)] for f in schema]},
    }


def manifest_location_id(location: str) -> str:
    """The manifest location as the fingerprint records it: without a trailing slash (`s3://b/m/`
    and `s3://b/m` list the same files), and for a URL without its query (a signed URL's
    signature and expiry change each time it is signed)."""
    if location.startswith(("http://", "https://")):
        return redact_url(location.split("?", 1)[0].split("#", 1)[0])
    return redact_url(location.rstrip("/") or location)


def defaults_of(config: JobConfig) -> dict:
    defaults = config.defaults.model_dump(mode="json")
    if not defaults["task_defaults"]:  # as before per-task defaults existed (Kandinsky 2.2 has none)
        del defaults["task_defaults"]
    if defaults["ddim_eta"] is None:  # Kandinsky 2.0's alone: the other families' fingerprints stay as they were
        del defaults["ddim_eta"]
    return defaults


def fingerprint(inputs: dict) -> str:
    """The hash of everything but the GPU record (`gpu`, kandinsky_engine/gpu_identity.py), which is
    compared on its own rule: a job keeps its fingerprint where the machine checking it (`verify`, a
    driver without a GPU) cannot see the GPU, and across an allowed device change."""
    hashed = {k: v for k, v in inputs.items() if k != "gpu"}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]


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
    """The output's _RUN.json, None if there is none; a damaged one is an error that says so."""
    path = f"{root}/{RUN_FILE}"
    try:
        with fs.open(path, "r") as f:
            run = json.load(f)
        run["fingerprint"], run["inputs"]  # noqa: B018 (both must be there)
        return run
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise FingerprintMismatch(
            f"{redact_url(path)} is damaged ({type(exc).__name__}: {exc}): this output's run cannot be identified. "
            "Restore the file, or pass --overwrite to start over") from None


def choose_output(config: JobConfig, inputs: dict, *, overwrite: bool, new_run: bool,
                  allow_device_change: bool = False) -> tuple[str, str]:
    """Where this run writes, and how: 'fresh', 'resume' or 'overwrite'. Read-only: nothing is
    changed until the job is known to be able to run.

    - an empty or missing output: fresh;
    - an output of the same fingerprint: resume;
    - --overwrite: replace the tool's entries there (jobs/output_guard.py checks it may);
    - another fingerprint: refused, or with --new-run written beside it at PATH-<fingerprint>;
    - a non-empty folder without _RUN.json (not ours, or older than resume): refused;
    - the same fingerprint on another GPU model or library build (`inputs["gpu"]`, where known):
      refused unless `allow_device_change` (kandinsky_engine/gpu_identity.py).
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
        check_device(path, run, inputs.get("gpu"), allow_device_change)
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


def with_gpu(config: JobConfig, inputs: dict) -> dict:
    """`inputs` with the job's GPU record (CUDA jobs; read once Ray is connected, since the driver may
    have no GPU): compared on resume by check_device, outside the fingerprint's hash."""
    from kandinsky_engine.gpu_identity import job_record

    gpu = job_record(config)
    return inputs if gpu is None else {**inputs, "gpu": gpu}


def run_gpu(run: dict) -> dict | None:
    """The GPU an output was last computed on: its latest recorded device change, else its first run's."""
    changes = run.get("device_changes") or []
    return changes[-1]["to"] if changes else run["inputs"].get("gpu")


def check_device(path: str, run: dict, gpu: dict | None, allowed: bool) -> None:
    """Refuse to resume `run` on another GPU model or library build unless `allowed`."""
    from kandinsky_engine import gpu_identity

    fields = gpu_identity.changed(run_gpu(run), gpu)
    if not gpu_identity.binding(fields) or allowed:
        return
    raise FingerprintMismatch(
        f"output {path} was computed on {gpu_identity.describe(run_gpu(run))}; this run's GPU is "
        f"{gpu_identity.describe(gpu)} (changed: {', '.join(fields)}). cuBLAS and cuDNN choose kernels by GPU model and "
        "library build, so rows computed here could differ in float rounding from the committed ones. Resume on the "
        "same GPU type, or pass --allow-device-change to resume anyway (the change is recorded in _RUN.json)")


def note_device(fs, root: str, inputs: dict, tmp_tag: str) -> None:
    """On a resume: record in _RUN.json (`device_changes`) a GPU that differs from the one the output
    was last computed on (allowed by check_device, or a driver change)."""
    from kandinsky_engine import gpu_identity
    from kandinsky_engine.pipelines.output import put_json

    run, gpu = read_run(fs, root), inputs.get("gpu")
    if run is None or gpu is None:
        return
    before = run_gpu(run)
    if before == gpu or (before is not None and not gpu_identity.changed(before, gpu) and before.get("model")):
        return
    fields = gpu_identity.changed(before, gpu)
    log.warning("resuming %s on %s (before: %s)%s", root, gpu_identity.describe(gpu), gpu_identity.describe(before),
                f"; changed: {', '.join(fields)}" if fields else "")
    change = {"run": tmp_tag, "at": datetime.now(timezone.utc).isoformat(), "from": before, "to": gpu,
              "changed": fields, "allowed_by": "--allow-device-change" if gpu_identity.binding(fields) else None}
    put_json(fs, root, RUN_FILE, {**run, "device_changes": [*(run.get("device_changes") or []), change]}, tmp_tag)


def write_run(fs, root: str, inputs: dict, config: JobConfig, tmp_tag: str) -> None:
    """_RUN.json, through a temporary file: the fingerprint, what it was computed from, and the job
    config (credentials removed) that `kandinsky-batch verify` recomputes it with."""
    from kandinsky_engine.pipelines.output import put_json

    config = config._as_written or config  # as written: a layout the engine chose is resolved on each run
    settings = json.loads(redact(json.dumps(config.model_dump(mode="json")), config.storage_options))
    record = {"fingerprint": fingerprint(inputs), "inputs": inputs, "config": settings,
              "created_at": datetime.now(timezone.utc).isoformat()}
    put_json(fs, root, RUN_FILE, record, tmp_tag)


class ManifestChanged(RuntimeError):
    """Committed units were computed from other manifest rows than the manifest now has, or a folder
    of a file no longer in the manifest holds ids that the manifest has again."""


class ForeignFiles(ValueError):
    """data/ or errors/ hold files that are not shards of the layout: the run does not guess."""


def foreign_message(path: str, foreign: list[str]) -> str:
    shown = ", ".join(f"{path}/{name}" for name in foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
    return (f"output {path}: {len(foreign)} file(s) in data/ or errors/ are not shards of this tool: {shown}. "
            "Nothing was changed. data/ is what readers load: move them out of data/ and errors/ (hidden files such "
            "as .DS_Store are ignored) and rerun")


def conflict_message(path: str, conflicts: dict[str, list[str]]) -> str:
    shown = "; ".join(f"data/{key}/ holds ids of {', '.join(files[:3])}" for key, files in list(conflicts.items())[:5])
    return (f"output {path}: {len(conflicts)} folder(s) of shards belong to manifest files no longer in the manifest, "
            f"and hold ids that the manifest has again (a file renamed and changed, or rows moved to another file): "
            f"{shown}. Computing them again would put those rows in data/ twice. Nothing was changed. Rerun with "
            "--recompute-changed to move those folders to _retired/ and compute the rows under their new files, or "
            "restore the files' old names to resume")


def log_gone(path: str, gone, tag: str) -> None:
    for old, new in gone.renamed.items():
        log.warning("manifest file %s is now %s (same content): its committed shards were moved under its new name, "
                    "not recomputed", old, new)
    if gone.retire or gone.conflicts:
        log.warning("set aside in %s/_retired/%s: %d shard(s) of manifest files no longer in the manifest (%s)", path,
                    tag, len(gone.retire) + sum(len(gone.leftover[k]) for k in gone.conflicts),
                    ", ".join(sorted({s.key for s in gone.retire} | set(gone.conflicts))[:5]))


def changed_message(path: str, changed: dict[str, list[str]]) -> str:
    shown = "; ".join(f"{file} ({len(units)} committed unit(s))" for file, units in list(changed.items())[:5])
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    return (f"output {path}: {len(changed)} manifest file(s) changed since their units were committed (other rows, "
            f"another order or other values under the same name): {shown}{more}. Nothing was changed. Restore "
            "the files to resume, rerun with --recompute-changed to recompute their units, --new-run to write "
            "this manifest beside it, or --overwrite to start over")
