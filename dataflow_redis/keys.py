"""The key schema: every Redis key a run uses, named in this one place.

All keys of a run share the hash tag ``{<run_id>}``, so every script touches a single
hash slot and works unchanged on Redis Cluster. Scripts never build key names
themselves: the clients pass every key in ``KEYS``.

    <ns>:{<run>}:<name>

| name            | type   | holds                                                        |
|-----------------|--------|--------------------------------------------------------------|
| config          | hash   | run settings and backpressure levers, plus ``version``        |
| counters        | hash   | monotonic counters (prompts, samples_committed, fence, ...)   |
| tasks           | hash   | task_id -> compact JSON record, while the task is live        |
| task_bytes      | hash   | task_id -> estimated bytes, only for tasks that carry one     |
| task_attempts   | hash   | task_id -> attempt, only once it is above 0                   |
| pending         | list   | task ids waiting for a rollout worker (FIFO)                  |
| prompt_leases   | hash   | task_id -> "token|reserved_bytes|granted_ms|worker_id"        |
| prompt_deadlines| zset   | task_id scored by lease deadline (ms, Redis time)              |
| worker_inflight | hash   | worker_id -> prompt leases held (a counter, never a scan)     |
| workers         | zset   | rollout worker_id scored by last contact (ms)                 |
| tasks_done      | hash   | packed id set (idset.py): tasks whose sample was committed    |
| dlq             | hash   | task_id -> JSON {reason, attempt, at_ms, attempts_exhausted}  |
| samples         | hash   | sample_id -> compact JSON record, until durably acked         |
| train_queue     | list   | sample ids waiting for a trainer (FIFO)                       |
| train_leases    | hash   | sample_id -> "token|0|granted_ms|trainer_id"                  |
| train_deadlines | zset   | sample_id scored by lease deadline (ms)                       |
| trainers        | zset   | trainer_id scored by last contact (ms)                        |
| train_signal    | list   | wake-up tokens for trainers blocked in ``lease(timeout_s=)``  |
| acked           | hash   | packed id set (idset.py): acked samples, ~len(id) + 9 bytes   |
| undurable       | zset   | acked sample ids scored by global_step, until a durable ack   |
| failed_samples  | hash   | sample_id -> reason, for terminally failed samples            |
| durable         | hash   | the durable ack marker: global_step, durable_global_step, ... |
| ack_log         | stream | one entry per ack: trainer, global_step, optimizer_durable    |
| bp              | hash   | backpressure state: latch, operator pause, starvation, bytes  |
| shards          | hash   | shard_id -> "seq|resident|max|avg_age|oldest_age|at_ms"       |
| shard_seen      | zset   | not-yet-stale shard_id scored by last report (ms)             |
| stale_shards    | set    | shards currently marked stale                                 |
| retired_shards  | hash   | shard_id -> last seq of a deregistered shard (late reports lose) |
| events          | stream | transition log (pause, resume, operator, config, stale)       |
| dedup_migrating | hash   | packed id set under construction while ``migrate`` runs       |
| reply:<id>      | string | cached reply of a mutating call, for safe retries (expires);  |
|                 |        | <id> is random, or <op>:<caller>:<request_id>:<content digest> |
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

DEFAULT_NAMESPACE = "dfr"

# Letters, digits and . _ - : only. Braces would break the hash tag; whitespace and
# control characters would make keys unreadable in redis-cli; 128 characters is plenty.
# fullmatch, not match with "$": "$" also matches before a final newline.
_RUN_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,32}")
# Ids of tasks, samples, workers, trainers and shards: printable, no whitespace.
_ITEM_ID = re.compile(r"[\x21-\x7e]{1,256}")


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it can name a run, else raise :class:`InvalidArgument`."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise InvalidArgument(
            f"invalid run id {run_id!r}: use 1-128 characters from letters, digits and . _ - : "
            "(braces and whitespace would break the {run} hash tag)"
        )
    return run_id


def validate_namespace(namespace: object) -> str:
    """Return ``namespace`` if it can prefix keys, else raise :class:`InvalidArgument`."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise InvalidArgument(
            f"invalid namespace {namespace!r}: use 1-32 characters from letters, digits and . _ -"
        )
    return namespace


def validate_item_id(item_id: object, what: str) -> str:
    """Return ``item_id`` if it is a usable id (printable ASCII, no spaces, <= 256 chars)."""
    if not isinstance(item_id, str) or not _ITEM_ID.fullmatch(item_id):
        raise InvalidArgument(
            f"invalid {what} {item_id!r}: ids are 1-256 printable ASCII characters without spaces"
        )
    return item_id


KEY_NAMES = (
    "config", "counters", "tasks", "task_bytes", "task_attempts", "pending",
    "prompt_leases", "prompt_deadlines", "worker_inflight", "workers", "tasks_done", "dlq",
    "samples", "train_queue", "train_leases", "train_deadlines", "trainers", "train_signal",
    "acked", "undurable", "failed_samples", "durable", "ack_log",
    "bp", "shards", "shard_seen", "stale_shards", "retired_shards", "events", "dedup_migrating",
)


class RunKeys:
    """Every key of one run, as attributes named like the table above (``keys.pending``)."""

    def __init__(self, run_id: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.run_id = validate_run_id(run_id)
        self.namespace = validate_namespace(namespace)
        self.prefix = f"{namespace}:{{{run_id}}}:"
        for name in KEY_NAMES:
            setattr(self, name, self.prefix + name)

    def reply(self, request_id: str) -> str:
        """Key caching the reply of the mutating call ``request_id``."""
        return self.prefix + "reply:" + request_id

    def all_fixed(self) -> list[str]:
        """Every fixed key of the run (reply keys excluded)."""
        return [self.prefix + name for name in KEY_NAMES]

    def pattern(self) -> str:
        """SCAN pattern matching every key of the run, reply keys included."""
        return self.prefix + "*"  # run ids hold no glob characters


RUN_MARKERS = ("config", "counters", "bp")
"""A run exists once one of these keys does: its config (configured), its counters
(anything ingested or committed) or its backpressure state (a shard reported)."""


def runs_patterns(namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """SCAN patterns that find every run in ``namespace`` (one per RUN_MARKERS key)."""
    ns = validate_namespace(namespace)
    return [f"{ns}:{{*}}:{name}" for name in RUN_MARKERS]
