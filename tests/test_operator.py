"""The operator's view: progress lines, `status` and `report`, on one job run twice through the CLI
(killed part way, then resumed to its end), on local disk and on S3 (moto), and the report in a
real browser (headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pytest

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.jobs.progress import rate
from kandinsky_engine.jobs.report import write_report
from kandinsky_engine.jobs.samples import image_bytes
from kandinsky_engine.jobs.status import read_status
from tests.conftest import FAST, KEY, SECRET, make_config, write_manifest
from tests.test_resume import _reap

pytestmark = pytest.mark.ray  # the job runs the CLI, which starts its own Ray

ROOT = Path(__file__).parents[1]
HOSTILE = '<img src=x onerror="document.title=1">'  # must stay text on the page
ROWS = 32  # 8 units of 4: the kill lands after the first ones
INTERVAL = 5.0  # seconds between progress lines of the resumed run


def job_rows() -> list[dict]:
    rows = [{"id": f"r{i:02d}", "prompt": f"a lighthouse {i} {HOSTILE}"} for i in range(ROWS - 1)]
    return [{"id": "bad</td><script>", "prompt": None}] + rows  # a validation failure in the first unit, hostile id


def cli(config_file: Path, out: Path, kill_after_rows: int | None, interval_s: float,
        seen: list | None = None) -> tuple[int, str, float]:
    """`kandinsky-batch run` in its own process, stdout piped; SIGKILLed once its progress file says
    `kill_after_rows` rows are committed (and `status` read into `seen` just before, while it runs).
    Returns (exit code, output, seconds)."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "kandinsky_engine.jobs.cli", "run", str(config_file), "--progress-interval", str(interval_s), "--report"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    while kill_after_rows is not None and proc.poll() is None:
        progress = [json.loads(p.read_text() or "{}") for p in (out / "_runs").glob("*.progress")] \
            if (out / "_runs").exists() else []
        if any(p.get("committed", 0) >= kill_after_rows for p in progress):
            if seen is not None:
                seen.append(read_status(str(out)))
            proc.send_signal(signal.SIGKILL)  # the driver only, as a lost node would
            break
        time.sleep(0.1)
    text = proc.communicate()[0].decode()
    _reap(proc.pid)
    return proc.returncode, text, time.perf_counter() - started


@pytest.fixture(scope="module")
def job(model_cache, tmp_path_factory):
    """(output, {"killed": (status, report html), "final": (returncode, stdout)}): one job killed
    after its first units, inspected, then resumed to its end by the same command."""
    tmp = tmp_path_factory.mktemp("operator")
    manifest = write_manifest(tmp / "m.parquet", job_rows())
    out = tmp / "out"
    config = make_config(model_cache, manifest, str(out), input={"rows_per_block": 4},
                         defaults={**FAST, "num_inference_steps": 12})
    config_file = tmp / "job.json"  # JSON is YAML
    config_file.write_text(json.dumps({**config.model_dump(mode="json"), "storage_options": {}}))
    running = []
    code, text, _ = cli(config_file, out, kill_after_rows=8, interval_s=1, seen=running)
    assert code == -signal.SIGKILL, text[-3000:]
    killed = read_status(str(out))
    url, _ = write_report(str(out))
    killed_html = Path(url).read_text()
    final = cli(config_file, out, kill_after_rows=None, interval_s=INTERVAL)
    return out, {"running": running[0], "killed": (killed, killed_html), "final": final, "killed_text": text}


def test_status_of_running_job(job):
    _, runs = job
    status = runs["running"]
    assert status["state"] == "running", status["state"]
    assert not status["lease"]["expired"] and not status["lease"]["owner_gone"]
    assert status["current"]["state"] == "running" and status["committed"] >= 8 and status["total"] == ROWS


def test_progress_lines_and_quiet_console(job):
    out, runs = job
    code, text, seconds = runs["final"]
    lines = text.strip().splitlines()
    assert code == 0, text  # one row failed validation: the job finished all the same (jobs/outcome.py)
    # One line per interval, and a few others (Ray's start, the plan, the summary): none of Ray's dumps.
    progress = [line for line in lines if line.startswith("progress: ")]
    assert 1 <= len(progress) <= seconds / INTERVAL + 2 and len(lines) - len(progress) < 10, text
    assert "Loading weights" not in text and "logging_progress" not in text and "Execution plan" not in text, text
    # Failed rows are not committed ones: 31 in data/, 1 in errors/, and the summary says 31 too.
    assert re.fullmatch(r"progress: 32/32 rows processed \(100%\): 31 committed, 1 failed, .* images/s over the "
                        r"last minute, ETA .*", progress[-1]), progress
    assert any(line.startswith("done: 31 rows in ") and "(1 failed, in errors/)" in line for line in lines[-4:])
    assert lines.count(f"report: {out}/report.html") == 1
    # The failed row is invalid (a null prompt): a rerun would fail it again, so no rerun is advised.
    failed = next(line for line in lines if line.startswith("1 row(s) failed: "))
    assert failed.startswith(f"1 row(s) failed: see {out}/errors/ (bad values or input files, which a rerun fails "
                             "again: fix them, then rerun; e.g. id 'bad</td><script>', validate: ") and \
        "rerun the same command" not in failed, failed
    # Ray's core worker notice about actor arguments is in the job log, not on the console; no traceback.
    assert "core_worker" not in text and "Traceback" not in text, text
    log_line = next(line for line in lines if line.startswith("log: "))
    log = Path(log_line.split()[1].rstrip(";")).read_text()
    assert str(out / "_logs") in log_line and "Execution plan of Dataset" in log and "Total Progress" in log
    assert "has constructor arguments in the object store" in log  # Ray 2.60 says it for every actor pool


def test_progress_shows_models_loading_before_the_first_commit(job):
    _, runs = job
    text = runs["killed_text"]  # progress every second: the first lines are while the three stages load
    loading = re.findall(r"^progress: 0/32 rows processed \(0%\): loading models: ([0-3])/3 stages ready$", text, re.M)
    assert loading and loading == sorted(loading), text[-3000:]
    assert "core_worker" not in text and "Traceback" not in text, text[-3000:]


def test_status_of_killed_job(job):
    out, runs = job
    status, html = runs["killed"]
    assert status["state"].startswith("stopped"), status["state"]  # its process is gone: not "running"
    assert status["lease"]["owner_gone"] and status["rows"] is None and status["runs"] == []
    assert 8 <= status["committed"] < ROWS and status["total"] == ROWS
    assert status["current"]["run"] and status["current"]["state"] == "running"
    assert status["failures"]["groups"][0]["examples"][0]["id"] == "bad</td><script>"
    assert f'data-figure="committed" data-value="{status["committed"]}"' in html
    assert html.count('class="thumb"') >= 4  # read from a listing: the killed first run wrote no index


def test_status_of_finished_job(job, capsys):
    out, _ = job
    summary = json.loads((out / "_SUCCESS.json").read_text())
    started = time.perf_counter()
    assert main(["status", str(out), "--json"]) == 0
    elapsed = time.perf_counter() - started
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "complete" and (status["rows"], status["failed_rows"]) == (31, 1)
    assert (status["shards"], status["error_shards"]) == (summary["shards"], summary["error_shards"])
    assert [r["run"] for r in status["runs"]] == [r["run"] for r in summary["runs"]]
    assert status["runs"][0]["rows_skipped"] >= 4  # the resumed run skipped what the killed one committed
    assert summary["runs"][0]["damaged"] == []  # the killed run's progress file is not taken for a torn report
    group = status["failures"]["groups"][0]
    assert (group["stage"], group["rows"]) == ("validate", 1) and status["lease"] is None
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "state: complete" in text and "rows: 31 in data/, 1 in errors/" in text
    print(f"\nstatus --json took {elapsed:.3f} s (in process)")


class Figures(HTMLParser):
    """data-figure values, and the page's own elements (to find any that user text would have made)."""

    def __init__(self):
        super().__init__()
        self.figures, self.tags, self.check = {}, [], {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "data-figure" in attrs and "data-value" in attrs:
            self.figures.setdefault(attrs["data-figure"], attrs["data-value"])
        if attrs.get("id") == "decode-check":
            self.check = attrs


def test_report_keeps_user_text_inert_and_prices_gpu_time(job, tmp_path):
    """The page as parsed HTML (no browser needed): hostile ids and prompts stay text, and GPU-hours
    are each run's GPU reservation x its wall time, priced."""
    out, _ = job
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    runs = sorted((copy / "_runs").glob("*.json"))
    for i, path in enumerate(runs):  # as if the runs had held 2 and 3 GPUs
        path.write_text(json.dumps({**json.loads(path.read_text()), "gpus_reserved": 2 + i}))
    url, _ = write_report(str(copy), gpu_hour_price=2.5)
    page = Path(url).read_text()
    parsed = Figures()
    parsed.feed(page)
    hours = sum((2 + i) * json.loads(p.read_text())["wall_time_s"] for i, p in enumerate(runs)) / 3600
    assert hours > 0 and float(parsed.figures["gpu_hours"]) == pytest.approx(hours, abs=1e-4)
    assert float(parsed.figures["dollars"]) == pytest.approx(2.5 * hours, abs=0.01)
    assert all(attrs.get("class") == "thumb" for tag, attrs in parsed.tags if tag == "img")
    assert sum(tag == "script" for tag, _ in parsed.tags) == 1
    assert HOSTILE not in page and "&lt;img src=x onerror=" in page  # escaped, so never markup
    assert "bad&lt;/td&gt;&lt;script&gt;" in page


def test_report_in_a_browser(job, tmp_path):
    out, _ = job
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    url, _ = write_report(str(out), gpu_hour_price=2.5)
    page = Path(url).resolve().as_uri()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,1600", f"--screenshot={shot}", page], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    parsed = Figures()
    parsed.feed(dom)
    total = int(parsed.check["data-total"])
    assert total == 31 and parsed.check["data-decoded"] == str(total), parsed.check  # every thumbnail decoded
    summary = json.loads((out / "_SUCCESS.json").read_text())
    for name in ("rows", "failed_rows", "manifest_rows", "shards", "error_shards"):
        assert parsed.figures[name] == str(summary[name]), name
    last = summary["runs"][-1]
    assert float(parsed.figures["wall_time_s"]) == last["wall_time_s"]
    assert float(parsed.figures["images_per_s"]) == last["images_per_s"]
    assert float(parsed.figures["gpu_hours"]) == 0.0 and float(parsed.figures["dollars"]) == 0.0  # CPU: no GPU held
    # Hostile prompts and ids stayed text: the only images are thumbnails, the only script the page's.
    assert all(attrs.get("class") == "thumb" for tag, attrs in parsed.tags if tag == "img")
    assert sum(tag == "script" for tag, _ in parsed.tags) == 1 and HOSTILE in dom.replace("&lt;", "<").replace("&gt;", ">")


def test_status_and_report_on_s3(job, s3, tmp_path):
    """The finished output on S3: status and report read it with the config's credentials, which
    appear nowhere in what they print or write."""
    out, _ = job
    fs, options = s3
    fs.put(str(out), "kandinsky/op/out", recursive=True)
    config = tmp_path / "creds.json"
    config.write_text(json.dumps({"input": {"manifest": "unused.parquet"}, "output": {"path": "unused"},
                                  "storage_options": options}))
    started = time.perf_counter()
    status = read_status("s3://kandinsky/op/out", options)
    elapsed = time.perf_counter() - started
    assert (status["state"], status["rows"], status["failed_rows"]) == ("complete", 31, 1)
    assert status["failures"]["groups"][0]["rows"] == 1
    code = subprocess.run([sys.executable, "-m", "kandinsky_engine.jobs.cli", "report", "s3://kandinsky/op/out", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert code.returncode == 0 and code.stdout.strip() == "report: s3://kandinsky/op/out/report.html", code.stderr
    html = fs.cat_file("kandinsky/op/out/report.html").decode()
    assert html.count('class="thumb"') == 31 and 'data-figure="rows" data-value="31"' in html
    assert KEY not in html + json.dumps(status) + code.stdout + code.stderr
    assert SECRET not in html + json.dumps(status) + code.stdout + code.stderr
    print(f"\nstatus of the S3 output took {elapsed:.3f} s")


def test_rate_is_over_the_last_minute():
    samples = [(0.0, 0), (30.0, 10), (61.0, 40), (90.0, 70)]
    assert rate(samples, 90.0, 70) == pytest.approx((70 - 10) / 60)  # from the sample at or before t - 60
    assert rate(samples[:2], 30.0, 10) == pytest.approx(10 / 30)  # younger than a minute: the whole run
    assert rate([(0.0, 0)], 5.0, 0) is None  # nothing committed yet


def test_image_bytes_reads_binary_and_struct_columns():
    binary = pa.array([b"a", None], pa.binary())
    struct = pa.array([{"bytes": b"a", "path": "x.png"}, {"bytes": None, "path": None}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    assert image_bytes(binary) == image_bytes(pa.chunked_array([struct])) == [b"a", None]
