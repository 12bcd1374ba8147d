"""What `kandinsky-batch` says: config problems one line per key, the progress line and bar while
models load and after, Ray's core-worker notice kept off the console, what --limit covers, the
--dry-run plan, and the advice after failed rows. Offline, no Ray: the CLI run that shows them
together is in tests/test_operator.py (and --limit, --dry-run in tests/test_integrity.py)."""

from __future__ import annotations

import io
import logging
import os
import re
from types import SimpleNamespace

import pytest
import yaml

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.jobs.native_stderr import NativeStderr
from kandinsky_engine.jobs.outcome import needs_fixing, run_exit_code
from kandinsky_engine.jobs.progress import BAR_FORMAT, Console, RunProgress
from kandinsky_engine.jobs.summary import format_plan, limit_note
from kandinsky_engine.config import load_config
from kandinsky_engine.config_errors import ConfigError
from kandinsky_engine.units import limit_stops

BASE = {"input": {"manifest": "m.parquet"}, "output": {"path": "out"}}


def job_file(tmp_path, patch: dict | None = None, text: str | None = None):
    data = {**BASE, **{k: {**BASE.get(k, {}), **v} if isinstance(v, dict) else v for k, v in (patch or {}).items()}}
    path = tmp_path / "job.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return path


# --- config problems ------------------------------------------------------------------------------

def test_cli_prints_one_line_per_config_problem_and_exits_2(tmp_path, capsys):
    path = job_file(tmp_path, {"defaults": {"num_inference_step": 30}})
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: {path}: defaults.num_inference_step: unknown key (did you mean "
                              "num_inference_steps?)\n")


@pytest.mark.parametrize("patch, overrides, line", [
    ({"decoder": {"batch_size": 0}}, [], "decoder.batch_size: must be at least 1, got 0"),
    ({"output": {"image_format": "jpg"}}, [],
     "output.image_format: expected 'png', 'jpeg' or 'webp', got 'jpg' (did you mean jpeg?)"),
    ({"defaults": {"width": "wide"}}, [], "defaults.width: expected an integer, got 'wide'"),
    ({"fuse_stages": "maybe"}, [], "fuse_stages: expected true or false, got 'maybe'"),
    ({"decoder": None}, [], "decoder: expected a mapping (key: value lines), got null (empty)"),
    ({"defaults": {"task_defaults": {"img2imgg": {"guidance_scale": 7}}}}, [],
     "defaults.task_defaults.img2imgg: unknown key (did you mean img2img?)"),
    ({"defaults": {"task_defaults": {"img2img": {"guidance_scale": "high"}}}}, [],
     "defaults.task_defaults.img2img.guidance_scale: expected an integer or a number, got 'high'"),
    ({"num_inference_steps": 8}, [], "num_inference_steps: unknown key (did you mean defaults.num_inference_steps?)"),
    ({"batch_size": 8}, [], "batch_size: unknown key here (batch_size is a key of prior, text_encoder, encode, "
                            "hint, decoder, movq, score)"),
    ({"outputs": {}}, [], "outputs: unknown key (did you mean output?)"),
    ({"model": {"dtype": "float16", "device": "cpu"}}, [], "model: model.dtype=float16 needs a cuda device, got model.device='cpu'"),
    ({}, ["decoder.batch_size=0"], "decoder.batch_size (--set): must be at least 1, got 0"),
    ({}, ["defaults.num_inference_step=3"], "--set defaults.num_inference_step: unknown key (did you mean "
                                            "num_inference_steps?)"),
])
def test_config_problem_is_one_line_naming_its_key(tmp_path, patch, overrides, line):
    path = job_file(tmp_path, patch)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert err.value.problems == [line]
    assert str(err.value) == (line if line.startswith("--set") else f"{path}: {line}")


def test_several_problems_are_listed_one_per_line(tmp_path):
    path = job_file(tmp_path, {"decoder": {"batch_sise": 8, "actors": 0}, "output": {"quality": "hi"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).splitlines() == [
        f"{path}: 3 problems in the config",
        "  output.quality: expected an integer, got 'hi'",
        "  decoder.actors: must be at least 1, got 0",
        "  decoder.batch_sise: unknown key (did you mean batch_size?)",
    ]
    with pytest.raises(ConfigError) as err:  # each bad --set is a line too
        load_config(job_file(tmp_path), ["decoder.batch_size=x", "inputs.manifest=m", "decoder"])
    assert err.value.problems == ["--set decoder.batch_size=x: expected an integer",
                                  "--set inputs.manifest: unknown key (did you mean input?)",
                                  "--set expects key.sub=value, got 'decoder'"]


def test_yaml_syntax_errors_and_missing_files_name_the_file_and_line(tmp_path):
    path = job_file(tmp_path, text="input:\n  manifest: m.parquet\n output: {path: out}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3:2: invalid YAML: .*expected <block end>"):
        load_config(path)
    path = job_file(tmp_path, text="input: {manifest: m.parquet\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2:1: invalid YAML: "):
        load_config(path)
    path = job_file(tmp_path, text="- input\n- output\n")
    with pytest.raises(ConfigError, match=r"expected a mapping of sections \(input:, output:, \.\.\.\) at the top "
                                          r"level, got a list$"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}/nope.yaml: no such file$"):
        load_config(tmp_path / "nope.yaml")


def test_config_problems_show_no_credentials(tmp_path):
    path = job_file(tmp_path, {"storage_options": {"s3": "AKIASECRETKEY"},
                               "input": {"max_side": "s3://user:hunter22@bucket/x"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == ["input.max_side: expected an integer, got 's3://***@bucket/x'",
                                  "storage_options.s3: expected a mapping (key: value lines)"]
    assert "AKIASECRETKEY" not in str(err.value) and "hunter22" not in str(err.value)


# --- progress -------------------------------------------------------------------------------------

def progress_at(snapshot: dict, total: int = 6, done: int = 0) -> RunProgress:
    progress = RunProgress(None, "", "t", total, done, Console())
    progress.snapshot = {"units": 0, "rows": 0, "failed": 0, "failures": {}, "stages": 3, "stages_ready": 0, **snapshot}
    return progress


def test_progress_shows_the_loading_phase_then_committed_and_failed_rows():
    assert progress_at({"stages_ready": 1}).line() == "progress: 0/6 rows processed (0%): loading models: 1/3 stages ready"
    assert progress_at({"stages_ready": 3}).line() == ("progress: 0/6 rows processed (0%): models loaded (3/3 stages), "
                                                       "first unit on its way")
    done = progress_at({"units": 2, "rows": 5, "failed": 1, "stages_ready": 3}).line()
    assert done == "progress: 6/6 rows processed (100%): 5 committed, 1 failed, ? images/s over the last minute, ETA ?"
    resumed = progress_at({"units": 1, "rows": 3, "failed": 1, "stages_ready": 3}, total=12, done=4).line()
    assert resumed.startswith("progress: 8/12 rows processed (67%): 7 committed, 1 failed, ")  # 4 from earlier runs


def test_progress_bar_has_no_empty_postfix():
    from tqdm import tqdm

    progress = progress_at({"stages_ready": 2})
    progress.bar = tqdm(total=6, file=io.StringIO(), bar_format=BAR_FORMAT)
    progress.poll()
    assert re.search(r"\| 0/6 \[\d\d:\d\d, loading models: 2/3 stages ready\]$", str(progress.bar)), str(progress.bar)
    progress.snapshot.update(units=2, rows=5, failed=1)
    progress.poll()
    assert re.search(r"\| 6/6 \[\d\d:\d\d, 5 committed, 1 failed, [\d.?]+ img/s \(1 min\), ETA [\d:?]+\]$",
                     str(progress.bar)), str(progress.bar)


def test_core_worker_notice_goes_to_the_job_log_and_the_rest_to_stderr(tmp_path, capfd):
    handler = logging.FileHandler(tmp_path / "job.log")
    native = NativeStderr(handler)
    os.write(2, b"[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(X)' and "
                b"ID: 'ab' has constructor arguments in the object store and max_restarts > 0. If the arguments ...\n")
    os.write(2, b"a line of its own\n")
    os.write(2, b"no newline yet")
    native.close()
    handler.close()
    err = capfd.readouterr().err
    assert err == "a line of its own\nno newline yet" and "core_worker" not in err
    assert "has constructor arguments in the object store" in (tmp_path / "job.log").read_text()
    os.write(2, b"after close\n")
    assert capfd.readouterr().err == "after close\n"


# --- --limit, --dry-run ---------------------------------------------------------------------------

def test_limit_says_when_it_rounds_up_to_whole_units():
    files = [SimpleNamespace(num_rows=16)]
    assert limit_note(5, limit_stops(files, 5, 4), 4) == "--limit 5 covers 8 rows (whole units of 4)"
    assert limit_note(8, limit_stops(files, 8, 4), 4) is None
    assert limit_note(None, limit_stops(files, None, 4), 4) is None
    assert limit_note(30, limit_stops(files, 30, 4), 4) is None  # the whole manifest: nothing rounded


def test_dry_run_plan_is_readable():
    plan = {"driver_peak_rss_mb": 312.4, "manifest_rows": 16, "files": 1, "read_tasks": 1, "rows_in_scope": 8,
            "units_in_scope": 2, "rows_per_block": 4, "committed_shards": 1, "rows_committed": 3,
            "rows_failed_before": 1, "rows_to_run": 5, "failing_validation": 1, "changed_files": [],
            "ray_startup_s": 3.21}
    assert format_plan(plan).splitlines() == [
        "dry run: nothing was written",
        "  manifest: 16 rows in 1 file(s), read by 1 read task(s)",
        "  scope: 8 rows of 16 (--limit) in 2 unit(s) of up to 4 rows",
        "  committed already: 3 rows in 1 data shard(s)",
        "  to run: 5 rows, 1 of them failed before and are retried",
        "  failing validation: 1 row(s) (they go to errors/, the others run)",
        "  driver: peak memory 312 MB; Ray start-up 3.2 s",
    ]


# --- advice after failed rows ---------------------------------------------------------------------

def failure(stage, error_type, message, id_="r1"):
    return {"id": id_, "stage": stage, "error_type": error_type, "message": message}


@pytest.mark.parametrize("row, fix", [
    (failure("validate", "InvalidRow", "prompt: null at id 'r1'"), True),
    (failure("resolve", "InvalidRow", "strength 2.0 outside [0, 1] at id 'r1'"), True),
    (failure("fetch_inputs", "ImageInputError", "image_uri: file not found: /in/a.png"), True),
    (failure("fetch_inputs", "ImageInputError", "image_uri: refused by input.allowed_uri_prefixes: /etc/x is outside"),
     True),
    (failure("fetch_inputs", "ImageInputError", "image_uri: /in/big.png is larger than input.max_input_bytes=10"), True),
    (failure("MovqEncodeStage", "ImageInputError", "image_uri: cannot identify image file"), True),
    (failure("fetch_inputs", "ImageInputError", "image_uri: cannot read s3://b/a.png: no answer within "
                                                "input.read_timeout_s=60"), False),
    (failure("fetch_inputs", "ImageInputError", "image_uri: cannot read s3://b/a.png: ClientOSError: reset"), False),
    (failure("DecoderStage", "OutOfMemoryError", "out of memory at batch size 1: CUDA out of memory"), False),
    (failure("DecoderStage", "RuntimeError", "expected scalar type"), False),
])
def test_failures_that_a_rerun_cannot_fix(row, fix):
    assert needs_fixing(row["stage"], row["error_type"], row["message"]) is fix


def test_rerun_is_advised_only_for_failures_a_rerun_can_fix():
    summary = {"rows": 5, "failed_rows": 2, "output": "/o"}
    timeout = failure("fetch_inputs", "ImageInputError", "image_uri: cannot read /a: no answer within input.read_timeout_s=1")
    missing = failure("fetch_inputs", "ImageInputError", "image_uri: file not found: /in/a.png", "r2")
    _, message = run_exit_code(summary, None, failures={"rows": [timeout, dict(timeout, id="r2")], "read_all": True})
    assert message == "2 row(s) failed: see /o/errors/ (rerun the same command to retry them)"
    _, message = run_exit_code(summary, None, failures={"rows": [dict(missing, id="r1"), missing], "read_all": True})
    assert message == ("2 row(s) failed: see /o/errors/ (bad values or input files, which a rerun fails again: fix "
                       "them, then rerun; e.g. id 'r1', fetch_inputs: image_uri: file not found: /in/a.png)")
    assert "rerun the same command" not in message
    code, message = run_exit_code(summary, 0.1, failures={"rows": [timeout, missing], "read_all": False})
    assert code == 1 and message.splitlines()[0] == (
        "2 row(s) failed: see /o/errors/ (1 of the 2 read may pass if you rerun the same command; 1 with bad values or "
        "input files fail again until fixed; e.g. id 'r2', fetch_inputs: image_uri: file not found: /in/a.png)")
