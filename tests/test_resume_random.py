"""Randomized resume: an adversarial operator, as a Hypothesis state machine, against one output.

Moves: run (with or without --limit and --recompute-changed), a run killed at a random point (each
unit it touched committed whole, or only its errors shard, or as it was; a torn temporary file; no
report, no _SUCCESS.json; its lease left to expire), a concurrent run while another holds the lease,
and between runs: rewrite a prompt, reorder a file, rename a file, append a file, damage a shard
(truncate, delete, edit in place), drop a hidden or a foreign file into data/, tear a run report.
After every run one of two things holds:
- a clean refusal (the run changed no byte of the output), or
- the run finished, `verify` passes, and every image equals the image of one uninterrupted run over
  the same manifest (a fresh job over a copy of it).
Failing sequences shrink to a short one. It runs on local disk and on the moto S3 server. Real kills
are in test_resume.py; here the state a kill leaves is made directly, so that a move costs seconds.

Budget: CI plays a few short sequences with a seed drawn per run and printed (FUZZ_SEED=... replays
it); `make fuzz` plays many (FUZZ_EXAMPLES, FUZZ_STEPS).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from kandinsky_engine.jobs.lease import Lease, LeaseHeld
from kandinsky_engine.jobs.resume import FingerprintMismatch
from kandinsky_engine.jobs.run import ForeignFiles, ManifestChanged, run_job
from kandinsky_engine.jobs.verify import verify
from kandinsky_engine.storage import url_to_fs
from tests.conftest import make_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

UNIT = 2
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("width", pa.int64()), ("note", pa.string()),
                    ("rank", pa.int64())])
REFUSALS = (ManifestChanged, FingerprintMismatch, ForeignFiles, LeaseHeld)
# What follows each move between runs: a run (with or without --limit and --recompute-changed) or a killed one.
THEN = st.tuples(st.sampled_from(["run", "run", "killed"]), st.none() | st.integers(1, 12), st.booleans(),
                 st.floats(0, 1), st.randoms(use_true_random=False))
SEED = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(2**32))
# Hypothesis' first sequence is its simplest one (two concurrent runs, which cost little); the
# others are drawn from the seed.
EXAMPLES = {"local": int(os.environ.get("FUZZ_EXAMPLES", 2)), "s3": int(os.environ.get("FUZZ_EXAMPLES", 1))}
STEPS = int(os.environ.get("FUZZ_STEPS", 3))


def new_rows(prefix: str, n: int) -> list[dict]:
    # p03 of the first file is poison (width 0): it fails validation at every attempt. `note` is null
    # in the whole first unit; `rank` is an int pass-through column with nulls and 63-bit values.
    return [{"id": f"{prefix}{i:02d}", "prompt": f"a harbour {prefix}, view {i}", "width": 0 if (prefix, i) == ("p", 3) else 64,
             "note": None if i < UNIT else f"n{i}", "rank": None if i % 3 == 0 else 2**62 + i} for i in range(n)]


def parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buf)
    return buf.getvalue()


class Operator(RuleBasedStateMachine):
    """One output and its manifest folder; `play` gives it the store, root, options and model cache."""

    store = root = options = model_cache = None
    references: dict = {}
    sequences = 0
    moves: Counter = Counter()

    @initialize()
    def start(self):
        Operator.sequences += 1
        self.base = f"{self.root}/seq{Operator.sequences}-{random.Random(SEED + Operator.sequences).randrange(10**6)}"
        self.folder, self.out = f"{self.base}/manifest", f"{self.base}/out"
        self.fs, _ = url_to_fs(self.base, self.options)
        self.files = {"a.parquet": new_rows("p", 10)}
        self.appended = 0
        self.foreign = None  # a non-hidden stray file in data/: every run refuses until it is gone
        self.write_manifest()
        self.run(None, False)  # a first complete run, so that every sequence starts from a real output

    def then(self, then) -> None:
        Operator.moves[sys._getframe(1).f_code.co_name] += 1
        kind, limit, recompute, keep, which = then
        if kind == "run":
            self.run(limit, recompute)
        else:
            self.killed_run(limit, keep, which)

    # -- the operator's moves between runs -------------------------------------------------------

    @rule(which=st.randoms(use_true_random=False), then=THEN)
    def rewrite_a_prompt(self, which, then):
        name = which.choice(sorted(self.files))
        i = which.randrange(len(self.files[name]))
        self.files[name][i] = {**self.files[name][i], "prompt": self.files[name][i]["prompt"] + " at night"}
        self.write_manifest()
        self.then(then)

    @rule(which=st.randoms(use_true_random=False), then=THEN)
    def reorder_a_file(self, which, then):
        which.shuffle(self.files[which.choice(sorted(self.files))])
        self.write_manifest()
        self.then(then)

    @rule(which=st.randoms(use_true_random=False), then=THEN)
    def rename_a_file(self, which, then):
        old = which.choice(sorted(self.files))
        self.files[f"renamed{len(self.files)}-{which.randrange(100)}.parquet"] = self.files.pop(old)
        self.write_manifest()
        self.then(then)

    @precondition(lambda self: self.appended < 2)
    @rule(rows=st.integers(1, 5), then=THEN)
    def append_a_file(self, rows, then):
        self.appended += 1
        self.files[f"z{self.appended}.parquet"] = new_rows(f"z{self.appended}-", rows)
        self.write_manifest()
        self.then(then)

    @rule(which=st.randoms(use_true_random=False), how=st.sampled_from(["truncate", "delete", "edit"]), then=THEN)
    def damage_a_shard(self, which, how, then):
        shards = self.keys("data") + self.keys("errors")
        if not shards:
            return self.then(then)
        key = which.choice(shards)
        if how == "truncate":
            self.put(key, self.fs.cat_file(key)[:64])
        elif how == "delete":
            self.fs.rm_file(key)
        else:  # same name, other bytes: a row's values edited in place
            table = pq.read_table(io.BytesIO(self.fs.cat_file(key)))
            if table.num_rows:
                buf = io.BytesIO()
                pq.write_table(table.set_column(0, "id", pa.array(table["id"].to_pylist()[::-1], pa.string())), buf)
                self.put(key, buf.getvalue() + b"\0")
        self.fs.invalidate_cache()
        self.then(then)

    @rule(hidden=st.booleans(), then=THEN)
    def drop_a_stray_file(self, hidden, then):
        key = self._key(f"{self.out}/data/{'.DS_Store' if hidden else 'notes.txt'}")
        self.put(key, b"stray")
        if not hidden:
            self.foreign = key
        self.then(then)

    @rule(which=st.randoms(use_true_random=False), then=THEN)
    def tear_a_report(self, which, then):
        reports = [k for k in self.keys("_runs") if k.endswith(".json")]
        if reports:
            key = which.choice(reports)
            self.put(key, self.fs.cat_file(key)[:40])
        self.then(then)

    # -- runs and the contract -----------------------------------------------------------------

    @rule(limit=st.none() | st.integers(1, 12), recompute=st.booleans())
    def run(self, limit, recompute):
        before = self.snapshot()
        try:
            summary = run_job(self.config(), limit=limit, recompute_changed=recompute)
        except REFUSALS as exc:
            assert self.snapshot() == before, f"a refusal changed the output: {exc}"
            Operator.moves[f"refused run: {type(exc).__name__}"] += 1
            self.fix_what_was_refused(exc)
            return
        Operator.moves["finished run (verified)"] += 1
        assert self.foreign is None, "a run went ahead with a foreign file in data/"
        check = verify(self.out, config=self.config())
        assert check.ok, check.problems
        want, got = self.reference(), {r["id"]: r["image"] for r in self.data_rows(self.out)}
        assert set(got) <= set(want) and all(got[i] == want[i] for i in got), "an image differs from a single run"
        if summary["complete"]:
            assert set(got) == set(want) and summary["failed_rows"] == ("p03" in self.ids())

    @rule(limit=st.none() | st.integers(1, 12), keep=st.floats(0, 1), which=st.randoms(use_true_random=False))
    def killed_run(self, limit, keep, which):
        """A run killed part way: of each unit it touched, what a kill can leave stays (committed
        whole; only its errors shard; or as it was), plus a torn temporary file; no report."""
        before = self.snapshot()
        try:
            run_job(self.config(), limit=limit, recompute_changed=True)
        except REFUSALS as exc:  # refused before anything was touched: nothing for a kill to leave
            assert self.snapshot() == before, f"a refusal changed the output: {exc}"
            self.fix_what_was_refused(exc)
            return
        Operator.moves["killed run"] += 1
        after = self.snapshot()
        touched = {k for k in set(after) | set(before) if after.get(k) != before.get(k)}
        for unit in sorted({u for k in touched if (u := self._unit(k)) is not None}):
            fate = which.random()
            if fate < keep:
                continue  # committed whole before the kill
            for key in (k for k in touched if self._unit(k) == unit):
                if fate < (keep + 1) / 2 and "/errors/" in key:
                    continue  # the kill fell between the unit's errors shard and its data shard
                if key in before:
                    self.put(key, before[key])
                elif self.fs.exists(key):
                    self.fs.rm_file(key)
        for key in touched:
            if ("/_runs/" in key or key.endswith("/_SUCCESS.json")) and self.fs.exists(key):
                self.fs.rm_file(key)  # a killed run writes no report, and removed _SUCCESS.json at its start
        self.put(self._key(f"{self.out}/_tmp/torn-{which.randrange(10**6)}"), b"PAR1 half a shard")
        # and its lease, which it renewed until it died: expired here, as if its time to live had passed
        self.put(self._key(f"{self.out}/_LEASE.json"), json.dumps({"owner": "killed", "expires_at_epoch": 1.0}).encode())

    @rule()
    def concurrent_run(self):
        """Another run holds the lease: this one exits busy and changes nothing."""
        fs, root = url_to_fs(self.out, self.options)
        holder = Lease(fs, root, 60, self.out)
        fs.makedirs(root, exist_ok=True)
        holder.acquire()
        try:
            before = self.snapshot()
            with pytest.raises(LeaseHeld):
                run_job(self.config())
            assert self.snapshot() == before
        finally:
            holder.release()

    def fix_what_was_refused(self, exc):
        """The operator reads the message and does what it says (or the next run refuses again)."""
        if isinstance(exc, ForeignFiles):
            assert self.foreign is not None and self.foreign.rsplit("/", 1)[1] in str(exc)
            self.fs.rm_file(self.foreign)
            self.foreign = None

    def teardown(self):
        keys = [k for k in self.fs.find(self._key(self.base)) if not k.startswith(self._key(self.out) + "/")]
        assert sorted(keys) == sorted(self._key(f"{self.folder}/{n}") for n in self.files), keys

    # -- helpers -------------------------------------------------------------------------------

    def ids(self) -> set[str]:
        return {r["id"] for rows in self.files.values() for r in rows}

    def write_manifest(self):
        for key in self.keys_under(self.folder):
            if key.rsplit("/", 1)[1] not in self.files:
                self.fs.rm_file(key)
        for name, rows in self.files.items():
            self.put(self._key(f"{self.folder}/{name}"), parquet_bytes(rows))
        self.fs.invalidate_cache()

    def config(self, manifest: str | None = None, out: str | None = None):
        config = make_config(self.model_cache, manifest or self.folder, out or self.out, input={"rows_per_block": UNIT},
                             prior={"batch_size": 2}, decoder={"batch_size": 2}, movq={"batch_size": 2})
        return config.model_copy(update={"storage_options": self.options})

    def reference(self) -> dict[str, bytes]:
        """Images of one uninterrupted run over the current manifest, cached by its files' contents
        (a row's image depends on its file's rows, not on the file's name)."""
        payloads = sorted(parquet_bytes(rows) for rows in self.files.values())
        key = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in payloads)).hexdigest()
        if key not in Operator.references:
            folder = f"{self.root}/ref-{key[:12]}"
            for i, payload in enumerate(payloads):
                self.put(self._key(f"{folder}/m/{i}.parquet"), payload)
            run_job(self.config(f"{folder}/m", f"{folder}/out"))
            Operator.references[key] = {r["id"]: r["image"] for r in self.data_rows(f"{folder}/out")}
        return {i: image for i, image in Operator.references[key].items() if i != "p03"}

    def data_rows(self, out: str) -> list[dict]:
        rows = []
        for key in self.keys_under(f"{out}/data"):
            if key.endswith(".parquet"):
                rows += pq.read_table(io.BytesIO(self.fs.cat_file(key)), columns=["id", "image"]).to_pylist()
        return rows

    def snapshot(self) -> dict[str, bytes]:
        # The lease is not output: a refused run may take over a killed run's expired lease and give it back.
        return {k: self.fs.cat_file(k) for k in self.keys_under(self.out) if not k.endswith("/_LEASE.json")}

    def keys(self, folder: str) -> list[str]:
        return [k for k in self.keys_under(f"{self.out}/{folder}") if k.rsplit("/", 1)[1].startswith("part-")
                or folder == "_runs"]

    def keys_under(self, path: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(self.fs.find(self._key(path)))
        except FileNotFoundError:
            return []

    def put(self, key: str, payload: bytes) -> None:
        if self.store == "local":
            self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(key, payload)
        self.fs.invalidate_cache()

    def _key(self, path: str) -> str:
        return url_to_fs(path, self.options)[1]

    def _unit(self, key: str) -> str | None:
        """The unit (file folder/start row) of a shard key of the output (not one set aside)."""
        folder, _, name = key.rpartition("/")
        parent, _, file_folder = folder.rpartition("/")
        shard = parent in (self._key(f"{self.out}/data"), self._key(f"{self.out}/errors")) and name.startswith("part-")
        return f"{file_folder}/{int(name[5:17])}" if shard else None


def play(store: str, root: str, options: dict, model_cache: str):
    machine = type(f"Operator_{store}", (Operator,), {"store": store, "root": root, "options": options,
                                                       "model_cache": model_cache})
    print(f"\n{store}: FUZZ_SEED={SEED}, {EXAMPLES[store]} sequence(s) of {STEPS} moves (FUZZ_SEED replays them)")
    Operator.moves.clear()
    run_state_machine_as_test(seed(SEED)(machine), settings=settings(
        max_examples=EXAMPLES[store], stateful_step_count=STEPS, deadline=None, database=None,
        suppress_health_check=list(HealthCheck), phases=(Phase.generate, Phase.shrink)),
        _min_steps=STEPS)  # Hypothesis starts from empty sequences; a budget this small must not spend itself on them
    print(f"{store}: {dict(Operator.moves)}")
    assert Operator.moves["finished run (verified)"] + Operator.moves["killed run"], "no run was played"


def test_random_resume_sequences_on_local_disk(ray_cluster, model_cache, tmp_path):
    play("local", str(tmp_path), {}, model_cache)


def test_random_resume_sequences_on_s3(ray_cluster, model_cache, s3):
    _, options = s3
    play("s3", "s3://kandinsky/random", options, model_cache)
