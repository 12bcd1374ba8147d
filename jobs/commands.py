"""What each `kandinsky-batch` command does: the handlers that `jobs/cli.py`'s parser dispatches to.
Each imports what it needs when it runs, so that `--help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys

from kandinsky_engine.jobs.signals import Interrupted, signal_number


def _config(args):
    from kandinsky_engine.config import load_config

    return load_config(args.config, args.set or [])


def _run_config(args):
    """The job of `run`: the config file with --set, or without one --manifest and --output (and
    --model), the defaults for everything else."""
    from kandinsky_engine.jobs.api import job_config

    if args.config:
        config = _config(args)
        if args.manifest or args.output or args.model:
            raise ValueError("run: give a config file or --manifest/--output/--model, not both (use --set to change "
                             "a config file's values)")
        return config
    if not (args.manifest and args.output):
        raise ValueError("run: give a config file, or --manifest M and --output O (e.g. kandinsky-batch run "
                         "--manifest prompts.csv --output out/)")
    model = {}
    if args.model:  # the decoder names the family; the tiny model is every part's
        model = {"prior": args.model, "decoder": args.model, "depth": args.model} if args.model.startswith("tiny") \
            else {"decoder": args.model}
    return job_config(args.manifest, args.output, None, args.set or [], {"model": model} if model else {})


def cmd_run(args) -> int:
    from kandinsky_engine.jobs.api import generate
    from kandinsky_engine.jobs.progress import Console, quiet_ray

    config = _run_config(args)
    quiet_ray(args.verbose)
    console = Console(interval_s=args.progress_interval, echo=True, log_file=True, verbose=args.verbose)
    from kandinsky_engine.jobs.outcome import read_failures, run_exit_code, wait_of

    try:
        summary = generate(config=config, address=args.address, overwrite=args.overwrite, limit=args.limit,
                           new_run=args.new_run, overwrite_unowned=args.overwrite_unowned, config_file=args.config,
                           recompute_changed=args.recompute_changed, check_shards=args.check_shards,
                           wait=wait_of(args), dry_run=args.dry_run, console=console,
                           allow_device_change=args.allow_device_change).summary
    except (KeyboardInterrupt, Interrupted) as exc:
        print(interrupted(config), file=sys.stderr)
        return 128 + signal_number(exc)
    if summary.get("dry_run"):
        from kandinsky_engine.jobs.summary import format_plan

        plan = {k: v for k, v in summary.items() if k != "dry_run"}
        print(json.dumps(plan) if args.json else format_plan(plan))
        return 0
    speed = f"{summary['images_per_s']:.2f} rows/s" if summary["images_per_s"] else "nothing left to run"
    failed = f" ({summary['failed_rows']} failed, in errors/)" if summary["failed_rows"] else ""
    print(
        f"done: {summary['rows']} rows in {len(summary['shards'])} shard(s){failed} at {summary['output']}; this run: "
        f"{summary['rows_computed']} rows computed, {summary['rows_skipped']} already committed, "
        f"{summary['wall_time_s']:.1f}s ({speed}; Ray start-up {summary['ray_startup_s']:.1f}s)"
    )
    if not summary["complete"]:
        print(f"partial: --limit {summary['limit']} covered {summary['rows'] + summary['failed_rows']} of "
              f"{summary['manifest_rows']} rows; run without --limit to complete the job")
    if summary.get("log"):
        print(f"log: {summary['log']}; workers' output: {summary['worker_logs']} (--verbose: all on the console)")
    if args.report:
        from kandinsky_engine.jobs.report import write_report

        url, _ = write_report(summary["output"], config.storage_options, args.gpu_hour_price)
        print(f"report: {url}")
    failures = read_failures(summary["output"], config.storage_options) if summary["failed_rows"] else None
    code, message = run_exit_code(summary, config.output.max_failed_fraction, args.fail_on_row_errors, failures)
    if message:
        print(message, file=sys.stderr)
    return code


def interrupted(config) -> str:
    """One line for a run stopped by a signal: how far it got, from its progress file."""
    from kandinsky_engine.jobs.status import read_status

    try:
        status = read_status(config.output.path, config.storage_options)
    except Exception:  # nothing written yet, or unreadable: still one line
        status = {}
    if status.get("committed") is not None:
        return (f"interrupted: {status['committed']}/{status['total']} rows committed; rerun the same command to "
                "resume")
    return "interrupted before any row was committed; rerun the same command to start"


def _options(args) -> dict:
    """Storage options of `status` and `report`: from --config if given, else the environment's."""
    return _config(args).storage_options if args.config else {}


def cmd_status(args) -> int:
    from kandinsky_engine.jobs.status import format_status, read_status

    status = read_status(args.output, _options(args))
    print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
    return 0


def cmd_report(args) -> int:
    from kandinsky_engine.jobs.report import write_report

    url, _ = write_report(args.output, _options(args), args.gpu_hour_price, max_rows=args.max_rows)
    print(f"report: {url}")
    if args.open:
        import tempfile
        import webbrowser
        from pathlib import Path

        from kandinsky_engine.storage import url_to_fs

        fs, local = url_to_fs(url, _options(args))
        if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            local = str(Path(tempfile.mkdtemp(prefix="kandinsky-report-")) / "report.html")  # a browser needs a file
            fs.get_file(url_to_fs(url, _options(args))[1], local)
        webbrowser.open(Path(local).resolve().as_uri())
    return 0


def cmd_validate(args) -> int:
    from kandinsky_engine.manifest import validate_manifest

    config = _config(args)
    manifest = validate_manifest(config)
    print(f"ok: {manifest.num_rows} rows in {len(manifest.files)} file(s); columns {', '.join(manifest.columns)}")
    if manifest.row_errors:
        shown = list(manifest.row_errors.values())[:20]
        print(f"{len(manifest.row_errors)} row(s) would fail (they go to errors/, the others run):\n  "
              + "\n  ".join(shown), file=sys.stderr)
        return 1
    return 0


def cmd_verify(args) -> int:
    from kandinsky_engine.jobs.verify import report, verify

    config = _config(args) if args.config else None
    check = verify(args.output, config=config, deep=not args.quick)
    print(report(check, args.output), file=sys.stdout if check.ok else sys.stderr)
    ok = check.ok
    if args.recompute or args.recompute_id:
        from kandinsky_engine.jobs.reproduce import recompute
        from kandinsky_engine.jobs.reproduce import report as recompute_report

        result = recompute(args.output, args.recompute, args.recompute_id or [], config=config, device=args.device,
                           tolerance=args.tolerance)
        print(recompute_report(result, args.output), file=sys.stdout if result.ok else sys.stderr)
        ok = ok and result.ok
    return 0 if ok else 1


def cmd_push(args) -> int:
    from kandinsky_engine.jobs.push import push

    result = push(args.output, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
    partial = "" if result["complete"] else " (a partial output: rows of its manifest are still to run)"
    if args.dry_run:
        print("\n".join(result["files"]))
        print(f"dry run: {len(result['files'])} file(s) would go to dataset {args.repo_id}{partial}")
    else:
        print(f"pushed {len(result['files'])} file(s) to dataset {args.repo_id}: {result['url']}{partial}")
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_tiny_model(args) -> int:
    from kandinsky_engine.families.tiny import write_tiny_model

    root = write_tiny_model(args.dir)
    print(f"tiny model written to {root}/prior and {root}/decoder")
    return 0


def cmd_stage_model(args) -> int:
    from kandinsky_engine.jobs.stage_model import stage_model

    options = _config(args).storage_options if args.config else None
    staged = stage_model(args.src, args.dest, options)
    if staged.skipped:
        print(f"not copied (the engine reads none of them): {', '.join(staged.skipped)}")
    print(f"staged {staged.files} files ({staged.bytes / 1e6:.1f} MB, sizes checked, {staged.index} last) to "
          f"{args.dest}; name it in the config, e.g. model.prior: {args.dest}")
    return 0


def cmd_convert_k20(args) -> int:
    from kandinsky_engine.families.kandinsky20.convert import convert

    options = _config(args).storage_options if args.config else None
    dest = convert(args.src, args.dest, task=args.task, head_channels=args.head_channels, storage_options=options)
    print(f"converted Kandinsky 2.0 ({args.task}) to {dest}; name it in the config: model.decoder: {dest}")
    return 0


def cmd_bench(args) -> int:
    if args.family != "kandinsky22" and (args.full_size or args.plan or args.order):
        raise SystemExit(f"bench --family {args.family}: only the Ray job vs diffusers loop comparison; "
                         "--full-size, --plan and --order run Kandinsky 2.2")
    if args.full_size:  # the GPU benchmark: its own options (python -m kandinsky_engine.jobs.bench_gpu --help)
        from kandinsky_engine.jobs.bench_gpu import main as bench_full_size

        return bench_full_size(["--smoke"] * args.smoke + (["--output", args.output] if args.output else []))
    if args.plan or args.order:
        from kandinsky_engine.jobs.bench_scale import run as run_scale

        result = json.dumps(run_scale(args), indent=2)
    else:
        from kandinsky_engine.jobs.bench import run_bench

        result = json.dumps(run_bench(args), indent=2)
    print(result)
    if args.output:  # Ray's worker logs share stdout: a file holds the figures alone
        with open(args.output, "w") as f:
            f.write(result + "\n")
    return 0


def cmd_plan(args) -> int:
    from kandinsky_engine.jobs.plan import run as run_plan

    return run_plan(args, _config(args))
