"""docker-compose.yml keeps its promises (no Docker engine here, so the file is read).

Redis persists every write (AOF, appendfsync always) and has a healthcheck; every
other service waits for it to be healthy; the tests service points the suite at it
through REDIS_URL; and every dataflow-redis command line in the file parses as a real
command of this CLI, with its options.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import click
import pytest
import yaml  # PyYAML, in the [test] extra

from dataflow_redis.cli import main
from dataflow_redis.keys import validate_namespace, validate_run_id

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def redis_args(service) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else list(command)


def parse_cli(args: list[str]) -> click.Command:
    """Parse ``args`` (after the program name) as the CLI would, without running
    anything: unknown commands, options or choices raise click errors."""
    group: click.Group = main
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # protected_args, click < 9
        ctx = group.make_context("dataflow-redis", list(args))
        rest = [*getattr(ctx, "protected_args", []), *ctx.args]
    while True:
        name, command, rest = group.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
        if not isinstance(command, click.Group):
            return command
        group = command
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*getattr(ctx, "protected_args", []), *ctx.args]


def cli_command_lines(compose) -> dict[str, list[str]]:
    """Service name -> the dataflow-redis arguments it runs (program name dropped)."""
    found = {}
    for name, service in compose["services"].items():
        entrypoint = service.get("entrypoint") or []
        words = list(entrypoint) + redis_args(service) if "command" in service else list(entrypoint)
        if words and words[0] == "dataflow-redis":
            found[name] = words[1:]
    return found


def test_redis_persists_every_write_and_has_a_healthcheck(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    args = redis_args(redis)
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the AOF must live on a volume"
    check = " ".join(redis["healthcheck"]["test"])
    # redis-cli exits 0 on an error reply (LOADING): only PONG means ready.
    assert "redis-cli ping" in check and "grep -q PONG" in check and check.startswith("CMD-SHELL")
    assert redis["healthcheck"]["retries"] >= 1


def test_every_service_waits_for_a_healthy_redis(compose):
    others = {n: s for n, s in compose["services"].items() if n != "redis"}
    assert others
    for name, service in others.items():
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_tests_service_runs_the_suite_against_the_compose_redis(compose):
    tests = compose["services"]["tests"]
    assert tests["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    command = redis_args(tests)
    assert "pytest" in command


def test_demo_roles_run_against_the_compose_redis(compose):
    lines = cli_command_lines(compose)
    roles = {}
    for name, args in lines.items():
        if "demo" in args:
            assert args[args.index("--redis-url") + 1] == "redis://redis:6379/0", name
            role = args[args.index("--role") + 1] if "--role" in args else "all"
            roles.setdefault(role, []).append(name)
    assert {"setup", "rollout", "trainer", "store", "all"} <= set(roles)
    # Roles of one pipeline share a run id.
    runs = {lines[n][lines[n].index("--run") + 1] for r in ("setup", "rollout", "trainer", "store") for n in roles[r]}
    assert len(runs) == 1


def test_every_command_line_is_a_real_cli_command(compose):
    lines = cli_command_lines(compose)
    assert {"setup", "rollout", "trainer", "store", "demo", "cli"} <= set(lines)
    for name, args in lines.items():
        command = parse_cli(args)
        assert command.name in ("demo", "status"), name
        # The root group checks these only when a command runs: check them here.
        if "--run" in args:
            validate_run_id(args[args.index("--run") + 1])
        if "--namespace" in args:
            validate_namespace(args[args.index("--namespace") + 1])


def test_a_service_without_a_redis_url_gets_it_from_the_variable_the_cli_reads(compose):
    envvars = {p.name: p.envvar for p in main.params}
    assert envvars["redis_url"] == "DATAFLOW_REDIS_URL" and envvars["run_id"] == "DATAFLOW_RUN"
    for name, args in cli_command_lines(compose).items():
        if "--redis-url" not in args:
            assert compose["services"][name]["environment"][envvars["redis_url"]] == "redis://redis:6379/0", name


def test_parse_cli_rejects_what_the_cli_would_reject():
    for bad in (["demo", "--role", "nonsense"], ["demo", "--no-such-option"], ["no-such-command"],
                ["config", "set"]):
        with pytest.raises(click.ClickException):
            parse_cli(bad)
    assert parse_cli(["config", "set", "max_train_lease=4"]).name == "set"


def test_the_image_installs_this_package_with_its_test_extra(compose):
    build = compose["x-app"]["build"]
    assert build["context"] == "."
    recipe = build["dockerfile_inline"]
    installs = re.findall(r"pip install [^\n]*'\.\[([\w,]+)\]'", recipe)
    assert installs and "test" in installs[0].split(","), recipe
    assert re.search(r"apt-get install [^\n]*redis-server", recipe)
    # The build context leaves out what a checkout may hold besides the sources.
    ignored = (COMPOSE.parent / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
