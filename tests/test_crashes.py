"""Crashes: SIGKILL workers and trainers in the middle of their leases.

A run with short leases (lease_s = 0.6 s) is worked by 4 rollout worker and 2
trainer processes while the test SIGKILLs a random one that holds leases, at least
24 times, and starts a replacement each time (alternately with the dead process's
id and with a new one). The test reads, right after each kill, exactly which leases
the dead process held (its state in Redis is frozen once it is dead) and proves:

* those leases came back only after their deadline (expired prompt leases with
  attempt + 1) and were worked by someone else;
* nothing was lost: every task ends committed and every sample acked;
* nothing was acked twice (ack replies of all trainers, and the counters);
* a late commit or ack under a dead holder's lease tokens is fenced off.

Two smaller tests freeze a live process with SIGSTOP while it holds a lease, let
the lease be re-granted and finished by someone else, then SIGCONT it: its late
commit (or ack) is rejected and counted in ``fenced_commits``.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

import reliability_procs as procs
from conftest import make_ref
from dataflow_redis import idset

pytestmark = pytest.mark.slow

LEASE_S = 0.6
MIN_KILLS = 24


def held_by(cp, kind: str, holder: str) -> dict[str, dict]:
    """The leases ``holder`` holds now, by item id (with token and deadline)."""
    return {row["id"]: row for row in cp.leases(kind, count=10_000) if row["holder"] == holder}


def test_sigkill_workers_and_trainers_mid_lease(make_cp, redis_url, tmp_path):
    cp = make_cp()
    ctx = procs.forkserver()
    rng = random.Random(7)
    stop_file = str(tmp_path / "stop")
    base = {"url": redis_url, "run_id": cp.run_id, "lease_s": LEASE_S, "stop_file": stop_file}

    def worker_params(worker_id: str, n: int) -> dict:
        return {**base, "worker_id": worker_id, "request": 8, "p_retry": 0.02, "delay_ms": 60,
                "idle_ms": 10, "seed": n, "log_path": str(tmp_path / f"{worker_id}.{n}.log")}

    def trainer_params(trainer_id: str, n: int) -> dict:
        return {**base, "trainer_id": trainer_id, "request": 16, "p_retry": 0.02, "delay_ms": 60,
                "wait_s": 0.05, "seed": 1000 + n, "log_path": str(tmp_path / f"{trainer_id}.{n}.log")}

    task_ids = cp.ingest_prompts([{"task_id": f"t{i:05d}"} for i in range(600)])
    live: dict[str, tuple[str, str, object]] = {}   # slot -> (kind, holder id, process)
    everyone: list = []
    spawned = 0

    def spawn(slot: str, kind: str, holder_id: str) -> None:
        nonlocal spawned
        spawned += 1
        target, params = ((procs.rollout_worker, worker_params(holder_id, spawned)) if kind == "prompt"
                          else (procs.trainer, trainer_params(holder_id, spawned)))
        live[slot] = (kind, holder_id, procs.start_roles(ctx, [(target, params)])[0])
        everyone.append(live[slot][2])

    try:
        for i in range(4):
            spawn(f"w{i}", "prompt", f"w{i}")
        for i in range(2):
            spawn(f"tr{i}", "train", f"tr{i}")

        kills = []            # (kind, holder, {id: lease row at the moment of death})
        next_task = len(task_ids)
        started = time.monotonic()
        while len(kills) < MIN_KILLS:
            assert time.monotonic() - started < 120, f"only {len(kills)} kills in 120 s"
            time.sleep(rng.uniform(0.05, 0.25))
            # Keep work flowing while the killing goes on.
            new = [{"task_id": f"t{i:05d}"} for i in range(next_task, next_task + 60)]
            task_ids += cp.ingest_prompts(new)
            next_task += len(new)
            slot = rng.choice(sorted(live))
            kind, holder, proc = live[slot]
            if not held_by(cp, kind, holder):
                continue          # kill only in the middle of leases
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            assert proc.exitcode == -signal.SIGKILL
            orphans = held_by(cp, kind, holder)   # frozen: the holder is dead
            if orphans:
                kills.append((kind, holder, orphans))
            # Replacement: alternately the same id and a new one.
            new_id = holder if len(kills) % 2 else f"{slot}-r{len(kills)}"
            spawn(slot, kind, new_id)
        open(stop_file, "w").close()
        procs.join_all([p for _, _, p in live.values()], timeout_s=120)
    finally:
        procs.kill_all(everyone)
    elapsed = time.monotonic() - started

    final = procs.verify_final_state(cp, set(task_ids))
    assert not final["dead"] and not final["failed"], "no terminal failure was injected: all must be acked"
    assert len(final["acked"]) == len(task_ids)

    logs = sorted(str(p) for p in tmp_path.glob("*.log"))
    acks = procs.acked_from_logs(logs)
    assert len(acks) == len(set(acks)), "a sample was reported newly acked twice"
    assert set(acks) <= final["acked"]

    # The dead holders' leases came back after their deadline and were re-granted.
    prompt_grants: dict[str, list] = {}
    train_grants: dict[str, list] = {}
    for path in logs:
        for line in procs.read_log(path):
            if line["op"] == "lease" and "granted" in line:
                for task_id, attempt, token in line["granted"]:
                    prompt_grants.setdefault(task_id, []).append((line["at"], attempt, token))
            elif line["op"] == "lease":
                for sample_id, token in zip(line["ids"], line["tokens"]):
                    train_grants.setdefault(sample_id, []).append((line["at"], token))
    orphaned = 0
    for kind, holder, orphans in kills:
        for item_id, row in orphans.items():
            orphaned += 1
            deadline_s = row["deadline_ms"] / 1000
            if kind == "prompt":
                # Tokens only grow: a later grant has a larger token.
                later = sorted((int(token), at, attempt) for at, attempt, token in prompt_grants[item_id]
                               if int(token) > int(row["token"]))
                assert later, f"orphaned task {item_id} of {holder} was never re-granted"
                assert all(at >= deadline_s for _, at, _ in later), "re-granted before the deadline"
                assert later[0][2] == row["attempt"] + 1, "an expired lease must count an attempt"
            else:
                later = [at for at, token in train_grants[item_id] if int(token) > int(row["token"])]
                assert later, f"orphaned sample {item_id} of {holder} was never re-granted"
                assert min(later) >= deadline_s, "re-granted before the deadline"
            assert (f"s-{item_id}" if kind == "prompt" else item_id) in final["acked"]

    # Late hand-ins under a dead holder's tokens are fenced off.
    fenced_before = int(cp.redis.hget(cp.keys.counters, "fenced_commits") or 0)
    acked_before = int(cp.redis.hget(cp.keys.counters, "samples_acked"))
    late_commits = late_acks = 0
    for kind, holder, orphans in kills:
        if kind == "prompt":
            ghost = cp.rollout_worker(holder, lease_s=LEASE_S)
            ghost._tokens = {task_id: str(row["token"]) for task_id, row in orphans.items()}
            assert ghost.commit([procs.sample_ref(cp.run_id, t) for t in orphans]) == []
            late_commits += len(orphans)
        else:
            ghost = cp.trainer(holder, lease_s=LEASE_S)
            ghost._tokens = {sample_id: str(row["token"]) for sample_id, row in orphans.items()}
            assert ghost.ack(list(orphans), optimizer_durable=True) == []
            late_acks += len(orphans)
    assert int(cp.redis.hget(cp.keys.counters, "fenced_commits")) == fenced_before + late_commits
    assert int(cp.redis.hget(cp.keys.counters, "samples_acked")) == acked_before
    procs.verify_final_state(cp, set(task_ids))

    kinds = [k for k, _, _ in kills]
    assert len(kills) >= MIN_KILLS and "prompt" in kinds and "train" in kinds
    print(f"\ncrashes: {len(kills)} SIGKILLs mid-lease ({kinds.count('prompt')} workers, "
          f"{kinds.count('train')} trainers), {orphaned} orphaned leases, {spawned} processes, "
          f"{len(task_ids)} tasks in {elapsed:.1f}s; {late_commits} late commits and {late_acks} "
          "late acks fenced")


def _stalled(ctx, cp, redis_url, tmp_path, kind):
    """Start a holder process, wait until it leased, freeze it with SIGSTOP."""
    log_path = str(tmp_path / "stalled.log")
    params = {"url": redis_url, "run_id": cp.run_id, "kind": kind, "holder_id": "stalled",
              "lease_s": LEASE_S, "log_path": log_path, "go_file": str(tmp_path / "go")}
    proc = ctx.Process(target=procs.stalled_holder, args=(params,))
    proc.start()
    deadline = time.monotonic() + 30
    while not list(procs.read_log(log_path)):
        if time.monotonic() > deadline or not proc.is_alive():
            proc.kill()
            pytest.fail("the holder never leased")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)
    leased = list(procs.read_log(log_path))[0]
    return proc, params, leased


def _resume_and_read(proc, params):
    """Let the frozen holder go on: it hands in its item at once."""
    open(params["go_file"], "w").close()
    os.kill(proc.pid, signal.SIGCONT)
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the resumed holder did not finish")
    assert proc.exitcode == 0
    return [line for line in procs.read_log(params["log_path"]) if line["op"] == "late"][0]


# The re-grant goes to a process with the frozen holder's own id (a restarted worker
# that kept its id: only the fencing token tells the two apart) or to another id.
RESCUERS = ["stalled", "rescuer"]


@pytest.mark.parametrize("rescuer_id", RESCUERS)
def test_late_commit_of_a_frozen_worker_is_fenced(cp, redis_url, tmp_path, rescuer_id):
    cp.ingest_prompts([{"task_id": "t0"}])
    proc, params, leased = _stalled(procs.forkserver(), cp, redis_url, tmp_path, "prompt")
    try:
        assert leased["id"] == "t0"
        time.sleep(LEASE_S + 0.3)                 # past the frozen holder's deadline
        rescuer = cp.rollout_worker(rescuer_id, lease_s=30)
        [task] = rescuer.lease(1)                 # reclaims the expired lease, re-grants it
        assert (task.task_id, task.attempt) == ("t0", 1)
        assert rescuer._tokens["t0"] != leased["token"]
        fenced_before = cp.status()["fenced_commits"]
    finally:
        late = _resume_and_read(proc, params)     # hands in while the re-grant is held
    assert late["returned"] == [], "the frozen holder's late commit was accepted"
    status = cp.status()
    assert status["fenced_commits"] == fenced_before + 1
    assert status["samples_committed"] == 0 and status["queue_depth"] == 0
    [lease] = cp.leases("prompt")
    assert (lease["id"], lease["holder"], str(lease["token"])) == ("t0", rescuer_id, str(rescuer._tokens["t0"]))
    assert cp.worker_inflight() == {rescuer_id: 1}
    # The current holder's commit is the one that counts.
    assert rescuer.commit([make_ref(cp, "s-t0", "t0")]) == ["s-t0"]
    assert cp.redis.lrange(cp.keys.train_queue, 0, -1) == ["s-t0"]
    assert cp.worker_inflight() == {} and cp.status()["prompts_done"] == 1


@pytest.mark.parametrize("rescuer_id", RESCUERS)
def test_late_ack_of_a_frozen_trainer_is_fenced(cp, redis_url, tmp_path, rescuer_id):
    cp.enqueue_offline_refs([make_ref(cp, "s0")])
    proc, params, leased = _stalled(procs.forkserver(), cp, redis_url, tmp_path, "train")
    try:
        assert leased["id"] == "s0"
        time.sleep(LEASE_S + 0.3)
        rescuer = cp.trainer(rescuer_id, lease_s=30)
        [ref] = rescuer.lease(1)                  # the expired lease came back
        assert ref.sample_id == "s0" and rescuer._tokens["s0"] != leased["token"]
    finally:
        late = _resume_and_read(proc, params)
    assert late["returned"] == [], "the frozen trainer's late ack was accepted"
    status = cp.status()
    assert status["samples_acked"] == 0 and status["queue_in_flight"] == 1
    [lease] = cp.leases("train")
    assert (lease["holder"], str(lease["token"])) == (rescuer_id, str(rescuer._tokens["s0"]))
    assert rescuer.ack(["s0"], global_step=1, optimizer_durable=True) == ["s0"]
    status = cp.status()
    assert status["samples_acked"] == 1 and status["queue_depth"] == 0 and status["queue_in_flight"] == 0
    assert idset.members(cp.redis, cp.keys.acked) == {"s0"}
