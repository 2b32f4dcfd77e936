"""Exceptions. Every error says what was wrong and what to do about it.

Lua scripts refuse bad calls with an error reply ``"<CODE> <message>"`` before they
write anything; :func:`from_script_error` turns that into one of these classes, so a
caller never sees a raw Lua traceback.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class DataflowError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidArgument(DataflowError, ValueError):
    """A value passed by the caller is not acceptable; nothing was written."""


class ConfigError(InvalidArgument):
    """A configuration value or combination is invalid; the stored config is unchanged."""


class RecordTooLarge(InvalidArgument):
    """A record's JSON exceeds the run's ``max_record_bytes``; nothing was written."""


class StepRegression(InvalidArgument):
    """An ack carried a global_step lower than the one already recorded."""


class UnknownRun(DataflowError, LookupError):
    """The run has no state in this Redis (wrong --run, wrong database or namespace)."""


class ConnectionFailed(DataflowError, ConnectionError):
    """Redis could not be reached (or kept dropping the connection) after bounded retries."""


class AuthenticationFailed(DataflowError, PermissionError):
    """Redis refused the credentials, or the ACL user lacks a needed command or key."""


class OutOfMemory(DataflowError, MemoryError):
    """Redis is at its maxmemory and refused a write that adds data; nothing was written."""


class WritesRefused(DataflowError, RuntimeError):
    """Redis refuses every write because it cannot persist (MISCONF: its last RDB save
    failed under stop-writes-on-bgsave-error, or an AOF write failed); nothing was
    written."""


class ScriptError(DataflowError, RuntimeError):
    """A script failed in a way it did not anticipate (a bug in dataflow-redis), or the
    run needs a step first (``ControlPlane.migrate()`` for a run made by 0.1.0), or
    Redis keeps forgetting scripts; the message says which."""


_BY_CODE = {
    "BADARG": InvalidArgument,
    "CONFIG": ConfigError,
    "TOOLARGE": RecordTooLarge,
    "STEP": StepRegression,
}


def from_script_error(message: str) -> DataflowError:
    """Map a script's error reply ``"<CODE> <message>"`` to an exception instance."""
    # redis-py may append " script: <sha>, on @user_script:..." to the message.
    text = message.split(" script: ", 1)[0].strip()
    if text.startswith("ERR "):
        text = text[4:]
    code, _, rest = text.partition(" ")
    if code == "WRONGTYPE":
        return ScriptError(
            "a key of this run holds another type than this version keeps there; a run made by "
            "dataflow-redis 0.1.0 keeps its dedup markers as Redis sets: convert it once with "
            "`dataflow-redis --run <run> migrate` (or ControlPlane.migrate())")
    cls = _BY_CODE.get(code)
    if cls is None:
        return ScriptError(f"unexpected error from Redis script: {message}")
    return cls(rest)


@contextlib.contextmanager
def steps_so_far(done: int, total: int) -> Iterator[None]:
    """Around one step of a call split into atomic steps: an error of a later step says
    that the call's earlier steps were applied (``done`` of its ``total`` items), where
    a one-step call's message would say the call changed nothing."""
    try:
        yield
    except DataflowError as exc:
        if not done:
            raise
        message = str(exc).replace("this call changed nothing", "this step changed nothing")
        raise type(exc)(f"{message} (the call's earlier steps handled {done} of its {total} items, "
                        "which stay handled)") from None
