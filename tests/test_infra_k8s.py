"""infra/k8s: every manifest against KubeRay 1.7.0's CRD schemas (tightened), its CEL and code rules,
Kubernetes' own schemas (strict) and this project's policy; the kustomization in each form; the
portable CronJob's script; the shipped job config through `kandinsky-batch validate`. Offline."""

from __future__ import annotations

import copy
import json
import re
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.infra_rules import (ROOT, core_problems, crd_problems, load_docs, manifest_problems, min_interval,
                               operator_problems, pod_specs, policy_problems, tighten, worst_case)

K8S = ROOT / "infra" / "k8s"
FORMS = ("rayjob.yaml", "raycluster.yaml", "raycronjob.yaml", "cronjob.yaml")
SHARED = ("identity.yaml",)  # every form's ServiceAccount and PriorityClass
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) not installed")


def doc(name: str, kind: str) -> dict:
    return next(d for d in load_docs(K8S / name) if d["kind"] == kind)


def render(root: Path, form: str | None = None) -> list[dict]:
    """`kubectl kustomize` of a copy of infra/k8s whose kustomization deploys `form`."""
    if form is not None:
        kustomization = root / "kustomization.yaml"
        text = kustomization.read_text()
        assert "- rayjob.yaml " in text
        kustomization.write_text(text.replace("- rayjob.yaml ", f"- {form} ", 1))
    out = subprocess.run([KUBECTL, "kustomize", str(root)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture
def k8s_copy(tmp_path) -> Path:
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    return root


# --- the shipped files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMS + SHARED)
def test_manifest_is_valid(name):
    docs = load_docs(K8S / name)
    assert docs
    for obj in docs:
        assert manifest_problems(obj) == [], obj["kind"]


def test_settings_name_the_image_make_builds():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    settings = yaml.safe_load((K8S / "settings" / "settings.yaml").read_text())
    assert settings["image"] == f"kandinsky-engine:{version}"  # `make image`'s tag: push it and rename here
    images = {c["image"] for n in ("rayjob.yaml", "raycluster.yaml", "raycronjob.yaml")
              for d in load_docs(K8S / n) for _, pod in pod_specs(d) for c in pod["containers"]}
    assert images == {settings["image"]}


def test_raycronjob_template_is_the_rayjob_spec():
    """One job, two schedules: the RayCronJob's template must not drift from rayjob.yaml, but for the
    scheduled run's --if-busy skip."""
    template = dict(doc("raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"])
    job = dict(doc("rayjob.yaml", "RayJob")["spec"])
    assert template.pop("entrypoint") == job.pop("entrypoint") + " --if-busy skip"
    assert template == job


def test_schedules_may_overlap_and_retries_do_not_burn_clusters():
    """The lease makes overlapping runs safe: a retry waits (bounded) for a crashed attempt's lease,
    a scheduled tick that meets a live run skips with exit 0, a failed run frees its GPU workers at
    once, and the portable CronJob's pod outlives its RayJob."""
    from kandinsky_engine.jobs.cli import build_parser
    from tests.infra_rules import lease_ttl_s

    job = doc("rayjob.yaml", "RayJob")["spec"]
    cron = doc("cronjob.yaml", "CronJob")["spec"]
    ray_cron = doc("raycronjob.yaml", "RayCronJob")["spec"]
    for entrypoint, skip in ((job["entrypoint"], "fail"), (ray_cron["jobTemplate"]["entrypoint"], "skip")):
        args = build_parser().parse_args(entrypoint.split()[1:])
        assert 2 * lease_ttl_s() <= args.wait_timeout < job["activeDeadlineSeconds"] and args.if_busy == skip
    rules = {(r["policy"], tuple(sorted(r["condition"].items()))) for r in job["deletionStrategy"]["deletionRules"]}
    assert ("DeleteWorkers", (("jobStatus", "FAILED"), ("ttlSeconds", 0))) in rules
    assert ("DeleteWorkers", (("jobDeploymentStatus", "Failed"), ("ttlSeconds", 0))) in rules
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["jobTemplate"]["spec"]["backoffLimit"] == 0
    waiter = cron["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert worst_case(job).total_seconds() + job["preRunningDeadlineSeconds"] < waiter < min_interval(
        cron["schedule"]).total_seconds()


def quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_job_config_fits_the_gpu_group(tmp_path):
    """The shipped job.yaml's actors fit the cluster the kustomization builds, by the engine's own
    check (kandinsky_engine.pipelines.generate.check_resources), else the job would be refused at start."""
    from kandinsky_engine.config import load_config
    from kandinsky_engine.pipelines.generate import check_resources

    config = load_config(K8S / "settings" / "job.yaml")
    assert config.model.family == "kandinsky22"  # named: the driver's checks need no model_index.json
    settings = yaml.safe_load((K8S / "settings" / "settings.yaml").read_text())
    worker = doc("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (worker["replicas"], limits["nvidia.com/gpu"]) == (settings["gpuWorkers"], settings["gpusPerWorker"])
    cluster = {"CPU": worker["replicas"] * quantity(limits["cpu"]),  # the head has num-cpus 0
               "GPU": settings["gpuWorkers"] * settings["gpusPerWorker"]}
    check_resources(config, SimpleNamespace(tasks={"text2img"}), cluster)
    for stage in (config.prior, config.decoder, config.movq):
        assert stage.num_gpus <= settings["gpusPerWorker"]  # one actor's share lies on one node
    with pytest.raises(ValueError, match="GPUs"):
        check_resources(config, SimpleNamespace(tasks={"text2img"}), {**cluster, "GPU": 0})


# --- kustomize ------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("form", FORMS)
def test_kustomization_renders_each_form(k8s_copy, form):
    docs = render(k8s_copy, form)
    kinds = {d["kind"] for d in docs}
    assert "Settings" not in kinds  # local-config: never sent to the cluster
    for obj in docs:
        assert manifest_problems(obj) == [], obj["kind"]
    # With the shipped settings, the kustomized objects are the standalone files.
    for original in load_docs(K8S / form):
        rendered = next(d for d in docs if (d["kind"], d["metadata"]["name"]) ==
                        (original["kind"], original["metadata"]["name"]))
        assert rendered == original
    job_config = next(d for d in docs if d["metadata"]["name"] == "kandinsky-job")
    assert job_config["data"]["job.yaml"] == (K8S / "settings" / "job.yaml").read_text()


@needs_kubectl
def test_settings_reach_every_manifest(k8s_copy):
    """One place: image, GPU workers, GPUs per worker and schedule from settings.yaml land in
    every container and group of every form."""
    settings_file = k8s_copy / "settings" / "settings.yaml"
    settings = yaml.safe_load(settings_file.read_text())
    settings.update(image="registry.example.com/ml/kandinsky-engine:9.9.9", gpuWorkers=3, gpusPerWorker=2,
                    schedule="30 1 * * *", kubectlImage="registry.example.com/kubectl:1.32")
    settings_file.write_text(yaml.safe_dump(settings))
    objs = {}
    for form in FORMS:
        copy_root = k8s_copy.parent / form
        shutil.copytree(k8s_copy, copy_root)
        objs.update({d["kind"]: d for d in render(copy_root, form)})
    for kind in ("RayJob", "RayCronJob", "RayCluster"):
        obj = objs[kind]
        cluster = {"RayJob": lambda: obj["spec"]["rayClusterSpec"], "RayCluster": lambda: obj["spec"],
                   "RayCronJob": lambda: obj["spec"]["jobTemplate"]["rayClusterSpec"]}[kind]()
        pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
        assert {c["image"] for p in pods for c in p["template"]["spec"]["containers"]} == {settings["image"]}
        group = cluster["workerGroupSpecs"][0]
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert group["maxReplicas"] == 3
        if kind != "RayCluster":
            assert group["replicas"] == group["minReplicas"] == 3
        else:
            assert group["minReplicas"] == 0  # the long-lived cluster still idles at zero GPU nodes
        assert manifest_problems(obj) == []
    assert objs["RayCronJob"]["spec"]["schedule"] == objs["CronJob"]["spec"]["schedule"] == "30 1 * * *"
    assert objs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.example.com/kubectl:1.32"


# --- the portable CronJob's script, with a stand-in kubectl --------------------------------------

FAKE_KUBECTL = """#!{python}
# Stands in for the API server: lists active RayJobs and answers status reads from a script;
# `create -k` renders with the real kubectl's kustomize and keeps what it would have created.
import json, os, subprocess, sys
state_file = os.environ["FAKE_STATE"]
state = json.load(open(state_file))
args = sys.argv[1:]
state["calls"].append(args)
if args[:2] == ["get", "rayjobs"]:
    print("\\n".join(state["active"]))
elif args[0] == "create":
    out = subprocess.run([os.environ["REAL_KUBECTL"], "kustomize", args[args.index("-k") + 1]],
                         capture_output=True, text=True, check=True).stdout
    state["created"] = out
    print("rayjob.ray.io/" + [line for line in out.splitlines() if line.startswith("  name: ")][0].split()[1])
elif args[0] == "get":
    print(state["statuses"].pop(0), end="")
json.dump(state, open(state_file, "w"))
"""


@pytest.fixture
def cron_run(k8s_copy, tmp_path):
    """Run cronjob.yaml's container script with the template ConfigMap laid out as its volume
    items lay it out; returns (exit code, stderr, fake API state)."""
    cron = next(d for d in render(k8s_copy, "cronjob.yaml") if d["kind"] == "CronJob")
    configmaps = {d["metadata"]["name"]: d for d in render(k8s_copy) if d["kind"] == "ConfigMap"}
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "template")["configMap"]
    template = tmp_path / "template"
    for item in volume["items"]:
        (template / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (template / item["path"]).write_text(configmaps[volume["name"]]["data"][item["key"]])
    container = pod["containers"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL.format(python=sys.executable))
    (bin_dir / "kubectl").chmod(stat.S_IRWXU)

    def run(active: list[str], statuses: list[str]):
        state_file = tmp_path / "state.json"
        state_file.write_text(json.dumps({"active": active, "statuses": statuses, "calls": []}))
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_STATE": str(state_file), "REAL_KUBECTL": KUBECTL,
               "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "TEMPLATE": str(template), "POLL_SECONDS": "0"}
        assert {e["name"] for e in container["env"]} >= {"TEMPLATE", "POLL_SECONDS"}
        done = subprocess.run(container["command"] + container["args"], env=env, capture_output=True, text=True,
                              timeout=60)
        return done.returncode, done.stderr + done.stdout, json.loads(state_file.read_text())

    return run


@needs_kubectl
def test_cronjob_creates_a_valid_rayjob_and_waits_for_success(cron_run):
    code, err, state = cron_run(active=["kandinsky-batch-20261130-0200 Complete"],
                                statuses=["/", "Initializing/", "Running/RUNNING", "Retrying/FAILED", "/",
                                          "Running/RUNNING", "Complete/SUCCEEDED"])
    assert code == 0, err
    assert state["statuses"] == []  # it waited through the retry's FAILED until Complete
    rayjob = yaml.safe_load(state["created"])
    assert rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"kandinsky-batch-2\d{7}-\d{6}", rayjob["metadata"]["name"])  # a new name per run
    assert manifest_problems(rayjob) == []
    expected = copy.deepcopy(doc("rayjob.yaml", "RayJob"))
    expected["metadata"]["name"] = rayjob["metadata"]["name"]
    assert rayjob == expected  # rayjob.yaml with the shipped settings, under a per-run name


@needs_kubectl
@pytest.mark.parametrize("final", ["Failed/FAILED", "Failed/", "ValidationFailed/", "Complete/STOPPED"])
def test_cronjob_fails_when_the_rayjob_fails(cron_run, final):
    code, err, state = cron_run(active=[], statuses=["Running/RUNNING", final])
    assert code == 1
    assert final in err


@needs_kubectl
def test_cronjob_skips_while_a_run_is_active(cron_run):
    """No GPU cluster is started only to wait for the output's lease: the tick is skipped, exit 0."""
    code, out, state = cron_run(active=["kandinsky-batch Running"], statuses=[])
    assert code == 0
    assert "skipped" in out and "kandinsky-batch Running" in out
    assert [call[0] for call in state["calls"]] == ["get"]  # never created a RayJob


# --- negative tests: each validator refuses what it should ----------------------------------------


def rayjob() -> dict:
    return copy.deepcopy(doc("rayjob.yaml", "RayJob"))


def gpu_worker(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def test_tightening_is_what_refuses_misspelled_fields():
    import jsonschema

    from tests.infra_rules import crd_schema

    bad = rayjob()
    bad["spec"]["activeDeadlineSecond"] = bad["spec"].pop("activeDeadlineSeconds")
    assert jsonschema.Draft7Validator(crd_schema("RayJob")).is_valid(bad)  # the CRD as shipped lets it through
    assert not jsonschema.Draft7Validator(tighten(crd_schema("RayJob"))).is_valid(bad)
    assert any("activeDeadlineSecond" in p for p in crd_problems(bad))


def test_crd_refuses_a_misspelled_field_deep_in_a_pod_template():
    bad = rayjob()
    gpu_worker(bad)["template"]["spec"]["containers"][0]["resource"] = {"limits": {"nvidia.com/gpu": 1}}
    assert any("'resource' was unexpected" in p for p in crd_problems(bad))


@pytest.mark.parametrize("path, value", [(("spec", "backoffLimit"), "2"),
                                         (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), "one"),
                                         (("spec", "deletionStrategy", "deletionRules", 0, "policy"), "Delete")])
def test_crd_refuses_a_wrong_type_or_value(path, value):
    bad = rayjob()
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert crd_problems(bad)


def test_cel_rules_are_evaluated():
    bad = rayjob()
    bad["spec"]["deletionStrategy"]["deletionRules"][0]["condition"]["jobDeploymentStatus"] = "Failed"
    assert any("cannot be used together" in p for p in crd_problems(bad))
    bad = rayjob()
    bad["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    assert any("requires either BOTH" in p for p in crd_problems(bad))


@pytest.mark.parametrize("change, message", [
    (lambda o: o["spec"].update(shutdownAfterJobFinishes=True), "mutually exclusive"),
    (lambda o: o["spec"]["deletionStrategy"]["deletionRules"][4]["condition"].update(ttlSeconds=0),
     "DeleteSelf TTL (0) must be >= DeleteCluster TTL (3600)"),
    (lambda o: o["spec"]["deletionStrategy"]["deletionRules"].append(
        {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}}), "duplicate rule"),
    (lambda o: o["metadata"].update(name="kandinsky-batch-" + "x" * 32), "longer than 47"),
    (lambda o: o["metadata"].update(name="Kandinsky_Batch"), "DNS-1035"),
    (lambda o: o["spec"].update(activeDeadlineSeconds=0), "activeDeadlineSeconds must be a positive"),
    (lambda o: o["spec"].update(clusterSelector={"ray.io/cluster": "kandinsky"}), "clusterSelector"),
    (lambda o: o["spec"].update(suspend=True), "suspend requires shutdownAfterJobFinishes"),
    (lambda o: gpu_worker(o).update(minReplicas=2), "minReplicas 2 > maxReplicas 1"),
    (lambda o: gpu_worker(o).update(idleTimeoutSeconds=60), "needs autoscaler v2"),
    (lambda o: gpu_worker(o)["rayStartParams"].update(labels="a=b"), "labels"),
])
def test_operator_rules(change, message):
    bad = rayjob()
    change(bad)
    assert crd_problems(bad) == []  # the schema alone accepts these
    assert any(message in p for p in operator_problems(bad)), operator_problems(bad)


def test_operator_rules_of_raycronjob_and_raycluster():
    cron = copy.deepcopy(doc("raycronjob.yaml", "RayCronJob"))
    cron["metadata"]["name"] = "kandinsky-nightly-" + "x" * 19  # 37 characters
    cron["spec"].update(schedule="0 25 * * *", timeZone="Mars/Olympus")
    problems = operator_problems(cron)
    assert any("longer than 36" in p for p in problems)
    assert any("invalid cron schedule" in p for p in problems)
    assert any("invalid time zone" in p for p in problems)
    cluster = copy.deepcopy(doc("raycluster.yaml", "RayCluster"))
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["restartPolicy"] = "Always"
    assert any("restartPolicy" in p for p in operator_problems(cluster))


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycronjob.yaml", "raycluster.yaml"])
def test_policy_refuses_a_gpu_group_without_a_gpu_limit(name):
    kind = {"rayjob.yaml": "RayJob", "raycronjob.yaml": "RayCronJob", "raycluster.yaml": "RayCluster"}[name]
    bad = copy.deepcopy(doc(name, kind))
    spec = {"RayJob": lambda: bad["spec"]["rayClusterSpec"], "RayCluster": lambda: bad["spec"],
            "RayCronJob": lambda: bad["spec"]["jobTemplate"]["rayClusterSpec"]}[kind]()
    del spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert crd_problems(bad) == []
    assert manifest_problems(bad) == ["worker group gpu-workers: a GPU group without a nvidia.com/gpu limit"]


@pytest.mark.parametrize("change, message", [
    (lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].__setitem__(
        1, {"name": "AWS_SECRET_ACCESS_KEY", "value": "inline"}), "is inline"),
    (lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"), "num-cpus"),
    (lambda o: o["spec"].update(entrypoint="kandinsky-batch run --limt 3 /home/ray/kandinsky/job.yaml"),
     "does not parse"),
    (lambda o: o["spec"].update(entrypoint="kandinsky-batch run /etc/job.yaml"), "mounts no ConfigMap"),
    (lambda o: o["spec"].pop("preRunningDeadlineSeconds"), "preRunningDeadlineSeconds is not set"),
    (lambda o: o["spec"].pop("deletionStrategy"), "no cleanup"),
    (lambda o: o["spec"]["deletionStrategy"]["deletionRules"].pop(2), "no DeleteWorkers rule"),
    (lambda o: o["spec"].update(entrypoint="kandinsky-batch run /home/ray/kandinsky/job.yaml"), "--wait-timeout"),
    (lambda o: gpu_worker(o)["template"]["spec"].pop("serviceAccountName"), "serviceAccountName"),
    (lambda o: gpu_worker(o)["template"]["spec"]["securityContext"].pop("seccompProfile"), "seccompProfile"),
    (lambda o: gpu_worker(o)["template"]["spec"]["containers"][0].pop("securityContext"), "allowPrivilegeEscalation"),
    (lambda o: gpu_worker(o)["template"]["spec"]["volumes"].append({"name": "c", "hostPath": {"path": "/x"}}),
     "hostPath"),
    (lambda o: gpu_worker(o)["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"].pop(
        "optional"), "must be optional"),
    (lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"].pop(2),
     "/dev/shm"),
])
def test_policy_rules(change, message):
    bad = rayjob()
    change(bad)
    assert any(message in p for p in policy_problems(bad)), policy_problems(bad)


def test_policy_refuses_schedules_that_fail_when_busy():
    cron = copy.deepcopy(doc("raycronjob.yaml", "RayCronJob"))
    cron["spec"]["schedule"] = "0 */6 * * *"  # every 6 h, while a run may last 18 h: safe, the lease
    assert policy_problems(cron) == []
    cron["spec"]["jobTemplate"]["entrypoint"] = cron["spec"]["jobTemplate"]["entrypoint"].replace(" --if-busy skip", "")
    assert any("--if-busy skip" in p for p in policy_problems(cron))
    cron = copy.deepcopy(doc("raycronjob.yaml", "RayCronJob"))
    cron["spec"]["jobTemplate"]["deletionStrategy"]["deletionRules"] = [
        r for r in cron["spec"]["jobTemplate"]["deletionStrategy"]["deletionRules"] if r["policy"] != "DeleteSelf"]
    assert any("pile up" in p for p in policy_problems(cron))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["spec"].update(concurencyPolicy=c["spec"].pop("concurrencyPolicy")), "concurencyPolicy"),
    (lambda c: c["spec"].update(successfulJobsHistoryLimit="7"), "is not of type 'integer'"),
    (lambda c: c["spec"]["jobTemplate"]["spec"]["template"]["spec"].update(restartPolicy=["Never"]), "not of type"),
    (lambda c: c["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "API_TOKEN", "value": "inline"}), "is inline"),
])
def test_core_kinds_refuse_misspelled_fields_and_wrong_types(change, message):
    bad = copy.deepcopy(doc("cronjob.yaml", "CronJob"))
    change(bad)
    assert any(message in p for p in manifest_problems(bad)), manifest_problems(bad)
    role = copy.deepcopy(doc("cronjob.yaml", "Role"))
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    assert core_problems(role)


# --- the shipped job config validates, with its own URLs, against an S3 API ------------------------


def test_job_config_validates_with_staged_models(s3, tiny_root, tmp_path):
    """`kandinsky-batch validate infra/k8s/settings/job.yaml` as the head pod would run it (S3 from
    the environment), against moto with the tiny model staged at the config's model URLs by
    `kandinsky-batch stage-model` and a manifest under its manifest URL."""
    from kandinsky_engine.jobs.cli import main
    from kandinsky_engine.config import load_config
    from tests.conftest import KEY, SECRET, put_manifest

    fs, options = s3
    config = load_config(K8S / "settings" / "job.yaml")
    bucket = config.input.manifest.split("/")[2]
    fs.mkdir(bucket)
    options_file = tmp_path / "options.yaml"  # stage-model takes storage options from a job config
    options_file.write_text(yaml.safe_dump({"input": {"manifest": "x"}, "output": {"path": "x"},
                                            "storage_options": options}))
    for part in ("prior", "decoder"):
        assert main(["stage-model", str(tiny_root / part), getattr(config.model, part),
                     "--config", str(options_file)]) == 0
    put_manifest(fs, config.input.manifest.removeprefix("s3://") + "part-00000.parquet",
                 [{"id": f"r{i}", "prompt": f"prompt {i}"} for i in range(3)])
    env = {**os.environ, "AWS_ENDPOINT_URL": options["s3"]["endpoint_url"], "AWS_ACCESS_KEY_ID": KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    done = subprocess.run([str(Path(sys.executable).parent / "kandinsky-batch"), "validate",
                           str(K8S / "settings" / "job.yaml")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ok: 3 rows in 1 file(s)" in done.stdout


@needs_kubectl
def test_kueue_component_renders_a_valid_suspended_rayjob(k8s_copy):
    kustomization = k8s_copy / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("components:\n- settings",
                                                               "components:\n- settings\n- components/kueue"))
    rayjob = next(d for d in render(k8s_copy) if d["kind"] == "RayJob")
    assert rayjob["spec"]["suspend"] is True and rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert manifest_problems(rayjob) == []


@needs_kubectl
@pytest.mark.parametrize("form", ("rayjob.yaml", "raycluster.yaml", "raycronjob.yaml"))
def test_shared_weights_component_mounts_one_read_only_volume_everywhere(k8s_copy, form):
    """components/shared-weights: every Ray pod (head and GPU workers) mounts the ReadOnlyMany claim
    read-only at /models, next to the per-pod cache, and the rendered objects still pass every rule."""
    kustomization = k8s_copy / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("components:\n- settings",
                                                               "components:\n- settings\n- components/shared-weights"))
    docs = render(k8s_copy, form)
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "kandinsky-weights" and claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    ray = next(d for d in docs if d.get("apiVersion") == "ray.io/v1")
    pods = pod_specs(ray)
    assert len(pods) >= 2
    for where, pod in pods:
        volume = next(v for v in pod["volumes"] if v["name"] == "weights")
        assert volume["persistentVolumeClaim"] == {"claimName": "kandinsky-weights", "readOnly": True}, where
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "weights")
        assert mount == {"name": "weights", "mountPath": "/models", "readOnly": True}, where
        assert any(m["name"] == "cache" for m in pod["containers"][0]["volumeMounts"]), where
    for obj in docs:
        assert manifest_problems(obj) == [], obj["kind"]


def test_the_monitoring_component_reads_the_metrics_the_engine_exports():
    """The Grafana dashboard queries only metrics pipelines/metrics.py defines (or Ray's own), and the
    PodMonitor selects the pods KubeRay labels as Ray nodes on their `metrics` port."""
    import json
    import re

    from kandinsky_engine.pipelines import metrics

    folder = ROOT / "infra" / "k8s" / "components" / "monitoring"
    dashboard = json.loads((folder / "grafana-dashboard.json").read_text())
    queried = {re.sub(r"_(total|bucket|count|sum)$", "", m) for panel in dashboard["panels"]
               for target in panel["targets"] for m in re.findall(r"ray_(kandinsky_\w+)", target["expr"])}
    defined = set(re.findall(r'"(kandinsky_\w+)"', Path(metrics.__file__).read_text()))
    assert queried and queried <= defined, queried - defined
    monitor = load_docs(folder / "podmonitor.yaml")[0]
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    component = load_docs(folder / "kustomization.yaml")[0]
    assert component["kind"] == "Component" and "podmonitor.yaml" in component["resources"]
