"""The trainer's client: lease sample refs, ack them at optimizer steps, fail them.

    t = cp.trainer()
    refs = t.lease(32, timeout_s=5.0)                 # lua/lease_samples.lua
    ...                                               # load features, train a step
    t.ack([r.sample_id for r in refs], global_step=7, optimizer_durable=True)
                                                      # lua/ack_samples.lua

Waiting without polling: when the queue is empty, ``lease(timeout_s=T)`` blocks on
BLPOP of the run's ``train_signal`` list. Every commit pushes a few wake-up tokens;
a lease that finds the queue empty clears them in the same atomic step, so a
waiting trainer sleeps in Redis until a commit arrives and then issues exactly one
lease call: O(1) commands per wake-up, woken within a round trip of the commit.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, Optional

import redis

from . import _args
from .holder import LeaseHolder
from .records import SampleRef, decode_ref
from .scripts import MAYBE_PASSING, is_passing, is_transient, translate_error

if TYPE_CHECKING:
    from .control_plane import ControlPlane

RECLAIM_PER_CALL = 32
MAX_BLOCK_SLICE_S = 10.0
UNKNOWN_TIMEOUT_SLICE_S = 4.0
"""BLPOP slice when the client's socket timeout is not in its settings: redis-py 8
applies 5 s unless told otherwise, and a BLPOP that outlives the socket timeout is
dropped and sent again (the wait would double)."""


class Trainer(LeaseHolder):
    """One trainer. Not thread-safe: give each thread its own trainer."""

    KIND = "train"
    ID_PREFIX = "trainer"

    def __init__(self, cp: "ControlPlane", trainer_id: Optional[str] = None, lease_s: float = 60.0) -> None:
        super().__init__(cp, trainer_id, lease_s, "trainer id")
        self.trainer_id = self.holder_id
        # A Redis client keeps its settings in its pool; a RedisCluster in its nodes manager.
        holder = getattr(cp.redis, "connection_pool", None) or getattr(cp.redis, "nodes_manager", None)
        socket_timeout = getattr(holder, "connection_kwargs", {}).get("socket_timeout")
        self._block_slice_s = (min(MAX_BLOCK_SLICE_S, UNKNOWN_TIMEOUT_SLICE_S) if not socket_timeout
                               else min(MAX_BLOCK_SLICE_S, max(0.05, 0.8 * socket_timeout)))

    def lease(self, max_refs: int, timeout_s: Optional[float] = None,
              request_id: Optional[str] = None) -> list[SampleRef]:
        """Lease up to ``max_refs`` refs for ``lease_s`` seconds.

        ``timeout_s=None`` returns at once; otherwise waits up to ``timeout_s`` seconds
        for work (see the module docstring; a Redis outage meanwhile extends the wait
        by up to ``retry_s``, as for any call). An empty result counts once as trainer
        starvation.
        """
        _args.count(max_refs, "max_refs")
        if timeout_s is None:
            return self._lease_once(max_refs, True, request_id)
        deadline = time.monotonic() + _args.seconds(timeout_s, "timeout_s", minimum=0.0)
        while True:
            remaining = deadline - time.monotonic()
            refs = self._lease_once(max_refs, remaining <= 0, request_id)
            request_id = None  # only the first attempt carries the caller's id
            if refs or remaining <= 0:
                return refs
            try:
                self.cp.redis.blpop([self.cp.keys.train_signal], timeout=min(remaining, self._block_slice_s))
            except (*MAYBE_PASSING, redis.ResponseError) as exc:
                # The next lease call retries or reports a lasting problem; only errors
                # no retry can mend (an ACL without BLPOP) are raised here.
                if isinstance(exc, redis.ResponseError) and not (
                        is_transient(exc) or isinstance(exc, redis.exceptions.ReadOnlyError)):
                    raise translate_error(exc) from None
                if not isinstance(exc, redis.ResponseError) and not is_passing(exc):
                    raise
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _lease_once(self, max_refs: int, final: bool, request_id: Optional[str]) -> list[SampleRef]:
        reply = self.cp._run(
            "lease_samples",
            [self.trainer_id, max_refs, self._lease_ms, int(final), RECLAIM_PER_CALL],
            request_id,
            scope=self.trainer_id,
            content=[max_refs],
        )
        run_id, text = self.cp.run_id, _args.text
        refs = []
        for i in range(0, len(reply), 3):
            sample_id = text(reply[i])
            self._tokens[sample_id] = text(reply[i + 1])
            refs.append(decode_ref(sample_id, run_id, text(reply[i + 2])))
        return refs

    def ack(self, sample_ids: Iterable[str], global_step: Optional[int] = None,
            optimizer_durable: bool = False, request_id: Optional[str] = None) -> list[str]:
        """Ack consumed refs at an optimizer step; returns the ids newly acked.

        One atomic step records the ids, ``global_step`` and ``optimizer_durable`` and
        releases the leases (one step per 1,000 ids: the first checks ``global_step``,
        the last moves the durable marker). A ``global_step`` below the recorded one
        raises :class:`~dataflow_redis.errors.StepRegression`; without one the ack
        counts at the recorded step. See docs/design.md for the recovery rule for
        non-durable acks (it needs named steps).
        """
        ids = _args.ids(sample_ids, "sample id")
        if global_step is not None and (type(global_step) is not int or not 0 <= global_step < 2**53):
            raise _args.InvalidArgument(f"global_step must be an int >= 0 or None, got {global_step!r}")
        step = "" if global_step is None else str(global_step)
        durable = int(_args.flag(optimizer_durable, "optimizer_durable"))

        def heads(first: bool, last: bool) -> list:
            # An ack of more than HAND_BACK_CHUNK ids goes in several steps. With a step,
            # the first checks it; the later ones ('+<step>') are not refused because
            # another trainer recorded a later step meanwhile. The durable marker moves
            # with the last: a trainer dying in between leaves the earlier ids as
            # non-durable acks, which a restart from the last checkpoint replays.
            # Without a step there is no checkpoint to move: every step is acked alike.
            if not step:
                return [self.trainer_id, "", durable]
            return [self.trainer_id, step if first else "+" + step, durable if last else 0]

        return self._hand_back("ack_samples", heads, ids, request_id)

    def fail(self, sample_ids: Iterable[str], reason: str, retryable: bool = True,
             request_id: Optional[str] = None) -> list[str]:
        """Give up held refs: retryable -> back to the queue tail; else terminal."""
        ids = _args.ids(sample_ids, "sample id")
        head = [self.trainer_id, _args.reason(reason), int(_args.flag(retryable, "retryable"))]
        return self._hand_back("fail_samples", head, ids, request_id)
