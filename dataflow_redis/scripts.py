"""Script loading: one Lua file per atomic operation, called by EVALSHA.

Each ``lua/<operation>.lua`` opens with a header whose ``KEYS:`` line names, in order,
the keys it touches (names from :mod:`dataflow_redis.keys`). The loader

* inlines ``-- @include <name>`` lines from ``lua/includes/<name>.lua``, keeping only
  the definitions the script uses (:func:`shake_includes`);
* turns each ``K.<name>`` of a declared key into ``KEYS[<i>]`` from that header, so
  scripts say ``K.pending`` and the Python side builds KEYS from the same header:
  the two can never disagree (:func:`bind_keys`);
* keeps each script as a redis-py ``Script`` (its SHA1 and source); calls go out as
  EVALSHA, and a NOSCRIPT reply sends the call again as EVAL with the source (which
  caches it), so a SCRIPT FLUSH or a failover to a server that never saw the script
  recovers by itself.

:class:`ScriptRunner` adds what every call needs: a request id (the reply-cache key
that makes a retried call apply once), bounded retry with backoff on connection
loss, and mapping of script errors to :mod:`dataflow_redis.errors`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import redis

from . import _args, errors
from .keys import KEY_NAMES, RunKeys
from .records import new_id

_INCLUDE = re.compile(r"^-- @include (\w+)\s*$", re.M)


def lua_dir() -> Path:
    """Directory holding the Lua scripts: inside the installed package, else the repo."""
    packaged = resources.files("dataflow_redis") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    source_tree = Path(__file__).resolve().parent.parent / "lua"
    if source_tree.is_dir():
        return source_tree
    raise FileNotFoundError("dataflow_redis: Lua scripts not found; reinstall the package")


def parse_key_names(source: str, name: str) -> list[str]:
    """Key names from a script header: the words after ``-- KEYS:`` up to ``-- ARGV:``."""
    names: list[str] = []
    in_keys = False
    for line in source.splitlines():
        if line.startswith("-- KEYS:"):
            in_keys = True
            line = line[len("-- KEYS:"):]
        elif line.startswith("-- ARGV:") or not line.startswith("--"):
            if in_keys:
                break
            continue
        elif not in_keys:
            continue
        names.extend(line.lstrip("-").split())
    unknown = [n for n in names if n != "reply" and n not in KEY_NAMES]
    if not names or unknown:
        raise ValueError(f"{name}.lua: bad KEYS header (unknown: {unknown})")
    return names


@dataclass(frozen=True)
class LuaScript:
    """One operation's source with its includes inlined, and its declared key names."""

    name: str
    key_names: tuple[str, ...]
    source: str


_TOP_LEVEL_LOCAL = re.compile(r"^local (?:function )?([\w, ]+?)\s*(?:=|\()", re.M)
_COMMENT = re.compile(r"--[^\n]*")
_NAME = re.compile(r"(?<![.:\w])[A-Za-z_]\w*")


def _names_used(code: str) -> set[str]:
    """Identifiers ``code`` mentions outside comments (field names after . or : excluded)."""
    return set(_NAME.findall(_COMMENT.sub("", code)))


def shake_includes(includes: list[str], body: str) -> str:
    """The definitions of ``includes`` that ``body`` needs, directly or through each
    other, in their original order.

    Every script runs its includes' top-level code on each call, and creating a Lua
    closure is not free: a lease that defined all 40 helpers spent about a quarter of
    its time doing so. An include is a sequence of top-level ``local`` definitions (a
    block runs from one top-level ``local`` line to the next); a block is kept when a
    name it defines is used by the body or by a kept block.
    """
    blocks: list[tuple[set[str], str]] = []
    for text in includes:
        starts = [m.start() for m in _TOP_LEVEL_LOCAL.finditer(text)]
        for begin, end in zip(starts, starts[1:] + [len(text)]):
            block = text[begin:end]
            defined = {n.strip() for n in _TOP_LEVEL_LOCAL.match(block).group(1).split(",")}
            blocks.append((defined, block))
    used = _names_used(body)
    keep = [False] * len(blocks)
    grew = True
    while grew:
        grew = False
        for i, (defined, block) in enumerate(blocks):
            if not keep[i] and defined & used:
                keep[i] = grew = True
                used |= _names_used(block)
    return "".join(block for (_, block), kept in zip(blocks, keep) if kept)


_KEY_REF = re.compile(r"(?<![\w.])K\.(\w+)")


def bind_keys(code: str, key_names: Sequence[str]) -> str:
    """``code`` with every ``K.<name>`` of a declared key written as ``KEYS[<i>]``.

    A table of the keys by name would be built on every call: with 16 keys that cost
    about 10,000 instructions a call (callgrind), as much as two Redis commands. A
    ``K.<name>`` the header does not declare stays, with ``K`` an empty table, so it
    reads nil as before (tests/test_scripts_and_keys.py rejects such names statically).
    """
    index = {name: i + 1 for i, name in enumerate(key_names)}
    bound = _KEY_REF.sub(lambda m: f"KEYS[{index[m.group(1)]}]" if m.group(1) in index else m.group(0), code)
    return ("local K = {}\n" + bound) if _KEY_REF.search(_COMMENT.sub("", bound)) else bound


@functools.lru_cache(maxsize=None)
def load_scripts() -> dict[str, LuaScript]:
    """Read and assemble every ``lua/*.lua`` (cached: files are read once per process)."""
    root = lua_dir()
    out = {}
    for path in sorted(root.glob("*.lua")):
        text = path.read_text()
        key_names = parse_key_names(text, path.stem)
        includes = [(root / "includes" / f"{name}.lua").read_text() for name in _INCLUDE.findall(text)]
        body = _INCLUDE.sub("", text)
        source = bind_keys(shake_includes(includes, body) + body, key_names)
        out[path.stem] = LuaScript(path.stem, tuple(key_names), source)
    return out


def content_digest(parts: Iterable[Any]) -> str:
    """A short digest of a call's content (for its reply-cache key): a retry of the same
    call finds the first reply, another call under the same request id does not."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(str(part).encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
             redis.exceptions.ClusterError)
"""Failures of a call Redis did not run, or whose reply was lost. ClusterError: a
RedisCluster client that ran out of redirects or TRYAGAIN answers (a slot migrating
under the run: a script that creates a key, as the reply cache does, is answered
TRYAGAIN until the migration ends)."""


def cluster_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is a RedisCluster client finding no node it can reach (every
    node down or restarting): passing, like a lost connection."""
    return isinstance(exc, redis.exceptions.RedisClusterException) and "cannot be connected" in str(exc)


MAYBE_PASSING = (*RETRYABLE, redis.exceptions.RedisClusterException)
"""What a retry loop catches; :func:`is_passing` tells which of them to retry."""


def is_passing(exc: BaseException) -> bool:
    """Whether ``exc`` (caught as MAYBE_PASSING) is a lost connection or a call Redis
    did not run, which a retry may outlive; other RedisClusterExceptions are not."""
    return isinstance(exc, RETRYABLE) or cluster_unreachable(exc)


class Retry:
    """One call's retry budget: tries go on until ``retry_s`` seconds have passed since
    the call began. The first retry follows at once (a pooled connection that was
    dropped while idle is simply reopened), then the pause starts at 0.05 s and
    doubles up to 1 s; the last pause is cut so that one more try starts at the limit.
    A try under way at the limit ends by the socket timeout (``connect()``: 5 s)."""

    __slots__ = ("retry_s", "started", "delay")

    def __init__(self, retry_s: float, started: float) -> None:
        self.retry_s = retry_s
        self.started = started
        self.delay = 0.0

    def wait(self, exc: Exception) -> None:
        """Sleep before the next try of a call Redis did not run (or whose reply was
        lost); raise :class:`~dataflow_redis.errors.ConnectionFailed` once the budget
        is spent."""
        now = time.monotonic()
        elapsed = now - self.started
        if elapsed >= self.retry_s:
            if isinstance(exc, redis.exceptions.ClusterError) and not isinstance(exc, redis.ResponseError):
                raise errors.ConnectionFailed(
                    f"the Redis Cluster kept redirecting the call or asking it to try again for {elapsed:.1f}s "
                    f"({exc}): a slot migration or failover is under way; check redis-cli --cluster check") from None
            if isinstance(exc, redis.exceptions.ReadOnlyError):
                raise errors.ConnectionFailed(
                    f"Redis answered as a read-only replica for {elapsed:.1f}s ({exc}); point the "
                    "URL at the primary (or at an endpoint that follows failovers)") from None
            if is_busy(exc):
                raise errors.ConnectionFailed(
                    f"Redis stayed busy running another client's script for {elapsed:.1f}s ({exc}); "
                    "find it with SLOWLOG GET, end it with SCRIPT KILL") from None
            if isinstance(exc, redis.ResponseError):
                raise errors.ConnectionFailed(
                    f"Redis kept refusing the call for {elapsed:.1f}s ({exc}); check the state of the "
                    "server or cluster (CLUSTER INFO, INFO replication)") from None
            raise errors.ConnectionFailed(
                f"Redis unreachable for {elapsed:.1f}s ({exc}); check that it is "
                "running and that the URL is right"
            ) from None
        time.sleep(min(self.delay, self.retry_s - elapsed))
        self.delay = min(self.delay * 2, 1.0) if self.delay else 0.05


class ScriptRunner:
    """Runs the scripts of one run on one Redis client.

    ``retry_s`` bounds how long a call keeps retrying through connection loss (a Redis
    restart, a failover) before raising :class:`~dataflow_redis.errors.ConnectionFailed`
    (see :class:`Retry`); retries reuse the call's request id, so a call whose reply
    was lost applies once. :meth:`read` gives plain reads the same retry.
    """

    def __init__(self, client: redis.Redis, keys: RunKeys, retry_s: float = 20.0) -> None:
        self.client = client
        self.keys = keys
        self.retry_s = retry_s
        self._scripts = {}
        self._key_lists = {}
        self._reply_slots = {}
        for name, script in load_scripts().items():
            self._scripts[name] = client.register_script(script.source)
            self._key_lists[name] = [
                None if n == "reply" else getattr(keys, n) for n in script.key_names
            ]
            self._reply_slots[name] = script.key_names.index("reply") if "reply" in script.key_names else None

    def __call__(self, name: str, args: Sequence[Any], request_id: str | None = None,
                 scope: str = "", content: Iterable[Any] | None = None) -> Any:
        """Run script ``name`` with ARGV ``args``; returns the script's reply.

        A cached reply is found only by the same operation (``name``) from the same
        caller (``scope``: a worker or trainer id) with the same ``request_id`` (checked
        with :func:`~dataflow_redis._args.request_id`) and the same ``content`` (default:
        ``args``; callers leave out what differs between tries, such as generated ids).
        """
        started = time.monotonic()
        keys = self._key_lists[name]
        slot = self._reply_slots[name]
        if slot is not None:
            # Without the operation, caller and content in the key, a request id reused
            # for a lease and then a commit, by two trainers acking the same step, or for
            # the next batch, would be handed another call's cached reply and apply nothing.
            keys = keys.copy()
            if request_id is None:
                keys[slot] = self.keys.reply(new_id())
            else:
                digest = content_digest(args if content is None else content)
                keys[slot] = self.keys.reply(f"{name}:{scope}:{_args.request_id(request_id)}:{digest}")
        script = self._scripts[name]
        # EVALSHA straight through the client: redis-py's Script wrapper costs several
        # microseconds a call. A NOSCRIPT (SCRIPT FLUSH, a failover to a server that
        # never saw the script) is answered below.
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        execute = self.client.execute_command
        retry = None
        while True:
            try:
                return execute(*command)
            except redis.exceptions.NoScriptError:
                # Send the source once: EVAL runs the call and caches the script on the
                # node that serves these keys (SCRIPT LOAD on a RedisCluster goes to
                # every primary and fails while any is down). The next call is EVALSHA.
                command = ("EVAL", script.script, *command[2:])
            except redis.exceptions.ReadOnlyError as exc:
                # A replica: the primary failed over, or the URL names a replica. A
                # script fails at its first write there, so nothing was written.
                self._drop_connections()
                retry = retry or Retry(self.retry_s, started)
                retry.wait(exc)
            except redis.ResponseError as exc:
                if not is_transient(exc):
                    raise translate_error(exc) from None
                # Another client's script is still running, or the cluster is between
                # states: ours was not run, so it is retried like a lost connection.
                retry = retry or Retry(self.retry_s, started)
                retry.wait(exc)
            except UnicodeEncodeError as exc:  # raised while packing the call: nothing was sent
                raise errors.InvalidArgument(
                    f"an argument is not valid Unicode ({exc.reason}: {exc.object[exc.start:exc.end]!r}); "
                    "decode the text properly before passing it"
                ) from None
            except redis.AuthenticationError as exc:
                raise auth_failed(str(exc)) from None
            except MAYBE_PASSING as exc:
                if not is_passing(exc):
                    raise
                retry = retry or Retry(self.retry_s, started)
                retry.wait(exc)

    def _drop_connections(self) -> None:
        """Close the pooled connections after READONLY: the next one resolves the host
        name again, as an endpoint that follows failovers needs (RedisCluster has no
        pool here: it follows redirects itself)."""
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            pool.disconnect()

    def read(self, read: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``read(*args, **kwargs)``: plain Redis reads (no script), retried as a script
        call is (they change nothing, so a repeat is harmless), with this library's
        errors instead of redis-py's."""
        retry = Retry(self.retry_s, time.monotonic())
        while True:
            try:
                return read(*args, **kwargs)
            except redis.exceptions.ReadOnlyError as exc:  # a write (delete) met a replica: as for a script
                self._drop_connections()
                retry.wait(exc)
            except redis.ResponseError as exc:
                if not is_transient(exc):
                    raise translate_error(exc) from None
                retry.wait(exc)
            except redis.AuthenticationError as exc:
                raise auth_failed(str(exc)) from None
            except MAYBE_PASSING as exc:
                if not is_passing(exc):
                    raise
                retry.wait(exc)


def retried_read(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for the methods that make plain (non-script) reads: run them through
    :meth:`ScriptRunner.read` of their control plane (``self``, or ``self.cp`` for the
    clients of a control plane)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, "cp", self)._runner.read(method, self, *args, **kwargs)

    return wrapper


def is_busy(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis's BUSY reply: another client's script is running past
    busy-reply-threshold, and the refused command was not run (safe to retry)."""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith("BUSY")


_PASSING_STATES = ("BUSY", "UNBLOCKED", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "LOADING")
"""Error replies for a state that passes, for a command Redis did not run: a script
running past busy-reply-threshold, a blocked command ended by a failover, a cluster
without a slot's master or moving a slot, a replica without its master, a server
loading its data."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an error reply that a retry may outlive (see _PASSING_STATES)."""
    return isinstance(exc, (redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError)) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(_PASSING_STATES))


_NO_PASSWORD_GIVEN = ("HELLO must be called with the client already authenticated", "Authentication required",
                      "Protocol error: unauthenticated")


def auth_failed(message: str) -> errors.AuthenticationFailed:
    """The library's error for Redis refusing a client's credentials, saying what to fix."""
    message = message.rstrip(".")
    if any(marker in message for marker in _NO_PASSWORD_GIVEN):
        # redis-py 8 opens with HELLO, which a server with a password refuses as
        # "NOAUTH HELLO must be called ..."; older clients meet "NOAUTH Authentication required".
        return errors.AuthenticationFailed(
            "Redis refused the credentials: the server requires a password and the URL gives none; "
            "put it in the URL (redis://:PASSWORD@host:port/db, or redis://USER:PASSWORD@... for an ACL user)")
    if "without any password configured" in message:
        return errors.AuthenticationFailed(
            "Redis refused the credentials: the URL gives a password but the server has none set; "
            "remove it from the URL (or set requirepass on the server)")
    return errors.AuthenticationFailed(
        f"Redis refused the credentials ({message}); check the user and password in the URL")


def translate_error(exc: redis.ResponseError) -> errors.DataflowError:
    """The library's exception for an error reply of Redis or of a script."""
    message = str(exc)
    if isinstance(exc, (redis.exceptions.MovedError, redis.exceptions.AskError)):
        # A plain client on a cluster node: the run's slot is served by another node.
        return errors.InvalidArgument(
            f"this URL names a node of a Redis Cluster and the run's keys are on another node "
            f"({message.split(' ', 1)[-1]}); add ?cluster=true to the URL")
    if message.startswith("DB index is out of range"):
        return errors.InvalidArgument(
            "the database number in the Redis URL does not exist on this server (DB index is out of "
            "range; a default server has databases 0-15)")
    if message.startswith("The user executing the script can't run this command"):
        # An ACL that allows EVALSHA but not a command the script calls. Redis does not
        # undo what the script wrote before that command.
        return errors.AuthenticationFailed(
            f"the Redis user may not run a command this call needs ({message.split(' script: ')[0]}); "
            "any writes the call made before it stay. Grant the ACL line in docs/reliability.md")
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or "used memory > 'maxmemory'" in message:
        return errors.OutOfMemory(
            "Redis is at its maxmemory and refuses writes that add data (maxmemory-policy "
            "noeviction); this call changed nothing. Trainers still lease, heartbeat and ack: "
            "let them drain the queue, delete finished runs, or raise maxmemory")
    if message.startswith("NOAUTH") or message.startswith("Protocol error: unauthenticated"):
        # No password given to a server that wants one: Redis answers a long first
        # command (a script call) from an unauthenticated client with a protocol error.
        return auth_failed(message)
    if "MISCONF" in message[:10]:
        # Redis checks this at a script's first write, so the call wrote nothing.
        return errors.WritesRefused(
            "Redis refuses every write because it cannot persist: its last RDB save or AOF write "
            "failed (MISCONF); this call changed nothing. Find the cause in the Redis log (disk "
            "full, permissions) and fix it (then BGSAVE); reads still work")
    # redis-py strips the NOPERM code when it raises its NoPermissionError subclass.
    if isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in message[:40]:
        return errors.AuthenticationFailed(
            f"the Redis user may not run this ({message}); see the ACL line in docs/reliability.md"
        )
    return errors.from_script_error(message)
