"""infra/ray-cluster: the `ray up` configs against Ray's own ray-schema.json (from the installed
wheel) and through Ray's config preparation (prepare_config + validate_config, as `ray up` runs
them before it calls the cloud), and the job commands they document against our CLI parser."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib

import pytest
import yaml

from kandinsky_engine.jobs.cli import build_parser
from tests.infra_rules import ROOT, launcher_problems

CONFIGS = ("aws.yaml", "gcp.yaml")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def config(name: str) -> dict:
    return yaml.safe_load((ROOT / "infra" / "ray-cluster" / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_launcher_config_is_valid(name):
    cfg = config(name)
    assert launcher_problems(cfg) == []
    assert cfg["docker"]["image"].endswith(f"/kandinsky-engine:{VERSION}")  # what `make image` tags
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert all(t["min_workers"] >= 1 for t in workers)  # the engine plans against the GPUs up at start


@pytest.mark.parametrize("name", CONFIGS)
def test_documented_job_commands_parse(name):
    """The commands in the file's header run our CLI with arguments it accepts, on a config that
    --working-dir really uploads."""
    text = (ROOT / "infra" / "ray-cluster" / name).read_text()
    commands = [shlex.split(line.lstrip("# ")) for line in text.splitlines() if "kandinsky-batch " in line
                and line.startswith("#   ")]
    assert len(commands) == 2  # the job and its verify
    for tokens in commands:
        inner = tokens[tokens.index("--") + 1:] if "--" in tokens else shlex.split(tokens[-1])
        assert inner[0] == "kandinsky-batch"
        args = build_parser().parse_args(inner[1:])
        if args.command == "run":
            working_dir = tokens[tokens.index("--working-dir") + 1]
            assert (ROOT / working_dir / args.config).is_file()


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(idle_timeout_minute=c.pop("idle_timeout_minutes")), "idle_timeout_minute"),
    (lambda c: c["available_node_types"]["gpu-workers"].update(
        min_worker=c["available_node_types"]["gpu-workers"].pop("min_workers")), "min_worker"),
    (lambda c: c.update(max_workers="four"), "is not of type 'integer'"),
    (lambda c: c["docker"].update(pull_before_run="yes"), "is not of type 'boolean'"),
    (lambda c: c.update(head_node_type="ray.head.default"), "Ray's config preparation"),
    (lambda c: c["available_node_types"]["gpu-workers"]["resources"].pop("GPU"), "no GPU"),
    (lambda c: c["available_node_types"]["head"]["resources"].update(CPU=8), "CPU: 0"),
    (lambda c: c.update(setup_commands=["pip install ray"]), "setup_commands"),
])
def test_launcher_refuses(change, message):
    for name in CONFIGS:
        bad = copy.deepcopy(config(name))
        change(bad)
        problems = launcher_problems(bad)
        assert any(message in p for p in problems), (name, problems)


def test_spot_where_sensible():
    """GPU workers on spot (a lost worker's work reruns, a lost job resumes), the head on demand."""
    aws, gcp = config("aws.yaml"), config("gcp.yaml")
    assert aws["available_node_types"]["gpu-workers"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in aws["available_node_types"]["head"]["node_config"]
    assert gcp["available_node_types"]["gpu-workers"]["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
    assert "scheduling" not in gcp["available_node_types"]["head"]["node_config"]
    assert re.fullmatch(r"g\d\w*\.\w+", aws["available_node_types"]["gpu-workers"]["node_config"]["InstanceType"])
