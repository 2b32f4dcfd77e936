"""``dataflow-redis``: inspect and steer a live run from a terminal.

This module only parses arguments, calls the library and formats output. Every
command that reads or changes a run goes through :class:`~dataflow_redis.ControlPlane`.

Connection: ``--redis-url`` (env ``DATAFLOW_REDIS_URL``; redis://, rediss://, unix://,
``user:password@`` for ACL users), ``--run`` (env ``DATAFLOW_RUN``), ``--namespace``
(env ``DATAFLOW_NAMESPACE``). A password is never printed: URLs in messages are masked.

Errors print one line on stderr and exit with a code that says what went wrong:

| code | meaning                                                     |
|------|-------------------------------------------------------------|
| 1    | any other error (including a demo that lost tasks)          |
| 2    | a bad value or usage (bad config value, bad URL, bad id)    |
| 3    | Redis unreachable                                           |
| 4    | Redis refused the credentials or lacks an ACL permission    |
| 5    | unknown run (no state under this run id and namespace)      |
| 130  | interrupted (Ctrl-C); 143 for SIGTERM (demo, bench)         |

Set ``DATAFLOW_REDIS_DEBUG=1`` to see the Python traceback of an unexpected error.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import click
import redis

from .config import parse_value
from .control_plane import ControlPlane, connect
from .errors import (AuthenticationFailed, ConfigError, ConnectionFailed, DataflowError,
                     InvalidArgument, UnknownRun)
from .keys import DEFAULT_NAMESPACE, runs_patterns, validate_namespace, validate_run_id
from .scripts import auth_failed, translate_error

DEFAULT_URL = "redis://localhost:6379/0"
CLI_RETRY_S = 3.0
"""How long a command keeps retrying through connection loss before giving up, seconds."""

EXIT_ERROR, EXIT_BAD_VALUE, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_UNKNOWN_RUN = 1, 2, 3, 4, 5
KIB = 1024


class FiniteFloatRange(click.FloatRange):
    """A finite number in [min, max]: click's FloatRange lets nan through (every
    comparison with nan is false), and a sleep or deadline of nan fails much later."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> float:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


# ----------------------------------------------------------------- formatting helpers
def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (in the user part and in a
    ``password=`` query parameter)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = netloc.rpartition("@")[2]
            netloc = f"{user}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*/")
        # Built by hand: urlunsplit would turn unix:///path into unix:/path.
        return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
                + (f"#{parts.fragment}" if parts.fragment else ""))
    except ValueError:
        return "<unparsable URL>"


def url_secrets(url: str) -> list[str]:
    """Every form in which ``url``'s password could appear in a message."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            raw = userinfo.split(":", 1)[1]
            found += [raw, unquote(raw)]
        found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() == "password"]
    except ValueError:
        # Unparsable: treat whatever sits between '://' and the last '@' as secret.
        head = url.split("://", 1)[-1].rpartition("@")[0]
        if head:
            found.append(head)
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def scrub(message: str, url: Optional[str]) -> str:
    """One line, with the URL masked and any trace of its password removed."""
    text = " ".join(str(message).split())
    if url:
        text = text.replace(url, mask_url(url))
        for secret in url_secrets(url):
            text = text.replace(secret, "***")
    return text


STALE_SHARDS_SHOWN = 5
"""Stale shard ids the status table names; --json lists them all."""


def list_some(names: list[str], shown: int = STALE_SHARDS_SHOWN) -> str:
    """``names`` joined by commas, the first ``shown`` of them and a count of the rest."""
    if not names:
        return "none"
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def fmt_bytes(n: Optional[float]) -> str:
    """Bytes in binary units: 512 B, 4.0 KiB, 1.5 MiB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def fmt_ms(ms: Optional[int]) -> str:
    """A Redis server time in ms as a UTC timestamp."""
    if ms is None:
        return "-"
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def fmt_value(value: Any) -> str:
    return "-" if value is None else str(value)


def watermark_bar(resident: int, reserved: int, high: Optional[int], low: Optional[int],
                  cap: Optional[int] = None, width: int = 50) -> str:
    """A text bar: ``#`` resident, ``+`` reserved, ``L``/``H`` the low/high watermarks.

        [###########################+++++.....L...........H.......]
    """
    scale = max(1, resident + reserved, cap or 0, int((high or 0) * 1.25))
    cells = []
    for i in range(width):
        x = (i + 0.5) * scale / width
        cells.append("#" if x <= resident else "+" if x <= resident + reserved else ".")
    for mark, at in (("L", low), ("H", high)):
        if at is not None:
            cells[min(width - 1, int(at * width / scale))] = mark
    return "[" + "".join(cells) + "]"


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A plain left-aligned text table."""
    text_rows = [[fmt_value(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in text_rows]
    return "\n".join(lines)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


# ------------------------------------------------------------------------ the target
@dataclass
class Target:
    """Where the commands point: a Redis URL, a namespace and (for most) a run."""

    url: str
    run: Optional[str]
    namespace: str
    _client: Optional[redis.Redis] = field(default=None, repr=False)
    _cp: Optional[ControlPlane] = field(default=None, repr=False)

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = connect(self.url, socket_connect_timeout=3.0)
        return self._client

    def control_plane(self, must_exist: bool = True) -> ControlPlane:
        """The run's ControlPlane; with ``must_exist``, refuse a run with no state."""
        if self.run is None:
            raise InvalidArgument("no run given: pass --run RUN_ID or set DATAFLOW_RUN "
                                  "(`dataflow-redis runs` lists the runs)")
        if self._cp is None:
            self._cp = ControlPlane(self.client(), self.run, self.namespace, retry_s=CLI_RETRY_S)
        if must_exist and not self._cp.exists():
            raise UnknownRun(
                f"run {self.run!r} has no state in namespace {self.namespace!r} at {self.masked_url}; "
                "check --run, the database and --namespace (`dataflow-redis runs` lists the runs)"
            )
        return self._cp

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def cli_error(exc: BaseException, target: Optional[Target]) -> click.ClickException:
    """Map any exception to one clear line and an exit code (see the module docstring).

    The library's own errors are already worded for people; they get the (masked)
    URL in front. redis-py's raw errors (from the few plain reads the CLI makes
    itself) are worded here.
    """
    url = target.url if target else None
    where = target.masked_url if target else "Redis"
    text = str(exc).rstrip(".")
    if isinstance(exc, AuthenticationFailed):
        message, code = f"{where}: {text}", EXIT_AUTH
    elif isinstance(exc, redis.exceptions.NoPermissionError) or (
            isinstance(exc, redis.ResponseError) and text.startswith("NOPERM")):
        message, code = f"{where}: the Redis user lacks a permission ({text})", EXIT_AUTH
    elif isinstance(exc, redis.AuthenticationError) or (
            isinstance(exc, redis.ResponseError) and text.split(" ", 1)[0] in ("WRONGPASS", "NOAUTH")):
        return cli_error(auth_failed(text), target)
    elif isinstance(exc, (redis.exceptions.MovedError, redis.exceptions.AskError)) or (
            isinstance(exc, redis.ResponseError) and text.startswith("DB index is out of range")):
        return cli_error(translate_error(exc), target)
    elif isinstance(exc, ConnectionFailed):
        message, code = f"cannot reach Redis at {where}: {text}", EXIT_UNREACHABLE
    elif isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        message, code = (f"cannot reach Redis at {where}: {text}; check that it runs and that "
                         "--redis-url / DATAFLOW_REDIS_URL is right"), EXIT_UNREACHABLE
    elif isinstance(exc, UnknownRun):
        message, code = text, EXIT_UNKNOWN_RUN
    elif isinstance(exc, InvalidArgument):
        message, code = text, EXIT_BAD_VALUE
    elif isinstance(exc, DataflowError):
        message, code = text, EXIT_ERROR
    elif isinstance(exc, redis.RedisError):
        message, code = f"{where}: Redis error: {text}", EXIT_ERROR
    elif isinstance(exc, OSError):
        message, code = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), EXIT_ERROR
    else:
        message, code = f"unexpected {type(exc).__name__}: {text}", EXIT_ERROR
    error = click.ClickException(scrub(message, url))
    error.exit_code = code
    return error


class DataflowCli(click.Group):
    """The root group: turns every error into one line and an exit code, and loads
    ``bench`` lazily (its module may be absent from a trimmed installation)."""

    LAZY = {"bench": ("dataflow_redis.bench", "bench_command")}

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            # Ctrl-C: the conventional 128 + SIGINT, not click's "Aborted!" with exit 1
            # (which a script could not tell from a failed command).
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except BrokenPipeError:
            # The reader went away (`dataflow-redis events | head`): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise click.exceptions.Exit(EXIT_ERROR) from None
        except Exception as exc:
            if os.environ.get("DATAFLOW_REDIS_DEBUG"):
                raise
            raise cli_error(exc, ctx.obj if isinstance(ctx.obj, Target) else None) from None
        finally:
            if isinstance(ctx.obj, Target):
                ctx.obj.close()

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        names.update(name for name in self.LAZY if self._lazy(name) is not None)
        return sorted(names)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        return super().get_command(ctx, name) or (self._lazy(name) if name in self.LAZY else None)

    def _lazy(self, name: str) -> Optional[click.Command]:
        module_name, attribute = self.LAZY[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        return getattr(module, attribute, None)


pass_target = click.make_pass_decorator(Target)


@click.group(cls=DataflowCli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--redis-url", envvar="DATAFLOW_REDIS_URL", default=DEFAULT_URL, show_default=True,
              metavar="URL", help="Redis URL: redis://[user:password@]host:port/db, rediss://..., "
                                  "unix:///path/redis.sock?db=0; add ?cluster=true for a node of a Redis "
                                  "Cluster (env DATAFLOW_REDIS_URL).")
@click.option("--run", "run_id", envvar="DATAFLOW_RUN", metavar="RUN_ID", help="Run id (env DATAFLOW_RUN).")
@click.option("--namespace", envvar="DATAFLOW_NAMESPACE", default=DEFAULT_NAMESPACE, show_default=True,
              help="Key namespace of the runs (env DATAFLOW_NAMESPACE).")
@click.version_option(package_name="dataflow-redis", prog_name="dataflow-redis")
@click.pass_context
def main(ctx: click.Context, redis_url: str, run_id: Optional[str], namespace: str) -> None:
    """Operate a dataflow-redis run: status, watch, config, pause/resume, leases,
    dead letters, events, metrics; `demo` shows backpressure at work in one command."""
    ctx.obj = Target(redis_url, None, namespace)
    validate_namespace(namespace)
    if run_id is not None:
        ctx.obj.run = validate_run_id(run_id)


# -------------------------------------------------------------------------- status
def status_text(status: dict[str, Any], target: Target, worker_inflight: Optional[dict[str, int]] = None,
                warnings: tuple[str, ...] = ()) -> str:
    """The status dict as a readable table, then any server warnings."""
    rows: list[tuple[str, str]] = []

    def section(title: str) -> None:
        rows.append(("", ""))
        rows.append((title, ""))

    def row(name: str, value: Any) -> None:
        rows.append(("  " + name, fmt_value(value)))

    rows.append(("run", f"{status['run_id']}  (namespace {target.namespace}, {target.masked_url})"))
    rows.append(("server time", fmt_ms(status["server_time_ms"])))
    rows.append(("config version", str(status["config_version"])))
    section("prompts")
    row("ingested", status["prompts"])
    row("pending", status["prompts_pending"])
    row("leased", status["prompts_leased"])
    row("done", status["prompts_done"])
    row("dead-lettered", status["prompts_failed"])
    section("samples")
    row("committed", status["samples_committed"])
    row("acked", f"{status['samples_acked']}  (above the checkpoint {status['uncheckpointed_acked']})")
    row("failed", status["samples_failed"])
    row("train backlog", f"{status['train_backlog']}  (queued {status['queue_depth']}, "
                         f"in flight {status['queue_in_flight']})")
    row("fenced commits", status["fenced_commits"])
    section("clients")
    row("rollout workers", status["rollout_workers"])
    row("trainers", status["trainers"])
    if worker_inflight:
        busiest = sorted(worker_inflight.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        row("in flight", ", ".join(f"{w}={n}" for w, n in busiest)
            + (f" (+{len(worker_inflight) - 8} more)" if len(worker_inflight) > 8 else ""))
    section("durable marker")
    row("global step", status["durable_global_step"])
    row("checkpoint step", status["checkpoint_global_step"])
    section("backpressure")
    operator = status.get("operator_pause")
    bp = status.get("backpressure")
    if not bp:
        row("policy", "off (no lever configured)")
        row("operator pause", f"PAUSED: {operator['reason']!r} for {operator['since_s']:.1f} s" if operator else "no")
    else:
        if operator:
            state = f"PAUSED by operator: {operator['reason']!r} for {operator['since_s']:.1f} s"
            if bp["paused"]:
                state += "; latch paused too"
        elif bp["paused"]:
            state = "PAUSED by the watermark latch (resumes at or below the low watermark)"
        else:
            state = "running"
        row("state", state)
        high, low = bp["high_watermark_bytes"], bp["low_watermark_bytes"]
        row("resident", f"{fmt_bytes(bp['resident_bytes'])}  "
                        + watermark_bar(bp["resident_bytes"], bp["reserved_bytes"], high, low,
                                        bp["max_resident_bytes"], width=40))
        row("reserved", fmt_bytes(bp["reserved_bytes"]))
        row("high / low watermark", f"{fmt_bytes(high)} / {fmt_bytes(low)}")
        row("free to high watermark", fmt_bytes(bp["free_to_high_watermark_bytes"]))
        row("peak resident", fmt_bytes(bp["peak_resident_bytes"]))
        row("store cap", f"{fmt_bytes(bp['max_resident_bytes'])}  ({bp['shards']} shard(s), "
                         f"stale: {list_some(sorted(bp['stale_shards']))})")
        row("transitions", f"{bp['pause_transitions']} pauses, {bp['resume_transitions']} resumes")
        row("rollout starvation", f"{bp['rollout_starved']} refused leases, {bp['rollout_starved_s']:.1f} s")
        row("trainer starvation", f"{bp['trainer_starved']} empty leases, {bp['trainer_starved_s']:.1f} s")
        row("worker cap hits", bp["rollout_capped"])
        avg, oldest = bp["avg_feature_age_s"], bp["oldest_feature_age_s"]
        row("feature age", "-" if avg is None and oldest is None else
            f"avg {fmt_value(avg)} s, oldest {fmt_value(oldest)} s")
    width = max(len(name) for name, _ in rows) + 2
    text = "\n".join(f"{name.ljust(width)}{value}".rstrip() if value else name for name, value in rows)
    return text + "".join(f"\n\nwarning: {w}" for w in warnings)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print exactly ControlPlane.status() as JSON.")
@pass_target
def status(target: Target, as_json: bool) -> None:
    """A snapshot of the run: queues, acks, durable marker, backpressure."""
    cp = target.control_plane()
    snapshot = cp.status()
    if as_json:
        echo_json(snapshot)
    else:
        click.echo(status_text(snapshot, target, cp.worker_inflight(), tuple(cp.server_warnings())))


# --------------------------------------------------------------------------- watch
RATE_FIELDS = (("ingested", "prompts"), ("committed", "samples_committed"), ("acked", "samples_acked"))


def watch_frame(status: dict[str, Any], previous: Optional[dict[str, Any]], target: Target,
                worker_inflight: dict[str, int]) -> str:
    """One screen of ``watch``: the bar, latch, in-flight, starvation, rates per second."""
    lines = [f"run {status['run_id']}  {fmt_ms(status['server_time_ms'])}  ({target.masked_url})"]
    bp = status.get("backpressure")
    operator = status.get("operator_pause")
    if bp:
        high, low = bp["high_watermark_bytes"], bp["low_watermark_bytes"]
        lines.append(watermark_bar(bp["resident_bytes"], bp["reserved_bytes"], high, low,
                                   bp["max_resident_bytes"], width=60))
        lines.append(f"  # resident {fmt_bytes(bp['resident_bytes'])}   + reserved {fmt_bytes(bp['reserved_bytes'])}"
                     f"   L low {fmt_bytes(low)}   H high {fmt_bytes(high)}"
                     f"   peak {fmt_bytes(bp['peak_resident_bytes'])}")
        latch = "PAUSED" if bp["paused"] else "open"
        lines.append(f"latch {latch}  ({bp['pause_transitions']} pauses, {bp['resume_transitions']} resumes)"
                     f"   operator: " + (f"PAUSED {operator['reason']!r}" if operator else "no pause"))
        lines.append(f"starvation  rollout {bp['rollout_starved']} ({bp['rollout_starved_s']:.1f} s)"
                     f"   trainer {bp['trainer_starved']} ({bp['trainer_starved_s']:.1f} s)"
                     f"   worker cap hits {bp['rollout_capped']}")
    else:
        lines.append("backpressure off" + (f"   operator: PAUSED {operator['reason']!r}" if operator else ""))
    lines.append(f"prompts pending {status['prompts_pending']}  leased {status['prompts_leased']}  "
                 f"done {status['prompts_done']}/{status['prompts']}  dead-lettered {status['prompts_failed']}")
    lines.append(f"samples queued {status['queue_depth']}  in flight {status['queue_in_flight']}  "
                 f"acked {status['samples_acked']}  backlog {status['train_backlog']}")
    if previous is not None and status["server_time_ms"] > previous["server_time_ms"]:
        dt = (status["server_time_ms"] - previous["server_time_ms"]) / 1000
        rates = "  ".join(f"{name} {(status[key] - previous[key]) / dt:.1f}" for name, key in RATE_FIELDS)
        lines.append(f"rates /s    {rates}")
    else:
        lines.append("rates /s    (after the next refresh)")
    if worker_inflight:
        busiest = sorted(worker_inflight.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        lines.append("in flight   " + "  ".join(f"{w}={n}" for w, n in busiest))
    return "\n".join(lines)


@main.command()
@click.option("--interval", type=FiniteFloatRange(0.05, 3600), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Stop after this many refreshes (default: until Ctrl-C).")
@pass_target
def watch(target: Target, interval: float, iterations: Optional[int]) -> None:
    """A refreshing view: resident bytes against the watermarks, latch, in-flight,
    starvation and rates per second. Ctrl-C exits."""
    cp = target.control_plane()
    tty = sys.stdout.isatty()
    previous = None
    shown = 0
    try:
        while iterations is None or shown < iterations:
            snapshot = cp.status()
            frame = watch_frame(snapshot, previous, target, cp.worker_inflight())
            if tty:
                click.clear()
            elif shown:
                click.echo("")
            click.echo(frame)
            previous, shown = snapshot, shown + 1
            if iterations is None or shown < iterations:
                time.sleep(interval)
    except KeyboardInterrupt:
        click.echo("")  # leave the prompt on a fresh line; Ctrl-C is the normal way out


# -------------------------------------------------------------------------- config
@main.group()
def config() -> None:
    """Show or change the run's settings and backpressure levers."""


def config_dict(cp: ControlPlane) -> dict[str, Any]:
    return {"version": cp.config_version(), "settings": asdict(cp.settings()),
            "backpressure": asdict(cp.backpressure_config())}


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_target
def config_show(target: Target, as_json: bool) -> None:
    """The stored config (a dash: unset)."""
    current = config_dict(target.control_plane())
    if as_json:
        echo_json(current)
        return
    click.echo(f"config version {current['version']}")
    for group in ("settings", "backpressure"):
        for name, value in current[group].items():
            shown = fmt_value(value)
            if name == "low_watermark_bytes" and value is None and current[group].get("high_watermark_bytes") is not None:
                shown += " (follows high_watermark_bytes)"
            click.echo(f"{name:34}{shown}")



@config.command("set", context_settings={"ignore_unknown_options": False})
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option("--reason", default="set from the command line", show_default=True,
              help="Recorded with the change in the event log.")
@click.option("--create", is_flag=True, help="Allow configuring a run that has no state yet.")
@pass_target
def config_set(target: Target, assignments: tuple[str, ...], reason: str, create: bool) -> None:
    """Change fields in one atomic step, validated like the API (VALUE 'none' unsets).

    Fields: max_prompt_attempts, max_record_bytes, reply_ttl_s, high_watermark_bytes,
    low_watermark_bytes, max_inflight_prompts_per_worker, max_train_lease,
    default_task_bytes, stale_after_s.
    """
    values: dict[str, Any] = {}
    for item in assignments:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"expected KEY=VALUE, got {item!r} (e.g. high_watermark_bytes=67108864)")
        if name.strip() in values:
            raise ConfigError(f"{name.strip()} is given twice; give each field once")
        values[name.strip()] = parse_value(name.strip(), text)
    cp = target.control_plane(must_exist=not create)
    version = cp.set_config(reason, **values)
    changes = ", ".join(f"{k}={fmt_value(v)}" for k, v in values.items())
    click.echo(f"config version {version}: {changes}")


# ------------------------------------------------------------------- pause / resume
@main.command()
@click.option("--reason", required=True, help="Why (shown in status and the event log).")
@pass_target
def pause(target: Target, reason: str) -> None:
    """Operator pause: no prompt is leased until `resume`, whatever the watermarks say."""
    if not reason.strip():
        raise InvalidArgument("--reason is empty; say why the run is paused (status and the event log show it)")
    cp = target.control_plane()
    if cp.pause(reason):
        click.echo(f"run {target.run} paused: {reason}")
    else:
        standing = cp.status()["operator_pause"] or {}
        click.echo(f"run {target.run} was already paused ({standing.get('reason', '')!r}); nothing changed")


@main.command()
@click.option("--reason", default="resumed from the command line", show_default=True, help="Why (logged).")
@pass_target
def resume(target: Target, reason: str) -> None:
    """Lift the operator pause (the watermark latch still applies)."""
    changed = target.control_plane().resume(reason)
    click.echo(f"run {target.run} resumed: {reason}" if changed else f"run {target.run} was not paused")


# -------------------------------------------------------------------------- leases
@main.command()
@click.option("--kind", type=click.Choice(["prompt", "train"]), default="prompt", show_default=True,
              help="Prompt leases (rollout workers) or train leases (trainers).")
@click.option("--count", type=click.IntRange(1, 10_000), default=100, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (times in Redis ms).")
@pass_target
def leases(target: Target, kind: str, count: int, as_json: bool) -> None:
    """Current leases: owner, age, time to deadline, attempt (Redis server time)."""
    cp = target.control_plane()
    rows = cp.leases(kind, count)
    seconds, micros = cp.redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    rows.sort(key=lambda r: (r["deadline_ms"] is None, r["deadline_ms"] or 0, r["id"]))
    if as_json:
        echo_json({"kind": kind, "server_time_ms": now_ms, "leases": rows})
        return
    if not rows:
        click.echo(f"no {kind} leases")
        return
    out = []
    for r in rows:
        deadline = None if r["deadline_ms"] is None else f"{(r['deadline_ms'] - now_ms) / 1000:.1f}"
        out.append([r["id"], r["holder"], f"{(now_ms - r['granted_ms']) / 1000:.1f}", deadline,
                     r.get("attempt", "-"), r["reserved_bytes"] if kind == "prompt" else "-"])
    click.echo(table(out, ["id", "holder", "age_s", "deadline_in_s", "attempt", "reserved_bytes"]))


# ----------------------------------------------------------------------------- dlq
@main.group()
def dlq() -> None:
    """Dead-lettered prompt tasks: list them, send them back to pending."""


@dlq.command("list")
@click.option("--count", type=click.IntRange(1, 10_000), default=100, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_target
def dlq_list(target: Target, count: int, as_json: bool) -> None:
    """Dead-lettered tasks with attempt, time and reason."""
    rows = target.control_plane().dead_letters(count)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no dead-lettered tasks")
        return
    click.echo(table([[r["task_id"], r.get("attempt"), fmt_ms(r.get("at_ms")), r.get("reason")] for r in rows],
                     ["task_id", "attempt", "at", "reason"]))


@dlq.command("requeue")
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--reason", default="requeued from the command line", show_default=True, help="Logged.")
@pass_target
def dlq_requeue(target: Target, task_ids: tuple[str, ...], reason: str) -> None:
    """Send dead-lettered TASK_IDS back to pending with attempt 0."""
    requeued = target.control_plane().requeue_dead_letters(list(task_ids), reason)
    click.echo(f"requeued {len(requeued)} of {len(task_ids)} task(s)" + (f": {' '.join(requeued)}" if requeued else ""))
    requeued_set = set(requeued)
    missing = [t for t in task_ids if t not in requeued_set]
    if missing:
        click.echo(f"not dead-lettered (left alone): {' '.join(missing)}", err=True)


# -------------------------------------------------------------------------- events
@main.command()
@click.option("--count", type=click.IntRange(1, 10_000), default=50, show_default=True, help="The newest this many.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_target
def events(target: Target, count: int, as_json: bool) -> None:
    """The transition log: pause, resume, operator actions, config changes, stale shards."""
    rows = target.control_plane().events(count)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no events")
        return
    click.echo(table([[fmt_ms(e.get("at_ms")), e.get("type"), fmt_bytes(e.get("resident_bytes")),
                       fmt_bytes(e.get("reserved_bytes")), e.get("reason")] for e in rows],
                     ["time", "type", "resident", "reserved", "reason"]))


# ---------------------------------------------------------------------------- runs
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_target
def runs(target: Target, as_json: bool) -> None:
    """Runs in the namespace (any run with a config, counters or backpressure state), with
    a few figures each. A run whose status cannot be read is listed with the reason."""
    client = target.client()
    run_ids = set()
    for pattern in runs_patterns(target.namespace):
        prefix = pattern.split("{", 1)[0]
        run_ids |= {key[len(prefix) + 1:key.rindex("}")] for key in client.scan_iter(match=pattern, count=1000)}
    found, odd = [], []
    for run_id in sorted(run_ids):
        try:
            s = ControlPlane(client, run_id, target.namespace, retry_s=CLI_RETRY_S).status()
        except InvalidArgument:
            odd.append(run_id)  # a key under the namespace that no version of this tool wrote
            continue
        except (AuthenticationFailed, ConnectionFailed):
            raise
        except DataflowError as exc:
            found.append({"run_id": run_id, "error": str(exc)})
            continue
        bp = s.get("backpressure") or {}
        found.append({"run_id": run_id, "prompts": s["prompts"], "prompts_pending": s["prompts_pending"],
                      "samples_acked": s["samples_acked"], "train_backlog": s["train_backlog"],
                      "paused": bool(bp.get("paused") or s["operator_pause"]),
                      "resident_bytes": bp.get("resident_bytes")})
    if odd:
        click.echo(f"warning: skipped keys whose run id is not valid: {', '.join(map(repr, odd))}", err=True)
    if as_json:
        echo_json(found)
        return
    if not found:
        click.echo(f"no runs in namespace {target.namespace!r} at {target.masked_url}")
        return
    click.echo(table([[r["run_id"], "-", "-", "-", "-", "error: " + r["error"], "-"] if "error" in r else
                      [r["run_id"], r["prompts"], r["prompts_pending"], r["samples_acked"], r["train_backlog"],
                       "PAUSED" if r["paused"] else "running", fmt_bytes(r["resident_bytes"])] for r in found],
                     ["run", "prompts", "pending", "acked", "backlog", "state", "resident"]))


# ------------------------------------------------------------------- reclaim, metrics
@main.command()
@pass_target
def reclaim(target: Target) -> None:
    """Return every expired lease to its queue now (the operations also do this as they go)."""
    n = target.control_plane().reclaim_expired()
    click.echo(f"reclaimed {n} expired lease(s)")


@main.command()
@click.option("--batch", type=click.IntRange(1, 10_000), default=1000, show_default=True,
              help="Ids moved per script call (each call blocks Redis for about 20 ms per 1,000).")
@pass_target
def migrate(target: Target, batch: int) -> None:
    """Convert a run made by dataflow-redis 0.1.0 (dedup markers as Redis sets) to this
    version's packed id sets. Safe to interrupt and to run again."""
    n = target.control_plane().migrate(batch=batch)
    click.echo(f"moved {n} dedup marker(s) into packed id sets")


@main.command()
@pass_target
def metrics(target: Target) -> None:
    """The status snapshot in Prometheus text exposition format."""
    from .metrics import render

    cp = target.control_plane()
    click.echo(render(cp.status(), cp.worker_inflight()), nl=False)


# ---------------------------------------------------------------------------- demo
def _progress_line(status: dict[str, Any], sample: Any, prompts: int) -> str:
    bp = status.get("backpressure") or {}
    latch = "PAUSED" if bp.get("paused") else "open  "
    bar = watermark_bar(bp.get("resident_bytes", 0), bp.get("reserved_bytes", 0), bp.get("high_watermark_bytes"),
                        bp.get("low_watermark_bytes"), bp.get("max_resident_bytes"), width=30)
    return (f"{sample.t_s:5.1f} s  acked {status['samples_acked']:>6}/{prompts}  {bar}  "
            f"resident {fmt_bytes(bp.get('resident_bytes')):>10}  reserved {fmt_bytes(bp.get('reserved_bytes')):>9}  "
            f"latch {latch}  pauses {bp.get('pause_transitions', 0)}")


def summary_text(s: dict[str, Any]) -> str:
    """The demo's summary for humans."""
    high = s["high_watermark_bytes"]
    lines = [
        f"demo run {s['run_id']} on {s['redis']}",
        f"  pipeline        {s['prompts']} prompts, {s['rollout_workers']} rollout workers, {s['trainers']} trainers",
        f"  duration        {s['duration_s']:.1f} s (Redis server time)",
        f"  throughput      {s['throughput_samples_per_s']:.1f} samples acked per second",
        f"  latch           {s['pause_transitions']} pauses, {s['resume_transitions']} resumes",
        f"  peak resident   {fmt_bytes(s['peak_resident_bytes'])} against high {fmt_bytes(high)} / "
        f"low {fmt_bytes(s['low_watermark_bytes'])} (over high by {fmt_bytes(s['peak_over_high_bytes'])}; "
        f"store cap {fmt_bytes(s['store_cap_bytes'])})",
        f"  peak reserved   {fmt_bytes(s['peak_reserved_bytes'])}",
        f"  starvation      rollout {s['rollout_starved']} refused leases ({s['rollout_starved_s']:.1f} s), "
        f"trainer {s['trainer_starved']} empty leases ({s['trainer_starved_s']:.1f} s)",
        f"  global step     {fmt_value(s['durable_global_step'])} (checkpoint {fmt_value(s['checkpoint_global_step'])})",
        f"  tasks lost      {s['tasks_lost']} of {s['prompts']} (dead-lettered {s['dead_lettered']}, "
        f"resident at end {fmt_bytes(s['resident_bytes_at_end'])})",
        "  result          " + ("OK: every ingested task was acked" if s["ok"] else "FAILED: tasks were lost"),
    ]
    return "\n".join(lines)


@main.command()
@click.option("--role", type=click.Choice(["all", "setup", "rollout", "trainer", "store"]), default="all",
              show_default=True, help="Run the whole demo, or one role against --redis-url (docker-compose).")
@click.option("--index", type=click.IntRange(min=0), default=None,
              help="With --role: this process's number (default: derived from host name and pid).")
@click.option("--prompts", type=click.IntRange(1, 1_000_000), default=None, help="Prompt tasks [1600].")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Rollout worker processes [4].")
@click.option("--trainers", type=click.IntRange(1, 64), default=None, help="Trainer processes [2].")
@click.option("--high-watermark", "high_watermark_bytes", type=click.IntRange(min=1), default=None,
              help="High watermark, bytes [524288].")
@click.option("--low-watermark", "low_watermark_bytes", type=click.IntRange(min=0), default=None,
              help="Low watermark, bytes [262144].")
@click.option("--store-cap", "store_cap_bytes", type=click.IntRange(min=1), default=None,
              help="Simulated store hard cap, bytes [786432].")
@click.option("--rollout-ms", type=FiniteFloatRange(0.1, 60_000), default=None, help="Generation time per sample [30].")
@click.option("--train-step-ms", type=FiniteFloatRange(0.1, 600_000), default=None,
              help="Time per training step of --train-batch samples [160].")
@click.option("--train-batch", type=click.IntRange(1, 1024), default=None, help="Samples per training step [8].")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary, as one JSON object, on stdout.")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write a PNG of resident and reserved bytes against the watermarks (needs [plot]).")
@click.option("--keep/--cleanup", default=None,
              help="Keep the run's keys at the end (default: keep on --redis-url, the private server goes anyway).")
@click.option("--timeout", "timeout_s", type=FiniteFloatRange(1, 86_400), default=300.0, show_default=True,
              help="Give up after this many seconds.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.pass_context
def demo(ctx: click.Context, role: str, index: Optional[int], as_json: bool, plot: Optional[str],
         keep: Optional[bool], timeout_s: float, quiet: bool, **sizes: Any) -> None:
    """A real small pipeline in separate processes, showing backpressure at work.

    Without --redis-url (or DATAFLOW_REDIS_URL) it starts a private redis-server and
    stops it at the end. Progress goes to stderr, the summary to stdout.
    """
    from . import demo as demo_module

    target: Target = ctx.obj
    url_given = ctx.parent is not None and ctx.parent.get_parameter_source("redis_url") not in (
        click.core.ParameterSource.DEFAULT, None)
    overrides = {k: v for k, v in sizes.items() if v is not None}
    for name in ("rollout_ms", "train_step_ms"):
        if name in overrides:
            overrides[name.replace("_ms", "_s")] = overrides.pop(name) / 1000
    plan = demo_module.DemoPlan(**overrides)

    if role != "all":
        if not url_given or target.run is None:
            raise InvalidArgument("--role needs --redis-url (or DATAFLOW_REDIS_URL) and --run")
        result = demo_module.run_role(role, target.url, target.run, target.namespace, index, plan=plan)
        if role == "setup":
            click.echo(f"run {target.run} set up with {plan.prompts} prompts" if result
                       else f"run {target.run} was already set up")
        else:
            click.echo(f"{role} finished on run {target.run}")
        return

    if plot:
        plt = demo_module.import_pyplot()  # fail before the run, not after it
        extension = os.path.splitext(plot)[1].lstrip(".").lower()
        supported = plt.figure().canvas.get_supported_filetypes()
        plt.close("all")
        if extension not in supported:
            what = f"a {extension!r} image" if extension else "an image without a file extension"
            raise InvalidArgument(f"--plot: cannot write {what}; end the name with one of "
                                  f".{', .'.join(sorted(supported))}")
        folder = os.path.dirname(os.path.abspath(plot))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise InvalidArgument(f"--plot: cannot write into {folder!r} (missing or read-only)")
    live = sys.stderr.isatty()

    def progress(status: dict[str, Any], sample: Any) -> None:
        line = _progress_line(status, sample, plan.prompts)
        click.echo(("\r" + line) if live else line, err=True, nl=not live)

    if not quiet:
        where = target.masked_url if url_given else "a private redis-server"
        click.echo(f"demo: {plan.prompts} prompts, {plan.workers} rollout workers (~{plan.rollout_rate():.0f} "
                   f"samples/s), {plan.trainers} trainers (~{plan.train_rate():.0f} samples/s) on {where}", err=True)
    result = demo_module.run_demo(
        plan, redis_url=target.url if url_given else None, run_id=target.run, namespace=target.namespace,
        timeout_s=timeout_s, cleanup=None if keep is None else not keep, progress=None if quiet else progress)
    if live and not quiet:
        click.echo("", err=True)
    if plot:
        demo_module.write_plot(result, plan, plot)
    summary = result.summary
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(summary_text(summary))
        if plot:
            click.echo(f"  plot            {plot}")
        if url_given and keep is not False:
            # The URL only when it came as an option: from DATAFLOW_REDIS_URL it still applies.
            on_command_line = ctx.parent.get_parameter_source("redis_url") == click.core.ParameterSource.COMMANDLINE
            url_option = f"--redis-url {target.masked_url} " if on_command_line else ""
            click.echo(f"  inspect         dataflow-redis {url_option}--run {summary['run_id']} status")
    if not summary["ok"]:
        click.echo(f"Error: the demo lost {summary['tasks_lost']} task(s) or left bytes resident", err=True)
        ctx.exit(EXIT_ERROR)


if __name__ == "__main__":
    main(prog_name="dataflow-redis")
