"""Run settings and backpressure levers: validated here, stored in the run's config hash.

Each field is checked on its own here; the cross-field rule (low <= high) is checked
again inside ``configure.lua`` against the merged stored config, so concurrent partial
updates cannot combine into an invalid one. Every write bumps ``version``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from .errors import ConfigError

# Defaults that apply when a field is unset (mirrored in lua/includes/util.lua).
DEFAULT_MAX_RECORD_BYTES = 1 << 20
DEFAULT_REPLY_TTL_S = 30.0


@dataclass(frozen=True)
class RunSettings:
    """Run-wide settings (``cp.configure(...)``). ``None`` means unset (the default)."""

    max_prompt_attempts: Optional[int] = None
    """A task runs at attempts 0 .. n-1, then is dead-lettered. None: retry forever."""
    max_record_bytes: Optional[int] = None
    """Largest record JSON accepted, in bytes. None: 1 MiB."""
    reply_ttl_s: Optional[float] = None
    """How long a mutating call's reply is kept for safe retries, seconds. None: 30.
    Keep it above the clients' ``retry_s`` (20 s by default)."""


@dataclass(frozen=True)
class BackpressureConfig:
    """The backpressure levers; every one optional (None disables it).

    ``high_watermark_bytes`` given without ``low_watermark_bytes`` means low = high (no
    hysteresis band; the latch then resumes only strictly below the threshold). Low then
    stays unset and follows high when high is changed later
    (:attr:`effective_low_watermark_bytes` gives the value in force).
    """

    high_watermark_bytes: Optional[int] = None
    low_watermark_bytes: Optional[int] = None
    max_inflight_prompts_per_worker: Optional[int] = None
    max_train_lease: Optional[int] = None
    default_task_bytes: Optional[int] = None
    """Bytes reserved per leased task that carries no ``estimated_bytes``. None: 0."""
    stale_after_s: Optional[float] = None
    """A shard silent this long (seconds) shows as stale. None: never stale."""

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name))
        high, low = self.high_watermark_bytes, self.low_watermark_bytes
        if low is not None and high is None:
            raise ConfigError("low_watermark_bytes needs high_watermark_bytes; set both")
        if high is not None and low is not None and low > high:
            raise ConfigError(
                f"low_watermark_bytes {low} > high_watermark_bytes {high}; the low watermark "
                "must not exceed the high one"
            )

    @property
    def effective_low_watermark_bytes(self) -> Optional[int]:
        """The low watermark in force, bytes: ``low_watermark_bytes``, else the high one."""
        return self.high_watermark_bytes if self.low_watermark_bytes is None else self.low_watermark_bytes

    @property
    def enabled(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self) if f.name in LEVERS)


LEVERS = ("high_watermark_bytes", "low_watermark_bytes", "max_inflight_prompts_per_worker",
          "max_train_lease", "default_task_bytes")

# field -> (kind, minimum)
_RULES: dict[str, tuple[type, float]] = {
    "max_prompt_attempts": (int, 1),
    "max_record_bytes": (int, 256),
    "reply_ttl_s": (float, 1.0),
    "high_watermark_bytes": (int, 1),
    "low_watermark_bytes": (int, 0),
    "max_inflight_prompts_per_worker": (int, 1),
    "max_train_lease": (int, 1),
    "default_task_bytes": (int, 0),
    "stale_after_s": (float, 0.001),
}
MAX_INT = 2**53  # Lua numbers are doubles: larger integers lose precision.
MAX_TASK_BYTES = 2**39
"""Largest estimated size of one task's samples (512 GiB), for a task's
``estimated_bytes`` and ``default_task_bytes``. A lease sums the sizes of up to
10,000 tasks in Lua, where numbers are doubles: under this cap every such sum is an
exact integer, so the byte reservation adds and later subtracts exactly the same."""
_MAXIMA = {"default_task_bytes": MAX_TASK_BYTES}


def _check_field(name: str, value: Any) -> None:
    if name not in _RULES:
        raise ConfigError(f"unknown config field {name!r}; known: {', '.join(sorted(_RULES))}")
    if value is None:
        return
    kind, minimum = _RULES[name]
    maximum = _MAXIMA.get(name, MAX_INT)
    if kind is int:
        ok = type(value) is int and minimum <= value <= maximum
        want = f"an integer from {minimum:g} to {maximum}"
    else:
        ok = (type(value) in (int, float) and math.isfinite(value) and minimum <= value <= MAX_INT)
        want = f"a number from {minimum:g} to {MAX_INT}"
    if not ok:
        raise ConfigError(f"{name} must be {want} or None, got {value!r}")


def parse_value(name: str, text: str) -> Any:
    """Parse a CLI string (``none`` unsets) into the field's type, validated."""
    if name not in _RULES:
        raise ConfigError(f"unknown config field {name!r}; known: {', '.join(sorted(_RULES))}")
    if not text.strip():
        raise ConfigError(f"{name} has no value; give one, or {name}=none to unset it")
    if text.strip().lower() in ("none", "null"):
        return None
    kind, _ = _RULES[name]
    try:
        value: Any = int(text) if kind is int else float(text)
    except ValueError:
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    _check_field(name, value)
    return value


def to_redis_pairs(values: Mapping[str, Any]) -> list[str]:
    """Flatten {field: value} into configure.lua's ARGV pairs ('' unsets a field)."""
    out: list[str] = []
    for name, value in values.items():
        _check_field(name, value)
        out += [name, "" if value is None else repr(value) if isinstance(value, float) else str(value)]
    return out


def from_redis(raw: Mapping[str, str]) -> tuple[RunSettings, BackpressureConfig, int]:
    """Build (run settings, backpressure config, version) from the stored config hash."""

    def value(name: str) -> Any:
        text = raw.get(name)
        if text is None:
            return None
        kind, _ = _RULES[name]
        try:
            number = float(text)
            # The scripts read any number Lua's tonumber accepts ("1e3", "12.0" for an
            # integer lever); an integral float is that integer.
            if kind is int and number.is_integer():
                return int(text) if text.strip().lstrip("-").isdigit() else int(number)
            if kind is float and math.isfinite(number):
                return number
        except ValueError:
            pass
        want = "an integer" if kind is int else "a number"
        raise ConfigError(f"the stored config holds {name}={text!r}, not {want}; "
                          f"set it again with `dataflow-redis config set {name}=...`")

    run = RunSettings(**{f.name: value(f.name) for f in fields(RunSettings)})
    bp = BackpressureConfig(**{f.name: value(f.name) for f in fields(BackpressureConfig)})
    return run, bp, int(raw.get("version", 0))
