"""Records are metadata only (issue point 8).

A tensor or ndarray anywhere, even nested in metadata, raises TypeError naming the path;
a value JSON cannot carry raises a clear InvalidArgument; a record over
max_record_bytes raises RecordTooLarge. On every error the run's keys are unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from conftest import dump_run, make_ref
from dataflow_redis import FeatureSpec, InvalidArgument, PromptTask, RecordTooLarge, SampleRef

np = pytest.importorskip("numpy")


class FakeArray:
    """Array-like through the numpy protocol only (like a cupy or arrow array)."""

    def __array__(self, dtype=None):
        return np.zeros(2)


class FakeDlpack:
    """Array-like through DLPack only (like a jax or torch tensor)."""

    def __dlpack__(self, stream=None):
        return None

    def __dlpack_device__(self):
        return (1, 0)


class FakeInterface:
    __array_interface__ = {"shape": (1,), "typestr": "<f4", "version": 3}


class FakeCuda:
    __cuda_array_interface__ = {"shape": (1,), "typestr": "<f4", "version": 3}


def torch_like():
    cls = type("Tensor", (), {})
    cls.__module__ = "torch"
    return cls()


ARRAY_LIKES = {
    "ndarray": lambda: np.zeros((2, 3), dtype=np.float32),
    "numpy_scalar": lambda: np.float32(1.5),
    "__array__": FakeArray,
    "__dlpack__": FakeDlpack,
    "__array_interface__": FakeInterface,
    "__cuda_array_interface__": FakeCuda,
    "torch_module": torch_like,
}


@pytest.fixture
def worker_with_task(cp):
    cp.ingest_prompts([{"task_id": "t0"}])
    w = cp.rollout_worker(worker_id="w")
    w.lease(1)
    return w


def assert_refused(cp, error, match, call):
    before = dump_run(cp)
    with pytest.raises(error, match=match):
        call()
    assert dump_run(cp) == before, "a refused call must write nothing"


# ------------------------------------------------------------- tensors

@pytest.mark.parametrize("kind", sorted(ARRAY_LIKES))
def test_array_like_in_a_prompt_payload_or_nested_metadata_names_the_path(cp, kind):
    make = ARRAY_LIKES[kind]
    assert_refused(cp, TypeError, r"task\[t0\]\.payload: .*tensor/array",
                   lambda: cp.ingest_prompts([{"task_id": "t0", "payload": make()}]))
    assert_refused(cp, TypeError, r"task\[t1\]\.metadata\.a\.b\[2\]\.hidden: ",
                   lambda: cp.ingest_prompts([{"task_id": "ok"},
                                              {"task_id": "t1", "metadata": {"a": {"b": [1, 2, {"hidden": make()}]}}}]))
    assert_refused(cp, TypeError, r"task\[t2\]\.payload\[1\]\.content: ",
                   lambda: cp.ingest_prompts([PromptTask(task_id="t2", run_id=cp.run_id,
                                                         payload=[{"content": "x"}, {"content": make()}])]))


@pytest.mark.parametrize("kind", sorted(ARRAY_LIKES))
def test_array_like_in_a_sample_ref_names_the_path(cp, worker_with_task, kind):
    make = ARRAY_LIKES[kind]
    w = worker_with_task
    nested = make_ref(cp, "s0", "t0", metadata={"stats": {"hist": [0, make()]}})
    assert_refused(cp, TypeError, r"ref\[s0\]\.metadata\.stats\.hist\[1\]: ", lambda: w.commit([nested]))
    in_versions = make_ref(cp, "s1", "t0", versions={"weights": make()})
    assert_refused(cp, TypeError, r"ref\[s1\]\.versions\.weights: ", lambda: w.commit([in_versions]))
    assert_refused(cp, TypeError, r"ref\[s2\]\.metadata\.x: ",
                   lambda: cp.enqueue_offline_refs([make_ref(cp, "ok"), make_ref(cp, "s2", metadata={"x": make()})]))
    # The worker still holds its lease and can commit a clean ref.
    assert w.commit([make_ref(cp, "clean", "t0")]) == ["clean"]


def test_a_sample_ref_is_never_built_from_tensors_in_its_fields(cp, worker_with_task):
    ref = SampleRef(sample_id="s0", run_id=cp.run_id, source_task_id="t0", feature_store_uri="mem://x",
                    feature_keys=(np.zeros(2),), feature_specs=(FeatureSpec("h", (1,), "float32"),),
                    strategy="eagle3")
    assert_refused(cp, InvalidArgument, "feature_keys", lambda: worker_with_task.commit([ref]))
    with pytest.raises(InvalidArgument, match="shape"):
        FeatureSpec("h", np.zeros(2), "float32")


# -------------------------------------------------------- non-JSON values

NON_JSON = {
    "nan": (float("nan"), "cannot be stored as JSON"),
    "inf": (math.inf, "cannot be stored as JSON"),
    "bytes": (b"\x00\x01", "bytes cannot be stored as JSON"),
    "set": ({1, 2}, "set cannot be stored as JSON"),
    "object": (object(), "object cannot be stored as JSON"),
    "complex": (1 + 2j, "complex cannot be stored as JSON"),
    "int_key": ({1: "x"}, "not a string"),
    "lone_surrogate": ("bad \ud800 text", "not valid Unicode"),
    "surrogate_key": ({"k\udc80": 1}, "not valid Unicode"),
}


@pytest.mark.parametrize("kind", sorted(NON_JSON))
def test_values_json_cannot_carry_raise_a_clear_error(cp, worker_with_task, kind):
    value, message = NON_JSON[kind]
    assert_refused(cp, InvalidArgument, r"task\[t9\]\.metadata\.deep\[0\].*" + message,
                   lambda: cp.ingest_prompts([{"task_id": "t9", "metadata": {"deep": [value]}}]))
    assert_refused(cp, InvalidArgument, r"ref\[s0\]\.metadata\.v.*" + message,
                   lambda: worker_with_task.commit([make_ref(cp, "s0", "t0", metadata={"v": value})]))


def test_nesting_too_deep_or_cyclic_is_refused_clearly(cp):
    deep = "leaf"
    for _ in range(500):
        deep = [deep]
    assert_refused(cp, InvalidArgument, "nested more than",
                   lambda: cp.ingest_prompts([{"task_id": "deep", "payload": deep}]))
    cyclic: list = []
    cyclic.append(cyclic)
    assert_refused(cp, InvalidArgument, "nested more than",
                   lambda: cp.ingest_prompts([{"task_id": "cyclic", "metadata": {"loop": cyclic}}]))
    moderate = "leaf"
    for _ in range(50):
        moderate = {"k": moderate}
    assert cp.ingest_prompts([{"task_id": "ok", "metadata": moderate}]) == ["ok"]
    (task,) = cp.rollout_worker().lease(1)
    assert task.metadata == moderate


@pytest.mark.parametrize("task, match", [
    ({"task_id": "t", "unknown_field": 1}, "unknown prompt task field"),
    ({"task_id": "t", "max_length": -1}, "max_length"),
    ({"task_id": "t", "max_length": 1.5}, "max_length"),
    ({"task_id": "t", "estimated_bytes": -5}, "estimated_bytes"),
    ({"task_id": "t", "chat_template": 3}, "chat_template"),
    ({"task_id": "t", "metadata": [1]}, "metadata must be a dict"),
    ({"task_id": "bad id"}, "task id"),
    ({"task_id": "t", "run_id": "other-run"}, "belongs to run"),
])
def test_malformed_prompt_tasks_are_refused(cp, task, match):
    assert_refused(cp, InvalidArgument, match, lambda: cp.ingest_prompts([{"task_id": "fine"}, task]))


def test_malformed_sample_refs_are_refused(cp, worker_with_task):
    w = worker_with_task
    no_strategy = dataclasses.replace(make_ref(cp, "s0", "t0"), strategy="")
    assert_refused(cp, InvalidArgument, "strategy", lambda: w.commit([no_strategy]))
    assert_refused(cp, InvalidArgument, "num_tokens", lambda: w.commit([make_ref(cp, "s0", "t0", num_tokens=-1)]))
    assert_refused(cp, InvalidArgument, "mixed schema versions",
                   lambda: w.commit([make_ref(cp, "s0", "t0"), make_ref(cp, "s1", "t0", schema_version=2)]))
    assert_refused(cp, InvalidArgument, "SampleRef", lambda: w.commit([{"sample_id": "s0"}]))
    with pytest.raises(InvalidArgument, match="dtype"):
        FeatureSpec("h", (1,), "float128")


# ------------------------------------------------------------ size limit

def test_records_over_max_record_bytes_raise_record_too_large(cp, worker_with_task):
    cp.configure(max_record_bytes=512)
    big = "x" * 600
    assert_refused(cp, RecordTooLarge, r"record big is \d+ bytes of JSON, over max_record_bytes=512",
                   lambda: cp.ingest_prompts([{"task_id": "small"}, {"task_id": "big", "payload": big}]))
    assert_refused(cp, RecordTooLarge, "max_record_bytes=512",
                   lambda: worker_with_task.commit([make_ref(cp, "s0", "t0"),
                                                    make_ref(cp, "s1", "t0", metadata={"note": big})]))
    assert_refused(cp, RecordTooLarge, "max_record_bytes=512",
                   lambda: cp.enqueue_offline_refs([make_ref(cp, "off", metadata={"note": big})]))
    # Multi-byte characters count as bytes, not characters.
    assert_refused(cp, RecordTooLarge, "max_record_bytes=512",
                   lambda: cp.ingest_prompts([{"task_id": "utf8", "payload": "é" * 300}]))
    # Raising the limit lets the same record in.
    cp.configure(max_record_bytes=4096)
    assert cp.ingest_prompts([{"task_id": "big", "payload": big}]) == ["big"]
    assert worker_with_task.commit([make_ref(cp, "s1", "t0", metadata={"note": big})]) == ["s1"]


def test_a_large_ingest_with_one_oversized_record_writes_nothing(cp):
    """An ingest bigger than one script call's chunk must still be all-or-nothing."""
    cp.configure(max_record_bytes=256)
    tasks = [{"task_id": f"t{i:04d}"} for i in range(2500)]
    tasks[2100]["payload"] = "x" * 300
    assert_refused(cp, RecordTooLarge, "record t2100", lambda: cp.ingest_prompts(tasks))
    assert cp.status()["prompts"] == 0


def test_a_large_call_takes_any_valid_request_id_and_a_retry_applies_nothing(cp):
    """A call split into chunks keeps the caller's request id as given: the longest
    valid id works, a retry returns the first reply, and a too-long id writes nothing."""
    tasks = [{"payload": {"i": i % 7}} for i in range(2500)]   # generated ids, repeating payloads
    longest = "r" * 256
    fresh = cp.ingest_prompts(tasks, request_id=longest)
    assert len(set(fresh)) == 2500 and cp.status()["prompts"] == 2500
    assert cp.ingest_prompts(tasks, request_id=longest) == fresh   # a retry after a lost reply
    assert cp.status()["prompts"] == 2500
    assert_refused(cp, InvalidArgument, "invalid request id", lambda: cp.ingest_prompts(tasks, request_id="r" * 257))
    refs = [make_ref(cp, f"off{i}") for i in range(1500)]
    assert len(cp.enqueue_offline_refs(refs, request_id=longest)) == 1500
    assert cp.enqueue_offline_refs(refs, request_id=longest) == [r.sample_id for r in refs]
    assert cp.status()["queue_depth"] == 1500


def test_default_record_limit_is_one_mebibyte(cp):
    assert_refused(cp, RecordTooLarge, "max_record_bytes=1048576",
                   lambda: cp.ingest_prompts([{"task_id": "huge", "payload": "x" * (1 << 20)}]))
    assert cp.ingest_prompts([{"task_id": "fits", "payload": "x" * 1000}]) == ["fits"]


def test_invalid_unicode_in_any_string_field_is_a_clear_error(cp, worker_with_task):
    assert_refused(cp, InvalidArgument, "not valid Unicode",
                   lambda: cp.ingest_prompts([{"task_id": "t5", "chat_template": "bad \udcff"}]))
    assert_refused(cp, InvalidArgument, "not valid Unicode",
                   lambda: worker_with_task.commit([dataclasses.replace(make_ref(cp, "s0", "t0"),
                                                                        feature_store_uri="mem://\ud800")]))
    assert_refused(cp, InvalidArgument, "not valid Unicode",
                   lambda: worker_with_task.fail(["t0"], "reason \ud800", retryable=True))


def test_integers_beyond_64_bits_are_refused_clearly(cp, worker_with_task):
    # Records are JSON read by other processes and languages: an integer must fit in 64 bits.
    assert_refused(cp, InvalidArgument, "64 bits",
                   lambda: cp.ingest_prompts([{"task_id": "t6", "metadata": {"seed": 2**70}}]))
    assert_refused(cp, InvalidArgument, "64 bits",
                   lambda: worker_with_task.commit([dataclasses.replace(make_ref(cp, "s0", "t0"),
                                                                        metadata={"n": -(2**64)})]))
    # At the edges of the 64-bit range a value round-trips exactly.
    assert cp.ingest_prompts([{"task_id": "t7", "metadata": {"lo": -(2**63), "hi": 2**64 - 1}}]) == ["t7"]
    leased = cp.rollout_worker("w-edges").lease(10)
    assert [t.metadata for t in leased if t.task_id == "t7"] == [{"lo": -(2**63), "hi": 2**64 - 1}]
