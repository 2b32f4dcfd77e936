"""ControlPlane: the handle on one run's state in Redis, and the factory of its clients.

| method                     | script                      |
|----------------------------|-----------------------------|
| configure / configure_backpressure | lua/configure.lua   |
| ingest_prompts             | lua/ingest_prompts.lua      |
| enqueue_offline_refs       | lua/commit_samples.lua      |
| reclaim_expired            | lua/reclaim_expired.lua     |
| requeue_undurable          | lua/requeue_undurable.lua   |
| requeue_dead_letters       | lua/requeue_dead_letter.lua |
| pause / resume             | lua/set_operator_pause.lua  |
| status                     | lua/status.lua              |
| rollout_worker()           | dataflow_redis/rollout.py   |
| trainer()                  | dataflow_redis/trainer.py   |
| capacity_reporter()        | dataflow_redis/capacity.py  |

Read-only inspection (events, leases, dead letters) uses plain reads: nothing to keep
atomic there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any, Iterable, Optional
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from . import _args
from .capacity import CapacityReporter
from .config import DEFAULT_MAX_RECORD_BYTES, BackpressureConfig, RunSettings, from_redis, to_redis_pairs
from .errors import (AuthenticationFailed, ConfigError, ConnectionFailed, InvalidArgument, RecordTooLarge,
                     steps_so_far)
from .keys import DEFAULT_NAMESPACE, RUN_MARKERS, RunKeys
from .records import PromptTask, SampleRef, check_refs, encode_ref, encode_task, task_from_input
from .rollout import RolloutWorker
from .scripts import ScriptRunner, auth_failed, retried_read
from .status import build_status
from .trainer import Trainer

ACTIVE_WINDOW_S = 300.0
"""status() counts a rollout worker or trainer as active if it called within this many seconds."""

SOCKET_TIMEOUT_S = 5.0
"""Socket timeout of the clients connect() makes, seconds (redis-py 8's default, set
so that every redis-py behaves alike): a reply that takes longer counts as a lost
connection, and the call is retried. Trainers wait in BLPOP slices of 80 % of it, so
a wait never outlives it."""

INGEST_CHUNK = 1000
"""Tasks per ingest script call: keeps each atomic step short (ingest is idempotent per id)."""


def connect(url: str, **kwargs: Any) -> Any:
    """A Redis client for ``url`` (redis://, rediss://, unix://; user and password in the
    URL), decoding replies. redis-py itself does not retry: the control plane's bounded
    retry (:class:`~dataflow_redis.scripts.Retry`) covers every call it makes, and a
    redis-py retry under it would let one try wait two socket timeouts.

    ``?cluster=true`` in the URL of any node of a Redis Cluster gives a ``RedisCluster``
    client, which reaches runs on every node (it reads the cluster's layout at once, so
    this form connects here; a plain client connects at its first call)."""
    # No health check either: its PING is refused while Redis cannot persist (MISCONF),
    # which would fail reads that work, and a dead pooled connection costs one immediate
    # retry anyway.
    options = dict(decode_responses=True, socket_connect_timeout=5.0, socket_timeout=SOCKET_TIMEOUT_S,
                   socket_keepalive=True, retry=Retry(NoBackoff(), 0))
    usage = "use redis://[user:password@]host:port/db, rediss://... or unix:///path"
    if not isinstance(url, str):
        raise InvalidArgument(f"the Redis URL must be a string, got {type(url).__name__}; {usage}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL"
        raise InvalidArgument(f"bad Redis URL: {exc}; {usage}") from None
    if url != url.strip():
        raise InvalidArgument(f"bad Redis URL: it has spaces or line breaks around it; {usage}")
    url, parts, cluster = _take_cluster_flag(url, parts)
    # Only the scheme is quoted back: the rest may hold a password.
    if parts.scheme not in ("redis", "rediss", "unix") or not url.startswith(parts.scheme + "://"):
        # As typed (urlsplit lowercases the scheme; redis-py wants it in lower case).
        got = f"it starts with {url[:len(parts.scheme) + 1]!r}" if parts.scheme else "it has none"
        raise InvalidArgument(f"bad Redis URL: it must start with redis://, rediss:// or unix:// ({got}); {usage}")
    if parts.scheme == "unix":
        del options["socket_keepalive"]  # a TCP option: unix socket connections refuse it
    else:
        # redis-py reads a database it cannot parse as database 0: a typo would steer
        # another database's runs.
        database = unquote(parts.path).strip("/")
        if database and not database.isdigit():
            raise InvalidArgument(
                f"bad Redis URL: database {database!r} is not a number; use redis://host:port/<db number>")
    options.update(kwargs)
    if cluster:
        return _cluster_client(url, parts, options)
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:  # from redis-py (a bad port, query option, ...)
        raise InvalidArgument(f"bad Redis URL: {exc}; {usage}") from None


def _take_cluster_flag(url: str, parts: Any) -> tuple[str, Any, bool]:
    """The URL without its ``cluster=`` query option (redis-py does not know it), its
    parts, and whether it asked for cluster mode."""
    query = parse_qsl(parts.query, keep_blank_values=True)
    flags = [value.lower() for name, value in query if name == "cluster"]
    if not flags:
        return url, parts, False
    if flags[-1] not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidArgument(f"bad Redis URL: cluster={flags[-1]!r}; use cluster=true or cluster=false")
    # Rebuilt by hand: urlunsplit would turn unix:///path into unix:/path.
    rest = urlencode([(name, value) for name, value in query if name != "cluster"])
    url = url.split("?", 1)[0] + ("?" + rest if rest else "")
    return url, urlsplit(url), flags[-1] in ("true", "1", "yes")


def _cluster_client(url: str, parts: Any, options: dict) -> RedisCluster:
    """A RedisCluster for ``url``; it reads the cluster's layout now, so connection and
    permission problems surface here, as the library's errors."""
    if parts.scheme == "unix":
        raise InvalidArgument("bad Redis URL: cluster=true needs redis:// or rediss:// (a cluster speaks TCP)")
    database = unquote(parts.path).strip("/") or dict(parse_qsl(parts.query)).get("db", "0")
    if database != "0":
        raise InvalidArgument("bad Redis URL: a Redis Cluster has database 0 only; end the URL with /0")
    try:
        return RedisCluster.from_url(url, **options)
    except ValueError as exc:
        raise InvalidArgument(f"bad Redis URL: {exc}") from None
    except (redis.exceptions.RedisClusterException, redis.RedisError) as exc:
        text = str(exc)
        if "NOPERM" in text or "no permissions" in text:
            raise AuthenticationFailed(
                f"the Redis user may not read the cluster's layout ({text}); a cluster client needs "
                "+cluster|slots and +command besides the ACL line in docs/reliability.md") from None
        if isinstance(exc, redis.AuthenticationError) or any(
                marker in text for marker in ("WRONGPASS", "NOAUTH", "invalid username-password", "Authentication")):
            raise auth_failed(text) from None
        raise ConnectionFailed(f"cannot reach the Redis Cluster through this URL ({text}); check that its "
                               "nodes run and that the URL names one of them") from None

class ControlPlane:
    """One run's control plane. Cheap to create; safe to share between threads (the
    clients it makes are not)."""

    def __init__(self, client: redis.Redis, run_id: str, namespace: str = DEFAULT_NAMESPACE,
                 retry_s: float = 20.0) -> None:
        self.keys = RunKeys(run_id, namespace)
        self.run_id = run_id
        self.redis = client
        self._run = self._runner = ScriptRunner(client, self.keys, _args.seconds(retry_s, "retry_s", 0.0, 3600.0))

    @classmethod
    def from_url(cls, url: str, run_id: str, namespace: str = DEFAULT_NAMESPACE,
                 retry_s: float = 20.0, **redis_kwargs: Any) -> "ControlPlane":
        """Connect to ``url`` (see :func:`connect`) and open run ``run_id``."""
        return cls(connect(url, **redis_kwargs), run_id, namespace, retry_s)

    # ----------------------------------------------------------------- config
    def configure(self, **settings: Any) -> int:
        """Set run settings (fields of :class:`RunSettings`; None unsets). Returns the
        new config version. Validated before anything is written."""
        known = {f.name for f in fields(RunSettings)}
        unknown = set(settings) - known
        if unknown:
            raise ConfigError(f"unknown run setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return int(self._run("configure", ["configure", *to_redis_pairs(settings)]))

    def configure_backpressure(self, config: BackpressureConfig) -> int:
        """Replace the backpressure levers with ``config`` (all-None disables the policy).
        Takes effect on every client's next call. Returns the new config version."""
        if not isinstance(config, BackpressureConfig):
            raise ConfigError("configure_backpressure takes a BackpressureConfig")
        return int(self._run("configure", ["configure_backpressure", *to_redis_pairs(asdict(config))]))

    def set_config(self, reason: str, **values: Any) -> int:
        """Change any config fields (run settings or levers) in one atomic step; the
        cross-field rules are checked against the merged stored config."""
        return int(self._run("configure", [_args.reason(reason), *to_redis_pairs(values)]))

    @retried_read
    def _config(self) -> tuple[RunSettings, BackpressureConfig, int]:
        return from_redis({_args.text(k): _args.text(v) for k, v in self.redis.hgetall(self.keys.config).items()})

    def settings(self) -> RunSettings:
        """The stored run settings."""
        return self._config()[0]

    def backpressure_config(self) -> BackpressureConfig:
        """The stored backpressure levers."""
        return self._config()[1]

    def config_version(self) -> int:
        return self._config()[2]

    # -------------------------------------------------------------- ingestion
    def ingest_prompts(self, tasks: Iterable[Any], request_id: Optional[str] = None) -> list[str]:
        """Append prompt tasks (PromptTask or dicts) to pending; ids are generated when
        absent. Returns the ids that were fresh (an id already known is skipped).
        Every task is validated before anything is written. A call repeated with the
        same ``request_id`` and the same tasks returns the first call's reply (kept
        ``reply_ttl_s``, 30 s by default) and adds nothing."""
        if isinstance(tasks, (str, bytes, dict)) or not isinstance(tasks, Iterable):
            raise InvalidArgument(f"tasks must be a list of PromptTask or dicts, got {type(tasks).__name__}")
        items = list(tasks)
        checked = [task_from_input(t, self.run_id) for t in items]
        # An id generated here (96 random bits) cannot be done already: the script skips
        # its tasks_done lookup.
        encoded = [(t.task_id, "" if t.estimated_bytes is None else t.estimated_bytes,
                    "1" if not isinstance(item, PromptTask) and item.get("task_id") is None else "",
                    encode_task(t))
                   for item, t in zip(items, checked)]
        if len(encoded) > INGEST_CHUNK:
            self._check_record_sizes((task_id, record) for task_id, _, _, record in encoded)
        if request_id is not None:
            _args.request_id(request_id)
        fresh: list[str] = []
        for start in range(0, len(encoded), INGEST_CHUNK):
            chunk = encoded[start:start + INGEST_CHUNK]
            args: list = [len(chunk)]
            for item in chunk:
                args.extend(item)
            # Generated ids differ on every call, so a retry is recognised by the rest;
            # the chunk's offset keeps the chunks of one call apart.
            content = None if request_id is None else [start, len(encoded)] + [
                part for task_id, size, generated, record in chunk
                for part in ("" if generated else task_id, size, record)]
            with steps_so_far(start, len(encoded)):
                fresh += [_args.text(i) for i in self._run("ingest_prompts", args, request_id, content=content)]
        return fresh

    def enqueue_offline_refs(self, refs: Iterable[SampleRef], request_id: Optional[str] = None) -> list[str]:
        """Put offline sample refs straight into the train queue. Returns fresh ids.
        ``request_id`` as for :meth:`ingest_prompts`."""
        checked = check_refs(refs, self.run_id)
        if len(checked) > INGEST_CHUNK:
            self._check_record_sizes((ref.sample_id, encode_ref(ref)) for ref in checked)
        if request_id is not None:
            _args.request_id(request_id)
        fresh: list[str] = []
        for start in range(0, len(checked), INGEST_CHUNK):
            chunk = checked[start:start + INGEST_CHUNK]
            args: list = ["", 1, len(chunk)]
            for ref in chunk:
                args += [ref.sample_id, ref.source_task_id or "", "", encode_ref(ref)]
            with steps_so_far(start, len(checked)):
                fresh += [_args.text(s) for s in self._run("commit_samples", args, request_id,
                                                           content=[start, len(checked), *args])]
        return fresh

    def _check_record_sizes(self, records: Iterable[tuple[str, str]]) -> None:
        """Refuse a call split over several script calls when any (id, record JSON) is
        over max_record_bytes, before the first chunk is written (each script checks
        only its own chunk)."""
        limit = self.settings().max_record_bytes or DEFAULT_MAX_RECORD_BYTES
        for item_id, record in records:
            size = len(record.encode())
            if size > limit:
                raise RecordTooLarge(
                    f"record {item_id} is {size} bytes of JSON, over max_record_bytes={limit}; "
                    "keep large data in the feature store or raise max_record_bytes")

    # ---------------------------------------------------------------- clients
    def rollout_worker(self, worker_id: Optional[str] = None, lease_s: float = 60.0) -> RolloutWorker:
        """A rollout worker client; ``lease_s`` is its prompt lease duration in seconds."""
        return RolloutWorker(self, worker_id, lease_s)

    def trainer(self, trainer_id: Optional[str] = None, lease_s: float = 60.0) -> Trainer:
        """A trainer client; ``lease_s`` is its train lease duration in seconds."""
        return Trainer(self, trainer_id, lease_s)

    def capacity_reporter(self, store_id: str) -> CapacityReporter:
        """A capacity reporter for feature-store shard ``store_id``."""
        return CapacityReporter(self, store_id)

    # ------------------------------------------------------------- operations
    def reclaim_expired(self, batch: int = 250) -> int:
        """Return every expired lease to its queue now, ``batch`` per script call.
        Returns how many were reclaimed."""
        _args.count(batch, "batch")
        total = 0
        while True:
            prompts, samples = self._run("reclaim_expired", [batch])
            total += prompts + samples
            if prompts < batch and samples < batch:
                return total

    def migrate(self, batch: int = 1000) -> int:
        """Convert a run made by dataflow-redis 0.1.0, whose dedup markers (tasks_done,
        acked) are Redis sets, to packed id sets, ``batch`` ids per script call. Until
        it is done the run's operations fail with ScriptError naming this method.
        Idempotent and safe to interrupt: call again to finish. Returns ids moved."""
        _args.count(batch, "batch")
        total = 0
        while True:
            moved, remaining = self._run("migrate_dedup_sets", [batch])
            total += moved
            if remaining == 0:
                return total

    def requeue_undurable(self, after_step: Optional[int] = None, batch: int = 250) -> int:
        """Recovery: samples acked by non-durable acks at a step above ``after_step``
        (default: the checkpoint, the newest step acked with optimizer_durable;
        ``status()["checkpoint_global_step"]``) go back to the train queue, and the
        recorded global step rolls back to ``after_step`` so the restarted trainer can
        ack again from ``after_step + 1``. Returns how many samples were requeued.
        An ``after_step`` below the checkpoint raises
        :class:`~dataflow_redis.errors.StepRegression` (what was acked durably since is
        no longer kept, so it cannot be replayed)."""
        if after_step is not None and type(after_step) is not int:
            raise InvalidArgument(f"after_step must be an int or None, got {after_step!r}")
        _args.count(batch, "batch")
        total = 0
        while True:
            n = self._run("requeue_undurable", ["" if after_step is None else after_step, batch])
            total += n
            if n < batch:
                return total

    def pause(self, reason: str) -> bool:
        """Operator pause: no prompt is leased until :meth:`resume`, whatever the
        watermarks say. Returns False if already paused."""
        return bool(self._run("set_operator_pause", [1, _args.reason(reason)]))

    def resume(self, reason: str) -> bool:
        """Lift the operator pause (the watermark latch still applies)."""
        return bool(self._run("set_operator_pause", [0, _args.reason(reason)]))

    def requeue_dead_letters(self, task_ids: Iterable[str], reason: str = "operator requeue") -> list[str]:
        """Send dead-lettered tasks back to pending with attempt 0; returns those requeued."""
        ids = _args.ids(task_ids, "task id")
        return [_args.text(t) for t in self._run("requeue_dead_letter", [_args.reason(reason), *ids])]

    # ------------------------------------------------------------- inspection
    def status(self) -> dict[str, Any]:
        """One consistent snapshot: every seed status field, plus more (see status.py)."""
        return build_status(self.run_id, self._run("status", [int(ACTIVE_WINDOW_S * 1000)]))

    @retried_read
    def exists(self) -> bool:
        """Whether this run has any state in Redis."""
        return bool(self.redis.exists(*(getattr(self.keys, name) for name in RUN_MARKERS)))

    @retried_read
    def events(self, count: int = 100) -> list[dict[str, Any]]:
        """The newest ``count`` transition events, oldest first."""
        _args.count(count, "count")
        entries = self.redis.xrevrange(self.keys.events, count=count)
        out = []
        for entry_id, values in reversed(entries):
            event = {_args.text(k): _args.text(v) for k, v in values.items()}
            event["id"] = _args.text(entry_id)
            for name in ("at_ms", "resident_bytes", "reserved_bytes"):
                if name in event:
                    event[name] = int(event[name])
            out.append(event)
        return out

    @retried_read
    def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """Up to ``count`` dead-lettered tasks: task_id, reason, attempt, at_ms."""
        _args.count(count, "count")
        out = []
        for task_id, value in self.redis.hscan_iter(self.keys.dlq, count=count):
            out.append({"task_id": _args.text(task_id), **json.loads(_args.text(value))})
            if len(out) >= count:
                break
        return out

    @retried_read
    def leases(self, kind: str = "prompt", count: int = 100) -> list[dict[str, Any]]:
        """Up to ``count`` current leases of ``kind`` ('prompt' or 'train'): id, holder,
        token, granted_ms, deadline_ms, attempt (prompts)."""
        if kind not in ("prompt", "train"):
            raise InvalidArgument("kind must be 'prompt' or 'train'")
        _args.count(count, "count")
        leases_key = self.keys.prompt_leases if kind == "prompt" else self.keys.train_leases
        ids: dict[str, None] = {}      # SCAN may return an id twice
        for item_id, _ in self.redis.hscan_iter(leases_key, count=min(count, 1000)):
            ids[_args.text(item_id)] = None
            if len(ids) >= count:
                break
        ids = list(ids)
        rows = []
        for start in range(0, len(ids), 1000):
            page = ids[start:start + 1000]
            # One script reads row, deadline and attempt of each id at one moment.
            flat = self._run("read_leases", [kind, *page])
            for i, item_id in enumerate(page):
                value, deadline, attempt = flat[3 * i:3 * i + 3]
                if value is None:
                    continue          # released since the scan
                token, nbytes, granted, holder = _args.text(value).split("|", 3)
                row = {"id": item_id, "holder": holder, "token": int(token), "granted_ms": int(granted),
                       "reserved_bytes": int(nbytes), "deadline_ms": None if deadline is None else int(deadline)}
                if kind == "prompt":
                    row["attempt"] = int(attempt or 0)
                rows.append(row)
        return rows

    def is_acked(self, sample_ids: Iterable[str]) -> list[bool]:
        """Whether each sample was acked (its dedup marker is kept), in order. Exact
        while other clients write (lua/read_membership.lua, up to 1,000 ids a call)."""
        return self._members("acked", _args.ids(sample_ids, "sample id"))

    def is_done(self, task_ids: Iterable[str]) -> list[bool]:
        """Whether each task is done (a sample of it was committed), in order. Exact
        while other clients write (lua/read_membership.lua, up to 1,000 ids a call)."""
        return self._members("tasks_done", _args.ids(task_ids, "task id"))

    def _members(self, which: str, ids: list[str]) -> list[bool]:
        out: list[bool] = []
        for start in range(0, len(ids), 1000):
            out += [flag == 1 for flag in self._run("read_membership", [which, *ids[start:start + 1000]])]
        return out

    def server_warnings(self) -> list[str]:
        """Server settings that put the run at risk, each as one sentence (empty when
        none, or when Redis does not allow CONFIG GET, as managed services often do).
        Today: an eviction policy other than noeviction under a maxmemory limit, which
        lets Redis drop queue, lease and marker keys without an error."""
        # On a cluster, the node that holds this run's slot.
        node = ({"target_nodes": self.redis.get_node_from_key(self.keys.config)}
                if isinstance(self.redis, RedisCluster) else {})
        try:
            memory = self.redis.config_get("maxmemory", **node)
            policy = self.redis.config_get("maxmemory-policy", **node)
        except redis.RedisError:
            return []
        limit = int(_args.text(memory.get("maxmemory", "0")) or 0)
        policy_name = _args.text(policy.get("maxmemory-policy", "noeviction"))
        if limit > 0 and policy_name != "noeviction":
            return [f"maxmemory-policy is {policy_name} with maxmemory {limit} bytes: Redis may evict this "
                    "run's queues, leases and markers when full, losing work silently; set "
                    "maxmemory-policy noeviction (a full Redis then refuses producers cleanly)"]
        return []

    @retried_read
    def worker_inflight(self) -> dict[str, int]:
        """In-flight prompt leases per rollout worker (O(workers); for operators)."""
        return {_args.text(k): int(v) for k, v in self.redis.hgetall(self.keys.worker_inflight).items()}

    @retried_read
    def delete(self) -> int:
        """Delete every key of this run (irreversible). Returns the number of keys removed
        (short of the true number when a lost connection made it start over: the keys
        an earlier try removed are gone all the same)."""
        removed = 0
        batch = []
        for key in self.redis.scan_iter(match=self.keys.pattern(), count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += self.redis.unlink(*batch)
                batch = []
        if batch:
            removed += self.redis.unlink(*batch)
        return removed
