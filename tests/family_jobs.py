"""The whole-job check the Kandinsky 2.0 and 2.1 job tests make (tests/test_kandinsky2*_job.py):
the job run twice on one output, every good row once in data/ and every bad row in errors/ with its
stage and reason, and the rerun retrying only the bad rows."""

from __future__ import annotations

from pathlib import Path

from kandinsky_engine.jobs.run import run_job
from kandinsky_engine.jobs.verify import verify
from tests.test_poison import errors_by_id, ids_in, sha256s


def run_twice(config, out: Path) -> dict:
    """The job, then the same job again on the same output; what each run left."""
    first = run_job(config)
    before = {"data": sha256s(out / "data"), "ids": ids_in(out / "data"), "errors": errors_by_id(out)}
    second = run_job(config)
    return {"config": config, "out": out, "first": first, "second": second, "before": before}


def check_every_row_once_then_resumed(job: dict, good: list[dict], bad: dict) -> None:
    """`bad`: id -> (row, stage expected in errors/, substring of its message)."""
    out, first, second, before = job["out"], job["first"], job["second"], job["before"]
    assert set(before["ids"]) == {r["id"] for r in good} and set(before["ids"].values()) == {1}
    assert {i: (e["stage"], bad[i][2] in e["message"]) for i, e in before["errors"].items()} == \
        {i: (stage, True) for i, (_, stage, _) in bad.items()}
    assert (first["rows"], first["failed_rows"], first["rows_computed"]) == (len(good), len(bad), len(good) + len(bad))
    # The rerun retries the failed rows only: data/ is byte-identical, nothing good recomputed.
    assert (second["rows_skipped"], second["rows_computed"]) == (len(good), len(bad))
    assert sha256s(out / "data") == before["data"] and ids_in(out / "data") == before["ids"]
    check = verify(str(out))
    assert check.problems == [] and (check.rows, check.failed_rows) == (len(good), len(bad))


def made_rows(job: dict, good: list[dict]) -> list[tuple[dict, dict]]:
    """[(manifest row, output row)] of the good rows, each image of the size the row asked for."""
    import pyarrow.parquet as pq

    from tests.reference import decode

    rows = {r["id"]: r for r in pq.read_table(job["out"] / "data").to_pylist()}
    pairs = [(want, rows[want["id"]]) for want in good]
    for want, row in pairs:
        assert decode(row["image"]["bytes"]).shape == (want.get("height", 64), want.get("width", 64), 3)
    return pairs


def family_job(tmp_path_factory, model_cache: str, name: str, rows: list[dict], **sections) -> dict:
    """`rows` as one manifest, run twice (run_twice) with the tiny model's config and `sections`."""
    from tests.conftest import make_config, write_manifest

    tmp = tmp_path_factory.mktemp(name)
    manifest = write_manifest(tmp / "manifest.parquet", rows)
    return run_twice(make_config(model_cache, manifest, str(tmp / "out"), **sections), tmp / "out")


def bad_rows(encode_stage: str) -> dict:
    """The bad rows every family's job test holds: id -> (row, stage expected in errors/, substring of
    its message): an image that does not decode (failed by the family's image encoder `encode_stage`),
    and an inpainting row, which the text-to-image decoder of the tiny model cannot run."""
    from tests.conftest import png

    return {"poison": ({"prompt": "x", "task": "img2img", "image_bytes": b"not an image", "strength": 0.8},
                       encode_stage, "not a decodable image"),
            "inpaint-here": ({"prompt": "x", "task": "inpaint", "image_bytes": png("red"), "mask_bytes": png("white")},
                             "validate", "inpaint")}
