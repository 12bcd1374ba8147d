"""Untrusted manifests: what an input URI may read (input.allowed_uri_prefixes), credentials kept out
of messages, bounded reads, only the inputs a row's task uses, `validate` telling the truth, and
`--set` values parsed against their field's type.

Real files, a real HTTP server and a real S3 API (moto) on loopback, real Ray for the whole job.
"""

from __future__ import annotations

import hashlib
import json
import http.server
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.jobs.run import run_job
from kandinsky_engine.config import GenerationDefaults, load_config
from kandinsky_engine.images import ImageInputError, read_uri
from kandinsky_engine.inputs import fetch_inputs
from kandinsky_engine.manifest import validate_manifest
from kandinsky_engine.rows import object_column
from kandinsky_engine.storage import redact_url
from kandinsky_engine.uri_policy import UriPolicy, UriRefused
from tests.conftest import TINY, batch_of, make_config, png, put_manifest, write_manifest

RULE = "refused by input.allowed_uri_prefixes"
PASSWORD, SIGNATURE = "S3cretPW", "deadbeefcafe0123"
ENDLESS = 64 << 20  # what /endless would send if nobody stopped reading


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """An HTTP server on loopback: files of a folder (ok.png, private/secret.png), /redirect/PATH
    (302 to /PATH), /endless (a body of 64 MiB without a length) and /stall (no answer until the
    module ends). Yields (base URL, folder, bytes sent per /endless GET)."""
    root = tmp_path_factory.mktemp("web")
    (root / "ok.png").write_bytes(png("green"))
    (root / "private").mkdir()
    (root / "private" / "secret.png").write_bytes(png("red"))
    sent: list[int] = []
    stop = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

        def special(self, body: bool) -> bool:
            if self.path.startswith("/redirect/"):  # /redirect/<path>: 302 to /<path>
                self.send_response(302)
                self.send_header("Location", "/" + self.path.removeprefix("/redirect/"))
                self.end_headers()
                return True
            if self.path == "/stall":
                stop.wait(60)
                return True
            if self.path != "/endless":
                return False
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            count = 0
            try:
                while body and count < ENDLESS:
                    self.wfile.write(b"\0" * 65536)
                    count += 65536
            except OSError:  # the reader hung up: what we want
                pass
            if body:
                sent.append(count)
            return True

        def do_GET(self):
            self.special(True) or super().do_GET()

        def do_HEAD(self):
            self.special(False) or super().do_HEAD()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, sent
    stop.set()
    server.shutdown()


@pytest.fixture
def job_dir(tmp_path) -> Path:
    """A manifest folder with an input inside, a sibling folder whose name extends it, and a symlink
    from inside to /etc/passwd."""
    job = tmp_path / "job"
    (job / "in").mkdir(parents=True)
    (job / "in" / "ok.png").write_bytes(png("blue"))
    (job / "in" / "link.png").symlink_to("/etc/passwd")
    (tmp_path / "job-secret").mkdir()
    (tmp_path / "job-secret" / "x.png").write_bytes(png("red"))
    return job


def fetch(rows: list[dict], config, manifest: str) -> dict[str, np.ndarray]:
    batch = batch_of(rows, config)
    if "mix" in batch:  # one list per cell, never a 2-D array
        batch["mix"] = object_column(r.get("mix") for r in rows)
    return fetch_inputs(batch, config=config, manifest_file=manifest)


def errors_of(batch) -> dict[str, str]:
    return {i: m for i, m in zip(batch["id"], batch["error_message"]) if m}


# --- item 1: the input policy ------------------------------------------------------------------

def test_prefixes_match_whole_segments_and_refuse_escapes():
    policy = UriPolicy.for_manifest("s3://b/m/part-*.parquet", "s3://b/m/part-0.parquet", ["s3://b/in", "/data/img/"])
    assert policy.check("s3://b/m/cat.png") == "s3://b/m/cat.png"  # a glob's part before the wildcard
    assert policy.check("s3://b/in/x/y.png") == "s3://b/in/x/y.png"
    assert policy.check("/data/img/a.png") == policy.check("file:///data/img/a.png") == "/data/img/a.png"
    refused = {
        "s3://b/input-secret/x.png": "is outside [s3://b/m/, s3://b/in, /data/img]",  # not a segment boundary
        "s3://b/mx/cat.png": "is outside",
        "s3://other/m/cat.png": "is outside",
        "s3://b/in/../secret/x.png": "has a '..' segment",
        "s3://b/in/%2e%2e/secret.png": "has a '..' segment",
        "/data/img/../../etc/passwd": "has a '..' segment",
        "/data/images/a.png": "is outside",
        "/etc/passwd": "is outside",
        "simplecache::s3://b/in/x.png": "is outside",  # chained: only a prefix naming the chain allows it
        "memory://b/in/x.png": "is outside",
        "zip://x.png::s3://b/in/a.zip": "is outside",
        "https://b/in/x.png": "is outside",
        "http://127.0.0.1:8080/admin": "is outside",
        "http://evil.example\\@b/in/x.png": "not a URL we can check: its host part has a backslash",
        "s3://b/in/.\t./x.png": "not a URL we can check: it has a control character",  # a WHATWG parser drops tabs
    }
    for uri, reason in refused.items():
        with pytest.raises(UriRefused, match=RULE) as err:
            policy.check(uri)
        assert reason in str(err.value), (uri, str(err.value))
    # A file manifest's folder; a folder manifest is its own location.
    assert UriPolicy.for_manifest("s3://b/m/x.parquet", "s3://b/m/x.parquet").check("s3://b/m/i.png")
    assert UriPolicy.for_manifest("s3://b/m", "s3://b/m/sub/x.parquet").check("s3://b/m/i.png")
    with pytest.raises(UriRefused):
        UriPolicy.for_manifest("s3://b/m", "s3://b/m/sub/x.parquet").check("s3://b/i.png")
    chained = UriPolicy.for_manifest("/m.parquet", "/m.parquet", ["simplecache::s3://b/in"])
    assert chained.check("simplecache::s3://b/in/x.png") == "simplecache::s3://b/in/x.png"


def test_validate_refuses_inputs_outside_the_manifest_folder(job_dir, model_cache, web, capsys):
    base, _, _ = web
    inside = job_dir / "in" / "ok.png"
    sources = {
        "inside": str(inside), "file-url": inside.as_uri(),
        "passwd": "/etc/passwd", "file-passwd": "file:///etc/passwd",
        "symlink": str(job_dir / "in" / "link.png"),  # resolves to /etc/passwd
        "dotdot": f"{job_dir}/in/../../job-secret/x.png",
        "sibling": str(job_dir.parent / "job-secret" / "x.png"),  # "job-secret" is not below "job"
        "http": f"{base}/ok.png", "s3": "s3://any-bucket/x.png", "memory": "memory://x.png",
        "chained": f"simplecache::{inside.as_uri()}",
        "creds": f"http://alice:{PASSWORD}@127.0.0.1:1/x.png?X-Amz-Signature={SIGNATURE}",
    }
    rows = [{"id": k, "prompt": "p", "task": "img2img", "strength": 0.5, "image_uri": v} for k, v in sources.items()]
    rows += [{"id": "t2i", "prompt": "p", "task": "text2img", "image_uri": "/etc/passwd"},  # not used: not read
             {"id": "mix", "prompt": "p", "task": "mix", "mix": [{"text": "a", "weight": 0.5},
                                                                 {"image_uri": "/etc/passwd", "weight": 0.5}]}]
    manifest = write_manifest(job_dir / "m.parquet", rows)
    errors = validate_manifest(make_config(model_cache, manifest, str(job_dir / "out"))).row_errors
    assert set(errors) == set(sources) - {"inside", "file-url"} | {"mix"}
    assert f"column 'image_uri': {RULE}: /etc/passwd is outside [{job_dir}] at id 'passwd'" in errors["passwd"]
    assert f"{job_dir}/in/link.png (a link to /etc/passwd) is outside" in errors["symlink"]
    assert "'..' segment" in errors["dotdot"]
    assert f"column 'mix' item 1 image_uri: {RULE}: /etc/passwd" in errors["mix"]
    assert "http://***@127.0.0.1:1/x.png?X-Amz-Signature=*** is outside" in errors["creds"]
    assert not [m for m in errors.values() if PASSWORD in m or SIGNATURE in m]

    # Listed prefixes widen it, on segment boundaries; relative ones resolve against the YAML's folder.
    (job_dir / "job.yaml").write_text(yaml.safe_dump({
        "input": {"manifest": "m.parquet", "allowed_uri_prefixes": [f"{base}/", "../job-secret"]},
        "output": {"path": "out"}, "model": {"cache_dir": model_cache, **TINY}, "defaults": {"num_inference_steps": 2}}))
    config = load_config(job_dir / "job.yaml")
    assert config.input.allowed_uri_prefixes == [f"{base}/", str(job_dir.parent / "job-secret")]
    errors = validate_manifest(config).row_errors
    assert set(errors) == set(sources) - {"inside", "file-url", "http", "sibling", "dotdot"} | {"mix", "dotdot"}
    # `validate` lists them, naming the rule.
    assert main(["validate", str(job_dir / "job.yaml")]) == 1
    err = capsys.readouterr().err
    assert f"{len(errors)} row(s) would fail" in err and f"{RULE}: /etc/passwd is outside" in err


def test_fetch_enforces_the_policy_again(job_dir, model_cache, tmp_path):
    """Defence in depth: rows that skipped validation are refused where they are read."""
    config = make_config(model_cache, str(job_dir / "m.parquet"), str(tmp_path / "out"))
    rows = [
        {"id": "passwd", "prompt": "p", "task": "img2img", "image_uri": "/etc/passwd"},
        {"id": "symlink", "prompt": "p", "task": "img2img", "image_uri": str(job_dir / "in" / "link.png")},
        {"id": "mask", "prompt": "p", "task": "inpaint", "image_uri": str(job_dir / "in" / "ok.png"),
         "mask_uri": "file:///etc/passwd"},
        {"id": "hint", "prompt": "p", "task": "controlnet", "hint_uri": "/etc/hostname"},
        {"id": "mix", "prompt": "p", "task": "mix", "mix": [{"image_uri": "/etc/passwd", "weight": 1.0}]},
        {"id": "ok", "prompt": "p", "task": "img2img", "image_uri": str(job_dir / "in" / "ok.png")},
    ]
    out = fetch(rows, config, str(job_dir / "m.parquet"))
    errors = errors_of(out)
    assert set(errors) == {"passwd", "symlink", "mask", "hint", "mix"}
    assert errors["passwd"] == f"image_uri: {RULE}: /etc/passwd is outside [{job_dir}]"
    assert errors["mask"].startswith(f"mask_uri: {RULE}: file:///etc/passwd is outside")
    assert errors["hint"].startswith(f"hint_uri: {RULE}") and errors["mix"].startswith(f"mix image_uri: {RULE}")
    assert set(out["error_stage"][:5]) == {"fetch_inputs"}
    assert out["image_bytes"][5] == png("blue") and out["image_bytes"][0] is None


def test_http_inputs_are_refused_unless_listed(job_dir, model_cache, tmp_path, web):
    base, _, _ = web
    manifest = str(job_dir / "m.parquet")
    rows = [{"id": "web", "prompt": "p", "task": "img2img", "image_uri": f"{base}/ok.png"},
            {"id": "gone", "prompt": "p", "task": "img2img",
             "image_uri": f"http://alice:{PASSWORD}@{base[7:]}/missing.png?X-Amz-Signature={SIGNATURE}&token=t0k3n"}]
    refused = fetch(rows, make_config(model_cache, manifest, str(tmp_path / "o")), manifest)
    assert errors_of(refused)["web"] == f"image_uri: {RULE}: {base}/ok.png is outside [{job_dir}]"

    config = make_config(model_cache, manifest, str(tmp_path / "o"), input={"allowed_uri_prefixes": [f"{base}/"]})
    out = fetch(rows, config, manifest)
    assert out["error_message"][0] == "" and out["image_bytes"][0] == png("green")
    # item 2: a failed read names the URL without its password or signature.
    message = out["error_message"][1]
    assert message == f"image_uri: file not found: http://***@{base[7:]}/missing.png?X-Amz-Signature=***&token=***"


def test_every_redirect_hop_is_checked_against_the_policy(job_dir, model_cache, tmp_path, web):
    """An allowed URL that answers 302 to a URL outside the allowed prefixes is refused, naming
    both; a redirect that stays inside is followed."""
    base, _, _ = web
    manifest = str(job_dir / "m.parquet")
    rows = [{"id": "escape", "prompt": "p", "task": "img2img", "image_uri": f"{base}/redirect/redirect/private/secret.png"},
            {"id": "inside", "prompt": "p", "task": "img2img", "image_uri": f"{base}/redirect/redirect/ok.png"}]
    config = make_config(model_cache, manifest, str(tmp_path / "o"),
                         input={"allowed_uri_prefixes": [f"{base}/redirect/", f"{base}/ok.png"]})
    out = fetch(rows, config, manifest)
    assert out["image_bytes"][0] is None and out["image_bytes"][1] == png("green")
    assert errors_of(out)["escape"] == (
        f"image_uri: {base}/redirect/private/secret.png redirects to {base}/private/secret.png: {RULE}: "
        f"{base}/private/secret.png is outside [{job_dir}, {base}/redirect/, {base}/ok.png]")
    direct = fetch([{**rows[0], "image_uri": f"{base}/private/secret.png"}], config, manifest)
    assert errors_of(direct)["escape"].startswith(f"image_uri: {RULE}: {base}/private/secret.png is outside")


# --- item 2: credentials in URIs -----------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    (f"http://alice:{PASSWORD}@h/x.png", "http://***@h/x.png"),
    (f"https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Security-Token=tk"
     f"&X-Amz-Signature={SIGNATURE}", "https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4&X-Amz-Credential=***"
     "&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://acct.blob.core.windows.net/c/x.png?sv=2024&sig=abc%3D", "https://acct.blob.core.windows.net/c/x.png?sv=2024&sig=***"),
    ("https://h/x?access_token=a&password=b&key=c&secret=d&signature=e&monkey=f",
     "https://h/x?access_token=***&password=***&key=***&secret=***&signature=***&monkey=f"),
    ("cannot read 'https://u:p@h/x?token=t': 404", "cannot read 'https://***@h/x?token=***': 404"),
])
def test_redact_url_hides_userinfo_and_secret_query_values(url, expected):
    assert redact_url(url) == expected


# --- item 3: bounded reads ----------------------------------------------------------------------

def test_reads_stop_after_max_input_bytes(tmp_path, web):
    base, _, sent = web
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"\0" * 2000)
    (tmp_path / "fits.png").write_bytes(b"\0" * 1000)
    with pytest.raises(ImageInputError, match=rf"^{tmp_path}/big.png is larger than input.max_input_bytes=1000$"):
        read_uri(str(tmp_path / "big.png"), max_bytes=1000)
    assert read_uri(str(tmp_path / "fits.png"), max_bytes=1000) == b"\0" * 1000
    # A body without a length and without end: the read stops, and so does the server's sending.
    with pytest.raises(ImageInputError, match=rf"^{base}/endless is larger than input.max_input_bytes=1048576$"):
        read_uri(f"{base}/endless", max_bytes=1 << 20)
    deadline = time.monotonic() + 10
    while len(sent) < 2 and time.monotonic() < deadline:  # fsspec's size probe (GET) and the read itself
        time.sleep(0.05)
    assert sent and max(sent) < ENDLESS // 4, sent


def test_special_files_are_refused_before_opening(job_dir, model_cache, tmp_path):
    os.mkfifo(job_dir / "in" / "fifo.png")
    manifest = str(job_dir / "m.parquet")
    config = make_config(model_cache, manifest, str(tmp_path / "o"), input={"allowed_uri_prefixes": ["/dev/zero"]})
    rows = [{"id": "fifo", "prompt": "p", "task": "img2img", "image_uri": str(job_dir / "in" / "fifo.png")},
            {"id": "zero", "prompt": "p", "task": "img2img", "image_uri": "/dev/zero"},
            {"id": "dir", "prompt": "p", "task": "img2img", "image_uri": str(job_dir / "in")}]
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=fetch(rows, config, manifest)), daemon=True)
    worker.start()
    worker.join(20)  # a FIFO opened for reading would block until a writer comes, /dev/zero never ends
    assert not worker.is_alive(), "a read of a FIFO or /dev/zero did not return"
    errors = errors_of(result["out"])
    assert errors["fifo"] == f"image_uri: cannot read {job_dir}/in/fifo.png: a FIFO, not a regular file"
    assert errors["zero"] == "image_uri: cannot read /dev/zero: a character device, not a regular file"
    assert errors["dir"].startswith(f"image_uri: cannot read {job_dir}/in: IsADirectoryError")


def test_a_read_that_does_not_answer_times_out(job_dir, model_cache, tmp_path, web):
    base, _, _ = web
    manifest = str(job_dir / "m.parquet")
    config = make_config(model_cache, manifest, str(tmp_path / "o"),
                         input={"allowed_uri_prefixes": [base], "read_timeout_s": 1})
    started = time.monotonic()
    out = fetch([{"id": "slow", "prompt": "p", "task": "img2img", "image_uri": f"{base}/stall"}], config, manifest)
    assert time.monotonic() - started < 10
    assert out["error_message"][0] == f"image_uri: cannot read {base}/stall: no answer within input.read_timeout_s=1"


def test_inline_bytes_over_the_limit_are_row_errors(job_dir, model_cache, tmp_path):
    manifest = str(job_dir / "m.parquet")
    big, small = b"\0" * 2000, png("red")
    rows = [{"id": "big", "prompt": "p", "task": "img2img", "image_bytes": big},
            {"id": "big-mix", "prompt": "p", "task": "mix", "mix": [{"image_bytes": big, "weight": 1.0}]},
            {"id": "t2i", "prompt": "p", "task": "text2img", "image_bytes": big},  # not used: no limit
            {"id": "ok", "prompt": "p", "task": "img2img", "image_bytes": small}]
    write_manifest(job_dir / "m.parquet", [{**r, "strength": 0.5} for r in rows])
    config = make_config(model_cache, manifest, str(tmp_path / "o"), input={"max_input_bytes": 1000})
    errors = validate_manifest(config).row_errors
    assert set(errors) == {"big", "big-mix"}
    assert "column 'image_bytes': 2000 bytes is larger than input.max_input_bytes=1000" in errors["big"]
    assert "column 'mix' item 0 image_bytes: 2000 bytes is larger than" in errors["big-mix"]
    assert errors_of(fetch(rows, config, manifest)) == {
        "big": "image_bytes: 2000 bytes is larger than input.max_input_bytes=1000",
        "big-mix": "mix image_bytes: 2000 bytes is larger than input.max_input_bytes=1000"}


# --- item 4 and the input hashes: only what a task uses ------------------------------------------

def test_fetch_reads_and_hashes_only_the_inputs_a_task_uses(job_dir, model_cache, tmp_path):
    manifest = str(job_dir / "m.parquet")
    config = make_config(model_cache, manifest, str(tmp_path / "o"))
    ok, missing = str(job_dir / "in" / "ok.png"), str(job_dir / "in" / "missing.png")
    inline = png("white")
    rows = [
        {"id": "t2i", "prompt": "p", "task": "text2img", "image_uri": missing, "mask_uri": "/etc/passwd",
         "hint_uri": missing},
        {"id": "i2i", "prompt": "p", "task": "img2img", "image_uri": ok, "mask_uri": missing, "hint_uri": missing},
        {"id": "inpaint", "prompt": "p", "task": "inpaint", "image_bytes": inline, "mask_uri": ok},
        {"id": "hint", "prompt": "p", "task": "controlnet", "hint_uri": ok, "image_uri": missing},
        {"id": "depth", "prompt": "p", "task": "controlnet", "image_uri": ok, "mask_uri": missing},
        {"id": "c-i2i", "prompt": "p", "task": "controlnet_img2img", "image_uri": ok, "hint_bytes": inline},
        {"id": "variation", "prompt": "p", "task": "variation", "image_uri": ok, "mask_bytes": inline},
        {"id": "mix", "prompt": "p", "task": "mix", "image_uri": missing,
         "mix": [{"text": "a", "weight": 0.2}, {"image_uri": ok, "weight": 0.4},
                 {"image_bytes": inline, "weight": 0.4}]},
    ]
    out = fetch(rows, config, manifest)
    assert errors_of(out) == {}
    sha = {"ok": hashlib.sha256(png("blue")).hexdigest(), "inline": hashlib.sha256(inline).hexdigest()}
    expected = {  # id -> (image, mask, hint) sha256 of the bytes used
        "t2i": (None, None, None), "i2i": ("ok", None, None), "inpaint": ("inline", "ok", None),
        "hint": (None, None, "ok"), "depth": ("ok", None, None), "c-i2i": ("ok", None, "inline"),
        "variation": ("ok", None, None), "mix": (None, None, None),
    }
    for i, row_id in enumerate(out["id"]):
        got = tuple(out[f"{kind}_sha256"][i] for kind in ("image", "mask", "hint"))
        assert got == tuple(sha.get(s) for s in expected[row_id]), row_id
    assert out["image_bytes"][0] is None and out["image_bytes"][3] is None  # never read
    assert [item["image_sha256"] for item in out["mix"][7]] == [None, sha["ok"], sha["inline"]]
    assert out["mix"][7][1]["image_bytes"] == png("blue")


# --- item 6: validate tells the truth -------------------------------------------------------------

IMAGE = {"task": "img2img", "image_bytes": png("blue")}


@pytest.mark.parametrize("row, decoder, expected", [
    ({**IMAGE, "strength": 0.0}, "tiny", "column 'strength': 0.0 x 2 num_inference_steps leaves no step to run"),
    ({**IMAGE, "strength": 0.01, "num_inference_steps": 4}, "tiny", "0.01 x 4 num_inference_steps leaves no step"),
    (IMAGE, "tiny", "column 'strength': 0.3 x 2 num_inference_steps"),  # the job defaults: 0.3 and 2 steps
    ({**IMAGE, "task": "variation", "strength": 0.2, "prior_num_inference_steps": 4, "num_inference_steps": 50},
     "tiny", "column 'strength': 0.2 x 4 prior_num_inference_steps leaves no step"),
    ({**IMAGE, "task": "controlnet_img2img", "strength": 0.1}, "tiny-controlnet", "0.1 x 2 num_inference_steps"),
    ({"prior_num_inference_steps": 1}, "tiny",
     "column 'prior_num_inference_steps' must be >= 2 (diffusers' UnCLIPScheduler divides by steps - 1), got 1"),
    ({"num_inference_steps": 10**7}, "tiny", "column 'num_inference_steps' is 10000000, above input.max_steps=1000"),
    ({"prior_num_inference_steps": 1001}, "tiny", "column 'prior_num_inference_steps' is 1001, above input.max_steps"),
    ({"width": 4097}, "tiny", "column 'width' is 4097, above input.max_side=4096"),
    ({"height": 10**6}, "tiny", "column 'height' is 1000000, above input.max_side=4096"),
    ({"guidance_scale": math.nan}, "tiny", "column 'guidance_scale' must be a finite number, got nan"),
    ({"prior_guidance_scale": -math.inf}, "tiny", "column 'prior_guidance_scale' must be a finite number, got -inf"),
    ({**IMAGE, "strength": math.nan}, "tiny", "column 'strength' must be within [0, 1], got nan"),
])
def test_validate_refuses_rows_that_always_fail(tmp_path, model_cache, row, decoder, expected):
    good = {**IMAGE, "strength": 0.5}  # 0.5 x 2 steps: one step, the edge that runs
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "good", "prompt": "p", **good},
                                                       {"id": "bad", "prompt": "p", **row}])
    if decoder != "tiny":
        manifest = write_manifest(tmp_path / "m.parquet", [{"id": "bad", "prompt": "p", **row}])
    errors = validate_manifest(make_config(model_cache, manifest, str(tmp_path / "o"),
                                           model={"decoder": decoder})).row_errors
    assert list(errors) == ["bad"] and expected in errors["bad"], errors


def test_one_prior_step_divides_by_zero_in_diffusers_so_it_is_refused():
    from diffusers import UnCLIPScheduler

    with pytest.raises(ZeroDivisionError):  # why the engine refuses it: every row would fail like this
        UnCLIPScheduler().set_timesteps(1)
    with pytest.raises(ValidationError, match="prior_num_inference_steps"):
        GenerationDefaults(prior_num_inference_steps=1)


# --- item 15: --set parses against the field's type -----------------------------------------------

@pytest.mark.parametrize("override, get, expected", [
    ("defaults.negative_prompt=no", lambda c: c.defaults.negative_prompt, "no"),
    ("defaults.negative_prompt=2024-01-01", lambda c: c.defaults.negative_prompt, "2024-01-01"),
    ("defaults.negative_prompt=null", lambda c: c.defaults.negative_prompt, "null"),
    ("defaults.negative_prompt= on, off ", lambda c: c.defaults.negative_prompt, " on, off "),
    ("input.rows_per_block=null", lambda c: c.input.rows_per_block, None),
    ("input.rows_per_block=16", lambda c: c.input.rows_per_block, 16),
    ("defaults.guidance_scale=7", lambda c: c.defaults.guidance_scale, 7.0),
    ("input.allowed_uri_prefixes=[s3://b/in/, 'https://cdn.example.com/img']",
     lambda c: c.input.allowed_uri_prefixes, ["s3://b/in/", "https://cdn.example.com/img"]),
    ("storage_options={s3: {anon: true, endpoint_url: 'http://127.0.0.1:9000'}}",
     lambda c: c.storage_options, {"s3": {"anon": True, "endpoint_url": "http://127.0.0.1:9000"}}),
    ("storage_options.s3.key=no", lambda c: c.storage_options, {"s3": {"key": "no"}}),
])
def test_set_values_follow_the_field_type(tmp_path, override, get, expected):
    (tmp_path / "job.yaml").write_text("input: {manifest: m.parquet}\noutput: {path: out}\n")
    assert get(load_config(tmp_path / "job.yaml", [override])) == expected


@pytest.mark.parametrize("override, message", [
    ("defaults.width=yes", "--set defaults.width=yes: expected an integer"),
    ("defaults.width=true", "expected an integer"),
    ("defaults.guidance_scale=NaN", "defaults.guidance_scale=NaN: expected a number"),
    ("defaults.seed=2024-01-01", "expected an integer"),
    ("input.rows_per_block=off", "expected an integer or null"),
    ("input.allowed_uri_prefixes=s3://b/in", "expected YAML flow syntax"),
    ("input.allowed_uri_prefixes=['']", "an empty prefix would allow the current folder"),
    ("decoder.batch_sise=8", "--set decoder.batch_sise: unknown key (did you mean batch_size?)"),
    ("inputs.manifest=m.parquet", "--set inputs.manifest: unknown key (did you mean input?)"),
])
def test_set_refuses_values_of_the_wrong_type_and_unknown_keys(tmp_path, override, message):
    (tmp_path / "job.yaml").write_text("input: {manifest: m.parquet}\noutput: {path: out}\n")
    with pytest.raises(ValueError) as err:
        load_config(tmp_path / "job.yaml", [override])
    assert message in str(err.value)


# --- the whole job on S3: the manifest's own prefix, not another bucket ---------------------------

@pytest.mark.ray
def test_s3_job_reads_its_own_prefix_only(ray_cluster, model_cache, s3):
    fs, options = s3
    fs.mkdir("other-bucket")
    fs.pipe("kandinsky/m/img.png", png("blue"))
    fs.pipe("kandinsky/m/big.png", b"\x89PNG" + b"\0" * 200_000)
    fs.pipe("kandinsky/m-secret/x.png", png("red"))
    fs.pipe("other-bucket/secret.png", png("red"))
    img2img = {"task": "img2img", "strength": 0.5}
    rows = [
        {"id": "own", "prompt": "a dog", **img2img, "image_uri": "s3://kandinsky/m/img.png"},
        {"id": "other", "prompt": "x", **img2img, "image_uri": "s3://other-bucket/secret.png"},
        {"id": "sibling", "prompt": "x", **img2img, "image_uri": "s3://kandinsky/m-secret/x.png"},
        {"id": "big", "prompt": "x", **img2img, "image_uri": "s3://kandinsky/m/big.png"},
        {"id": "creds", "prompt": "x", **img2img,
         "image_uri": f"https://bob:{PASSWORD}@kandinsky.s3.amazonaws.com/m/x.png?X-Amz-Signature={SIGNATURE}"},
        {"id": "t2i", "prompt": "a cat", "task": "text2img", "image_uri": "s3://kandinsky/m/missing.png"},
    ]
    put_manifest(fs, "kandinsky/m/part-0.parquet", rows)
    # Not kandinsky/out: s3fs keeps its listings per process (driver and Ray workers) across test modules,
    # and test_s3.py writes there after moto's reset.
    config = make_config(model_cache, "s3://kandinsky/m/part-0.parquet", "s3://kandinsky/policy-out",
                         input={"max_input_bytes": 100_000, "rows_per_block": 2})
    config = config.model_copy(update={"storage_options": options})
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"]) == (2, 4)
    # One schema across units with and without a fetched image: data/ reads as one table.
    data = pq.read_table("kandinsky/policy-out/data", filesystem=fs).to_pylist()
    assert {r["id"]: r["image_sha256"] for r in data} == {"own": hashlib.sha256(png("blue")).hexdigest(), "t2i": None}
    errors = {r["id"]: r for r in pq.read_table("kandinsky/policy-out/errors", filesystem=fs).to_pylist()}
    assert errors["other"]["stage"] == "validate"
    assert (f"column 'image_uri': {RULE}: s3://other-bucket/secret.png is outside [s3://kandinsky/m]"
            in errors["other"]["message"])
    assert f"{RULE}: s3://kandinsky/m-secret/x.png is outside" in errors["sibling"]["message"]
    assert errors["big"]["stage"] == "fetch_inputs"
    assert errors["big"]["message"] == ("image_uri: s3://kandinsky/m/big.png is larger than "
                                        "input.max_input_bytes=100000")
    assert "https://***@kandinsky.s3.amazonaws.com/m/x.png?X-Amz-Signature=*** is outside" in errors["creds"]["message"]
    assert not [r for r in errors.values() if PASSWORD in r["message"] or SIGNATURE in r["message"]]

    # Listing the other bucket lets the manifest read it, with the job's credentials.
    allowed = config.model_copy(update={"input": config.input.model_copy(
        update={"allowed_uri_prefixes": ["s3://other-bucket/"]})})
    assert "other" not in validate_manifest(allowed).row_errors
    out = fetch([rows[1]], allowed, "s3://kandinsky/m/part-0.parquet")
    assert out["error_message"][0] == "" and out["image_bytes"][0] == png("red")


@pytest.mark.ray
def test_an_http_manifest_runs_resumes_under_a_new_signature_and_never_shows_it(ray_cluster, model_cache, tmp_path,
                                                                                web, capsys):
    """A presigned URL's query changes with every signing: the file is named by its path, identified
    by Last-Modified and Content-Length, and its signature appears in no message or file."""
    base, root, _ = web
    write_manifest(root / "m" / "m.parquet", [{"id": f"h{i}", "prompt": f"a harbour {i}"} for i in range(3)])
    (root / "m" / "broken.parquet").write_bytes(b"not parquet")

    def signed(name: str, signature: str) -> str:
        return f"{base}/m/{name}?X-Amz-Date=20261206T0000Z&X-Amz-Expires=600&X-Amz-Signature={signature}"

    out = tmp_path / "out"
    config = make_config(model_cache, signed("m.parquet", SIGNATURE), str(out))
    summary = run_job(config)
    assert summary["rows"] == 3 and [f["file"] for f in summary["files"]] == ["m.parquet"]
    again = run_job(make_config(model_cache, signed("m.parquet", "0ther5ignature"), str(out)))
    assert (again["rows"], again["rows_computed"]) == (3, 0)  # the same job, resumed
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert SIGNATURE.encode() not in written and b"0ther5ignature" not in written
    for name, expected in (("broken.parquet", "cannot read as Parquet"), ("missing.parquet", "no such file")):
        job = tmp_path / f"{name}.json"
        job.write_text(json.dumps({**make_config(model_cache, signed(name, SIGNATURE), str(tmp_path / "o2")).model_dump(
            mode="json"), "storage_options": {}}))
        assert main(["run", str(job)]) == 2
        err = capsys.readouterr().err
        assert expected in err and "X-Amz-Signature=***" in err and SIGNATURE not in err, err
