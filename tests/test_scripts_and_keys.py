"""Layout, packaging, key schema and script loading (issue points 1, 2 and 3).

* every lua/*.lua states KEYS, ARGV and Returns in its header, and the keys the loader
  parses from that header are the schema's keys and cover every key the script uses;
* the wheel ships the scripts: installed into a fresh virtualenv and run from another
  directory, the package works against a real Redis;
* every key a run creates carries the run's hash tag, is named in keys.KEY_NAMES and
  hashes to one cluster slot; bad run ids fail with a clear InvalidArgument;
* calls go through EVALSHA and recover by themselves after SCRIPT FLUSH and after the
  server restarts empty.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from conftest import make_ref
from dataflow_redis import (
    BackpressureConfig, ConnectionFailed, ControlPlane, InvalidArgument,
)
from dataflow_redis.embedded import RedisServer
from dataflow_redis.keys import KEY_NAMES, RunKeys
from dataflow_redis.scripts import load_scripts, lua_dir, parse_key_names

REPO = Path(__file__).resolve().parents[1]
LUA = REPO / "lua"


def header_of(path: Path) -> str:
    """The leading comment block of a Lua file (the script's contract)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------- layout

def test_every_script_header_states_keys_argv_and_returns():
    scripts = sorted(LUA.glob("*.lua"))
    assert len(scripts) >= 10, "lua/ should hold one script per operation"
    for path in scripts:
        header = header_of(path)
        for field in ("-- KEYS:", "-- ARGV:", "-- Returns:"):
            assert re.search("^" + re.escape(field), header, re.M), f"{path.name}: header lacks {field!r}"
        assert header.startswith(f"-- {path.name}:"), f"{path.name}: header should open with the script's name"


def test_loader_keys_are_schema_keys():
    scripts = load_scripts()
    assert set(scripts) == {p.stem for p in LUA.glob("*.lua")}
    for script in scripts.values():
        assert script.key_names, script.name
        for name in script.key_names:
            assert name == "reply" or name in KEY_NAMES, f"{script.name}: key {name} not in keys.KEY_NAMES"
        assert len(set(script.key_names)) == len(script.key_names), f"{script.name}: a key is declared twice"
        assert "-- @include" not in script.source, f"{script.name}: an include was not inlined"


def test_design_doc_lists_each_scripts_keys_as_its_header_declares():
    """docs/design.md's table of scripts and the keys they touch cannot fall behind."""
    doc = (LUA.parent / "docs" / "design.md").read_text()
    rows = dict(re.findall(r"^\| `lua/(\w+)\.lua` \| (.*) \|$", doc, re.M))
    scripts = load_scripts()
    assert set(rows) == set(scripts)
    for name, script in scripts.items():
        assert re.findall(r"`(\w+)`", rows[name]) == list(script.key_names), name


def test_loader_rejects_an_unknown_key_in_a_header():
    with pytest.raises(ValueError, match="bogus"):
        parse_key_names("-- x.lua: test\n--\n-- KEYS: config bogus\n-- ARGV: none\n", "x")
    with pytest.raises(ValueError):
        parse_key_names("-- x.lua: no keys line\n", "x")


def _include_functions() -> dict[str, str]:
    functions = {}
    for path in (lua_dir() / "includes").glob("*.lua"):
        parts = re.split(r"^local function (\w+)\(", path.read_text(), flags=re.M)
        functions.update(zip(parts[1::2], parts[2::2]))
    return functions


def test_every_key_a_script_uses_is_declared_in_its_header():
    """A K.<name> the header does not declare would be nil at run time: catch it statically,
    following the include helpers each script calls."""
    functions = _include_functions()

    def keys_used(body: str, seen: set) -> set:
        used = set(re.findall(r"\bK\.(\w+)", body))
        for name, fbody in functions.items():
            if name not in seen and re.search(r"\b%s\(" % name, body):
                seen.add(name)
                used |= keys_used(fbody, seen)
        return used

    for name, script in load_scripts().items():
        used = keys_used((lua_dir() / f"{name}.lua").read_text(), set())
        missing = used - set(script.key_names)
        assert not missing, f"{name}.lua uses undeclared keys {sorted(missing)}"


# -------------------------------------------------------------- packaging

_WHEEL_SMOKE = r"""
import json, sys
import dataflow_redis
from dataflow_redis import ControlPlane, FeatureSpec, SampleRef
from dataflow_redis.scripts import lua_dir
url, run_id = sys.argv[1], sys.argv[2]
cp = ControlPlane.from_url(url, run_id=run_id)
ids = cp.ingest_prompts([{"task_id": "t0", "payload": {"text": "hello"}}])
w = cp.rollout_worker()
tasks = w.lease(1)
ref = SampleRef(sample_id="s0", run_id=run_id, source_task_id=tasks[0].task_id,
                feature_store_uri="mem://x", feature_keys=("s0/h",),
                feature_specs=(FeatureSpec("h", (2, 2), "bfloat16"),), strategy="eagle3")
committed = w.commit([ref])
t = cp.trainer()
leased = [r.sample_id for r in t.lease(1)]
acked = t.ack(leased, global_step=1, optimizer_durable=True)
status = cp.status()
cp.delete()
print(json.dumps({"module": dataflow_redis.__file__, "lua": str(lua_dir()), "ids": ids,
                  "committed": committed, "acked": acked, "status": status}))
"""

# Signs that the wheel could not be built because the build backend could not be
# fetched (no registry reachable): the only reason this test may skip.
_NO_BUILD_BACKEND = ("Could not find a version that satisfies", "No matching distribution",
                     "Failed to establish a new connection", "Temporary failure in name resolution",
                     "Network is unreachable")


def test_wheel_ships_scripts_and_works_from_another_directory(tmp_path, redis_url):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
         "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=240,
    )
    if build.returncode != 0:
        output = build.stdout + build.stderr
        if any(sign in output for sign in _NO_BUILD_BACKEND):
            pytest.skip(f"cannot build a wheel here (build backend unavailable): {output[-500:]}")
        pytest.fail(f"pip wheel failed:\n{output[-3000:]}")
    (wheel,) = wheels.glob("dataflow_redis-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for script in LUA.glob("*.lua"):
        assert f"dataflow_redis/lua/{script.name}" in names, f"wheel lacks {script.name}"
    for include in (LUA / "includes").glob("*.lua"):
        assert f"dataflow_redis/lua/includes/{include.name}" in names, f"wheel lacks includes/{include.name}"

    venv = tmp_path / "venv"
    # A fresh, isolated virtualenv: it cannot see this interpreter's (editable) install,
    # so the package can only come from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    venv_python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv_python), "install", "-q",
         "--disable-pip-version-check", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=120)
    if install.returncode != 0 and "no such option" in install.stderr:  # pip < 22.3
        subprocess.run([str(venv_python), "-m", "ensurepip", "-q"], check=True, timeout=300)
        install = subprocess.run([str(venv_python), "-m", "pip", "install", "-q", "--no-deps",
                                  "--no-index", str(wheel)], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr[-3000:]
    # The runtime dependencies (redis, click, hiredis) come from this interpreter's site
    # directories, listed after the venv's own site-packages, so they never shadow the wheel.
    site_packages = Path(subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    dependency_dirs = set()
    for module in ("redis", "click", "hiredis"):
        try:
            found = __import__(module).__file__
        except ImportError:
            continue
        dependency_dirs.add(str(Path(found).resolve().parent.parent))
    (site_packages / "zz_test_dependencies.pth").write_text("\n".join(sorted(dependency_dirs)) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run([str(venv_python), "-c", _WHEEL_SMOKE, redis_url, "wheel-smoke"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["module"].startswith(str(venv)), f"imported {result['module']}, not the wheel"
    assert result["lua"].startswith(str(venv)), f"scripts read from {result['lua']}, not the wheel"
    assert result["ids"] == ["t0"] and result["committed"] == ["s0"] and result["acked"] == ["s0"]
    assert result["status"]["checkpoint_global_step"] == 1
    assert result["status"]["train_backlog"] == 0


# ------------------------------------------------------------- key schema

def _touch_every_part_of_a_run(cp):
    """A lifecycle that writes as many kinds of state as the API can reach."""
    cp.configure(max_prompt_attempts=2, max_record_bytes=100_000)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=10_000, low_watermark_bytes=5_000,
                                                 max_inflight_prompts_per_worker=8, max_train_lease=8,
                                                 default_task_bytes=10, stale_after_s=0.001))
    cp.capacity_reporter("shard-a").report(100, max_resident_bytes=20_000, avg_age_s=1.0, oldest_age_s=2.0)
    cp.ingest_prompts([{"task_id": f"t{i}", "payload": "p", "estimated_bytes": 7} for i in range(9)])
    w = cp.rollout_worker(lease_s=30)
    tasks = w.lease(6)
    assert len(tasks) == 6
    w.fail(["t4"], "retry me", retryable=True)
    w.fail(["t5"], "broken", retryable=False)
    w.commit([make_ref(cp, f"s{i}", f"t{i}") for i in range(4)])
    cp.enqueue_offline_refs([make_ref(cp, "offline-0")])
    t = cp.trainer(lease_s=30)
    refs = t.lease(5)
    assert len(refs) == 5  # offline-0 stays leased
    t.ack(["s0"], global_step=1, optimizer_durable=False)
    t.ack(["s1"], global_step=2, optimizer_durable=True)
    t.ack(["s2"], global_step=3)
    t.fail(["s3"], "corrupt", retryable=False)
    t.lease(1, timeout_s=0.01)  # empty: starvation bookkeeping
    cp.pause("maintenance")
    cp.resume("done")
    time.sleep(0.01)
    w.lease(1)  # marks the silent shard stale
    cp.reclaim_expired()


def test_every_key_of_a_run_carries_its_hash_tag_and_is_in_the_schema(make_cp):
    cp = make_cp(run_id="schema-run.1:a_b-c")
    _touch_every_part_of_a_run(cp)
    prefix = f"dfr:{{{cp.run_id}}}:"
    mentioning_run = [k for k in cp.redis.scan_iter(match="*", count=1000) if cp.run_id in k]
    assert mentioning_run
    names = set()
    for key in mentioning_run:
        assert key.startswith(prefix), f"key {key!r} lacks the run's hash tag prefix"
        name = key[len(prefix):]
        assert name in KEY_NAMES or name.startswith("reply:"), f"key {key!r} is not in keys.KEY_NAMES"
        names.add(name if name in KEY_NAMES else "reply:*")
    # The lifecycle above really reached most of the schema (so the check means something).
    expected = {"config", "counters", "tasks", "task_bytes", "task_attempts", "pending", "prompt_leases",
                "prompt_deadlines", "worker_inflight", "workers", "tasks_done", "dlq", "samples",
                "train_leases", "train_deadlines", "trainers", "acked", "undurable",
                "failed_samples", "durable", "ack_log", "bp", "shards", "stale_shards", "events", "reply:*"}
    assert expected <= names, f"not reached: {sorted(expected - names)}"
    slots = {key_slot(k.encode()) for k in mentioning_run}
    assert len(slots) == 1, f"keys of one run hash to several slots: {slots}"
    assert slots == {key_slot(cp.run_id.encode())}, "the slot must be the one of the run id (the hash tag)"


def test_run_keys_object_names_every_schema_key_under_the_tag():
    keys = RunKeys("r1")
    assert len(set(keys.all_fixed())) == len(KEY_NAMES)
    for name in KEY_NAMES:
        assert getattr(keys, name) == f"dfr:{{r1}}:{name}"
    assert keys.reply("abc") == "dfr:{r1}:reply:abc"
    assert {key_slot(k.encode()) for k in keys.all_fixed() + [keys.reply("x")]} == {key_slot(b"r1")}


@pytest.mark.parametrize("bad", ["", "x" * 129, "a{b", "a}b", "{run}", "a b", "a\nb", "tab\there",
                                 "a*b", "a/b", "é", None, 7, b"bytes", ["r"]])
def test_bad_run_ids_raise_a_clear_invalid_argument(redis_url, bad):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(InvalidArgument, match="run id"):
            ControlPlane(client, run_id=bad)
        with pytest.raises(InvalidArgument, match="run id"):
            ControlPlane.from_url(redis_url, run_id=bad)
    finally:
        client.close()


@pytest.mark.parametrize("good", ["r", "x" * 128, "run-1", "a.b_c:d-e", "RUN.2024-01-01:7"])
def test_good_run_ids_are_accepted(make_cp, good):
    cp = make_cp(run_id=good)
    assert cp.ingest_prompts([{"task_id": "t"}]) == ["t"]
    assert cp.status()["run_id"] == good


def test_bad_namespace_is_refused(redis_url):
    with pytest.raises(InvalidArgument, match="namespace"):
        ControlPlane.from_url(redis_url, run_id="r", namespace="a{b}")


# --------------------------------------------------------- EVALSHA, recovery

def _commandstats(client) -> dict[str, int]:
    return {name[len("cmdstat_"):]: stats["calls"] for name, stats in client.info("commandstats").items()}


def _lifecycle_step(cp, n: int) -> None:
    cp.ingest_prompts([{"task_id": f"task-{n}"}])
    w = cp.rollout_worker()
    (task,) = w.lease(1)
    assert w.commit([make_ref(cp, f"sample-{n}", task.task_id)]) == [f"sample-{n}"]
    t = cp.trainer()
    assert [r.sample_id for r in t.lease(1)] == [f"sample-{n}"]
    assert t.ack([f"sample-{n}"], global_step=n) == [f"sample-{n}"]


def test_calls_use_evalsha_and_load_each_script_once():
    with RedisServer() as server:
        cp = ControlPlane.from_url(server.url, run_id="evalsha")
        _lifecycle_step(cp, 1)
        cp.status()
        before = _commandstats(cp.redis)
        for n in range(2, 6):
            _lifecycle_step(cp, n)
            cp.status()
        after = _commandstats(cp.redis)
        # A script's first call on a server that never saw it is one EVAL (after the
        # NOSCRIPT); warm scripts go by EVALSHA alone and are never loaded again.
        assert 0 < before.get("eval", 0) == after.get("eval", 0), "warm scripts must be called by EVALSHA"
        assert after.get("script", 0) == before.get("script", 0), "warm scripts must not be loaded again"
        assert after["evalsha"] - before["evalsha"] == 4 * 6
        cp.redis.close()


def test_calls_recover_by_themselves_after_script_flush(cp):
    _lifecycle_step(cp, 1)
    cp.redis.script_flush()
    assert not any(cp.redis.script_exists(*[s.sha for s in cp._run._scripts.values()]))
    _lifecycle_step(cp, 2)
    assert cp.status()["samples_acked"] == 2


def test_a_forgotten_script_is_sent_once_with_the_call_not_loaded_everywhere(cp, monkeypatch):
    """NOSCRIPT: the call goes again as EVAL with the source, which runs it and caches
    the script on the node that serves the run's keys (SCRIPT LOAD on a cluster client
    goes to every primary and fails while any is down). The next call is EVALSHA."""
    def no_load(source):
        raise AssertionError("SCRIPT LOAD was sent")

    monkeypatch.setattr(cp.redis, "script_load", no_load)
    cp.redis.script_flush()
    sent = []
    real = cp.redis.execute_command
    monkeypatch.setattr(cp.redis, "execute_command", lambda *a, **k: sent.append(a[0]) or real(*a, **k))
    assert cp.status()["prompts"] == 0
    assert cp.status()["prompts"] == 0
    assert sent == ["EVALSHA", "EVAL", "EVALSHA"]


def test_calls_recover_after_the_server_restarts_empty():
    """A restart without persistence (or a failover to a replica that never saw the
    scripts): the next call reconnects and reloads its script without user action."""
    server = RedisServer().start()
    try:
        cp = ControlPlane.from_url(server.url, run_id="restart", retry_s=20.0)
        _lifecycle_step(cp, 1)
        server.kill()
        server.start()
        assert cp.status()["prompts"] == 0  # the new server is empty, and the call works
        _lifecycle_step(cp, 2)
        assert cp.status()["samples_acked"] == 1

        # A call made while the server is down waits (bounded retry) and succeeds once
        # the server is back: no operator action in between.
        server.kill()
        restarter = threading.Timer(0.5, server.start)
        restarter.start()
        try:
            assert cp.ingest_prompts([{"task_id": "after-outage"}]) == ["after-outage"]
        finally:
            restarter.join()
        assert cp.status()["prompts_pending"] == 1
        cp.redis.close()
    finally:
        server.stop()


def test_unreachable_redis_gives_up_with_a_clear_error():
    server = RedisServer().start()
    try:
        cp = ControlPlane.from_url(server.url, run_id="gone", retry_s=0.3, socket_connect_timeout=0.2)
        cp.status()
        server.kill()
        started = time.monotonic()
        with pytest.raises(ConnectionFailed, match="unreachable"):
            cp.status()
        assert time.monotonic() - started < 15, "bounded retry must give up"
        cp.redis.close()
    finally:
        server.stop()


def test_scripts_carry_only_the_helpers_they_use():
    from dataflow_redis.scripts import shake_includes
    includes = ["local A = 1\nlocal function f()\n  return A\nend\n-- g is next\nlocal function g()\n  return 2\nend\n",
                "local function h()\n  return f()\nend\nlocal x, y = 1, 2\n"]
    kept = shake_includes(includes, "return h() -- not g\n")
    assert "local function h()" in kept and "local function f()" in kept and "local A = 1" in kept
    assert "local function g()" not in kept and "local x, y" not in kept
    assert kept.index("local A") < kept.index("local function f") < kept.index("local function h")
    scripts = load_scripts()
    # status needs no lease helpers; the prompt lease needs the latch and the grant.
    assert "local function grant_leases" not in scripts["status"].source
    assert "local function grant_leases" in scripts["lease_prompts"].source
    assert "local function evaluate_latch" in scripts["lease_prompts"].source
    assert "local function idset_split" not in scripts["lease_prompts"].source


def test_keys_are_bound_by_position_without_a_table_per_call():
    from dataflow_redis.scripts import bind_keys
    code = "redis.call('GET', K.config)\nlocal x = obj.K.config .. MK.pending\nreturn K.pending"
    assert bind_keys(code, ["pending", "config"]) == (
        "redis.call('GET', KEYS[2])\nlocal x = obj.K.config .. MK.pending\nreturn KEYS[1]")
    # An undeclared name stays and reads nil from an empty K, as before.
    assert bind_keys("return K.dlq", ["pending"]) == "local K = {}\nreturn K.dlq"
    for script in load_scripts().values():
        assert "local K = {" not in script.source and re.search(r"\bKEYS\[\d+\]", script.source)


def test_a_large_grant_leaves_no_placeholder_and_hash_table_encodings(cp):
    # Ids that look like the placeholders are ordinary ids.
    cp.ingest_prompts([{"task_id": "~"}, {"task_id": "~" * 129}] + [{"task_id": f"t{i}"} for i in range(38)])
    worker = cp.rollout_worker("w-enc")
    granted = worker.lease(32)
    assert len(granted) == 32 and {"~", "~" * 129} <= {t.task_id for t in granted}
    r, k = cp.redis, cp.keys
    assert r.object("encoding", k.prompt_leases) == "hashtable"
    assert r.object("encoding", k.prompt_deadlines) == "skiplist"
    assert r.hlen(k.prompt_leases) == 32 and r.zcard(k.prompt_deadlines) == 32
    assert r.hexists(k.prompt_leases, "~") and r.zscore(k.prompt_deadlines, "~" * 129) is not None
    assert not r.hexists(k.prompt_leases, " ")
    assert all(" " not in m for m in r.zrange(k.prompt_deadlines, 0, -1))
    assert len(worker.lease(4)) == 4  # small grants take the plain path
    assert r.hlen(k.prompt_leases) == 36 and r.zcard(k.prompt_deadlines) == 36
