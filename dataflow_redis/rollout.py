"""The rollout worker's client: lease prompt tasks, commit sample refs, fail tasks.

    w = cp.rollout_worker()
    for task in w.lease(8):            # lua/lease_prompts.lua
        ...                            # run the model, write features to the store
    w.commit(refs)                     # lua/commit_samples.lua
    w.fail([task_id], "oom", True)     # lua/fail_prompts.lua
    w.heartbeat()                      # lua/extend_leases.lua
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from . import _args
from .errors import steps_so_far
from .holder import HAND_BACK_CHUNK, LeaseHolder
from .records import PromptTask, SampleRef, check_refs, decode_task, encode_ref

if TYPE_CHECKING:
    from .control_plane import ControlPlane

RECLAIM_PER_CALL = 32
"""Expired leases each lease call reclaims before granting (bounded work per call)."""


class RolloutWorker(LeaseHolder):
    """One rollout worker. Not thread-safe: give each thread its own worker.

    The worker remembers the fencing token of every lease it holds, so a commit or
    fail for a task whose lease expired and was re-granted is rejected by Redis.
    """

    KIND = "prompt"
    ID_PREFIX = "rollout"

    def __init__(self, cp: "ControlPlane", worker_id: Optional[str] = None, lease_s: float = 60.0) -> None:
        super().__init__(cp, worker_id, lease_s, "worker id")
        self.worker_id = self.holder_id

    def lease(self, max_tasks: int, request_id: Optional[str] = None) -> list[PromptTask]:
        """Lease up to ``max_tasks`` pending tasks for ``lease_s`` seconds.

        Returns fewer (or none) when little is pending or backpressure holds the
        worker back. ``request_id`` makes a retry after a lost reply return the same
        grant (one is generated per call when omitted).
        """
        _args.count(max_tasks, "max_tasks")
        reply = self.cp._run(
            "lease_prompts", [self.worker_id, max_tasks, self._lease_ms, RECLAIM_PER_CALL], request_id,
            scope=self.worker_id, content=[max_tasks],
        )
        run_id, text = self.cp.run_id, _args.text
        tasks = []
        for i in range(0, len(reply), 4):
            task_id, token = text(reply[i]), text(reply[i + 1])
            self._tokens[task_id] = token
            tasks.append(decode_task(task_id, run_id, int(reply[i + 2]), text(reply[i + 3])))
        return tasks

    def commit(self, refs: Iterable[SampleRef], request_id: Optional[str] = None) -> list[str]:
        """Hand in sample refs; returns the ids that were fresh and accepted.

        A ref's source task lease is released. Refs whose source task this worker no
        longer holds (expired and re-granted) are rejected; duplicates are dropped.
        More than 1,000 refs go as several atomic steps, the refs of one task in one.
        """
        checked = check_refs(refs, self.cp.run_id)
        if len(checked) > _args.MAX_BATCH:
            raise _args.InvalidArgument(f"at most {_args.MAX_BATCH} refs per call; split the batch")
        encoded = [(ref, encode_ref(ref)) for ref in checked]
        if len(encoded) <= HAND_BACK_CHUNK:
            return self._commit_step(encoded, request_id, 0, len(encoded))
        # Several steps (see HAND_BACK_CHUNK). The refs of one source task stay in one
        # step: the step that releases the task's lease must see them all. Every record
        # is checked against max_record_bytes before the first step (each step checks
        # only its own).
        self.cp._check_record_sizes((ref.sample_id, record) for ref, record in encoded)
        by_task: dict[str, list[tuple[SampleRef, str]]] = {}
        for i, item in enumerate(encoded):
            by_task.setdefault(item[0].source_task_id or f" {i}", []).append(item)
        fresh: set[str] = set()
        step: list[tuple[SampleRef, str]] = []
        sent = 0
        for group in by_task.values():
            if step and len(step) + len(group) > HAND_BACK_CHUNK:
                fresh.update(self._commit_step(step, request_id, sent, len(encoded)))
                sent += len(step)
                step = []
            step += group
        fresh.update(self._commit_step(step, request_id, sent, len(encoded)))
        # In call order, each id once, as one step returns them.
        seen: set[str] = set()
        return [r.sample_id for r in checked
                if r.sample_id in fresh and not (r.sample_id in seen or seen.add(r.sample_id))]

    def _commit_step(self, refs: list[tuple[SampleRef, str]], request_id: Optional[str], offset: int,
                     total: int) -> list[str]:
        """One commit script call: ``refs`` (each with its record JSON) from ``offset`` of
        a call of ``total`` refs (both keep the steps of one call apart, and from other
        calls, in the reply cache)."""
        args: list = [self.worker_id, 0, len(refs)]
        for ref, record in refs:
            source = ref.source_task_id or ""
            args += [ref.sample_id, source, self._tokens.get(source, ""), record]
        # Tokens stay out of the reply-cache content (see LeaseHolder._hand_back).
        content = None if request_id is None else [offset, total] + [
            part for i in range(3, len(args), 4) for part in (args[i], args[i + 1], args[i + 3])]
        with steps_so_far(offset, total):
            fresh = self.cp._run("commit_samples", args, request_id, scope=self.worker_id, content=content)
        for ref, _ in refs:
            self._tokens.pop(ref.source_task_id or "", None)
        return [_args.text(s) for s in fresh]

    def fail(self, task_ids: Iterable[str], reason: str, retryable: bool = True,
             request_id: Optional[str] = None) -> list[str]:
        """Give up held tasks; returns the ids affected (only this worker's leases).

        Retryable: attempt + 1 and back to pending (dead-lettered once
        ``max_prompt_attempts`` is reached). Not retryable: dead-lettered at once.
        """
        ids = _args.ids(task_ids, "task id")
        head = [self.worker_id, _args.reason(reason), int(_args.flag(retryable, "retryable"))]
        return self._hand_back("fail_prompts", head, ids, request_id)
