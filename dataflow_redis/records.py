"""Records: small frozen dataclasses that carry metadata only, never tensors.

The control plane stores records as compact JSON: fields equal to their default are
left out, and the id and run id live in the key, so a task with a 100-byte payload
costs little more than its payload. Every record is checked before anything is
written: a tensor or ndarray anywhere (even nested in metadata) raises ``TypeError``
naming the path; a value JSON cannot carry raises :class:`InvalidArgument`.
"""

from __future__ import annotations

import functools
import math
import os
from base64 import urlsafe_b64encode
from collections.abc import Mapping  # not typing.Mapping: isinstance against it is several times slower
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional

import orjson

from .config import MAX_TASK_BYTES
from .errors import InvalidArgument
from .keys import validate_item_id

DTYPES = frozenset({
    "bool", "uint8", "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32", "float64",
    "float8_e4m3fn", "float8_e5m2",
})


@dataclass(frozen=True)
class FeatureSpec:
    """Shape and dtype of one stored feature tensor (the tensor itself stays in the store)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgument(f"FeatureSpec.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise InvalidArgument(
                f"FeatureSpec {self.name!r}: unsupported dtype {self.dtype!r}; "
                f"use one of {', '.join(sorted(DTYPES))}"
            )
        shape = tuple(self.shape) if isinstance(self.shape, (list, tuple)) else None
        if shape is None or not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidArgument(
                f"FeatureSpec {self.name!r}: shape must be a sequence of non-negative ints, "
                f"got {self.shape!r}"
            )
        object.__setattr__(self, "shape", shape)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FeatureSpec":
        return cls(name=data["name"], shape=tuple(data["shape"]), dtype=data["dtype"])


@dataclass(frozen=True)
class PromptTask:
    """A prompt for a rollout worker. ``attempt`` counts earlier failed or expired tries."""

    task_id: str
    run_id: str
    source_id: str = ""
    payload: Any = None
    max_length: Optional[int] = None
    chat_template: Optional[str] = None
    loss_mask_policy: Optional[str] = None
    target_model_version: Optional[str] = None
    draft_weight_version: Optional[str] = None
    attempt: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)
    estimated_bytes: Optional[int] = None
    """Bytes the task's samples are expected to add to the feature store (reservation);
    at most ``MAX_TASK_BYTES`` (512 GiB)."""


@dataclass(frozen=True)
class SampleRef:
    """A pointer to one sample's features in the feature store."""

    sample_id: str
    run_id: str
    source_task_id: Optional[str]
    feature_store_uri: str
    feature_keys: tuple[str, ...]
    feature_specs: tuple[FeatureSpec, ...]
    strategy: str
    schema_version: int = 1
    versions: Mapping[str, Any] = field(default_factory=dict)
    num_tokens: int = 0
    estimated_bytes: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.feature_keys, list):
            object.__setattr__(self, "feature_keys", tuple(self.feature_keys))
        if isinstance(self.feature_specs, list):
            object.__setattr__(self, "feature_specs", tuple(self.feature_specs))


_TASK_FIELDS = [f for f in fields(PromptTask) if f.name not in ("task_id", "run_id", "attempt")]
_REF_FIELDS = [f for f in fields(SampleRef) if f.name not in ("sample_id", "run_id")]


def _defaults(fs) -> dict[str, Any]:
    out = {}
    for f in fs:
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


_TASK_DEFAULTS = _defaults(_TASK_FIELDS)
_REF_DEFAULTS = _defaults(_REF_FIELDS)
_TASK_FIELD_NAMES = frozenset(f.name for f in fields(PromptTask))
# Fields whose default is a fresh dict (default_factory=dict), per record class.
_DICT_DEFAULTS = {PromptTask: tuple(n for n, d in _TASK_DEFAULTS.items() if type(d) is dict),
                  SampleRef: tuple(n for n, d in _REF_DEFAULTS.items() if type(d) is dict)}
_REF_FIELD_NAMES = frozenset(f.name for f in _REF_FIELDS)
_REF_REQUIRED = frozenset(f.name for f in _REF_FIELDS if f.name not in _REF_DEFAULTS)


MAX_NESTING = 100
"""Deepest nesting of lists and dicts a record may carry."""

_JSON_TYPES = frozenset((type(None), bool, int, float, str, dict, list, tuple))


def check_metadata_only(value: Any, path: str) -> None:
    """Raise if ``value`` holds a tensor, an ndarray, or anything JSON cannot carry.

    ``TypeError`` (naming the path) for array-likes, numpy scalars included;
    :class:`InvalidArgument` for other values JSON cannot represent exactly (NaN,
    infinity, bytes, sets, objects, nesting deeper than ``MAX_NESTING``). Tuples are
    stored as JSON arrays: they come back as lists.
    """
    kind = type(value)
    if value is None or (kind is str and value.isascii()) or (kind is dict and not value):
        return  # what almost every record carries: nothing to walk
    stack = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_NESTING:
            # Deeper JSON overflows the recursion limit of json encoders and decoders.
            raise InvalidArgument(f"{where}: nested more than {MAX_NESTING} levels deep; flatten the metadata")
        kind = type(item)
        # Array-likes first: numpy scalars subclass float and int (np.float64) but JSON
        # cannot encode them.
        if kind not in _JSON_TYPES and _is_array_like(item):
            raise TypeError(
                f"{where}: a {kind.__module__}.{kind.__name__} is a tensor/array; "
                "the control plane takes metadata only: put the data in the feature store "
                "and pass its key"
            )
        if item is None or isinstance(item, (bool, int)):
            continue
        if isinstance(item, str):
            _require_utf8(item, where)
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidArgument(f"{where}: {item!r} cannot be stored as JSON; use a finite number or null")
            continue
        if isinstance(item, Mapping):
            if kind is not dict and depth > 0:
                raise InvalidArgument(f"{where}: a {kind.__name__} cannot be stored as JSON; use a dict")
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise InvalidArgument(f"{where}: key {key!r} is not a string; JSON objects need string keys")
                _require_utf8(key, f"{where}: key {key!r}")
                stack.append((sub, f"{where}.{key}", depth + 1))
            continue
        if isinstance(item, (list, tuple)):
            for i, sub in enumerate(item):
                stack.append((sub, f"{where}[{i}]", depth + 1))
            continue
        raise InvalidArgument(
            f"{where}: a {type(item).__name__} cannot be stored as JSON; "
            "use str, int, float, bool, None, lists and dicts"
        )


def _require_utf8(text: str, where: str) -> None:
    # Lone surrogates (e.g. from a bad decode) have no UTF-8 form: Redis could not store them.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"{where}: the string is not valid Unicode (a lone surrogate); "
                                  "decode the text properly before passing it") from None


def _is_array_like(item: Any) -> bool:
    cls = type(item)
    module = cls.__module__.split(".", 1)[0]
    if module in ("numpy", "torch", "jax", "jaxlib", "tensorflow", "cupy", "mlx"):
        return True
    return any(hasattr(item, a) for a in ("__array__", "__array_interface__", "__dlpack__", "__cuda_array_interface__"))


def _is_mapping(value: Any) -> bool:
    # A plain dict answers at once; isinstance against the Mapping ABC costs far more.
    return type(value) is dict or isinstance(value, Mapping)


def _dumps(value: Any) -> str:
    """Compact JSON (UTF-8, no spaces) by orjson, several times faster than the json
    module on records. Values were checked first (check_metadata_only: no NaN, no
    tensors); what orjson still refuses is an integer beyond 64 bits."""
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:  # orjson.JSONEncodeError
        if "UTF-8" in str(exc):  # a lone surrogate in a field check_metadata_only does not walk
            raise InvalidArgument("a string in the record is not valid Unicode (a lone surrogate); "
                                  "decode the text properly before passing it") from None
        raise InvalidArgument(f"a record holds a value JSON cannot carry portably ({exc}); "
                              "integers must fit in 64 bits: pass larger ones as strings") from None


_loads = orjson.loads


def new_id() -> str:
    """A random id: 16 characters of URL-safe base64 (96 random bits, the size of a
    MongoDB ObjectId; a collision among a billion ids has odds of about 1 in 10^11).
    Short ids are cheap wherever an id is kept: the pending list, the record hashes,
    the leases and the dedup markers of done tasks and acked samples."""
    return urlsafe_b64encode(os.urandom(12)).decode()


def _check_optional(value: Any, kind: type, where: str, minimum: Optional[int] = None,
                    maximum: Optional[int] = None) -> None:
    if value is None:
        return
    if kind is int and (type(value) is not int or (minimum is not None and value < minimum)
                        or (maximum is not None and value > maximum)):
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise InvalidArgument(f"{where} must be an int {bounds} or None, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise InvalidArgument(f"{where} must be a string or None, got {value!r}")


def task_from_input(item: Any, run_id: str) -> PromptTask:
    """Build a PromptTask from a PromptTask or a dict, generating ``task_id`` when absent."""
    if isinstance(item, PromptTask):
        task = item
    elif _is_mapping(item):
        unknown = set(item) - _TASK_FIELD_NAMES
        if unknown:
            raise InvalidArgument(f"unknown prompt task field(s): {', '.join(sorted(map(repr, unknown)))}")
        data = dict(item)
        data.setdefault("run_id", run_id)
        if data.get("task_id") is None:
            data["task_id"] = new_id()
        data.setdefault("attempt", 0)
        task = _built(PromptTask, _TASK_DEFAULTS, data)  # = PromptTask(**data): every name is a field
    else:
        raise InvalidArgument(f"a prompt task must be a PromptTask or a dict, got {type(item).__name__}")
    if task.run_id != run_id:
        raise InvalidArgument(f"task {task.task_id!r} belongs to run {task.run_id!r}, not {run_id!r}")
    validate_item_id(task.task_id, "task id")
    # Optional fields are mostly unset: build a message only for a value to check.
    if task.max_length is not None:
        _check_optional(task.max_length, int, f"task {task.task_id}: max_length", 1)
    if task.estimated_bytes is not None:
        _check_optional(task.estimated_bytes, int, f"task {task.task_id}: estimated_bytes", 0, MAX_TASK_BYTES)
    for name in ("chat_template", "loss_mask_policy", "target_model_version", "draft_weight_version"):
        if getattr(task, name) is not None:
            _check_optional(getattr(task, name), str, f"task {task.task_id}: {name}")
    if not isinstance(task.source_id, str):
        raise InvalidArgument(f"task {task.task_id}: source_id must be a string")
    if task.attempt != 0 or type(task.attempt) is not int:
        # Redis counts the attempts (task_attempts); a count from the caller would be
        # dropped, and the task's retries would start over.
        raise InvalidArgument(f"task {task.task_id}: attempt is counted by the control plane, got "
                              f"{task.attempt!r}; ingest tasks with attempt 0")
    if not _is_mapping(task.metadata):
        raise InvalidArgument(f"task {task.task_id}: metadata must be a dict")
    check_metadata_only(task.payload, f"task[{task.task_id}].payload")
    check_metadata_only(task.metadata, f"task[{task.task_id}].metadata")
    return task


def encode_task(task: PromptTask) -> str:
    """Compact JSON of a task: non-default fields only, without id, run and attempt.
    A task that carries nothing but a string payload (the usual prompt) is stored as
    that string's JSON alone, without the ``{"payload":...}`` wrapper."""
    out = {}
    for name, default in _TASK_DEFAULTS.items():
        value = getattr(task, name)
        if value != default:
            out[name] = dict(value) if _is_mapping(value) else value
    if len(out) == 1 and type(out.get("payload")) is str:
        return _dumps(out["payload"])
    return _dumps(out)


def decode_task(task_id: str, run_id: str, attempt: int, text: str) -> PromptTask:
    data = _loads(text)
    if type(data) is str:  # the bare-payload form (see encode_task)
        data = {"payload": data}
    elif not data.keys() <= _TASK_FIELD_NAMES:
        return PromptTask(task_id=task_id, run_id=run_id, attempt=attempt, **data)  # raises, naming the field
    return _built(PromptTask, _TASK_DEFAULTS, data, task_id=task_id, run_id=run_id, attempt=attempt)


def _built(cls: type, defaults: dict, data: dict, **ids: Any) -> Any:
    """A frozen record from fields this module stored and checked itself, without the
    dataclass __init__ (a field at a time through object.__setattr__: the largest
    cost of decoding a lease). Equal to ``cls(**ids, **data)``; defaults that are
    dicts are copied, as their default_factory would make fresh ones."""
    record = object.__new__(cls)
    values = record.__dict__
    values.update(defaults)
    for name in _DICT_DEFAULTS.get(cls, ()):
        values[name] = {}
    values.update(data)
    values.update(ids)
    return record


def check_ref(ref: Any, run_id: str) -> SampleRef:
    """Validate a SampleRef for ``run_id``; raise naming the first problem found."""
    if not isinstance(ref, SampleRef):
        raise InvalidArgument(f"expected a SampleRef, got {type(ref).__name__}")
    sid = validate_item_id(ref.sample_id, "sample id")
    if ref.run_id != run_id:
        raise InvalidArgument(f"sample {sid!r} belongs to run {ref.run_id!r}, not {run_id!r}")
    if ref.source_task_id is not None:
        validate_item_id(ref.source_task_id, "source task id")
    if not isinstance(ref.feature_store_uri, str) or not ref.feature_store_uri:
        raise InvalidArgument(f"sample {sid}: feature_store_uri must be a non-empty string")
    if not isinstance(ref.feature_keys, tuple) or not all(isinstance(k, str) and k for k in ref.feature_keys):
        raise InvalidArgument(f"sample {sid}: feature_keys must be a sequence of non-empty strings")
    if not isinstance(ref.feature_specs, tuple) or not all(isinstance(s, FeatureSpec) for s in ref.feature_specs):
        raise InvalidArgument(f"sample {sid}: feature_specs must be a sequence of FeatureSpec")
    if not isinstance(ref.strategy, str) or not ref.strategy:
        raise InvalidArgument(f"sample {sid}: strategy must be a non-empty string such as 'eagle3'")
    if type(ref.schema_version) is not int or ref.schema_version < 1:
        raise InvalidArgument(f"sample {sid}: schema_version must be an int >= 1")
    for name in ("num_tokens", "estimated_bytes"):
        value = getattr(ref, name)
        if type(value) is not int or value < 0:
            raise InvalidArgument(f"sample {sid}: {name} must be an int >= 0, got {value!r}")
    for name in ("versions", "metadata"):
        value = getattr(ref, name)
        if not _is_mapping(value):
            raise InvalidArgument(f"sample {sid}: {name} must be a dict")
        check_metadata_only(value, f"ref[{sid}].{name}")
    return ref


def check_refs(refs: Any, run_id: str) -> list[SampleRef]:
    """Validate a batch of refs: each ref, and one schema_version per call. (A sample id
    twice in one call is the script's business: the first copy is taken.)"""
    if isinstance(refs, (str, bytes, SampleRef)) or not hasattr(refs, "__iter__"):
        raise InvalidArgument("refs must be a list of SampleRef")
    out = [check_ref(r, run_id) for r in refs]
    versions = {r.schema_version for r in out}
    if len(versions) > 1:
        raise InvalidArgument(
            f"mixed schema versions {sorted(versions)} in one call; commit each schema version separately"
        )
    return out


def encode_ref(ref: SampleRef) -> str:
    out: dict[str, Any] = {
        "source_task_id": ref.source_task_id,
        "feature_store_uri": ref.feature_store_uri,
        "feature_keys": list(ref.feature_keys),
        "feature_specs": [_spec_json(s) for s in ref.feature_specs],
        "strategy": ref.strategy,
    }
    for name, default in _REF_DEFAULTS.items():
        if name in out:
            continue
        value = getattr(ref, name)
        if value != default:
            out[name] = dict(value) if _is_mapping(value) else value
    return _dumps(out)


def decode_ref(sample_id: str, run_id: str, text: str) -> SampleRef:
    data = _loads(text)
    data["feature_keys"] = tuple(data["feature_keys"])
    data["feature_specs"] = tuple(_feature_spec(s["name"], tuple(s["shape"]), s["dtype"])
                                  for s in data["feature_specs"])
    if not data.keys() <= _REF_FIELD_NAMES or not _REF_REQUIRED <= data.keys():
        return SampleRef(sample_id=sample_id, run_id=run_id, **data)  # raises, naming the field
    return _built(SampleRef, _REF_DEFAULTS, data, sample_id=sample_id, run_id=run_id)


@functools.lru_cache(maxsize=4096)
def _spec_json(spec: FeatureSpec) -> dict:
    # The same few specs in every ref of a run: build their JSON form once (read-only).
    return spec.to_json()


@functools.lru_cache(maxsize=4096)
def _feature_spec(name: str, shape: tuple, dtype: str) -> FeatureSpec:
    # Samples of a run share a few specs; FeatureSpec is frozen, so one object serves all.
    return FeatureSpec(name=name, shape=shape, dtype=dtype)
