"""`kandinsky-batch report OUTPUT`: one self-contained HTML page about a job, written to OUTPUT/report.html.

Contact sheet (a sample of rows as small JPEG data URIs, jobs/samples.py), failures by stage and
error type, one row per run, a throughput chart (inline SVG, from each run's progress samples) and
an estimated cost. No external assets: it works offline and from an object store's download. Every
value from the manifest or the output (ids, prompts, messages, paths) is HTML-escaped, and a
Content-Security-Policy allows no scripts but the page's own (by hash), no requests at all.
"""

from __future__ import annotations

import base64
import hashlib
import io
import time
from html import escape

from kandinsky_engine.storage import is_object_store, move_file, url_to_fs
from kandinsky_engine.pipelines.output import REPORT

from .samples import sample_rows
from .status import read_status

THUMB = 128  # thumbnail side in pixels: ~3 KB each as JPEG, 200 of them well under a megabyte
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
# Writes into the DOM how many thumbnails the browser decoded (what the tests read back).
SCRIPT = """window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll("img.thumb"));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.getElementById("decode-check");
  out.dataset.decoded = ok; out.dataset.total = imgs.length;
  out.textContent = ok + " of " + imgs.length + " thumbnails decoded";
});"""
STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
.sheet{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:140px;font-size:11px;overflow-wrap:anywhere}
figure img{width:128px;height:128px;object-fit:contain;background:#eee}.muted{color:#777}"""


def thumbnail(data: bytes | None) -> str | None:
    """A JPEG data URI of the image, at most THUMB pixels a side; None if it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (THUMB, THUMB))  # JPEG: decode at reduced scale
            image = image.convert("RGB")
            image.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=75)
    except Exception:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def cost(runs: list[dict], rows: int | None, price: float | None) -> dict:
    """GPU-hours: each run's GPU reservation (its actor pools' num_gpus) x its wall time."""
    known = [r for r in runs if r.get("gpus_reserved") is not None]
    hours = sum(r["gpus_reserved"] * r["wall_time_s"] for r in known) / 3600
    dollars = None if price is None else hours * price
    per_1000 = None if dollars is None or not rows else 1000 * dollars / rows
    return {"gpu_hours": hours, "gpu_hour_price": price, "dollars": dollars, "dollars_per_1000_images": per_1000,
            "runs_without_reservation": len(runs) - len(known)}


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def _figure(name: str, label: str, value, digits: int = 2) -> str:
    # data-figure: the machine-readable value the tests compare with _SUCCESS.json
    raw = "" if value is None else escape(str(value))
    return f'<tr><th>{escape(label)}</th><td data-figure="{escape(name)}" data-value="{raw}">{_fmt(value, digits)}</td></tr>'


def chart(progress: list[dict], width: int = 720, height: int = 220) -> str:
    """Rows committed over each run's time (one line per run; the slope is images/s), from its
    progress samples, as inline SVG. Cumulative rather than per-interval rates: units commit in
    bursts, and a rate over a 1 s tail interval would draw a spike."""
    series = [(p["run"], p["samples"]) for p in progress if len(p.get("samples") or []) > 1]
    if not series:
        return '<p class="muted">No progress samples (runs written before progress files existed).</p>'
    t_max = max(t for _, points in series for t, _ in points) or 1
    n_max = max(n for _, points in series for _, n in points) or 1
    pad = 40
    x = lambda t: pad + (width - 2 * pad) * t / t_max  # noqa: E731
    y = lambda n: height - pad - (height - 2 * pad) * n / n_max  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="rows committed over time">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>',
             f'<text x="{pad}" y="{pad - 8}" font-size="11">{n_max} rows</text>',
             f'<text x="{width - pad}" y="{height - pad + 16}" font-size="11" text-anchor="end">{t_max:.0f} s</text>']
    for i, (run, points) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        t_end, n_end = points[-1]
        speed = f"{n_end / t_end:.2f} images/s" if t_end else ""
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                     f'points="{" ".join(f"{x(t):.1f},{y(n):.1f}" for t, n in points)}"/>')
        parts.append(f'<text x="{width - pad}" y="{pad + 14 * i}" font-size="11" fill="{color}" '
                     f'text-anchor="end">run {escape(str(run))}: {speed}</text>')
    return "".join(parts) + "</svg>"


def render(status: dict, rows: list[dict], price: float | None) -> str:
    runs = status["runs"]
    last = runs[-1] if runs else {}
    money = cost(runs, status.get("rows"), price)
    summary = [
        _figure("state", "state", status["state"]),
        _figure("rows", "rows in data/", status.get("rows")),
        _figure("failed_rows", "rows in errors/", status.get("failed_rows")),
        _figure("manifest_rows", "manifest rows", status.get("manifest_rows")),
        _figure("shards", "data shards", status.get("shards")),
        _figure("error_shards", "error shards", status.get("error_shards")),
        _figure("wall_time_s", "last run's wall time (s)", last.get("wall_time_s"), 1),
        _figure("images_per_s", "last run's images/s", last.get("images_per_s")),
        _figure("gpu_hours", "GPU-hours (reservation x wall time, all runs)", money["gpu_hours"], 4),
        _figure("gpu_hour_price", "$ per GPU-hour", money["gpu_hour_price"]),
        _figure("dollars", "estimated cost ($)", money["dollars"]),
        _figure("dollars_per_1000_images", "$ per 1,000 images", money["dollars_per_1000_images"], 4),
    ]
    if status.get("committed") is not None:  # a running or stopped job
        summary.insert(1, _figure("committed", "rows committed (last progress write)", status["committed"]))
    run_rows = "".join(
        f'<tr data-run="{escape(str(r["run"]))}"><td>{escape(str(r["run"]))}</td><td>{escape(str(r["finished_at"]))}</td>'
        f'<td data-figure="rows_computed">{_fmt(r["rows_computed"])}</td><td>{_fmt(r["rows_skipped"])}</td>'
        f'<td>{_fmt(r["rows_retried"])}</td><td data-figure="wall_time_s">{_fmt(r["wall_time_s"], 1)}</td>'
        f'<td data-figure="images_per_s">{_fmt(r.get("images_per_s"))}</td><td>{_fmt(r.get("oom_splits"))}</td>'
        f'<td>{_fmt(r.get("gpus_reserved"))}</td></tr>' for r in runs)
    failures = status["failures"]
    failure_rows = "".join(
        f'<tr><td>{escape(str(g["stage"]))}</td><td>{escape(str(g["error_type"]))}</td><td>{g["rows"]}</td><td>'
        + "<br>".join(f'<code>{escape(str(e["id"])[:200])}</code>: {escape(str(e["message"])[:500])}'
                      for e in g["examples"]) + "</td></tr>" for g in failures["groups"])
    sampled = (f" (from {failures['error_shards_read']} of {failures['error_shards']} error shards)"
               if failures["error_shards_read"] < failures["error_shards"] else "")
    figures = []
    for row in rows:
        uri = thumbnail(row["image"])
        score = f"<br>clip_score {row['clip_score']:.3f}" if isinstance(row.get("clip_score"), float) else ""
        image = f'<img class="thumb" alt="" src="{uri}">' if uri else '<div class="muted">(no image)</div>'
        figures.append(f'<figure data-id="{escape(str(row.get("id")))}">{image}<figcaption><b>'
                       f'{escape(str(row.get("id"))[:100])}</b><br>{escape(str(row.get("prompt"))[:160])}<br>'
                       f'seed {_fmt(row.get("seed"))} · {escape(str(row.get("task")))}{score}</figcaption></figure>')
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()}'")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>kandinsky-batch report: {escape(status['output'])}</title><style>{STYLE}</style></head><body>
<h1>kandinsky-batch report</h1>
<p><code>{escape(status['output'])}</code> · generated {escape(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>
<h2>Summary</h2><table>{''.join(summary)}</table>
<p class="muted">Cost: each run's GPU reservation (its actor pools' <code>num_gpus</code>) x its wall time;
CPU-only runs reserve no GPU.{' Pass --gpu-hour-price for dollars.' if price is None else ''}</p>
<h2>Runs</h2><table><tr><th>run</th><th>finished</th><th>rows computed</th><th>skipped</th><th>retried</th>
<th>wall time (s)</th><th>images/s</th><th>OOM splits</th><th>GPUs reserved</th></tr>{run_rows}</table>
<h2>Throughput</h2>{chart(status['progress'])}
<h2>Failures</h2>{f'<table><tr><th>stage</th><th>error type</th><th>rows</th><th>examples</th></tr>{failure_rows}</table>{escape(sampled)}'
                  if failures['groups'] else '<p>None.</p>'}
{''.join(f'<p class="muted">Unreadable error shard, skipped: <code>{escape(name)}</code></p>' for name in failures['damaged'])}
<h2>Contact sheet</h2><p class="muted">{len(figures)} rows sampled from {len({r['shard'] for r in rows})} shard(s).
<span id="decode-check" data-decoded="" data-total="{len(figures)}"></span></p>
<div class="sheet">{''.join(figures)}</div>
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(path: str, storage_options: dict | None = None, gpu_hour_price: float | None = None,
                 max_rows: int = 200) -> tuple[str, dict]:
    """Build the report of the output at `path` and write it to PATH/report.html. Returns (its URL, status)."""
    status = read_status(path, storage_options)
    fs, root = url_to_fs(path.rstrip("/"), storage_options)
    page = render(status, sample_rows(fs, root, max_rows=max_rows), gpu_hour_price)
    # One whole-object write (a PUT on S3, a rename on disk): report.html is not part of the commit protocol.
    if is_object_store(fs):
        fs.pipe_file(f"{root}/{REPORT}", page.encode())
    else:
        fs.pipe_file(f"{root}/{REPORT}.tmp", page.encode())
        move_file(fs, f"{root}/{REPORT}.tmp", f"{root}/{REPORT}")
    return f"{path.rstrip('/')}/{REPORT}", status
