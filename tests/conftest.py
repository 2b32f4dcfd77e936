"""Test fixtures: a real redis-server per session (or REDIS_URL), fakeredis for the fast tier.

Set REDIS_URL (e.g. redis://localhost:6379/0 from docker-compose) to run the suite
against an existing server; otherwise a private redis-server is started on a free
port and stopped at the end. Each test gets its own run id, so tests never share state.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from dataflow_redis import ControlPlane, FeatureSpec, SampleRef
from dataflow_redis.embedded import RedisServer


@pytest.fixture(scope="session")
def redis_url():
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def run_id():
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_cp(redis_url):
    """Factory of ControlPlanes on the session server; every run it made is deleted after."""
    made = []

    def factory(run_id=None, **kwargs):
        cp = ControlPlane.from_url(redis_url, run_id=run_id or f"test-{uuid.uuid4().hex[:10]}", **kwargs)
        made.append(cp)
        return cp

    yield factory
    for cp in made:
        cp.delete()
        cp.redis.close()


@pytest.fixture
def cp(make_cp):
    """A ControlPlane on a fresh run of the real session Redis."""
    return make_cp()


@pytest.fixture
def fake_cp():
    """A ControlPlane on fakeredis (with Lua): the fast unit tier, never the only proof."""
    fakeredis = pytest.importorskip("fakeredis")
    pytest.importorskip("lupa")
    client = fakeredis.FakeRedis(decode_responses=True)
    _give_fake_lua_sha1hex(client)
    return ControlPlane(client, run_id=f"fake-{uuid.uuid4().hex[:8]}")


def _give_fake_lua_sha1hex(client) -> None:
    """fakeredis's Lua has no redis.sha1hex (the packed id sets hash ids with it): add
    Python's, which gives the same digest as Redis's. If a fakeredis release has it, it
    is used as is; if its internals moved, the fast tier is skipped (the real-server
    tests are the proof)."""
    if client.eval("return type(redis.sha1hex)", 0) == "function":
        return
    connection = client.connection_pool.get_connection()
    try:
        runtime = connection._server._lua_runtime
        runtime.globals().redis.sha1hex = lambda data: hashlib.sha1(data).hexdigest().encode()
    except AttributeError:
        pytest.skip("this fakeredis release has no redis.sha1hex in Lua and no known way to add it")
    finally:
        client.connection_pool.release(connection)
    assert client.eval("return redis.sha1hex('abc')", 0) == hashlib.sha1(b"abc").hexdigest()


def make_ref(cp, sample_id, task_id=None, nbytes=1024, **kwargs):
    """A SampleRef for tests: one bf16 feature, ``nbytes`` estimated bytes."""
    return SampleRef(
        sample_id=sample_id,
        run_id=cp.run_id,
        source_task_id=task_id,
        feature_store_uri="mem://store",
        feature_keys=(f"{sample_id}/hidden",),
        feature_specs=(FeatureSpec("hidden", (4, 8), "bfloat16"),),
        strategy="eagle3",
        estimated_bytes=nbytes,
        **kwargs,
    )


def dump_run(cp):
    """Every key of the run with its type and full content, for before/after comparisons."""
    r = cp.redis
    out = {}
    for key in sorted(r.scan_iter(match=cp.keys.pattern(), count=1000)):
        kind = r.type(key)
        if kind == "string":
            value = r.get(key)
        elif kind == "hash":
            value = r.hgetall(key)
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(r.smembers(key))
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = r.xrange(key)
        else:
            value = kind
        out[key] = (kind, value)
    return out


def cli_runner(**kwargs):
    """A click ``CliRunner`` that behaves as click 8.2 does on every click the package
    allows: ``stdout`` and ``stderr`` apart, ``output`` both. click 8.1 (the last for
    Python 3.9) mixes stderr into ``stdout`` unless told not to, and then its ``output``
    is stdout alone."""
    from click.testing import CliRunner, Result

    try:
        runner = CliRunner(mix_stderr=False, **kwargs)
    except TypeError:  # click >= 8.2: no such option, and nothing to do
        return CliRunner(**kwargs)

    class BothOutputs(Result):
        @property
        def output(self) -> str:
            return self.stdout + self.stderr

    invoke = runner.invoke

    def invoke_keeping_both(*args, **kw):
        result = invoke(*args, **kw)
        result.__class__ = BothOutputs
        return result

    runner.invoke = invoke_keeping_both
    return runner
