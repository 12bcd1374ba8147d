"""The Python API: `kandinsky_engine.generate(rows_or_manifest, output, **settings)`.

What the CLI's `run` calls, for notebooks and pipelines:

    import kandinsky_engine as ke
    result = ke.generate([{"id": "a", "prompt": "a red fox"}], "out/foxes",
                         model={"prior": "tiny", "decoder": "tiny"}, defaults={"width": 64, "height": 64})
    result.rows, result.to_table()

`rows_or_manifest` is a manifest path or URL (Parquet, CSV, TSV, JSONL; file, folder or glob), or
rows in memory: a pandas DataFrame, a pyarrow Table or a list of dicts. Rows in memory are written
to `OUTPUT/_manifests/rows.parquet` first, so that the job is an ordinary manifest job: it resumes
(call it again with the same rows), and rows changed since their units were committed are refused
like a rewritten manifest file (`recompute_changed=True` recomputes them). Their relative input
paths are taken from the current folder, which they may read below unless `input.allowed_uri_prefixes`
says otherwise.

`settings` are config sections as dicts (`model=`, `defaults=`, `output=`, `decoder=`...), applied
over `config` (a YAML path or a dict) if given; keyword options of the run (`limit`, `overwrite`,
`wait`, `address`...) are those of `kandinsky_engine.jobs.run.run_job`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

ROWS_FILE = "_manifests/rows.parquet"


@dataclass
class Result:
    """What a run did: its `_SUCCESS.json` (`summary`) and the figures most asked for."""

    output: str
    rows: int  # in data/
    failed_rows: int  # in errors/
    complete: bool  # every unit of the manifest committed (False after a `limit` run)
    summary: dict = field(repr=False)
    storage_options: dict = field(default_factory=dict, repr=False)

    def to_table(self):
        """data/ as one pyarrow Table (the `image` column holds the encoded bytes)."""
        import pyarrow.parquet as pq

        from kandinsky_engine.storage import url_to_fs

        fs, root = url_to_fs(self.output, self.storage_options)
        return pq.read_table(f"{root}/data", filesystem=fs)


def generate(rows_or_manifest=None, output: str | None = None, *, config: str | os.PathLike | dict | None = None,
             overrides: list[str] = (), **settings) -> Result:
    """Run (or resume) a job; see the module docstring. Returns a Result (a dry run returns its plan
    as `summary`)."""
    from kandinsky_engine.config import JobConfig

    from .run import run_job

    run_options = {k: settings.pop(k) for k in list(settings) if k in RUN_OPTIONS}
    if run_options.get("overwrite") and rows_or_manifest is not None and not isinstance(rows_or_manifest, (str, os.PathLike)):
        run_options["overwrite_unowned"] = True  # the rows' file is in the output: keep it, remove the rest
    job = config if isinstance(config, JobConfig) else job_config(rows_or_manifest, output, config, overrides, settings)
    summary = run_job(job, **run_options)
    if summary.get("dry_run"):
        return Result(job.output.path, 0, 0, False, summary, job.storage_options)
    return Result(summary["output"], summary["rows"], summary["failed_rows"], summary["complete"], summary,
                  job.storage_options)


RUN_OPTIONS = ("address", "overwrite", "limit", "new_run", "recompute_changed", "check_shards", "overwrite_unowned",
               "config_file", "wait", "dry_run", "console", "allow_device_change")


def job_config(rows_or_manifest, output, config, overrides, settings: dict):
    """The JobConfig of a `generate` call: `config` (YAML path or dict), then `settings` (sections),
    then the manifest and output given here, then `overrides` (`--set key=value` strings)."""
    from kandinsky_engine.config import apply_overrides, resolve_local, resolve_paths, validate
    from kandinsky_engine.config_errors import read_yaml

    base = Path(config).resolve().parent if isinstance(config, (str, os.PathLike)) else Path.cwd()
    data = read_yaml(Path(config)) if isinstance(config, (str, os.PathLike)) else dict(config or {})
    for section, values in settings.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    if output is not None:
        data["output"] = {**data.get("output", {}), "path": str(output)}
    if rows_or_manifest is not None:
        if isinstance(rows_or_manifest, (str, os.PathLike)):
            data["input"] = {**data.get("input", {}), "manifest": str(rows_or_manifest)}
        else:
            if not data.get("output", {}).get("path"):
                raise ValueError("output: name the output path (rows in memory are written below it first)")
            manifest = write_rows(rows_or_manifest, resolve_local(data["output"]["path"], base),
                                  data.get("storage_options"))
            given = data.get("input", {})
            data["input"] = {**given, "manifest": manifest,
                             "allowed_uri_prefixes": given.get("allowed_uri_prefixes") or [str(Path.cwd())]}
    job = validate(apply_overrides(data, list(overrides)), "the job's settings", overrides)
    return resolve_paths(job, base)


def write_rows(rows, output: str, storage_options: dict | None) -> str:
    """Write rows held in memory as OUTPUT/_manifests/rows.parquet (unless the file there already
    holds these bytes); returns its path. Relative input paths become absolute (the current folder)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kandinsky_engine.normalize import URI_COLUMNS, resolve
    from kandinsky_engine.storage import ensure_dir, move_file, url_to_fs

    if isinstance(rows, pa.Table):
        table = rows
    elif isinstance(rows, list):
        keys = list(dict.fromkeys(k for row in rows for k in row))  # every row's keys, not the first row's
        table = pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows])
    elif hasattr(rows, "to_parquet") and hasattr(rows, "columns"):  # a pandas DataFrame
        table = pa.Table.from_pandas(rows, preserve_index=False)
    else:
        raise TypeError(f"rows_or_manifest: expected a manifest path, a pandas DataFrame, a pyarrow Table or a list "
                        f"of dicts, got {type(rows).__name__}")
    cwd = str(Path.cwd())
    for name in (n for n in URI_COLUMNS if n in table.column_names):
        column = pa.array([resolve(v, cwd) for v in table[name].to_pylist()], table.schema.field(name).type)
        table = table.set_column(table.schema.get_field_index(name), name, column)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    payload = sink.getvalue()
    fs, root = url_to_fs(output.rstrip("/"), storage_options)
    path = f"{root}/{ROWS_FILE}"
    try:
        same = fs.cat_file(path) == payload
    except FileNotFoundError:
        same = False
    if not same:
        ensure_dir(fs, path.rsplit("/", 1)[0])
        with fs.open(f"{path}.tmp-{os.getpid()}", "wb") as f:
            f.write(payload)
        move_file(fs, f"{path}.tmp-{os.getpid()}", path)
    return fs.unstrip_protocol(path) if "://" in output else path
