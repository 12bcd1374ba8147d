"""`kandinsky-batch`: run a job, validate one, build the tiny model, stage a model, benchmark, plan stage sizes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from kandinsky_engine.jobs.commands import (cmd_bench, cmd_convert_k20, cmd_plan, cmd_push, cmd_report, cmd_run,
                                            cmd_stage_model, cmd_status, cmd_tiny_model, cmd_validate, cmd_verify,
                                            positive_int)
from kandinsky_engine.jobs.outcome import add_arguments as outcome_arguments  # argparse only: light to import
from kandinsky_engine.jobs.signals import Interrupted, signal_number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kandinsky-batch", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)  # options every command takes, after its name
    common.add_argument("--verbose", action="store_true",
                        help="on failure, print the full traceback; run: Ray's operator status and workers' output "
                             "(model loading) on the console too")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, **kwargs):
        return sub.add_parser(name, parents=[common], **kwargs)

    def with_config(p):
        p.add_argument("config", help="YAML job config")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. output.path=out")
        return p

    run = add("run", help="run a batch job (a config file, or --manifest and --output)")
    run.add_argument("config", nargs="?", help="YAML job config (optional with --manifest and --output)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. output.path=out")
    run.add_argument("--manifest", help="without a config file: the manifest (Parquet, CSV, TSV or JSONL; file, folder "
                                        "or glob)")
    run.add_argument("--output", help="without a config file: the output path")
    run.add_argument("--model", help="without a config file: model.decoder (a hub id, a folder or URL; 'tiny' for every "
                                     "part); default the released Kandinsky 2.2")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    run.add_argument("--overwrite", action="store_true",
                     help="start over: remove this tool's entries (data/, errors/, _RUN.json, ...) from an output it "
                          "wrote; other files stay")
    run.add_argument("--overwrite-unowned", action="store_true",
                     help="--overwrite also on a folder this tool did not write, or that holds the manifest or the "
                          "config (still removes only this tool's entries)")
    run.add_argument("--new-run", action="store_true",
                     help="if the output holds a run with another fingerprint, write this one beside it (PATH-<fp>)")
    run.add_argument("--limit", type=positive_int, metavar="N",
                     help="smoke run: the first N rows, rounded up to whole units (a later full run resumes it)")
    run.add_argument("--recompute-changed", action="store_true",
                     help="if manifest files changed since their units were committed, recompute those units "
                          "(default: refuse and change nothing)")
    run.add_argument("--wait", action="store_true",
                     help="if another run is writing the output (holds its lease), wait for it instead of exiting 3")
    outcome_arguments(run)  # --wait-timeout, --if-busy, --fail-on-row-errors (jobs/outcome.py)
    run.add_argument("--dry-run", action="store_true",
                     help="plan, validate and compare with the output, print what a run would do; write nothing")
    run.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    run.add_argument("--allow-device-change", action="store_true",
                     help="resume an output computed on another GPU model or CUDA/cuDNN/cuBLAS build (refused by "
                          "default: float rounding may differ); the change is recorded in _RUN.json")
    run.add_argument("--check-shards", action="store_true",
                     help="before resuming, compare every committed shard's sha256 with its record (reads the "
                          "whole output); by default sizes are compared and unrecorded shards read back")
    run.add_argument("--progress-interval", type=float, default=10.0, metavar="S",
                     help="seconds between progress lines and writes of _runs/{run}.progress (default 10)")
    run.add_argument("--report", action="store_true", help="write OUTPUT/report.html when the run ends (see report)")
    run.add_argument("--gpu-hour-price", type=float, metavar="P", help="with --report: $ per GPU-hour")
    run.set_defaults(func=cmd_run)

    def with_output(p):
        p.add_argument("output", help="output path (PATH of the job's output.path), local or URL")
        p.add_argument("--config", help="a job config whose storage_options to use (default: the environment)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value of --config")
        return p

    status = with_output(add("status", help="where a job stands (running or finished): rows, failures, rate, "
                                            "ETA, lease; reads small files only"))
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    report = with_output(add("report", help="write OUTPUT/report.html: contact sheet, failures, runs, throughput, "
                                            "cost; self-contained"))
    report.add_argument("--open", action="store_true", help="open it in a browser")
    report.add_argument("--gpu-hour-price", type=float, metavar="P", help="$ per GPU-hour, for the cost estimate")
    report.add_argument("--max-rows", type=int, default=200, help="thumbnails on the contact sheet (default 200)")
    report.set_defaults(func=cmd_report)

    push = add("push", help="publish a finished output as a Hugging Face dataset repository: README.md (the dataset "
                            "card), shards.txt and data/ only (needs huggingface_hub's token: HF_TOKEN or hf auth login)")
    push.add_argument("output", help="the output folder (local)")
    push.add_argument("repo_id", help="dataset repository, e.g. me/kandinsky-cats (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch to commit to (default: main)")
    push.add_argument("--dry-run", action="store_true", help="check the folder and list what would be uploaded")
    push.set_defaults(func=cmd_push)

    validate = with_config(add("validate", help="check the config and manifest without running"))
    validate.set_defaults(func=cmd_validate)

    check = add("verify", help="check an output's invariants (exit 0: sound, 1: problems listed)")
    check.add_argument("output", help="output path (PATH of the job's output.path)")
    check.add_argument("--config", help="the job config (for storage options); default: the one in PATH/_RUN.json")
    check.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value of --config")
    check.add_argument("--quick", action="store_true", help="compare shard sizes only, not their sha256")
    check.add_argument("--recompute", type=int, default=0, metavar="N",
                       help="also render N sampled rows again on this machine, from the output's own record, and "
                            "compare their images with the stored ones (see jobs/reproduce.py)")
    check.add_argument("--recompute-id", action="append", metavar="ID", help="also render the row with this id again")
    check.add_argument("--device", help="with --recompute: render on this torch device (e.g. cpu for a GPU run: "
                                        "float32, compared within --tolerance)")
    check.add_argument("--tolerance", type=int, default=1, metavar="K",
                       help="with --recompute: largest per-channel difference accepted, in /255 (default 1)")
    check.set_defaults(func=cmd_verify)

    tiny = add("tiny-model", help="write the tiny random model (DIR/prior, DIR/decoder)")
    tiny.add_argument("dir")
    tiny.set_defaults(func=cmd_tiny_model)

    stage = add("stage-model", help="copy a local model directory (e.g. a Hugging Face snapshot) to object "
                                    "storage: safetensors and config files only, sizes checked")
    stage.add_argument("src", help="diffusers pipeline or transformers model directory")
    stage.add_argument("dest", help="destination URL, e.g. s3://bucket/models/kandinsky-2-2-prior (a new prefix)")
    stage.add_argument("--config", help="a job config whose storage_options to use (default: the environment)")
    stage.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value of --config")
    stage.set_defaults(func=cmd_stage_model)

    k20 = add("convert-k20", help="convert the original Kandinsky 2.0 files (ai-forever/Kandinsky-2: U-Net .pt, vae.ckpt, "
                                  "text_encoder1/, text_encoder2/) to a safetensors model directory; see docs/kandinsky20.md")
    k20.add_argument("src", help="folder of the original files, local or URL (e.g. s3://bucket/kandinsky-2-0/)")
    k20.add_argument("dest", help="new local directory to write")
    k20.add_argument("--task", choices=["text2img", "inpainting"], default="text2img",
                     help="which U-Net: Kandinsky-2-0.pt (text2img and img2img) or Kandinsky-2-0-inpainting.pt")
    k20.add_argument("--head-channels", type=int, default=64, help="channels per attention head (the original's "
                     "num_head_channels, 64; the weights do not show it)")
    k20.add_argument("--config", help="a job config whose storage_options to use for SRC (default: the environment)")
    k20.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value of --config")
    k20.set_defaults(func=cmd_convert_k20)

    bench = add("bench", help="Ray job vs a plain diffusers loop on the same rows")
    bench.add_argument("--rows", type=int, default=32)
    bench.add_argument("--family", default="kandinsky22", choices=["kandinsky22", "kandinsky21", "kandinsky3", "kandinsky20"],
                       help="the model family: its tiny model in the Ray job, its diffusers pipelines in the loop")
    bench.add_argument("--steps", type=int, default=10, help="decoder steps")
    bench.add_argument("--prior-steps", type=int, default=None, help="prior steps (default: --steps)")
    bench.add_argument("--loop-batch", type=int, default=8, help="rows per call of the diffusers loop")
    bench.add_argument("--threads", type=int, default=None,
                       help="also time the loop in one process with N torch threads (the like-for-like loops run at "
                            "the job's budget: a process per model actor, with an actor's threads)")
    bench.add_argument("--no-batch1", dest="batch1", action="store_false", help="skip the batch-1 diffusers loop")
    bench.add_argument("--size", type=int, default=64)
    bench.add_argument("--output", metavar="FILE", help="also write the figures (JSON) to FILE")
    bench.add_argument("--tasks", default="", metavar="T1,T2",
                       help="also time the Ray job on N rows of each of these tasks (or 'all')")
    bench.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    bench.add_argument("--plan", metavar="N1,N2", default="",
                       help="instead: plan synthetic manifests of these row counts (--dry-run in a subprocess) and "
                            "report the driver's peak RSS and the time")
    bench.add_argument("--order", action="store_true",
                       help="instead: the same job (--rows, --steps) with and without Ray Data's preserve_order")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the job config, e.g. decoder.batch_size=8")
    bench.add_argument("--full-size", action="store_true",
                       help="instead: the real Kandinsky 2.2 architectures with random bf16 weights on this machine's "
                            "GPU, 768x768, 50 + 25 steps (jobs/bench_gpu.py; skipped without CUDA)")
    bench.add_argument("--smoke", action="store_true", help="with --full-size: tiny widths, runs on a CPU in seconds")
    bench.set_defaults(func=cmd_bench)

    from kandinsky_engine.jobs.plan import add_arguments as plan_arguments  # light: argparse and the placement arithmetic

    planner = with_config(add("plan", help="measure each stage's rows/s and size the actor pools so that the "
                                           "U-Net stays busy on N GPUs (or C CPU cores); see docs/performance.md"))
    plan_arguments(planner)
    planner.set_defaults(func=cmd_plan)
    return parser


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted. A plain StreamHandler keeps the
    stream it was created with, which breaks when `main` runs in a process that swaps stderr
    (tests, notebooks): later records would go to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        from kandinsky_engine.jobs.lease import LeaseHeld, LeaseLost

        if isinstance(exc, LeaseLost):  # another run took over, and resumes the output
            print(f"busy: {exc}", file=sys.stderr)
            return 3
        if isinstance(exc, LeaseHeld):  # not a failure of this job: another run is writing the output
            if getattr(args, "if_busy", "fail") == "skip":  # a scheduled tick that the running job covers
                print(f"skipped: {exc} (--if-busy skip)")
                return 0
            print(f"busy: {exc}", file=sys.stderr)
            return 3
        # Exit code 1 means "finished, too many rows failed" (jobs/outcome.py): any failure to run is 2, with one
        # clear message (config, manifest, storage access, output: our own messages name the file
        # or URL) and the traceback only when asked for.
        if args.verbose:
            traceback.print_exc()
        message = describe(exc)
        hint = "" if args.verbose or message == str(exc) else " (--verbose for the traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
        return 2


def describe(exc: BaseException) -> str:
    """One line for a failure: the engine's own errors as they are (they name the file or URL, and
    may list problems below their first line); a Ray error as the last line of its text, which
    ends with the remote traceback (`OSError: Unable to load weights ...`); anything else as its
    type and first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    ray = sys.modules.get("ray")
    if ray and isinstance(exc, ray.exceptions.RayError):
        return f"{type(exc).__name__}: {lines[-1]}"
    if isinstance(exc, (ValueError, FileNotFoundError, PermissionError, RuntimeError)):
        return str(exc)
    return f"{type(exc).__name__}: {lines[0]}"


def entry() -> None:
    """The `kandinsky-batch` command: `main`, then `leave`; SIGTERM and Ctrl-C stop it cleanly."""
    from kandinsky_engine.jobs.signals import install

    install()
    try:
        code = main()
    except (KeyboardInterrupt, Interrupted) as exc:  # outside a run: nothing to report but the stop
        print("interrupted", file=sys.stderr)
        code = 128 + signal_number(exc)
    leave(code)


def leave(code: int) -> None:
    """End the process with `code`, skipping the interpreter's own shutdown. By then every result
    is written and printed; what shutdown would still run is native library teardown and daemon
    threads (fsspec's event loop, tqdm's monitor, Ray's core worker), and an abort there (SIGABRT,
    exit -6) must not replace a finished command's exit code. A local Ray cluster this process
    started is shut down first, as Ray's own exit hook would."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 (the result stands; the cluster's processes end with this one)
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 (a closed pipe: nothing more to say)
            pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
