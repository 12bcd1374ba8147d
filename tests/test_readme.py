"""The README's quick start ("Your own prompts") run as written: its shell block in an empty folder
with the installed `kandinsky-batch` on PATH, then its Python block; what they say they make is
there. (Its dataset-loading snippets run in tests/test_dataset_outputs.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def quick_start() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own prompts\n"):]
    section = section[:section.index("\n## ", 1)]
    (shell,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (python,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return shell, python


def test_quick_start_runs_as_written(ray_cluster, model_cache, tmp_path):
    import datasets

    shell, python = quick_start()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "KANDINSKY_CACHE": model_cache,
           "RAY_AUTH_MODE": "disabled", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    env["RAY_ADDRESS"] = ray_cluster.get_runtime_context().gcs_address  # the session's cluster: no start-up per run
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", shell], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done: 2 rows" in done.stdout  # what the README says it prints
    ds = datasets.load_dataset(str(tmp_path / "out" / "mine"), split="train")
    assert sorted(ds["id"]) == ["fox", "lighthouse"] and ds[0]["image"].size == (64, 64)
    assert dict(zip(ds["id"], ds["seed"])) == {"fox": 1, "lighthouse": 2}

    done = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "2 0"  # the comment in the snippet
    assert (tmp_path / "out" / "from-python" / "_SUCCESS.json").exists()
