"""The op-id rules of ``apply_write`` and ``OpLog``, one rule per test, at their edges.

The contract suite covers the same rules through a backend; these pin them down
where a backend could not tell: equal timestamps, the exact trim point, what is
remembered with which version, claims taken, renewed, completed and released.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from chatstate.exceptions import (
    CorruptStateError,
    CounterError,
    OpIdReusedError,
    StateTooLargeError,
    UsageError,
)
from chatstate.state._backend import (
    INT64_MAX,
    INT64_MIN,
    OPS_TRIM_AT,
    REMEMBERED_OPS,
    UNCHANGED,
    Acquire,
    Delete,
    Document,
    Edits,
    Increment,
    Lease,
    OpLog,
    OpRecord,
    Outcome,
    Release,
    Replace,
    Reset,
    Snapshot,
    Write,
    apply_operation,
    apply_write,
    check_deadline,
    check_limit,
    corrupt,
    increment_in_place,
)
from chatstate.state._codec import stored_size
from chatstate.state._rules import SET, copy_json

NOW = 1_000_000


def write(
    operation: object = None,
    *,
    key: str = "op",
    nonce: str = "n1",
    digest: str = "",
    completes_claim: bool = False,
    op_id: str | None = None,
    max_bytes: int = 10_000,
) -> Write:
    if operation is None:
        operation = Edits(((SET, ("a",), 1),))
    return Write(
        operation,  # type: ignore[arg-type]
        key,
        nonce,
        digest,
        None,
        max_bytes,
        60_000,
        completes_claim=completes_claim,
        op_id=op_id,
    )


def doc(data: dict | None = None, version: int = 3) -> Snapshot:
    return Snapshot({"x": 1} if data is None else data, version)


# --- a remembered key ---------------------------------------------------------------


def test_a_first_write_is_applied_and_remembered_with_the_version_it_made() -> None:
    log = OpLog()
    result = apply_write(doc(), log, write(digest="d"), NOW)
    assert result.outcome.status == "applied"
    assert result.outcome.version == 4
    assert result.outcome.snapshot == Snapshot({"x": 1, "a": 1}, 4)
    assert result.data == {"x": 1, "a": 1}
    assert result.log_changed
    assert log.records == {"op": OpRecord(1, 4, "n1", "d")}
    assert log.seq == 1
    assert result.outcome.retry_after_ms == 0
    assert result.size == stored_size(result.data)  # type: ignore[arg-type]


def test_a_resend_of_the_same_call_is_applied_and_another_call_is_a_duplicate() -> None:
    log = OpLog({"op": OpRecord(7, 2, "n1", "d")}, seq=7)
    for nonce, status in (("n1", "applied"), ("n2", "duplicate")):
        result = apply_write(doc(version=5), log, write(nonce=nonce, digest="d"), NOW)
        assert result.outcome.status == status
        assert result.outcome.version == 2
        assert result.outcome.snapshot == doc(version=5)
        assert result.data is UNCHANGED
        assert not result.log_changed
    assert log.records == {"op": OpRecord(7, 2, "n1", "d")}
    assert log.seq == 7


def test_a_claim_for_a_remembered_key_is_a_duplicate_even_from_the_same_call() -> None:
    log = OpLog({"op": OpRecord(1, 2, "n1", "")}, seq=1)
    result = apply_write(doc(), log, write(Acquire(5000)), NOW)
    assert result.outcome.status == "duplicate"
    assert result.outcome.version == 2
    assert log.lease is None


@pytest.mark.parametrize(("stored", "sent"), [("d1", "d1"), ("", "d2"), ("d1", "")])
def test_a_digest_is_compared_only_when_both_have_one(stored: str, sent: str) -> None:
    log = OpLog({"op": OpRecord(1, 2, "n1", stored)}, seq=1)
    result = apply_write(doc(), log, write(nonce="n2", digest=sent), NOW)
    assert result.outcome.status == "duplicate"


@pytest.mark.parametrize(("op_id", "named"), [("caller-id", "caller-id"), (None, "op")])
def test_a_reused_key_with_another_digest_is_refused(op_id: str | None, named: str) -> None:
    log = OpLog({"op": OpRecord(1, 2, "n1", "d1")}, seq=1)
    with pytest.raises(OpIdReusedError, match="different request") as info:
        apply_write(doc(), log, write(digest="d2", op_id=op_id), NOW)
    assert info.value.op_id == named


def test_a_release_is_not_answered_from_the_log() -> None:
    log = OpLog({"op": OpRecord(1, 2, "n1", "d")}, seq=1, lease=Lease("n1", NOW + 10, "op"))
    result = apply_write(doc(), log, write(Release(), digest="other"), NOW)
    assert result.outcome.status == "released"
    assert log.lease is None


# --- claims -------------------------------------------------------------------------


def test_a_claim_is_taken_when_free() -> None:
    log = OpLog()
    result = apply_write(doc(), log, write(Acquire(5000), key="k"), NOW)
    assert result.outcome.status == "claimed"
    assert result.outcome.version == 3
    assert result.outcome.retry_after_ms == 0
    assert result.outcome.snapshot == doc()
    assert result.log_changed
    assert result.data is UNCHANGED
    assert log.lease == Lease("n1", NOW + 5000, "k")
    assert log.records == {}


def test_a_claim_held_by_another_call_is_busy_until_it_lapses() -> None:
    log = OpLog(lease=Lease("other", NOW + 700, "k"))
    result = apply_write(doc(), log, write(Acquire(5000)), NOW)
    assert result.outcome.status == "busy"
    assert result.outcome.retry_after_ms == 700
    assert result.outcome.version == 3
    assert not result.log_changed
    assert log.lease == Lease("other", NOW + 700, "k")
    result = apply_write(doc(), log, write(Acquire(5000)), NOW + 700)  # lapsed exactly now
    assert result.outcome.status == "claimed"
    assert log.lease == Lease("n1", NOW + 5700, "op")


def test_the_same_call_takes_its_own_claim_again() -> None:
    log = OpLog(lease=Lease("n1", NOW + 700, "op"))
    result = apply_write(doc(), log, write(Acquire(5000)), NOW)
    assert result.outcome.status == "claimed"
    assert log.lease == Lease("n1", NOW + 5000, "op")


@pytest.mark.parametrize("holder", [None, "other"])
def test_releasing_a_claim_one_does_not_hold_changes_nothing(holder: str | None) -> None:
    lease = Lease(holder, NOW + 10, "k") if holder else None
    log = OpLog(lease=lease)
    result = apply_write(doc(), log, write(Release()), NOW)
    assert result.outcome.status == "released"
    assert result.outcome.version == 0
    assert not result.log_changed
    assert log.lease == lease


def test_releasing_ones_own_claim_frees_it() -> None:
    log = OpLog(lease=Lease("n1", NOW + 10, "op"))
    result = apply_write(doc(), log, write(Release()), NOW)
    assert result.log_changed
    assert log.lease is None
    assert log.records == {}


@pytest.mark.parametrize(
    "lease",
    [None, Lease("other", NOW + 10, "op"), Lease("n1", NOW, "op"), Lease("n1", NOW - 1, "op")],
    ids=["none", "another", "lapsed-now", "lapsed"],
)
def test_a_write_completing_a_claim_it_lost_is_lost(lease: Lease | None) -> None:
    log = OpLog(lease=lease)
    result = apply_write(doc(), log, write(completes_claim=True), NOW)
    assert result.outcome.status == "lost"
    assert result.outcome.version == 3
    assert not result.log_changed
    assert log.records == {}
    assert log.lease == lease


@pytest.mark.parametrize("operation", [None, Edits(())], ids=["edits", "empty"])
def test_a_write_completing_its_claim_releases_it(operation: object) -> None:
    log = OpLog(lease=Lease("n1", NOW + 1, "op"))
    result = apply_write(doc(), log, write(operation, completes_claim=True), NOW)
    assert result.outcome.status == "applied"
    assert log.lease is None
    assert "op" in log.records


def test_a_plain_write_leaves_someone_elses_claim_alone() -> None:
    lease = Lease("other", NOW + 1, "k")
    for operation in (None, Edits(())):
        log = OpLog(lease=lease)
        apply_write(doc(), log, write(operation), NOW)
        assert log.lease == lease


# --- empty and conditional writes ---------------------------------------------------


def test_an_empty_write_only_remembers_its_key() -> None:
    log = OpLog()
    result = apply_write(doc(), log, write(Edits((), expected_version=3)), NOW)
    assert result.outcome.status == "applied"
    assert result.outcome.version == 3
    assert result.outcome.snapshot == doc()
    assert result.data is UNCHANGED
    assert result.log_changed
    assert log.records == {"op": OpRecord(1, 3, "n1", "")}
    result = apply_write(None, OpLog(), write(Edits(())), NOW)
    assert result.outcome.version == 0
    assert result.outcome.snapshot == Snapshot({}, 0)


@pytest.mark.parametrize(
    "operation",
    [Edits((), expected_version=2), Edits(((SET, ("a",), 1),), expected_version=4), Replace({}, 2)],
    ids=["empty", "edits", "replace"],
)
def test_a_conditional_write_on_another_version_is_a_conflict(operation: object) -> None:
    log = OpLog()
    result = apply_write(doc(), log, write(operation), NOW)
    assert result.outcome.status == "conflict"
    assert result.outcome.version == 0
    assert result.data is UNCHANGED
    assert not result.log_changed
    assert log.records == {}


# --- document operations ------------------------------------------------------------


def test_a_delete_makes_version_zero_and_is_remembered() -> None:
    log = OpLog()
    result = apply_write(doc(), log, write(Delete()), NOW)
    assert result.outcome.status == "applied"
    assert result.outcome.version == 0
    assert result.outcome.snapshot == Snapshot({}, 0)
    assert result.data is None
    assert result.size == 0
    assert log.records == {"op": OpRecord(1, 0, "n1", "")}


def test_each_operation_makes_the_next_version() -> None:
    cases = [
        (Increment(("n",), 2), {"x": 1, "n": 2}, 2),
        (Reset((("x",),)), {"x": 1}, None),
        (Replace({"y": 2}, 3), {"y": 2}, None),
    ]
    for operation, data, value in cases:
        log = OpLog()
        result = apply_write(doc(), log, write(operation), NOW)
        assert result.outcome.version == 4
        assert result.outcome.value == value
        assert result.data == data
        assert result.outcome.snapshot == Snapshot(data, 4)
        assert log.records["op"].version == 4


def test_a_write_on_no_document_makes_version_one() -> None:
    result = apply_write(None, OpLog(), write(), NOW)
    assert result.outcome.version == 1
    assert result.data == {"a": 1}
    assert result.size == stored_size({"a": 1})
    result = apply_write(None, OpLog(), write(Increment(("n",), 5)), NOW)
    assert result.data == {"n": 5}
    assert result.size == stored_size({"n": 5})


@pytest.mark.parametrize("known", [False, True], ids=["size-unknown", "size-known"])
@pytest.mark.parametrize("shared", [False, True])
def test_the_new_size_is_the_stored_size(known: bool, shared: bool) -> None:
    data = {"x": 1, "o": {"n": 10}, "s": "text"}
    operations = [
        Edits(((SET, ("a",), "value"),)),
        Increment(("o", "n"), 95),
        Increment(("p", "q"), 1),
        Reset((("x",),)),
        Replace({"y": [1, 2]}, 3),
    ]
    for operation in operations:
        current = Snapshot({**data, "o": dict(data["o"])}, 3)  # type: ignore[arg-type]
        size = stored_size(current.data) if known else None
        result = apply_write(current, OpLog(), write(operation), NOW, size, shared=shared)
        assert result.size == stored_size(result.data), operation  # type: ignore[arg-type]
        assert result.outcome.snapshot.version == 4


def test_apply_operation_answers_status_data_and_size() -> None:
    edits = Edits(((SET, ("a",), 1),))
    size = stored_size({"x": 1, "a": 1})
    assert apply_operation(doc(), edits, 100) == ("applied", {"x": 1, "a": 1}, size)
    assert apply_operation(None, edits, 100, 0) == ("applied", {"a": 1}, stored_size({"a": 1}))
    assert apply_operation(doc(), Delete(), 100) == ("applied", None, 0)
    conflicting = Edits(edits.edits, expected_version=1)
    assert apply_operation(doc(), conflicting, 100) == ("conflict", None, 0)
    assert apply_operation(doc(), Replace({}, 1), 100) == ("conflict", None, 0)
    with pytest.raises(StateTooLargeError) as info:
        apply_operation(doc(), edits, 3)
    assert (info.value.size, info.value.limit) == (size, 3)
    with pytest.raises(TypeError, match="Acquire is not a document operation"):
        apply_operation(doc(), Acquire(1), 100)  # type: ignore[arg-type]


def test_a_snapshot_defaults_to_an_empty_document_at_version_zero() -> None:
    assert Snapshot().version == 0
    assert Snapshot().data == {}
    assert Snapshot(None, 2).data == {}
    assert Snapshot({}, 1) != Snapshot({}, 2)
    assert Snapshot({"a": 1}, 1) != Snapshot({}, 1)


@pytest.mark.parametrize("shared", [False, True])
def test_a_write_over_max_bytes_is_refused_and_not_remembered(shared: bool) -> None:
    log = OpLog()
    with pytest.raises(StateTooLargeError):
        apply_write(doc({}), log, write(max_bytes=3), NOW, 0, shared=shared)
    assert log.records == {}
    assert log.seq == 0


def test_a_shared_document_is_never_changed_and_snapshots_are_private() -> None:
    stored = {"o": {"n": 1, "p": {"q": 1}}, "l": [1]}
    before = {"o": {"n": 1, "p": {"q": 1}}, "l": [1]}
    current = Snapshot(stored, 3)
    operations = [
        Edits(((SET, ("o", "m"), 2),)),
        Increment(("o", "n"), 1),
        Increment(("o", "p", "q"), 1),
        Replace({"o": {"n": 5}}, 3),
    ]
    for operation in operations:
        size = stored_size(stored)
        result = apply_write(current, OpLog(), write(operation), NOW, size, shared=True)
        assert stored == before
        assert result.outcome.snapshot.version == 4
        result.outcome.snapshot.data["o"]["n"] = 99
        assert result.data != result.outcome.snapshot.data
    found = apply_write(current, OpLog(), write(Acquire(10)), NOW, shared=True)
    found.outcome.snapshot.data["o"]["n"] = 99
    assert stored == before


# --- the log ------------------------------------------------------------------------


def test_the_log_keeps_the_newest_ids_and_trims_in_batches() -> None:
    log = OpLog()
    for i in range(1, OPS_TRIM_AT):
        log.remember(write(key=f"k{i}", nonce=f"n{i}", digest=f"d{i}"), i * 10)
    assert len(log.records) == OPS_TRIM_AT - 1
    assert log.seq == OPS_TRIM_AT - 1
    assert log.records["k1"] == OpRecord(1, 10, "n1", "d1")
    log.remember(write(key="last"), 5)
    assert log.seq == OPS_TRIM_AT
    assert len(log.records) == REMEMBERED_OPS
    newest = [f"k{i}" for i in range(OPS_TRIM_AT - REMEMBERED_OPS + 1, OPS_TRIM_AT)]
    assert list(log.records) == [*newest, "last"]
    assert log.records["last"] == OpRecord(OPS_TRIM_AT, 5, "n1", "")


def test_a_trimmed_id_is_applied_again() -> None:
    log = OpLog()
    for i in range(OPS_TRIM_AT):
        apply_write(doc(), log, write(key=f"k{i}"), NOW)
    assert apply_write(doc(), log, write(key="k0", nonce="n2"), NOW).outcome.status == "applied"
    last = f"k{OPS_TRIM_AT - 1}"
    assert apply_write(doc(), log, write(key=last, nonce="n2"), NOW).outcome.status == "duplicate"


# --- counters and argument checks -----------------------------------------------------


@pytest.mark.parametrize(
    ("before", "path", "after"),
    [
        ({}, ("a", "b", "c"), {"a": {"b": {"c": 3}}}),
        ({"a": {}}, ("a", "b", "c"), {"a": {"b": {"c": 3}}}),
        ({"a": {"b": {"c": 1}}}, ("a", "b", "c"), {"a": {"b": {"c": 4}}}),
        (
            {"long_key": {"b": {}}},
            ("long_key", "b", "c", "d"),
            {"long_key": {"b": {"c": {"d": 3}}}},
        ),
        ({"long_key": {"bb": {"c": 7}}}, ("long_key", "bb", "c"), {"long_key": {"bb": {"c": 10}}}),
    ],
)
def test_an_increment_makes_missing_parents_and_counts_its_size(
    before: dict, path: tuple, after: dict
) -> None:
    doc = copy_json(before)
    value, delta = increment_in_place(doc, path, 3)
    assert doc == after
    node = after
    for key in path:
        node = node[key]
    assert value == node
    assert delta == stored_size(after) - stored_size(before)


def test_a_counter_at_the_int64_edges() -> None:
    doc = {"n": INT64_MIN}
    assert increment_in_place(doc, ("n",), 1)[0] == INT64_MIN + 1
    with pytest.raises(CounterError, match=r"incrementing \$\.o\.n would overflow") as info:
        increment_in_place({"o": {"n": INT64_MAX}}, ("o", "n"), 1)
    assert (info.value.path, info.value.reason) == ("$.o.n", "overflow")
    with pytest.raises(CounterError, match=r"value at \$\.o\.n \(or a parent\)") as info:
        increment_in_place({"o": {"n": "1"}}, ("o", "n"), 1)
    assert (info.value.path, info.value.reason) == ("$.o.n", "not_integer")
    with pytest.raises(CounterError) as info:
        increment_in_place({"o": None}, ("o", "n"), 1)
    assert info.value.path == "$.o.n"


def test_deadlines_are_whole_milliseconds_within_2_to_the_53() -> None:
    for ok in (0, 2**53, -(2**53)):
        assert check_deadline(ok) == ok
    for bad in (2**53 + 1, -(2**53) - 1):
        with pytest.raises(UsageError, match="within 2"):
            check_deadline(bad)
    for bad in (True, 1.0, "1"):
        with pytest.raises(UsageError, match=f"not {bad!r}"):
            check_deadline(bad)


def test_a_limit_is_a_positive_whole_number() -> None:
    assert check_limit(1) == 1
    for bad in (0, -1, True, 1.0):
        with pytest.raises(UsageError, match=f"not {bad!r}"):
            check_limit(bad)


# --- records and documents ------------------------------------------------------------


def test_a_write_wants_the_document_back_unless_told() -> None:
    assert write().want_document is True
    assert Write(Delete(), "k", "n", "", None, 1, 1, want_document=False).want_document is False


def test_a_document_compares_by_content_and_copies_deeply() -> None:
    one = Document(Snapshot({"a": {"b": [1]}}, 1))
    assert one == Document(Snapshot({"a": {"b": [1]}}, 2))
    assert one != Document(Snapshot({"a": {"b": [2]}}, 1))
    assert one == {"a": {"b": [1]}}
    assert one != {"a": 1}
    assert "a" in one
    assert "b" not in one
    copy = one.to_dict()
    assert copy == {"a": {"b": [1]}}
    copy["a"]["b"].append(2)
    assert one == {"a": {"b": [1]}}
    nested = Document(Snapshot({"l": [[1, {"x": [2]}]]}, 1)).to_dict()
    assert nested == {"l": [[1, {"x": [2]}]]}


def test_a_documents_repr_hides_preserved_values() -> None:
    data = {"jwt": "secret", "p": {"id": "concealed", "name": "shown"}, "s": "x", "q": 1}
    preserved = frozenset({("jwt",), ("p", "id"), ("missing", "x"), ("q", "r"), ("s", "t", "u")})
    shown = repr(Document(Snapshot(data, 1), preserved))
    assert "secret" not in shown
    assert "concealed" not in shown
    assert shown == ("{'jwt': <hidden>, 'p': {'id': <hidden>, 'name': 'shown'}, 's': 'x', 'q': 1}")
    assert data == {"jwt": "secret", "p": {"id": "concealed", "name": "shown"}, "s": "x", "q": 1}
    assert repr(Document(Snapshot(data, 1))) == repr(data)


def test_outcomes_compare_by_what_they_answer() -> None:
    one = Outcome("applied", Snapshot({"a": 1}, 2), 2, value=5)
    assert one == Outcome("applied", Snapshot({"a": 1}, 2), 2, value=5)
    assert one != Outcome("applied", Snapshot({"a": 1}, 2), 2, value=6)
    assert one != Outcome("duplicate", Snapshot({"a": 1}, 2), 2, value=5)
    assert one != "applied"


def test_reprs_name_keys_and_paths_but_no_values() -> None:
    assert repr(Snapshot({"b": "secret", "a": 1}, 3)) == "Snapshot(version=3, keys=['a', 'b'])"
    edits = Edits(((SET, ("a", "b"), "secret"), (SET, ("c",), 1)))
    assert repr(edits) == "Edits(s:a.b, s:c)"
    assert (
        repr(Replace({"b": "secret", "a": 1}, 4)) == "Replace(expected_version=4, keys=['a', 'b'])"
    )


def test_corrupt_names_the_key() -> None:
    error = corrupt("user:1", "not a hash")
    assert isinstance(error, CorruptStateError)
    assert error.key == "user:1"
    assert str(error).endswith("not a hash (key 'user:1'); nothing was written")


def test_a_document_is_a_read_only_dict_decoded_when_first_read() -> None:
    loads = []

    def load() -> dict[str, object]:
        loads.append(1)
        return {"a": {"b": [1]}, "c": "x"}

    doc = Document(Snapshot.lazy(3, load))
    assert isinstance(doc, dict)
    assert doc.version == 3
    assert not loads  # nothing decoded yet
    assert json.dumps(doc) == '{"a": {"b": [1]}, "c": "x"}'  # the C encoder's first read
    assert loads == [1]
    assert json.dumps(doc, indent=None, sort_keys=True) == '{"a": {"b": [1]}, "c": "x"}'
    assert json.dumps(Document(Snapshot.lazy(1, load)), indent=1).startswith("{\n")
    assert dict(doc) == {**doc} == doc.copy() == {"a": {"b": [1]}, "c": "x"}
    assert doc | {"d": 1} == {"a": {"b": [1]}, "c": "x", "d": 1}
    assert {"d": 1} | doc == {"d": 1, "a": {"b": [1]}, "c": "x"}
    assert list(doc.items()) == [("a", {"b": [1]}), ("c", "x")]
    assert list(reversed(doc)) == ["c", "a"]
    assert doc.get("missing", 5) == 5
    for change in (
        lambda: doc.__setitem__("c", "y"),
        lambda: doc.__delitem__("c"),
        lambda: doc.update(c="y"),
        lambda: doc.pop("c"),
        doc.popitem,
        lambda: doc.setdefault("e", 1),
        doc.clear,
    ):
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert doc == {"a": {"b": [1]}, "c": "x"}
    for copied in (copy.copy(doc), copy.deepcopy(doc), pickle.loads(pickle.dumps(doc))):  # noqa: S301
        assert type(copied) is dict
        assert copied == doc
    deep = copy.deepcopy(doc)
    deep["a"]["b"].append(2)
    assert doc["a"]["b"] == [1]
    assert json.dumps(Document(Snapshot({}, 1))) == "{}"


def test_a_document_that_cannot_be_decoded_raises_when_read_and_stays_unread() -> None:
    def load() -> dict[str, object]:
        raise CorruptStateError("bad", key="k")

    doc = Document(Snapshot.lazy(1, load))
    with pytest.raises(CorruptStateError):
        json.dumps(doc)
    with pytest.raises(CorruptStateError):
        len(doc)
