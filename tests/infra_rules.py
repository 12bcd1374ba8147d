"""Offline checks of the deployment manifests in infra/ (used by tests/test_infra_*.py).

Each check returns a list of problems (empty: valid), so a test can assert both that a shipped
manifest passes and that a broken one fails with the expected message.

- `crd_problems`: a KubeRay object against the v1 CRD schema of KubeRay 1.7.0 (tests/data/kuberay/),
  tightened so that unknown fields fail, plus the CRD's CEL rules (x-kubernetes-validations).
- `operator_problems`: the rules KubeRay's operator enforces in code, not in the schema
  (ray-operator/controllers/ray/utils/validation.go at v1.7.0), for the fields these manifests use.
- `policy_problems`: this project's own rules for a deployment (GPU groups, secrets, cleanup...).
- `core_problems`: core kinds (CronJob, RBAC, ConfigMap...) with kubernetes-validate, strict.
- `launcher_problems`: a `ray up` config against Ray's ray-schema.json, then through Ray's own
  config preparation (prepare_config + validate_config), plus the policy for its node types.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import re
import shlex
import zoneinfo
from datetime import datetime, timedelta
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).parent / "data" / "kuberay"
CRD_FILES = {"RayJob": "rayjobs", "RayCluster": "rayclusters", "RayCronJob": "raycronjobs"}
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for (CronJob timeZone is GA)
# validation.go's limits: a RayCluster name (53) leaves room for its pods' suffixes; a RayJob's
# cluster adds 6 characters, a RayCronJob's RayJobs add 11 more.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY)", re.I)
GPU = "nvidia.com/gpu"


def load_docs(path: Path | str) -> list[dict]:
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


# --- KubeRay CRD schemas -------------------------------------------------------------------------


def tighten(schema):
    """A copy in which every object schema with `properties` and without
    x-kubernetes-preserve-unknown-fields forbids other fields, as the API server's pruning
    would silently drop them (a misspelled field would be ignored, not refused)."""
    if isinstance(schema, list):
        return [tighten(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: tighten(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str) -> dict:
    return json.loads((SCHEMAS / f"{CRD_FILES[kind]}.v1.schema.json").read_text())


@functools.cache
def _crd_validator(kind: str):
    import jsonschema

    return jsonschema.Draft7Validator(tighten(crd_schema(kind)))


def with_defaults(schema: dict, value):
    """A copy of `value` with the schema's defaults filled in, as the API server does before it
    validates (so `required` fields that have a default may be left out, as in a real apply)."""
    if isinstance(value, dict):
        out = {k: with_defaults(schema.get("properties", {}).get(k, {}), v) for k, v in value.items()}
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [with_defaults(schema["items"], v) for v in value]
    return value


def crd_problems(obj: dict) -> list[str]:
    kind = obj.get("kind")
    if obj.get("apiVersion") != "ray.io/v1" or kind not in CRD_FILES:
        return [f"not a KubeRay v1 object: apiVersion {obj.get('apiVersion')!r}, kind {kind!r}"]
    obj = with_defaults(crd_schema(kind), obj)
    errors = sorted(_crd_validator(kind).iter_errors(obj), key=lambda e: list(e.absolute_path))
    problems = [f"{kind} {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]
    return problems + cel_problems(crd_schema(kind), obj, kind)


@functools.cache
def _cel_program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_problems(schema: dict, value, where: str) -> list[str]:
    """Evaluate the schema's x-kubernetes-validations (CEL) on the parts of `value` it describes,
    as the API server does on create. Transition rules (those using oldSelf) apply to updates only."""
    import celpy

    problems = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        if not _cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)}):
            problems.append(f"{where}: {rule.get('message') or rule['rule']}")
    if isinstance(value, dict):
        for key, sub in value.items():
            child = schema.get("properties", {}).get(key)
            if child is None and isinstance(schema.get("additionalProperties"), dict):
                child = schema["additionalProperties"]
            if child is not None:
                problems += cel_problems(child, sub, f"{where}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            problems += cel_problems(schema["items"], sub, f"{where}[{i}]")
    return problems


# --- KubeRay operator rules (validation.go, v1.7.0) ----------------------------------------------


def operator_problems(obj: dict) -> list[str]:
    kind, meta, spec = obj["kind"], obj.get("metadata", {}), obj.get("spec", {})
    name = meta.get("name", "")
    problems = []
    if len(name) > MAX_NAME[kind]:
        problems.append(f"{kind} name {name!r} is longer than {MAX_NAME[kind]} characters")
    if kind != "RayCronJob" and not DNS1035.match(name):
        problems.append(f"{kind} name {name!r} is not a DNS-1035 label")
    if kind == "RayJob":
        problems += rayjob_spec_problems(spec)
    elif kind == "RayCluster":
        problems += cluster_spec_problems(spec, "RayCluster")
    else:
        schedule = spec.get("schedule", "")
        if "TZ" in schedule:
            problems.append("RayCronJob: TZ or CRON_TZ in schedule; use timeZone")
        try:
            cron_times(schedule, 1)
        except ValueError as exc:
            problems.append(f"RayCronJob: invalid cron schedule {schedule!r}: {exc}")
        if "timeZone" in spec:
            try:
                zoneinfo.ZoneInfo(spec["timeZone"])
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                problems.append(f"RayCronJob: invalid time zone {spec['timeZone']!r}")
        problems += [f"invalid RayJob template: {p}" for p in rayjob_spec_problems(spec.get("jobTemplate", {}))]
    return problems


def rayjob_spec_problems(spec: dict) -> list[str]:
    problems = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    selector = spec.get("clusterSelector") or {}
    backoff = spec.get("backoffLimit")
    mode = spec.get("submissionMode", "K8sJobMode")
    if spec.get("suspend") and not shutdown:
        problems.append("RayJob: suspend requires shutdownAfterJobFinishes: true")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append("RayJob: ttlSecondsAfterFinished must be non-negative")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        problems.append("RayJob: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    problems += deletion_problems(spec)
    if selector and spec.get("suspend"):
        problems.append("RayJob: clusterSelector does not support suspend")
    if not spec.get("rayClusterSpec") and not selector:
        problems.append("RayJob: one of rayClusterSpec or clusterSelector must be set")
    if selector and backoff is not None and backoff > 0:
        problems.append("RayJob: backoffLimit > 0 cannot be combined with clusterSelector")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        problems.append("RayJob: backoffLimit > 0 cannot be combined with InteractiveMode")
    if mode == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
        problems.append("RayJob: SidecarMode supports neither submitterPodTemplate nor submitterConfig")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            problems.append(f"RayJob: {field} must be a positive integer")
    if backoff is not None and backoff < 0:
        problems.append("RayJob: backoffLimit must be non-negative")
    if spec.get("rayClusterSpec"):
        problems += cluster_spec_problems(spec["rayClusterSpec"], "RayJob")
    return problems


ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")  # TTLs must not decrease along it


def deletion_problems(spec: dict) -> list[str]:
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return []
    rules = strategy.get("deletionRules") or []
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    autoscaling = (spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling", False)
    if rules and spec.get("shutdownAfterJobFinishes"):
        return ["RayJob: shutdownAfterJobFinishes and deletionStrategy.deletionRules are mutually exclusive"]
    if rules and legacy:
        return ["RayJob: deletionRules cannot be combined with onSuccess/onFailure"]
    if legacy:
        if "onSuccess" not in strategy or "onFailure" not in strategy:
            return ["RayJob: deletionStrategy needs both onSuccess and onFailure"]
        return []
    if not rules:
        return ["RayJob: deletionStrategy needs onSuccess and onFailure, or deletionRules"]
    problems, ttls = [], {}
    for i, rule in enumerate(rules):
        cond, policy = rule.get("condition", {}), rule.get("policy")
        keys = [k for k in ("jobStatus", "jobDeploymentStatus") if k in cond]
        if len(keys) != 1:
            problems.append(f"deletionRules[{i}]: exactly one of jobStatus and jobDeploymentStatus must be set")
            continue
        if cond.get("ttlSeconds", 0) < 0:
            problems.append(f"deletionRules[{i}]: ttlSeconds must be non-negative")
            continue
        if (spec.get("clusterSelector") and policy in ("DeleteCluster", "DeleteWorkers")) or \
                (autoscaling and policy == "DeleteWorkers"):
            problems.append(f"deletionRules[{i}]: {policy} is not supported here")
            continue
        per_condition = ttls.setdefault((keys[0], cond[keys[0]]), {})
        if policy in per_condition:
            problems.append(f"deletionRules[{i}]: duplicate rule for {policy} and {keys[0]} {cond[keys[0]]}")
            continue
        per_condition[policy] = cond.get("ttlSeconds", 0)
    for (key, value), by_policy in ttls.items():
        ordered = [(p, by_policy[p]) for p in ORDER if p in by_policy]
        for (p1, t1), (p2, t2) in zip(ordered, ordered[1:]):
            if t2 < t1:
                problems.append(f"deletionRules for {key} {value}: {p2} TTL ({t2}) must be >= {p1} TTL ({t1})")
    return problems


def cluster_spec_problems(spec: dict, owner: str) -> list[str]:
    problems = []
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    head = spec.get("headGroupSpec", {})
    groups = [("Head", head)] + [(g.get("groupName"), g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        pod = group.get("template", {}).get("spec", {})
        if not pod.get("containers"):
            problems.append(f"{owner}: group {name} has no container")
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            problems.append(f"{owner}: group {name} sets resources both in rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{owner}: group {name}: rayStartParams['labels'] is not supported; use labels")
        if name == "Head":
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            problems.append(f"{owner}: worker group {name} must set minReplicas and maxReplicas without autoscaling")
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            problems.append(f"{owner}: worker group {name} has negative replicas")
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"{owner}: worker group {name} has minReplicas {lo} > maxReplicas {hi}")
        if group.get("idleTimeoutSeconds") is not None and not v2:
            problems.append(f"{owner}: worker group {name}: idleTimeoutSeconds needs autoscaler v2")
        if autoscaling and group.get("suspend"):
            problems.append(f"{owner}: worker group {name} cannot be suspended with autoscaling")
        if autoscaling and v2 and pod.get("restartPolicy", "Never") != "Never":
            problems.append(f"{owner}: worker group {name}: restartPolicy must be Never with autoscaler v2")
    if autoscaling and v2 and head.get("template", {}).get("spec", {}).get("restartPolicy", "Never") != "Never":
        problems.append(f"{owner}: head restartPolicy must be Never with autoscaler v2")
    if (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds", 0) < 0:
        problems.append(f"{owner}: autoscalerOptions.idleTimeoutSeconds must be non-negative")
    return problems


# --- cron schedules (the standard five fields, as robfig/cron's ParseStandard and CronJob) -------

FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 6))
NAMES = {3: "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split(), 4: "SUN MON TUE WED THU FRI SAT".split()}
DESCRIPTORS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
               "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}


def _cron_field(text: str, index: int) -> set[int]:
    name, lo, hi = FIELDS[index]
    names = NAMES.get(index, [])
    offset = 1 if index == 3 else 0

    def number(token: str) -> int:
        if token.upper() in names:
            return names.index(token.upper()) + offset
        if not token.isdigit():
            raise ValueError(f"{name}: {token!r} is not a number")
        value = int(token)
        if index == 4 and value == 7:
            value = 0  # Sunday, both ways
        if not lo <= value <= hi:
            raise ValueError(f"{name}: {value} is outside [{lo}, {hi}]")
        return value

    values: set[int] = set()
    for part in text.split(","):
        span, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"{name}: bad step {step!r}")
        if span in ("*", "?"):
            first, last = lo, hi
        elif "-" in span:
            first, last = map(number, span.split("-", 1))
        else:
            first = last = number(span)
            if step:
                last = hi
        values.update(range(first, last + 1, int(step or 1)))
    return values


def cron_times(schedule: str, count: int, start: datetime = datetime(2026, 1, 1)) -> list[datetime]:
    """The next `count` times `schedule` fires after `start` (raises ValueError if it cannot parse).
    Day of month and day of week are OR-ed when both are restricted, as cron does."""
    fields = DESCRIPTORS.get(schedule.strip(), schedule).split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields, got {len(fields)}")
    minutes, hours, days, months, weekdays = (_cron_field(f, i) for i, f in enumerate(fields))
    any_day, any_weekday = fields[2] in ("*", "?"), fields[4] in ("*", "?")
    times, day = [], start.replace(hour=0, minute=0, second=0, microsecond=0)
    for _ in range(366 * 8):  # enough for any schedule that fires at all (Feb 29 included)
        weekday = (day.weekday() + 1) % 7  # cron: Sunday = 0
        if any_day or any_weekday:
            on = day.day in days and weekday in weekdays
        else:
            on = day.day in days or weekday in weekdays
        if day.month in months and on:
            times += [day.replace(hour=h, minute=m) for h in sorted(hours) for m in sorted(minutes)
                      if day.replace(hour=h, minute=m) > start]
            if len(times) >= count:
                return times[:count]
        day += timedelta(days=1)
    if not times:
        raise ValueError("never fires")
    return times


def min_interval(schedule: str) -> timedelta:
    times = cron_times(schedule, 400)
    return min(b - a for a, b in zip(times, times[1:]))


# --- this project's deployment policy ------------------------------------------------------------


def cluster_specs(obj: dict) -> list[dict]:
    """The Ray cluster specs inside a KubeRay object."""
    spec = obj.get("spec", {})
    return {"RayJob": lambda: [spec.get("rayClusterSpec", {})],
            "RayCronJob": lambda: [spec.get("jobTemplate", {}).get("rayClusterSpec", {})],
            "RayCluster": lambda: [spec]}[obj["kind"]]()


def rayjob_spec(obj: dict) -> dict | None:
    return {"RayJob": obj.get("spec"), "RayCronJob": obj.get("spec", {}).get("jobTemplate")}.get(obj["kind"])


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in an object, KubeRay or core."""
    if obj.get("apiVersion") == "ray.io/v1":
        out = []
        for cluster in cluster_specs(obj):
            out.append(("head", cluster.get("headGroupSpec", {}).get("template", {}).get("spec", {})))
            out += [(f"worker group {g.get('groupName')}", g.get("template", {}).get("spec", {}))
                    for g in cluster.get("workerGroupSpecs", [])]
        return out
    if obj.get("kind") == "CronJob":
        return [("cronjob", obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])]
    return []


def is_gpu_group(group: dict) -> bool:
    """A worker group meant for GPU nodes: named so, or selecting or tolerating GPU nodes."""
    pod = group.get("template", {}).get("spec", {})
    return "gpu" in group.get("groupName", "").lower() or "gpu" in json.dumps(pod.get("nodeSelector", {})).lower() \
        or any("gpu" in json.dumps(t).lower() for t in pod.get("tolerations", []))


def ray_container(pod: dict) -> dict:
    return (pod.get("containers") or [{}])[0]  # KubeRay's Ray container is the first one


def restricted_problems(where: str, pod: dict) -> list[str]:
    """Pod Security Standards, "restricted" profile: the fields it requires of a pod template."""
    problems = []
    security = pod.get("securityContext") or {}
    if not security.get("runAsNonRoot"):
        problems.append(f"{where}: Pod Security restricted: securityContext.runAsNonRoot must be true")
    if (security.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{where}: Pod Security restricted: seccompProfile RuntimeDefault")
    if any("hostPath" in v for v in pod.get("volumes", [])):
        problems.append(f"{where}: Pod Security restricted: no hostPath volumes")
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        context = container.get("securityContext") or {}
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: container {container.get('name')}: allowPrivilegeEscalation must be false")
        if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{where}: container {container.get('name')}: capabilities must drop ALL")
    return problems


def policy_problems(obj: dict) -> list[str]:
    problems = []
    for where, pod in pod_specs(obj):
        problems += restricted_problems(where, pod)
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]) and "value" in env:
                    problems.append(f"{where}: env {env['name']} is inline; take it from a Secret (secretKeyRef)")
                ref = env.get("valueFrom", {})
                if SECRET_NAME.search(env["name"]) and "valueFrom" in env and "secretKeyRef" not in ref:
                    problems.append(f"{where}: env {env['name']} must come from a Secret (secretKeyRef)")
                if "secretKeyRef" in ref and not ref["secretKeyRef"].get("optional"):
                    # A missing Secret would leave the pod pending: keys are optional (cloud identity instead).
                    problems.append(f"{where}: env {env['name']}: secretKeyRef must be optional")
    if obj.get("apiVersion") != "ray.io/v1":
        return problems
    for where, pod in pod_specs(obj):
        if not pod.get("serviceAccountName"):
            problems.append(f"{where}: no serviceAccountName (the hook for IRSA / workload identity)")
        if where == "head" and "/dev/shm" not in {m.get("mountPath") for m in ray_container(pod).get("volumeMounts", [])}:
            problems.append("head: no /dev/shm volume (Ray's object store would be the container's 64 MiB)")
    for cluster in cluster_specs(obj):
        head = cluster.get("headGroupSpec", {})
        if (head.get("rayStartParams") or {}).get("num-cpus") != "0":
            problems.append('head: rayStartParams num-cpus must be "0" (no tasks or actors beside the driver)')
        gpu_groups = [g for g in cluster.get("workerGroupSpecs", []) if is_gpu_group(g)]
        if not gpu_groups:
            problems.append("no GPU worker group")
        for group in gpu_groups:
            limits = ray_container(group.get("template", {}).get("spec", {})).get("resources", {}).get("limits", {})
            if int(limits.get(GPU, 0)) < 1:
                problems.append(f"worker group {group.get('groupName')}: a GPU group without a {GPU} limit")
    job = rayjob_spec(obj)
    if job is not None:
        for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds", "backoffLimit"):
            if field not in job:
                problems.append(f"RayJob spec: {field} is not set")
        if "backoffLimit" not in (job.get("submitterConfig") or {}):
            problems.append("RayJob spec: submitterConfig.backoffLimit is not set")
        rules = (job.get("deletionStrategy") or {}).get("deletionRules") or []
        if not rules and not (job.get("shutdownAfterJobFinishes") and "ttlSecondsAfterFinished" in job):
            problems.append("RayJob spec: no cleanup (deletionRules, or shutdownAfterJobFinishes with a TTL)")
        for condition in ({"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}):
            if rules and not any(r.get("policy") == "DeleteWorkers" and r["condition"].get("ttlSeconds", 0) == 0
                                 and all(r["condition"].get(k) == v for k, v in condition.items()) for r in rules):
                problems.append(f"RayJob spec: no DeleteWorkers rule at 0 s for {condition}: failed runs keep GPUs")
        problems += entrypoint_problems(job, cluster_specs(obj)[0])
    if obj["kind"] == "RayCronJob":
        problems += schedule_problems(obj["spec"]["schedule"], job)
    return problems


def entrypoint_problems(job: dict, cluster: dict) -> list[str]:
    """The entrypoint is our CLI, and the config it names is where the head mounts one."""
    from kandinsky_engine.jobs.cli import build_parser

    tokens = shlex.split(job.get("entrypoint", ""))
    if not tokens or tokens[0] != "kandinsky-batch":
        return [f"entrypoint {job.get('entrypoint')!r} does not run kandinsky-batch"]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its usage before exiting
            args = build_parser().parse_args(tokens[1:])
    except SystemExit:
        return [f"entrypoint {job['entrypoint']!r} does not parse with kandinsky-batch's own parser"]
    config = getattr(args, "config", None)
    if config is None:
        return []
    head = cluster.get("headGroupSpec", {}).get("template", {}).get("spec", {})
    mounts = {m["name"]: m["mountPath"] for m in ray_container(head).get("volumeMounts", [])}
    maps = {v["name"]: v["configMap"]["name"] for v in head.get("volumes", []) if "configMap" in v}
    if not any(config == f"{mounts.get(volume)}/job.yaml" for volume in maps):
        return [f"entrypoint names {config}, but the head mounts no ConfigMap's job.yaml there"]
    if args.command == "run" and (args.wait_timeout or 0) < 2 * lease_ttl_s():
        # A retry right after a crashed attempt would exit 3 while that attempt's lease lives on.
        return [f"entrypoint {job['entrypoint']!r}: run needs --wait-timeout of at least 2 x output.lease_ttl_s "
                f"({2 * lease_ttl_s():g} s)"]
    return []


def lease_ttl_s() -> float:
    from kandinsky_engine.config import OutputConfig

    return OutputConfig.model_fields["lease_ttl_s"].default


def worst_case(job: dict) -> timedelta:
    """The longest a RayJob can run: every attempt up to its active deadline (a deadline failure is
    not retried, so the last attempt is the one that reaches it)."""
    return timedelta(seconds=(job.get("backoffLimit", 0) + 1) * job["activeDeadlineSeconds"])


def schedule_problems(schedule: str, job: dict) -> list[str]:
    """Scheduled RayJobs: a tick that meets a run still writing the output (the lease makes that safe)
    skips it with exit 0 instead of failing and being retried on new GPU clusters; no pile-up of old
    RayJobs."""
    problems = []
    if "--if-busy skip" not in " ".join(shlex.split(job.get("entrypoint", ""))):
        problems.append("a scheduled run must pass --if-busy skip: a tick that overlaps a running job would fail "
                        "(exit 3) and be retried on new GPU clusters")
    if not any(r.get("policy") == "DeleteSelf" for r in (job.get("deletionStrategy") or {}).get("deletionRules", [])):
        problems.append("scheduled RayJobs need a DeleteSelf rule, or they pile up")
    return problems


# --- core Kubernetes kinds ------------------------------------------------------------------------


def core_problems(obj: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(map(str, exc.absolute_path))
        return [f"{obj.get('kind')} {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{obj.get('kind')}: {exc}"]
    return []


def manifest_problems(obj: dict) -> list[str]:
    """Every check that applies to one object."""
    if obj.get("apiVersion") == "ray.io/v1":
        crd = crd_problems(obj)
        if crd:
            return crd  # the code rules assume a well-formed object
        obj = with_defaults(crd_schema(obj["kind"]), obj)  # the operator sees the defaulted object
        return operator_problems(obj) + policy_problems(obj)
    return core_problems(obj) + policy_problems(obj)


# --- Ray cluster launcher ------------------------------------------------------------------------


def launcher_problems(config: dict) -> list[str]:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as exc:
        return [f"ray-schema.json: {'.'.join(map(str, exc.absolute_path)) or '(top)'}: {exc.message}"]
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as exc:  # Ray's own checks raise ValueError, AssertionError, jsonschema errors
        return [f"Ray's config preparation: {type(exc).__name__}: {exc}"]
    problems = []
    head = config["head_node_type"]
    if prepared["setup_commands"] or prepared["worker_setup_commands"]:
        # Ray's defaults would pip install a Ray nightly here; the image has what a node runs.
        problems.append("setup_commands and worker_setup_commands must be empty: everything is in the image")
    if not (config.get("docker") or {}).get("image"):
        problems.append("docker.image is not set: nodes must run the engine's image")
    if config["available_node_types"][head].get("resources", {}).get("CPU") != 0:
        problems.append(f"head node type {head}: resources must say CPU: 0 (no tasks or actors beside the driver)")
    workers = {n: t for n, t in config["available_node_types"].items() if n != head}
    if not workers:
        problems.append("no worker node type")
    for name, node in workers.items():
        if node.get("resources", {}).get("GPU", 0) < 1:
            problems.append(f"worker node type {name}: no GPU in its resources")
    return problems
