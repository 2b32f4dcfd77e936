"""Server instructions per operation, counted by callgrind (repeatable on a noisy machine).

    python tools/instructions.py            # needs valgrind and redis-server on PATH

Starts ``redis-server`` under ``valgrind --tool=callgrind`` on a free port, then counts
the instructions the server executes (event loop, parsing, the script and its
commands) for:

* each single-item operation of ``dataflow-redis bench`` (backpressure configured,
  as there), per call, next to a no-op EVALSHA and the floors of a lease and a commit;
* each step of the batched cycle (64 items per call), per task, with the lease keys
  emptied between batches as a single worker leaves them;
* single commands and Lua operations inside a script (keys passed, a read, a write,
  TIME, creating a key with an expiry, number-to-text, SHA1).

Timings on a shared 2-core VM move by 20 % between runs; instruction counts move by
well under 1 %, so they show what a change to a script does. docs/benchmarks.md quotes
them.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataflow_redis import BackpressureConfig  # noqa: E402
from dataflow_redis.bench import PAYLOAD, _Client, make_ref  # noqa: E402
from dataflow_redis.embedded import free_port  # noqa: E402

SINGLE = ("noop", "floor_lease_1", "floor_commit_1", "ingest", "lease_1", "commit", "train_lease", "ack",
          "capacity_report", "status")
CALLS = 200
BATCH, BATCHES = 64, 10


class Callgrind:
    """A redis-server under callgrind; ``count(fn)`` = instructions the server runs during fn()."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="dfr-callgrind-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.dir}/out.%p",
             "redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        client.close()

    def _control(self, flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], capture_output=True, check=False)

    def count(self, fn) -> int:
        self._control("-z")
        fn()
        self._control("-d")
        newest = max(glob.glob(f"{self.dir}/out.*"), key=os.path.getmtime)
        with open(newest) as dump:
            for line in dump:
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
        raise RuntimeError(f"no totals in {newest}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def new_client(url: str, label: str) -> _Client:
    client = _Client(url, f"instr-{label}-{time.time_ns()}", 0)
    client.cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=1 << 50, low_watermark_bytes=1 << 49))
    return client


def single_items(cg: Callgrind) -> None:
    client = new_client(cg.url, "single")
    client.prefill(CALLS + 100)
    noop = None
    print(f"single-item operations, instructions per call ({CALLS} calls each)")
    for op in SINGLE:
        step = client.step(op)
        if op == "commit":
            client.budget("commit", 0)
        for _ in range(5):
            step()
        per_call = cg.count(lambda: [step() for _ in range(CALLS)]) / CALLS
        noop = noop or per_call
        print(f"  {op:16}{per_call:10,.0f}{'' if op == 'noop' else f'{per_call - noop:12,.0f} over the no-op'}")


def batched_cycle(cg: Callgrind) -> None:
    client = new_client(cg.url, "batched")
    cp, worker, trainer, run_id = client.cp, client.worker, client.trainer, client.run_id
    tasks = lambda: [{"payload": PAYLOAD} for _ in range(BATCH)]  # noqa: E731
    for _ in range(3):  # warm up every script and key
        cp.ingest_prompts(tasks())
        worker.commit([make_ref(run_id, t.task_id) for t in worker.lease(BATCH)])
        trainer.ack([r.sample_id for r in trainer.lease(BATCH)], optimizer_durable=True)
    per_task = {}
    n = BATCH * BATCHES
    per_task["ingest"] = cg.count(lambda: [cp.ingest_prompts(tasks()) for _ in range(BATCHES)]) / n
    leased: list = []
    per_task["lease"] = cg.count(lambda: leased.extend(worker.lease(BATCH) for _ in range(BATCHES))) / n
    refs = [[make_ref(run_id, t.task_id) for t in batch] for batch in leased]
    per_task["commit"] = cg.count(lambda: [worker.commit(r) for r in refs]) / n
    train: list = []
    per_task["train_lease"] = cg.count(lambda: train.extend(trainer.lease(BATCH) for _ in range(BATCHES))) / n
    per_task["ack"] = cg.count(
        lambda: [trainer.ack([r.sample_id for r in b], optimizer_durable=True) for b in train]) / n
    print(f"batched cycle, instructions per task ({BATCHES} calls of {BATCH} per step)")
    for step, value in per_task.items():
        print(f"  {step:16}{value:10,.0f}")
    print(f"  {'total':16}{sum(per_task.values()):10,.0f}")


SNIPPETS = (
    # (what, script body, keys): each runs CALLS times; the figure is over "return 1".
    ("16 keys passed (12 more)", "return 1", 16),
    ("HGET", "redis.call('HGET', KEYS[1], 'f') return 1", 0),
    ("HSET of an existing field", "redis.call('HSET', KEYS[1], 'f', 'v') return 1", 0),
    ("HINCRBY", "redis.call('HINCRBY', KEYS[2], 'f', 1) return 1", 0),
    ("TIME", "redis.call('TIME') return 1", 0),
    ("SET ... PX of a new key", "redis.call('SET', KEYS[3] .. redis.call('INCR', KEYS[4]), 'x', 'PX', '30000') "
     "return 1", 0),
    ("  (its INCR alone)", "redis.call('INCR', KEYS[4]) return 1", 0),
    ("a number turned into text", "local x = 1234567890123 .. '' return 1", 0),
    ("string.format('%d')", "local x = string.format('%d', 123456789) return 1", 0),
    ("redis.sha1hex of 18 bytes", "local x = redis.sha1hex('abcdefghijklmnop:0') return 1", 0),
)


def snippets(cg: Callgrind) -> None:
    import redis
    client = redis.Redis.from_url(cg.url)
    keys = [f"instr:{{snip}}:k{i}" for i in range(16)]
    client.hset(keys[0], "f", "v")

    def per_call(body: str, nkeys: int) -> float:
        sha = client.script_load(body)
        names = keys if nkeys else keys[:4]
        client.evalsha(sha, len(names), *names)
        return cg.count(lambda: [client.evalsha(sha, len(names), *names) for _ in range(CALLS)]) / CALLS

    base = per_call("return 1", 0)
    print(f"inside a script, instructions each (EVALSHA with 4 keys and 'return 1': {base:,.0f})")
    for what, body, nkeys in SNIPPETS:
        print(f"  {what:28}{per_call(body, nkeys) - base:10,.0f}")
    client.delete(*keys)
    client.close()


def main() -> None:
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found on PATH (apt-get install -y valgrind redis-server)")
    cg = Callgrind()
    try:
        single_items(cg)
        batched_cycle(cg)
        snippets(cg)
    finally:
        cg.stop()


if __name__ == "__main__":
    main()
