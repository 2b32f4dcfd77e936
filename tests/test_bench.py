"""``dataflow-redis bench`` produces every figure it promises (issue 6).

One small run of the real command (CliRunner, ``--json``) on its own private
redis-server, with tiny sizes: every section, every operation at two process counts,
both cycle batch sizes with the LMOVE baseline, both scaling pairs, both memory id
styles and every target. No assertion on speed: the machine is shared; only on the
shape and the internal consistency of the figures.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import cli_runner
from dataflow_redis.bench import (
    ALL_OPS,
    CYCLE_STEPS,
    FLOORS,
    PAYLOAD,
    SINGLE_ITEM_OPS,
    TARGETS,
    bench_command,
    format_report,
)

TINY = ["--seconds", "0.03", "--processes", "1,2", "--cycle-processes", "2", "--cycle-seconds", "0.15",
        "--cycle-rounds", "2", "--floor-rounds", "2", "--backlog", "2000", "--workers", "20",
        "--memory-tasks", "20000"]  # smaller runs are dominated by hash-table growth steps


@pytest.fixture(scope="module")
def result():
    run = cli_runner().invoke(bench_command, ["--json", *TINY], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout)  # progress lines go to stderr


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_machine_and_settings_are_recorded(result):
    machine = result["machine"]
    assert machine["nproc"] >= 1 and machine["python"] and machine["redis_version"]
    assert machine["redis_server"] != "external (--redis-url)", "without --redis-url it starts its own server"
    assert result["settings"]["processes"] == [1, 2]


def test_every_operation_at_every_process_count_against_the_noop(result):
    levels = result["ops"]["levels"]
    assert [level["processes"] for level in levels] == [1, 2]
    for level in levels:
        assert positive(level["noop"]["ops_per_s"])
        assert set(level["ops"]) == set(ALL_OPS)
        for op, stat in level["ops"].items():
            assert stat["calls"] > 0 and positive(stat["ops_per_s"]), (level["processes"], op)
            assert 0 < stat["p50_ms"] <= stat["p99_ms"], (level["processes"], op)
            assert stat["ratio_to_noop"] == pytest.approx(stat["ops_per_s"] / stat["noop_ops_per_s"], rel=1e-2, abs=1e-3)  # ratios are rounded to 3 decimals
        # A floor is measured in every round and keeps its best one (the figures above).
        for floor in FLOORS:
            stat = level["ops"][floor]
            assert len(stat["rounds"]) == result["settings"]["floor_rounds"] == 2
            assert stat["ratio_to_noop"] == max(stat["rounds"])
        assert all("rounds" not in level["ops"][op] for op in ALL_OPS if op not in FLOORS)


def test_full_cycle_and_lmove_baseline_for_both_batch_sizes(result):
    from statistics import median
    batches = {b["batch"]: b for b in result["cycle"]["batches"]}
    assert set(batches) == {1, 64}
    for b in batches.values():
        rounds = b["rounds"]
        assert len(rounds) == result["settings"]["cycle_rounds"] == 2
        for r in rounds:  # each round: ours, the LMOVE baseline and the floor, interleaved in time slices
            assert positive(r["tasks_per_s"]) and positive(r["lmove_tasks_per_s"]) and positive(r["floor_tasks_per_s"])
            assert r["ratio_to_lmove"] == pytest.approx(r["tasks_per_s"] / r["lmove_tasks_per_s"], rel=1e-2, abs=1e-3)
            assert r["floor_ratio_to_lmove"] == pytest.approx(r["floor_tasks_per_s"] / r["lmove_tasks_per_s"],
                                                              rel=1e-2, abs=1e-3)
        # Ours and the baseline: medians of the rounds; the floor: its best round.
        assert b["tasks_per_s"] == pytest.approx(median(r["tasks_per_s"] for r in rounds))
        assert b["lmove_tasks_per_s"] == pytest.approx(median(r["lmove_tasks_per_s"] for r in rounds))
        assert b["ratio_to_lmove"] == pytest.approx(median(r["ratio_to_lmove"] for r in rounds), abs=1e-3)
        assert b["floor_tasks_per_s"] == max(r["floor_tasks_per_s"] for r in rounds)
        assert b["floor_ratio_to_lmove"] == max(r["floor_ratio_to_lmove"] for r in rounds)
        for side in ("", "lmove_", "floor_"):
            assert positive(b[side + "client_cpu_us_per_task"]) and positive(b[side + "server_us_per_task"])


def test_scaling_pairs_cover_every_cycle_step(result):
    scaling = result["scaling"]
    assert (scaling["backlog"]["small"], scaling["backlog"]["large"]) == (1000, 2000)
    assert (scaling["workers"]["small"], scaling["workers"]["large"]) == (10, 20)
    for pair in ("backlog", "workers"):
        ops = scaling[pair]["ops"]
        assert set(ops) == set(CYCLE_STEPS)
        for op, figure in ops.items():
            assert positive(figure["small_ms"]) and positive(figure["large_ms"]), (pair, op)
            assert figure["ratio"] == pytest.approx(figure["large_ms"] / figure["small_ms"], rel=2e-2, abs=1e-3)


def test_memory_per_pending_leased_and_acked_item(result):
    memory = result["memory"]
    assert memory["payload_bytes"] == len(PAYLOAD)
    assert memory["generated"]["task_id_chars"] == 16 and memory["short"]["task_id_chars"] == 8
    assert memory["uuid"]["task_id_chars"] == 32
    for style in ("generated", "short", "uuid"):
        figures = memory[style]
        # A pending task holds at least its payload and its id; a lease adds a record.
        assert figures["pending_task_bytes"] > len(PAYLOAD) + figures["task_id_chars"]
        assert figures["leased_task_bytes"] > figures["pending_task_bytes"]
        assert positive(figures["acked_sample_bytes"])
        assert figures["pending_overhead_bytes"] == pytest.approx(figures["pending_task_bytes"] - len(PAYLOAD))
        assert positive(figures["reply_cache_bytes_per_call"])
    # Longer ids cost more wherever an id is kept.
    for longer, shorter in (("uuid", "generated"), ("generated", "short")):
        assert memory[longer]["pending_task_bytes"] > memory[shorter]["pending_task_bytes"]
        assert memory[longer]["acked_sample_bytes"] > memory[shorter]["acked_sample_bytes"]


def test_every_target_is_checked(result):
    targets = result["targets"]
    names = {t["target"] for t in targets}
    assert names == {"single-item op / no-op EVALSHA", "batched full cycle tasks/s",
                     "batched full cycle / LMOVE baseline", "backlog scaling ratio", "workers scaling ratio",
                     "pending-task overhead bytes", "bytes per acked sample"}
    assert len([t for t in targets if t["target"] == "single-item op / no-op EVALSHA"]) == 2
    for t in targets:
        assert isinstance(t["ok"], bool) and math.isfinite(t["value"])
    single = [t for t in targets if t["target"] == "single-item op / no-op EVALSHA"]
    for t, level in zip(single, result["ops"]["levels"]):
        worst = min(level["ops"][op]["ratio_to_noop"] for op in SINGLE_ITEM_OPS)
        assert t["value"] == worst and t["ok"] == (worst >= TARGETS["single_item_vs_noop_min"])
        # The lowest single-item floor bounds the target; out of reach only if it misses.
        floor = min(FLOORS, key=lambda f: level["ops"][f]["ratio_to_noop"])
        assert (t["floor"], t["floor_of"]) == (level["ops"][floor]["ratio_to_noop"], FLOORS[floor])
        assert t["out_of_reach"] == (t["floor"] < TARGETS["single_item_vs_noop_min"])
    batched = next(b for b in result["cycle"]["batches"] if b["batch"] == 64)
    for name, floor, goal in (
            ("batched full cycle tasks/s", batched["floor_tasks_per_s"], TARGETS["batched_cycle_tasks_per_s_min"]),
            ("batched full cycle / LMOVE baseline", batched["floor_ratio_to_lmove"],
             TARGETS["batched_cycle_vs_lmove_min"])):
        [t] = [t for t in targets if t["target"] == name]
        assert t["floor"] == floor and t["out_of_reach"] == (floor < goal)
    # Targets without a floor make no claim about reach.
    assert all("floor" not in t for t in targets if "scaling" in t["target"] or "bytes" in t["target"])


def test_the_table_shows_every_section(result):
    text = format_report(result)
    for title in ("1. operations", "2. full cycle", "3. scaling", "4. memory", "targets"):
        assert title in text
    for op in ALL_OPS:
        assert op in text
    assert text.count("best of ") == len(FLOORS) * len(result["ops"]["levels"])


def test_targets_show_ratios_to_three_decimals(result):
    # A floor of 0.598 misses the 0.6 goal: it must not be printed as 0.60.
    import copy
    edited = copy.deepcopy(result)
    single = next(t for t in edited["targets"] if t["target"] == "single-item op / no-op EVALSHA")
    single.update(value=0.5984, floor=0.5979, out_of_reach=True)
    line = next(x for x in format_report(edited).splitlines() if "single-item" in x)
    assert " 0.598 " in line and "0.598: out of reach" in line and "0.60" not in line


def test_bad_options_are_refused_with_a_clear_message():
    runner = cli_runner()
    run = runner.invoke(bench_command, ["--sections", "ops,speed"])
    assert run.exit_code == 2 and "unknown section" in run.output
    run = runner.invoke(bench_command, ["--processes", "1,zero"])
    assert run.exit_code == 2 and "process counts" in run.output


def _evalsha_calls(client) -> int:
    return client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


def test_a_url_typed_before_bench_is_benchmarked_one_from_the_environment_is_not(redis_url):
    import redis

    from dataflow_redis.cli import main

    client = redis.Redis.from_url(redis_url)
    small = ["bench", "--json", "--sections", "memory", "--memory-tasks", "100"]
    before = _evalsha_calls(client)
    run = cli_runner().invoke(main, ["--redis-url", redis_url, *small], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert _evalsha_calls(client) > before            # the scripts ran on that server

    before = _evalsha_calls(client)
    run = cli_runner().invoke(main, small, env={"DATAFLOW_REDIS_URL": redis_url}, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert _evalsha_calls(client) == before           # a private server took the load
    assert "DATAFLOW_REDIS_URL is not used" in run.stderr

    run = cli_runner().invoke(main, ["--redis-url", redis_url, "bench", "--redis-url", redis_url + "1"])
    assert run.exit_code == 2 and "two different Redis URLs" in run.output
    client.close()


def test_cycle_slices_take_turns_on_the_shared_schedule(redis_url):
    """The cycle section's processes run ours, the LMOVE baseline and the floor in
    turn, each slice in its own window of the schedule (a call under way at the end
    of a window finishes first: the bounds leave room for a loaded machine)."""
    import time

    from dataflow_redis.bench import CYCLE_KINDS, _Client

    client = _Client(redis_url, f"slices-{time.time_ns()}", 0)
    try:
        slice_s, slices = 0.08, 2 * len(CYCLE_KINDS)
        start_at = time.monotonic() + 0.05
        out = client.cycle_slices(start_at, slice_s, slices, 4)
        finished = time.monotonic()
    finally:
        client.cp.delete()
        client.close()
    assert [s["kind"] for s in out] == [CYCLE_KINDS[k % len(CYCLE_KINDS)] for k in range(slices)]
    # A slice swallowed by a call running past the previous one (a stall) reports
    # nothing; every slice that ran moved tasks, and every kind ran.
    for s in out:
        assert s["elapsed"] < slice_s + 1.0 and (s["tasks"] > 0) == (s["elapsed"] > 0)
    assert {s["kind"] for s in out if s["tasks"] > 0} == set(CYCLE_KINDS)
    assert start_at + slices * slice_s <= finished < start_at + slices * slice_s + 1.0


def test_a_pool_closed_midway_ends_its_processes_at_once(redis_url):
    """On an error or a signal in the parent the benchmark processes are ended at once,
    not left to finish a schedule of many seconds (loading the server meanwhile)."""
    import time

    from dataflow_redis import ControlPlane
    from dataflow_redis.bench import _NAMESPACE, _Pool

    run_id = f"close-{time.time_ns()}"
    pool = _Pool(redis_url, 2)
    try:
        pool.ask("open", run_id)
        pool.send("cycle_slices", time.monotonic(), 10.0, 3, 1)   # a 30 s schedule
        time.sleep(0.5)
    finally:
        started = time.monotonic()
        pool.close()
    assert time.monotonic() - started < 5
    assert not any(proc.is_alive() for proc in pool.procs)
    ControlPlane.from_url(redis_url, run_id, namespace=_NAMESPACE).delete()


def test_benchmark_processes_end_with_a_parent_killed_outright(redis_url, tmp_path):
    """On a server the benchmark does not own, its processes must not go on loading it
    after their parent is SIGKILLed (they end with the forkserver, which ends with it)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from dataflow_redis.bench import _Pool\n"
        "if __name__ == '__main__':\n"
        "    pool = _Pool(sys.argv[1], 2)\n"
        "    pool.ask('open', sys.argv[2])\n"
        "    pool.send('cycle_slices', time.monotonic(), 1.0, 30, 1)\n"
        "    print(' '.join(str(p.pid) for p in pool.procs), flush=True)\n"
        "    time.sleep(60)\n")
    run_id = f"orphan-{time.time_ns()}"
    parent = subprocess.Popen([sys.executable, str(script), redis_url, run_id], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 2
        time.sleep(0.5)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") and
                                                   " Z " not in open(f"/proc/{pid}/stat").read()
                                                   for pid in children):
            time.sleep(0.1)
        alive = [pid for pid in children if os.path.exists(f"/proc/{pid}")
                 and " Z " not in open(f"/proc/{pid}/stat").read()]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive, "benchmark processes outlived their parent"
    finally:
        parent.kill()
        from dataflow_redis import ControlPlane
        from dataflow_redis.bench import _NAMESPACE
        ControlPlane.from_url(redis_url, run_id, namespace=_NAMESPACE).delete()
