"""What a job may do to its output and how it fails: never more than its own files, never a bucket,
never the manifest; every failure to run is exit code 2 with one line (issue 9, items 8-14).

Most refusals happen in the driver before Ray starts, so those tests are quick; three tests run a
small job (tiny model, 64x64, 2 steps, 2 rows) to show the happy path around a refusal."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kandinsky_engine.jobs.cli import main
from kandinsky_engine.jobs.output_guard import OutputRefused, check_bucket, is_empty, remove_owned
from kandinsky_engine.jobs.resume import choose_output
from kandinsky_engine.jobs.run import run_job
from kandinsky_engine.manifest import find_files
from kandinsky_engine.model_cache import check_cache_dir
from kandinsky_engine.storage import url_to_fs
from kandinsky_engine.pipelines.output import OWNED_ENTRIES
from tests.conftest import KEY, SECRET, TINY, TINY_YAML, make_config, put_manifest, write_manifest
from tests.faultproxy import FaultProxy

ROWS = [{"id": f"row-{i}", "prompt": f"a cat {i}"} for i in range(2)]
REPO = Path(__file__).resolve().parent.parent


def with_output(config, path: str):
    return config.model_copy(update={"output": config.output.model_copy(update={"path": path})})


def s3_config(model_cache, s3, manifest: str, out: str):
    return make_config(model_cache, manifest, out).model_copy(update={"storage_options": s3[1]})


def write_job(folder: Path, manifest: str, out: str, model_cache: str, **model) -> Path:
    model_yaml = ", ".join(f"{k}: {v}" for k, v in {"cache_dir": model_cache, **TINY, **model}.items())
    path = folder / "job.yaml"
    path.write_text(f"input: {{manifest: '{manifest}', rows_per_block: 2}}\noutput: {{path: '{out}'}}\n"
                    f"model: {{{model_yaml}}}\n"
                    "defaults: {num_inference_steps: 2, prior_num_inference_steps: 2, width: 64, height: 64}\n")
    return path


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 8. a bucket-root output -----------------------------------------------------------------------

def test_bucket_root_output_is_refused_and_the_versioned_bucket_kept(model_cache, s3):
    fs, _ = s3
    fs.mkdir("rootless")
    fs.make_bucket_versioned("rootless")
    fs.pipe("rootless/keep.txt", b"keep")
    put_manifest(fs, "rootless/manifests/m.parquet", ROWS)
    config = s3_config(model_cache, s3, "s3://rootless/manifests/m.parquet", "s3://rootless/out")
    for root in ("s3://rootless", "s3://rootless/"):
        with pytest.raises(OutputRefused, match=r"output.path s3://rootless is the root of bucket 'rootless'"):
            run_job(with_output(config, root), overwrite=True)
    fs.invalidate_cache()
    assert fs.is_bucket_versioned("rootless")
    assert fs.cat("rootless/keep.txt") == b"keep" and fs.exists("rootless/manifests/m.parquet")


@pytest.mark.ray
def test_overwrite_on_a_versioned_bucket_removes_only_the_jobs_entries(ray_cluster, model_cache, s3):
    fs, _ = s3
    fs.mkdir("versioned")
    fs.make_bucket_versioned("versioned")
    fs.pipe({"versioned/keep.txt": b"keep", "versioned/out/": b"",  # a folder made in the S3 web console
             "versioned/out/notes.txt": b"mine", "versioned/out/_RUN.json": b"{}",  # an earlier job's output
             "versioned/out/data/part-00000009-a1.parquet": b"stale", "versioned/out/_SUCCESS.json": b"{}"})
    put_manifest(fs, "versioned/manifests/m.parquet", ROWS)
    config = s3_config(model_cache, s3, "s3://versioned/manifests/m.parquet", "s3://versioned/out")

    summary = run_job(config, overwrite=True)
    assert (summary["rows"], summary["rows_computed"]) == (2, 2)
    fs.invalidate_cache()
    assert fs.is_bucket_versioned("versioned")
    assert fs.cat("versioned/keep.txt") == b"keep" and fs.cat("versioned/out/notes.txt") == b"mine"
    assert fs.exists("versioned/manifests/m.parquet") and fs.exists("versioned/out/")
    shard = summary["shards"][0]["file"]
    assert [s["file"] for s in summary["shards"]] == [shard] and shard.split("/")[2].startswith("part-000000000000-")  # stale one gone
    assert fs.glob("versioned/out/data/*/*") == [f"versioned/out/{shard}"]


def test_remove_owned_removes_exactly_the_layout_entries(s3, tmp_path):
    """Every entry of the layout goes, nothing else; a README.md goes only while it is the tool's
    generated dataset card (it carries the marker)."""
    from kandinsky_engine.pipelines.card import MARKER

    fs, _ = s3
    # _manifests/ (content-named copies of the input) is the tool's but outlives --overwrite.
    keep = ["data_old/part-00000000-a1.parquet", "datafile", "_RUN.json.bak", "notes.txt", "_other/x", "_manifests/m"]
    owned = ["data/part-00000000-a1.parquet", "errors/part-00000000.parquet", "_tmp/x", "_damaged/y",
             "_runs/abc.json", "_RUN.json", "_SUCCESS.json", "_index.parquet", "report.html", "_logs/abc.log",
             "_retired/z", "_files.parquet", "README.md", "shards.txt"]
    assert {name.split("/")[0] for name in owned} | {"_manifests"} == set(OWNED_ENTRIES)
    payload = {name: f"---\n---\n{MARKER}\n".encode() if name == "README.md" else b"x" for name in keep + owned}
    fs.pipe({f"kandinsky/owned/{name}": data for name, data in payload.items()})
    assert sorted(remove_owned(fs, "kandinsky/owned")) == sorted(set(OWNED_ENTRIES) - {"_manifests"})
    fs.invalidate_cache()
    assert sorted(k.removeprefix("kandinsky/owned/") for k in fs.find("kandinsky/owned")) == sorted(keep)

    local, _ = url_to_fs(str(tmp_path))
    payload["README.md"] = b"# my own notes on this folder"  # no marker: the user's, kept
    for name in keep + owned:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(payload[name])
    assert "README.md" not in remove_owned(local, str(tmp_path))
    assert sorted(files_under(tmp_path)) == sorted(keep + ["README.md"])


# -- 9. --overwrite and files the job does not own ------------------------------------------------

def test_overwrite_refuses_a_folder_with_the_manifest_config_or_foreign_files(model_cache, tmp_path, capsys):
    work = tmp_path / "work"
    write_manifest(work / "m.parquet", ROWS)
    (work / "notes.txt").write_text("mine")
    job = write_job(work, "m.parquet", ".", model_cache)
    before = files_under(work)

    assert main(["run", str(job)]) == 2  # not ours: the refusal no longer suggests --overwrite
    err = capsys.readouterr().err
    assert f"output {work} is not empty and holds no _RUN.json" in err and "pass --overwrite" not in err
    assert "--overwrite-unowned would write into it, removing data/, errors/" in err

    assert main(["run", str(job), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"output {work} holds the manifest {work}/m.parquet: --overwrite refuses" in err
    assert files_under(work) == before

    # Not written by this tool: refused, and --overwrite-unowned names what it would remove.
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "mine.csv").write_text("1,2")
    assert main(["run", str(job), "--overwrite", "--set", f"output.path={other}"]) == 2
    assert f"output {other} is not empty and holds no _RUN.json: this tool did not write it" in capsys.readouterr().err
    assert (other / "data" / "mine.csv").exists()

    # A manifest inside an entry that --overwrite removes is refused even with --overwrite-unowned.
    write_manifest(other / "data" / "m.parquet", ROWS)
    assert main(["run", str(job), "--overwrite-unowned", "--set", f"input.manifest={other}/data/m.parquet",
                 "--set", f"output.path={other}"]) == 2
    assert f"the manifest {other}/data/m.parquet is inside {other}/data, which --overwrite deletes" in \
        capsys.readouterr().err
    assert files_under(work) == before and (other / "data" / "m.parquet").exists()


@pytest.mark.ray
def test_overwrite_unowned_keeps_every_file_but_the_layout(ray_cluster, model_cache, tmp_path, capsys):
    """Also item 13: the manifest's folder has glob characters in its name (`run[1]/`)."""
    work = tmp_path / "work"
    write_manifest(work / "run[1]" / "m.parquet", ROWS)
    (work / "notes.txt").write_text("mine")
    (work / "README.md").write_text("# my project\n")  # the user's: no generated dataset card replaces it
    (work / "_RUN.json").write_text("{}")  # a stale run file of another job
    job = write_job(work, "run[1]/m.parquet", ".", model_cache)
    before = {k: v for k, v in files_under(work).items() if k != "_RUN.json"}

    assert main(["run", str(job), "--overwrite-unowned"]) == 0
    after = files_under(work)
    assert {k: after[k] for k in before} == before  # config, manifest, notes and README untouched
    assert pq.read_table(work / "data").num_rows == 2
    assert {Path(k).parts[0] for k in after} - {Path(k).parts[0] for k in before} == {
        "data", "_runs", "_RUN.json", "_SUCCESS.json", "_index.parquet", "_files.parquet", "_logs",  # _logs: the CLI's log
        "shards.txt"}
    assert "README.md was not written by this tool: left as it is" in capsys.readouterr().err
    # Written by this tool now, but it still holds the config and the manifest: --overwrite refuses.
    assert main(["run", str(job), "--overwrite"]) == 2
    assert f"output {work} holds the manifest" in capsys.readouterr().err


# -- 10. a missing bucket -------------------------------------------------------------------------

def test_missing_output_bucket_is_refused_not_created(model_cache, s3, tmp_path, capsys):
    fs, options = s3
    put_manifest(fs, "kandinsky/typo/m.parquet", ROWS)
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{manifest: 's3://kandinsky/typo/m.parquet'}}\noutput: {{path: 's3://typo-bucket/out'}}\n"
                   f"model: {{cache_dir: '{model_cache}', {TINY_YAML}}}\n"
                   f"storage_options: {{s3: {{endpoint_url: '{options['s3']['endpoint_url']}', key: {KEY}, "
                   f"secret: {SECRET}}}}}\n")
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert "output s3://typo-bucket/out: bucket 'typo-bucket' does not exist; this tool never creates buckets" in err
    assert SECRET not in err
    fs.invalidate_cache()
    assert not fs.exists("typo-bucket")


def test_bucket_check_does_not_take_access_denied_for_missing(moto_endpoint, s3):
    """A role may write under a prefix without the right to HeadBucket: a 403 says nothing about
    existence, so the check goes on (the output's own listing comes next and names the URL)."""
    import s3fs

    with FaultProxy(moto_endpoint) as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.url, key=KEY, secret=SECRET, skip_instance_cache=True)
        with pytest.raises(OutputRefused, match="bucket 'nowhere' does not exist"):
            check_bucket(fs, "nowhere/out", "s3://nowhere/out")
        proxy.mode = "deny"
        check_bucket(fs, "kandinsky/out", "s3://kandinsky/out")
        assert proxy.counts["403"] >= 1


# -- 11. an output inside the manifest location ------------------------------------------------------

def test_output_inside_the_manifest_location_is_refused(model_cache, tmp_path):
    write_manifest(tmp_path / "manifests" / "part-0.parquet", ROWS)
    for manifest in (tmp_path / "manifests", f"{tmp_path}/manifests/*.parquet"):
        config = make_config(model_cache, str(manifest), str(tmp_path / "manifests" / "out"))
        with pytest.raises(OutputRefused, match=rf"output {tmp_path}/manifests/out is inside the manifest location "
                                                rf"{tmp_path}/manifests: a rerun would read"):
            run_job(config)
    assert sorted(files_under(tmp_path)) == ["manifests/part-0.parquet"]


def test_directory_manifest_skips_underscore_and_dot_entries(tmp_path):
    for name in ("a.parquet", "sub/b.parquet", "_tmp/x.parquet", ".hidden/y.parquet", "sub/_damaged/z.parquet",
                 "_part.parquet", ".part.parquet"):
        write_manifest(tmp_path / "m" / name, ROWS)
    _, files = find_files(str(tmp_path / "m"))
    assert files == [f"{tmp_path}/m/a.parquet", f"{tmp_path}/m/sub/b.parquet"]
    _, files = find_files(str(tmp_path / "m" / "_tmp"))  # a folder named by the user is listed
    assert files == [f"{tmp_path}/m/_tmp/x.parquet"]


# -- 12. directory markers ------------------------------------------------------------------------------

def test_console_folder_marker_counts_as_empty(model_cache, s3):
    fs, _ = s3
    fs.pipe("kandinsky/console/", b"")  # what "Create folder" in the S3 console makes
    config = s3_config(model_cache, s3, "s3://kandinsky/in/m.parquet", "s3://kandinsky/console")
    assert choose_output(config, {}, overwrite=False, new_run=False) == ("s3://kandinsky/console", "fresh")
    fs.pipe("kandinsky/console/notes.txt", b"mine")
    out, _ = url_to_fs("s3://kandinsky/console", s3[1])
    out.invalidate_cache()
    assert not is_empty(out, "kandinsky/console")


# -- 13. glob characters in an existing path ------------------------------------------------------

def test_manifest_path_with_glob_characters_is_taken_as_given(tmp_path):
    write_manifest(tmp_path / "run[1]" / "m.parquet", ROWS)
    assert find_files(str(tmp_path / "run[1]" / "m.parquet"))[1] == [f"{tmp_path}/run[1]/m.parquet"]
    assert find_files(str(tmp_path / "run[1]"))[1] == [f"{tmp_path}/run[1]/m.parquet"]
    write_manifest(tmp_path / "run1" / "m.parquet", ROWS)
    # A path that does not exist is still a pattern: [1] matches the character 1.
    assert find_files(str(tmp_path / "run[1]" / "*.parquet"))[1] == [f"{tmp_path}/run1/m.parquet"]


# -- 14. exit codes ---------------------------------------------------------------------------------

def test_output_path_that_is_a_file_exits_2_with_one_line(model_cache, tmp_path, capsys):
    """In a fresh process, as the console script runs: the exit code and all of stderr."""
    write_manifest(tmp_path / "m.parquet", ROWS)
    (tmp_path / "out").write_text("a file")
    job = write_job(tmp_path, "m.parquet", "out", model_cache)
    quiet = subprocess.run([sys.executable, "-m", "kandinsky_engine.jobs.cli", "run", str(job)], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert quiet.returncode == 2
    assert quiet.stderr.splitlines() == [f"error: output.path {tmp_path}/out is a file; it must be a folder "
                                         "(or not exist yet)"]
    assert main(["run", str(job), "--verbose"]) == 2
    verbose = capsys.readouterr().err
    assert verbose.startswith("Traceback") and verbose.splitlines()[-1] == quiet.stderr.strip()


def test_unwritable_cache_dir_exits_2_naming_it(model_cache, tmp_path, capsys):
    write_manifest(tmp_path / "m.parquet", ROWS)
    (tmp_path / "blocker").write_text("a file where the cache's parent folder should be")
    job = write_job(tmp_path, "m.parquet", "out", str(tmp_path / "blocker" / "cache"))
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: model.cache_dir {tmp_path}/blocker/cache is not writable (Not a directory); "
                                "set model.cache_dir (or KANDINSKY_CACHE) to a writable folder"]
    before = files_under(tmp_path)
    check_cache_dir(tmp_path / "fresh" / "cache")  # probed in tmp_path, the nearest folder that exists
    assert files_under(tmp_path) == before and not (tmp_path / "fresh").exists()


@pytest.mark.ray
def test_actor_that_fails_to_start_exits_2_with_one_line(ray_cluster, model_cache, tiny_root, tmp_path, capsys):
    """A Ray error (the U-Net actor cannot load its truncated weights) is a failure to run, not 'some
    rows failed'. Ray Data logs its own report; the CLI's verdict is its last line."""
    decoder = tmp_path / "decoder"
    shutil.copytree(tiny_root / "decoder", decoder)
    weights = decoder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    write_manifest(tmp_path / "m.parquet", ROWS)
    job = write_job(tmp_path, "m.parquet", "out", model_cache, decoder=str(decoder))
    assert main(["run", str(job)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert lines[-1].startswith("error: ActorDiedError: OSError: Unable to load weights from checkpoint file for "
                                f"'{weights}'") and lines[-1].endswith("(--verbose for the traceback)")
