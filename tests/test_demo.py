"""The demo: a real pipeline of OS processes on Redis, with backpressure engaging.

Sizes are small (a few hundred prompts, short sleeps) so each run takes seconds; the
checks read the run back from Redis themselves instead of trusting the summary.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

import dataflow_redis
from conftest import cli_runner
from dataflow_redis import ControlPlane, idset
from dataflow_redis.cli import EXIT_BAD_VALUE, main
from dataflow_redis.demo import BYTES_PER_TOKEN, sample_id_of
from dataflow_redis.simstore import SimulatedFeatureStore

CLEAN_ENV = {"DATAFLOW_REDIS_URL": None, "DATAFLOW_RUN": None, "DATAFLOW_NAMESPACE": None}
# Tight watermarks (a sample is 3-7 KiB, estimated at 4 KiB) and trainers slower than
# rollout, so the latch must pause and resume within a few hundred prompts.
SMALL = ["--prompts", "240", "--workers", "3", "--trainers", "1", "--high-watermark", str(24 * 1024),
         "--low-watermark", str(12 * 1024), "--store-cap", str(64 * 1024), "--rollout-ms", "4",
         "--train-step-ms", "40", "--train-batch", "8"]


def demo_keys_cleanup(client, cp):
    SimulatedFeatureStore(cp, "sim-0", report=False).delete()
    client.delete(f"dfr-demo:{{{cp.run_id}}}:plan", f"dfr-demo:{{{cp.run_id}}}:step")


@pytest.fixture
def demo_run(redis_url):
    """A run id on the session Redis; every key the demo made is removed afterwards."""
    cp = ControlPlane.from_url(redis_url, f"demo-test-{uuid.uuid4().hex[:8]}")
    yield cp
    demo_keys_cleanup(cp.redis, cp)
    cp.delete()
    cp.redis.close()


def test_demo_json_on_external_redis_loses_nothing_and_engages_backpressure(redis_url, demo_run, tmp_path):
    # Started as the dataflow-redis script is (not with -m), from a folder that holds
    # another "dataflow_redis": the role processes must import the parent's copy.
    launcher, decoy = tmp_path / "bin" / "launch.py", tmp_path / "work" / "dataflow_redis" / "__init__.py"
    launcher.parent.mkdir()
    launcher.write_text("from dataflow_redis.cli import main\nmain(prog_name='dataflow-redis')\n")
    decoy.parent.mkdir(parents=True)
    decoy.write_text("raise ImportError('the decoy package in the working directory was imported')\n")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(dataflow_redis.__file__)))
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(launcher), "--redis-url", redis_url, "--run", demo_run.run_id,
         "demo", "--json", *SMALL], capture_output=True, text=True, env=env, timeout=240, cwd=decoy.parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, "stdout must hold the summary JSON and nothing else"
    summary = json.loads(lines[0])
    assert summary["ok"] is True and summary["tasks_lost"] == 0 and summary["samples_acked"] == 240

    # Read the run back from Redis: every task's sample is in the acked set, nothing is
    # left queued, leased or resident, and the summary's figures are the run's own.
    cp = demo_run
    status = cp.status()
    bp = status["backpressure"]
    assert (status["prompts"], status["samples_acked"], status["prompts_pending"], status["prompts_leased"],
            status["queue_depth"], status["queue_in_flight"], status["prompts_failed"]) == (240, 240, 0, 0, 0, 0, 0)
    acked = idset.contains(cp.redis, cp.keys.acked, [sample_id_of(f"task-{i:06d}") for i in range(240)])
    assert all(acked)
    assert SimulatedFeatureStore(cp, "sim-0", report=False).state().resident_bytes == 0
    assert bp["resident_bytes"] == 0 and bp["reserved_bytes"] == 0
    for name in ("pause_transitions", "resume_transitions", "rollout_starved", "peak_resident_bytes"):
        assert summary[name] == bp[name], name

    # Backpressure engaged: the latch paused and resumed, and every crossing is in the log.
    assert summary["pause_transitions"] >= 1 and summary["resume_transitions"] >= 1
    kinds = [e["type"] for e in cp.events(10_000)]
    assert kinds.count("pause") == bp["pause_transitions"]
    assert kinds.count("resume") == bp["resume_transitions"]
    # The store's hard cap held; overshoot past high stays within the in-flight work
    # (3 workers x cap 4 tasks x 7 KiB largest sample).
    assert summary["store_peak_bytes"] <= 64 * 1024
    assert summary["peak_over_high_bytes"] <= 3 * 4 * 14 * BYTES_PER_TOKEN
    assert 0 < summary["peak_reserved_bytes"] <= 24 * 1024 + 4 * 1024
    # Progress went to stderr.
    assert "acked" in proc.stderr and "latch" in proc.stderr


def test_demo_on_a_private_redis_with_plot(tmp_path):
    plot = tmp_path / "demo.png"
    result = cli_runner(env=CLEAN_ENV).invoke(main, ["demo", "--plot", str(plot), *SMALL])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "tasks lost      0 of 240" in out and "OK: every ingested task was acked" in out
    assert re.search(r"latch +\d+ pauses, \d+ resumes", out)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    # The private server is gone once the demo returns.
    port = int(re.search(r"private redis-server on 127\.0\.0\.1:(\d+)", out).group(1))
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, socket_connect_timeout=1).ping()


def test_demo_roles_as_separate_commands_like_docker_compose(redis_url, demo_run):
    """setup, then store, trainer and rollout roles, each its own `dataflow-redis demo
    --role` process, as the compose services run them."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.update(DATAFLOW_REDIS_URL=redis_url, DATAFLOW_RUN=demo_run.run_id)
    cli = [sys.executable, "-m", "dataflow_redis.cli", "demo"]
    setup = subprocess.run(cli + ["--role", "setup", *SMALL], capture_output=True, text=True, env=env, timeout=60)
    assert setup.returncode == 0, setup.stderr
    assert f"run {demo_run.run_id} set up with 240 prompts" in setup.stdout
    again = subprocess.run(cli + ["--role", "setup"], capture_output=True, text=True, env=env, timeout=60)
    assert "already set up" in again.stdout and demo_run.status()["prompts"] == 240

    roles = [["--role", "store"], ["--role", "trainer", "--index", "0"], ["--role", "rollout", "--index", "0"],
             ["--role", "rollout"]]
    procs = [subprocess.Popen(cli + r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in roles]
    try:
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "finished on run" in out
    status = demo_run.status()
    assert (status["samples_acked"], status["train_backlog"], status["prompts_pending"]) == (240, 0, 0)
    workers = set(demo_run.redis.zrange(demo_run.keys.workers, 0, -1))
    assert "rollout-0" in workers and len(workers) == 2  # the second id came from host name and pid


def test_demo_refuses_an_existing_run_and_bad_sizes(redis_url, demo_run):
    demo_run.configure(max_prompt_attempts=2)
    runner = cli_runner(env=CLEAN_ENV)
    result = runner.invoke(main, ["--redis-url", redis_url, "--run", demo_run.run_id, "demo", "--prompts", "5"])
    assert result.exit_code == EXIT_BAD_VALUE and "already exists" in result.stderr
    result = runner.invoke(main, ["demo", "--high-watermark", "1000", "--low-watermark", "2000"])
    assert result.exit_code == EXIT_BAD_VALUE
    assert result.stderr.strip().count("\n") == 0
    assert "low watermark 2000 must not exceed the high watermark 1000" in result.stderr
    result = runner.invoke(main, ["demo", "--role", "rollout"])
    assert result.exit_code == EXIT_BAD_VALUE and "--role needs --redis-url" in result.stderr
    result = runner.invoke(main, ["demo", "--plot", "/no/such/folder/demo.png"])
    assert result.exit_code == EXIT_BAD_VALUE and "--plot: cannot write into '/no/such/folder'" in result.stderr
    # Refused before the run, not after it (the run would take its whole time first).
    result = runner.invoke(main, ["demo", "--plot", "/tmp/demo.jpgx"])
    assert result.exit_code == EXIT_BAD_VALUE and "--plot: cannot write a 'jpgx' image" in result.stderr
    assert ".png" in result.stderr and "demo:" not in result.stderr  # the run never started



# ------------------------------------------------------------- stopping the demo
def _start_demo(tmp_path):
    """``dataflow-redis demo`` on its private server, long enough to be stopped midway;
    its temporary files go under ``tmp_path``. Returns the process once every role and
    the server run, and the pids of all its descendants."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "from dataflow_redis.cli import main; main()", "demo",
                             "--prompts", "100000", "--rollout-ms", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        family = _descendants(proc.pid)
        if sum("dataflow_redis.demo" in args for args in family.values()) == 7 and \
                any("redis-server" in args for args in family.values()):
            return proc, family
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the demo did not start its roles: {proc.communicate()}")


def _descendants(pid):
    """{pid: command line} of every live descendant of ``pid``."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    children, found, todo = {}, {}, [pid]
    for row in rows:
        children.setdefault(int(row[1]), []).append((int(row[0]), row[2] if len(row) > 2 else ""))
    while todo:
        for child, args in children.get(todo.pop(), []):
            found[child] = args
            todo.append(child)
    return found


def _gone(pids, within_s=15.0):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and
                 not open(f"/proc/{p}/stat").read().split(") ")[1].startswith("Z")]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_stopped_demo_stops_its_processes_and_server_and_removes_its_files(tmp_path, sig, code):
    """kill, timeout, a cancelled job (SIGTERM) or Ctrl-C (SIGINT, to the parent alone
    here): the roles and the private server end, the server's directory is removed."""
    proc, family = _start_demo(tmp_path)
    assert list(tmp_path.glob("dataflow-redis-*")), "the private server keeps its files under TMPDIR"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert _gone(family), f"left running: {_descendants(proc.pid) or family}"
    assert not list(tmp_path.glob("dataflow-redis-*"))


def test_a_demo_killed_outright_takes_its_processes_and_server_with_it(tmp_path):
    """SIGKILL leaves no chance to clean up files, but the roles and the private server
    end with their parent instead of running on unowned."""
    proc, family = _start_demo(tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert _gone(family), f"left running: {family}"


def test_a_demo_whose_private_server_dies_says_so_at_once(tmp_path):
    proc, family = _start_demo(tmp_path)
    [server] = [pid for pid, args in family.items() if "redis-server" in args]
    os.kill(server, signal.SIGKILL)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - started < 10, "the parent waited out a long retry"
    assert proc.returncode == 1 and "Traceback" not in stderr
    assert "the demo's private redis-server exited (code -9) during the run" in stderr, stderr
    assert "localhost:6379" not in stderr
    assert _gone(family)
