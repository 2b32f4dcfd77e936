"""What a rollout worker and a trainer share: an id, a lease duration, and the fencing
token of every lease held. Tokens go with every hand-back (commit, fail, ack,
heartbeat), so Redis can tell the current holder from one whose lease expired and was
re-granted (see docs/design.md, "Leases, deadlines, fencing")."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

from . import _args
from .errors import steps_so_far
from .keys import validate_item_id

if TYPE_CHECKING:
    from .control_plane import ControlPlane

HEARTBEAT_CHUNK = 1000
"""Leases one heartbeat script call extends: a holder of many leases sends several
short atomic steps rather than one long one (each lease is extended on its own)."""

HAND_BACK_CHUNK = 1000
"""Items one commit, fail or ack script call carries. A larger call goes as several
short atomic steps (each item is handed back on its own), so that no call holds the
shared Redis for long: a 10,000-ref commit in one step held it about 0.5 s."""


class LeaseHolder:
    """Base of :class:`~dataflow_redis.RolloutWorker` and :class:`~dataflow_redis.Trainer`.
    Not thread-safe: give each thread its own holder."""

    KIND = ""
    """Which leases ``extend_leases.lua`` extends: 'prompt' or 'train'."""
    ID_PREFIX = ""
    """Prefix of generated holder ids."""

    def __init__(self, cp: "ControlPlane", holder_id: Optional[str], lease_s: float, what: str) -> None:
        self.cp = cp
        self.holder_id = validate_item_id(holder_id or f"{self.ID_PREFIX}-{uuid.uuid4().hex[:12]}", what)
        self.lease_s = _args.seconds(lease_s, "lease_s")
        self._lease_ms = max(1, int(self.lease_s * 1000))
        self._tokens: dict[str, str] = {}

    @property
    def held(self) -> list[str]:
        """Ids of the leases this holder believes it holds."""
        return list(self._tokens)

    def _hand_back(self, script: str, head: Sequence | Callable[[bool, bool], Sequence], ids: Iterable[str],
                   request_id: Optional[str]) -> list[str]:
        """Run a script whose ARGV is ``head`` then (id, token) pairs and which releases
        those leases; returns the ids it affected. The ids stop being held either way.
        Up to HAND_BACK_CHUNK ids per script call (an atomic step). ``head`` may be a
        function ``head(first, last)`` giving each step's head (an ack checks its step
        with the first and moves its durable marker with the last)."""
        ids = list(ids)
        affected: list[str] = []
        for start in range(0, max(1, len(ids)), HAND_BACK_CHUNK):
            chunk = ids[start:start + HAND_BACK_CHUNK]
            last = start + HAND_BACK_CHUNK >= len(ids)
            step_head = list(head(start == 0, last) if callable(head) else head)
            args = list(step_head)
            for item_id in chunk:
                args += [item_id, self._tokens.get(item_id, "")]
            # The tokens stay out of the reply-cache content: a retry after the first try
            # went through (and dropped them) must still find its reply. The offset and
            # size keep the steps of one call apart, and from other calls.
            content = None if request_id is None else [start, len(ids), *step_head, *chunk]
            with steps_so_far(start, len(ids)):
                affected += [_args.text(i) for i in self.cp._run(script, args, request_id, scope=self.holder_id,
                                                                 content=content)]
            for item_id in chunk:
                self._tokens.pop(item_id, None)
        return affected

    def heartbeat(self) -> list[str]:
        """Extend every held lease to now + ``lease_s`` seconds; returns the ids lost
        meanwhile (expired and reclaimed, or re-granted), which stop being held.
        Up to HEARTBEAT_CHUNK leases per script call (at least one call, which also
        records the holder as seen)."""
        held = list(self._tokens.items())
        lost: list[str] = []
        for start in range(0, max(1, len(held)), HEARTBEAT_CHUNK):
            args: list = [self.KIND, self.holder_id, self._lease_ms]
            for item_id, token in held[start:start + HEARTBEAT_CHUNK]:
                args += [item_id, token]
            lost += [_args.text(i) for i in self.cp._run("extend_leases", args)]
        for item_id in lost:
            self._tokens.pop(item_id, None)
        return lost
