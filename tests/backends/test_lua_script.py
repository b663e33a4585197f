"""The Lua scripts called directly: hand-made arguments and stored data, exact replies and fields.

The other Redis tests reach the scripts through the Python API, where a packing
or parsing bug could hide a script bug (or the other way round). Here each test
writes the keys with plain commands, runs the script with ``EVAL`` and checks the
reply string and every stored field. Paths are encoded as ``_codec`` does (each
segment as a JSON string, concatenated); a document's size is the sum of its path
fields' and values' lengths.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from chatstate import RedisBackend, StateData, StateService
from chatstate.exceptions import CorruptStateError
from chatstate.state._backend import OPS_TRIM_AT, REMEMBERED_OPS, Edits, Increment, Write
from chatstate.state.redis._lua import APPLY_SCRIPT, LOAD_SCRIPT, write_args

pytestmark = pytest.mark.redis

# A stored document {"a": 1, "b": {"c": "x"}} at version 3: 4 + 5 + 9 = 18 bytes.
DOC = {"#v": "3", "#s": "18", '"a"': "1", '"b"': "{}", '"b""c"': '"x"'}


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A client that answers text."""
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


@pytest.fixture
def keys(namespace: str) -> list[str]:
    """A user's document, operation log and claim keys (one hash slot)."""
    base = f"{namespace}:{{u}}"
    return [base, base + ":ops", base + ":claim"]


def params(
    *,
    op_key: str = "k1",
    nonce: str = "n1",
    digest: str = "",
    dedupe: int = 60_000,
    ttl: int | str = "",
    max_bytes: int = 1000,
    mode: str = "e",
    expected: int | str = "",
    flags: str = "",
    lease: int | str = "",
    want: int = 0,
    schema: int | str = "",
) -> str:
    """ARGV[1] written out by hand (not by ``write_args``), in the script's order."""
    fields = [op_key, nonce, digest, dedupe, ttl, max_bytes, mode, expected, flags, lease, want]
    return "\n".join(str(f) for f in [*fields, schema])


def run(client: redis.Redis, keys: list[str], argv1: str, body: str = "") -> str:
    """Run the apply script with EVAL."""
    return str(client.eval(APPLY_SCRIPT, 3, *keys, argv1, body))


def stored(client: redis.Redis, keys: list[str]) -> tuple[dict[str, str], dict[str, str], object]:
    """Everything the script may write: the document, the operation log, the claim."""
    return client.hgetall(keys[0]), client.hgetall(keys[1]), client.get(keys[2])


def put_doc(client: redis.Redis, keys: list[str], fields: dict[str, str] = DOC) -> None:
    """Store a document with plain HSET."""
    client.hset(keys[0], mapping=fields)


# -- writes that apply ----------------------------------------------------------


def test_edits_create_a_document_with_version_size_and_op_record(client, keys) -> None:
    """Edits on no document make version 1, count the size and record the op key."""
    reply = run(client, keys, params(), 'o"b"\ns"b""c"\n"x"\ns"a"\n1')
    assert reply == "applied\nn1\n1\n1\n\n"
    doc, ops, claim = stored(client, keys)
    assert doc == {"#v": "1", "#s": "18", '"a"': "1", '"b"': "{}", '"b""c"': '"x"'}
    assert ops == {"#n": "1", "k1": "1 1 n1 "}
    assert claim is None
    assert 0 < client.pttl(keys[1]) <= 60_000
    assert client.pttl(keys[0]) == -1  # no ttl sent: none set


def test_edits_merge_into_the_stored_fields(client, keys) -> None:
    """A set replaces one field, a new nested field joins its parent; the rest stays."""
    put_doc(client, keys)
    client.hset(keys[1], mapping={"#n": "7", "old": "7 3 nz "})
    reply = run(client, keys, params(digest="dg"), 's"a"\n2\no"b"\ns"b""d"\n"y"')
    assert reply == "applied\nn1\n4\n4\n\n"
    doc, ops, _ = stored(client, keys)
    assert doc == {**DOC, "#v": "4", "#s": "27", '"a"': "2", '"b""d"': '"y"'}
    assert ops == {"#n": "8", "old": "7 3 nz ", "k1": "8 4 n1 dg"}


def test_delete_of_a_field_and_of_a_subtree(client, keys) -> None:
    """Deleting a leaf drops one field; deleting an object drops its whole subtree."""
    put_doc(client, keys)
    assert run(client, keys, params(), 'd"a"') == "applied\nn1\n4\n4\n\n"
    assert client.hgetall(keys[0]) == {"#v": "4", "#s": "14", '"b"': "{}", '"b""c"': '"x"'}
    assert run(client, keys, params(op_key="k2", nonce="n2"), 'd"b"') == "applied\nn2\n5\n5\n\n"
    assert client.hgetall(keys[0]) == {"#v": "5", "#s": "0"}
    assert client.hgetall(keys[1]) == {"#n": "2", "k1": "1 4 n1 ", "k2": "2 5 n2 "}


def test_setting_over_an_object_replaces_its_subtree(client, keys) -> None:
    """A value set where an object was removes the object's fields (the whole-document path)."""
    put_doc(client, keys)
    assert run(client, keys, params(), 's"b"\n7') == "applied\nn1\n4\n4\n\n"
    assert client.hgetall(keys[0]) == {"#v": "4", "#s": "8", '"a"': "1", '"b"': "7"}


def test_empty_edits_record_the_op_key_only(client, keys) -> None:
    """No edits: no new version and no document made, but the op key is remembered."""
    assert run(client, keys, params()) == "applied\nn1\n0\n0\n\n"
    assert client.exists(keys[0]) == 0
    assert client.hgetall(keys[1]) == {"#n": "1", "k1": "1 0 n1 "}


def test_want_document_appends_every_field(client, keys) -> None:
    """With want=1 the reply's head is followed by the stored hash, fields and values."""
    put_doc(client, keys)
    reply = run(client, keys, params(want=1), 's"a"\n2')
    head, dump = reply.split("\n", 5)[:5], reply.split("\n", 5)[5]
    assert head == ["applied", "n1", "4", "4", ""]
    items = dump.split("\n")
    assert dict(zip(items[0::2], items[1::2], strict=True)) == {
        **DOC,
        "#v": "4",
        '"a"': "2",
    }


def test_replace_stores_exactly_the_sent_fields(client, keys) -> None:
    """A replace at the expected version drops every field it does not send."""
    put_doc(client, keys)
    reply = run(client, keys, params(mode="x", expected=3), '"z"\n[]\n"a"\n1')
    assert reply == "applied\nn1\n4\n4\n\n"
    assert client.hgetall(keys[0]) == {"#v": "4", "#s": "9", '"z"': "[]", '"a"': "1"}


def test_reset_keeps_only_the_preserved_subtrees(client, keys) -> None:
    """A reset keeps a preserved path that exists (with its ancestors) and nothing else."""
    put_doc(client, keys)
    # preserved b.c (one ancestor, b) and q (absent, no ancestors)
    reply = run(client, keys, params(mode="r"), '"b""c"\n1\n"b"\n"q"\n0')
    assert reply == "applied\nn1\n4\n4\n\n"
    assert client.hgetall(keys[0]) == {"#v": "4", "#s": "14", '"b"': "{}", '"b""c"': '"x"'}


def test_increment_reads_the_exact_text_and_makes_ancestors(client, keys) -> None:
    """An increment answers the counter's new text and creates missing parent objects."""
    put_doc(client, keys)
    reply = run(client, keys, params(mode="i"), '"a"\n41')
    assert reply == "applied\nn1\n4\n4\n42\n"
    reply = run(client, keys, params(op_key="k2", nonce="n2", mode="i"), '"m""n"\n"m"\n-5')
    assert reply == "applied\nn2\n5\n5\n-5\n"
    doc = client.hgetall(keys[0])
    assert doc == {**DOC, "#v": "5", "#s": "32", '"a"': "42", '"m"': "{}", '"m""n"': "-5"}


def test_delete_removes_the_document_and_records_version_zero(client, keys) -> None:
    """A delete drops the hash, answers version 0 without a document, and is logged."""
    put_doc(client, keys)
    client.pexpire(keys[0], 100_000)
    assert run(client, keys, params(mode="D", want=1)) == "applied\nn1\n0\n0\n\n"
    assert client.exists(keys[0]) == 0
    assert client.hgetall(keys[1]) == {"#n": "1", "k1": "1 0 n1 "}


def test_a_forced_delete_clears_a_foreign_op_log(client, keys) -> None:
    """Only a forced delete gets past an operation log that is not a hash, by deleting it."""
    put_doc(client, keys)
    client.set(keys[1], "junk")
    refused = run(client, keys, params(mode="D"))
    assert refused == f"corrupt\n{keys[1]}\nthe key is not a chatstate operation log"
    assert client.get(keys[1]) == "junk"
    assert run(client, keys, params(mode="D", flags="f")) == "applied\nn1\n0\n0\n\n"
    assert client.exists(keys[0]) == 0
    assert client.hgetall(keys[1]) == {"#n": "1", "k1": "1 0 n1 "}
    client.set(keys[1], "junk")
    put_doc(client, keys)
    assert run(client, keys, params(op_key="k2", mode="D", flags="nf")) == "applied\nn1\n0\n0\n\n"
    assert client.exists(keys[0]) == 0
    assert client.hgetall(keys[1]) == {"#n": "1", "k2": "1 0 n1 "}


def test_ttl_is_set_with_pexpire_and_kept_when_not_sent(client, keys) -> None:
    """A ttl replaces the document's expiry (PEXPIRE); a write without one keeps it."""
    put_doc(client, keys)
    client.pexpire(keys[0], 100_000)
    assert run(client, keys, params(dedupe=30_000), 's"a"\n2').startswith("applied\n")
    assert 90_000 < client.pttl(keys[0]) <= 100_000
    assert 0 < client.pttl(keys[1]) <= 30_000
    assert run(client, keys, params(op_key="k2", ttl=5000), 's"a"\n3').startswith("applied\n")
    assert 0 < client.pttl(keys[0]) <= 5000


# -- the operation log ------------------------------------------------------------


def test_a_known_op_key_answers_applied_duplicate_or_reused(client, keys) -> None:
    """Same nonce: applied (the recorded version); other nonce: duplicate; other digest: reused."""
    put_doc(client, keys)
    log = {"#n": "7", "k1": "5 2 nA dg"}
    client.hset(keys[1], mapping=log)
    before = stored(client, keys)
    assert run(client, keys, params(nonce="nA", digest="dg"), 's"a"\n9') == "applied\nnA\n2\n3\n\n"
    assert (
        run(client, keys, params(nonce="nB", digest="dg"), 's"a"\n9') == "duplicate\nnB\n2\n3\n\n"
    )
    assert run(client, keys, params(nonce="nB"), 's"a"\n9') == "duplicate\nnB\n2\n3\n\n"
    assert run(client, keys, params(nonce="nA", digest="zz"), 's"a"\n9') == "reused\nnA\n3\n3\n\n"
    assert stored(client, keys) == before


def test_a_first_send_does_not_look_its_key_up(client, keys) -> None:
    """Flag n skips the op key lookup: the write applies and its record is overwritten."""
    put_doc(client, keys)
    client.hset(keys[1], mapping={"#n": "7", "k1": "5 2 nA dg"})
    assert run(client, keys, params(nonce="nB", flags="n"), 's"a"\n9') == "applied\nnB\n4\n4\n\n"
    assert client.hgetall(keys[1]) == {"#n": "8", "k1": "8 4 nB "}


def test_the_op_log_is_trimmed_to_the_newest_records(client, keys) -> None:
    """The write numbered OPS_TRIM_AT drops every record older than the newest REMEMBERED_OPS."""
    last = OPS_TRIM_AT - 1
    log = {f"r{i:03d}": f"{i} 1 nz " for i in range(1, last + 1)}
    client.hset(keys[1], mapping={"#n": str(last), **log})
    assert run(client, keys, params(), 's"a"\n1') == "applied\nn1\n1\n1\n\n"
    ops = client.hgetall(keys[1])
    kept = {f"r{i:03d}" for i in range(OPS_TRIM_AT - REMEMBERED_OPS + 1, last + 1)}
    assert set(ops) == {"#n", "k1", *kept}
    assert ops["#n"] == str(OPS_TRIM_AT)
    assert ops["k1"] == f"{OPS_TRIM_AT} 1 n1 "


def test_the_op_log_is_not_trimmed_before_its_time(client, keys) -> None:
    """One write short of OPS_TRIM_AT, every record stays."""
    last = OPS_TRIM_AT - 2
    log = {f"r{i:03d}": f"{i} 1 nz " for i in range(1, last + 1)}
    client.hset(keys[1], mapping={"#n": str(last), **log})
    run(client, keys, params(), 's"a"\n1')
    assert len(client.hgetall(keys[1])) == last + 2


# -- refusals: nothing is written -------------------------------------------------


def test_expected_version_conflict(client, keys) -> None:
    """A conditional write at another version answers conflict and writes nothing at all."""
    put_doc(client, keys)
    before = stored(client, keys)
    assert run(client, keys, params(expected=2), 's"a"\n9') == "conflict\nn1\n0\n3\n\n"
    assert run(client, keys, params(expected=2)) == "conflict\nn1\n0\n3\n\n"
    assert run(client, keys, params(mode="x", expected=4), '"a"\n9') == "conflict\nn1\n0\n3\n\n"
    assert stored(client, keys) == before
    assert client.exists(keys[1]) == 0


def test_max_bytes_refusal_leaves_the_hash_unchanged(client, keys) -> None:
    """A write past max_bytes answers too_large with the size it would have had."""
    put_doc(client, keys)
    before = stored(client, keys)
    big = '"' + "x" * 50 + '"'
    assert run(client, keys, params(max_bytes=40), f's"big"\n{big}') == "too_large\nn1\n75"
    assert run(client, keys, params(max_bytes=40), f'd"b"\ns"big"\n{big}') == "too_large\nn1\n61"
    assert stored(client, keys) == before
    assert run(client, keys, params(max_bytes=75), f's"big"\n{big}').startswith("applied\n")


def test_increment_too_large_puts_the_old_text_back(client, keys) -> None:
    """An increment over max_bytes undoes its HINCRBY, to the exact old text."""
    put_doc(client, keys, {**DOC, "#s": "19", '"a"': "-1"})
    before = stored(client, keys)
    assert run(client, keys, params(mode="i", max_bytes=18), '"a"\n11') == "too_large\nn1\n19"
    assert stored(client, keys) == before
    assert run(client, keys, params(mode="i", max_bytes=18), '"a"\n-9') == "too_large\nn1\n20"
    assert stored(client, keys) == before


@pytest.mark.parametrize(
    ("counter", "body", "why"),
    [
        ("9223372036854775807", '"a"\n1', "overflow"),
        ('"text"', '"a"\n1', "not_integer"),
        ("1", '"a""x"\n"a"\n1', "not_integer"),  # an ancestor that is not an object
    ],
)
def test_increment_refusals(client, keys, counter: str, body: str, why: str) -> None:
    """An overflow or a non-integer answers counter with the reason; the field is unchanged."""
    size = str(3 + len(counter) + 14)
    put_doc(client, keys, {**DOC, "#s": size, '"a"': counter})
    before = stored(client, keys)
    assert run(client, keys, params(mode="i"), body) == f"counter\nn1\n3\n3\n{why}\n"
    assert stored(client, keys) == before


def test_increment_of_a_counter_whose_parent_is_missing(client, keys) -> None:
    """A counter stored without its parent object is not a counter of this document."""
    fields = {**DOC, "#s": "26", '"m""n"': "1"}
    put_doc(client, keys, fields)
    reply = run(client, keys, params(mode="i"), '"m""n"\n"m"\n1')
    assert reply == "counter\nn1\n3\n3\nnot_integer\n"
    assert client.hgetall(keys[0]) == fields


def test_claim_busy_claimed_and_released(client, keys) -> None:
    """A claim held by another nonce is busy (with its PTTL); a free one is taken; release."""
    put_doc(client, keys)
    client.set(keys[2], "nX kX", px=5000)
    head = run(client, keys, params(mode="c", lease=3000)).split("\n")
    assert head[:4] == ["busy", "n1", "3", "3"]
    assert 0 < int(head[4]) <= 5000
    assert client.get(keys[2]) == "nX kX"
    assert run(client, keys, params(mode="l")) == "released\nn1\n0\n0\n\n"
    assert client.get(keys[2]) == "nX kX"  # not ours to release
    client.delete(keys[2])
    assert run(client, keys, params(mode="c", lease=3000)) == "claimed\nn1\n3\n3\n\n"
    assert client.get(keys[2]) == "n1 k1"
    assert 0 < client.pttl(keys[2]) <= 3000
    assert client.exists(keys[1]) == 0  # a claim records nothing
    assert run(client, keys, params(mode="l")) == "released\nn1\n0\n0\n\n"
    assert client.exists(keys[2]) == 0


def test_a_completing_write_needs_its_claim(client, keys) -> None:
    """Flag c: lost when another nonce (or nobody) holds the claim; else applied, claim ended."""
    put_doc(client, keys)
    before = stored(client, keys)
    assert run(client, keys, params(flags="c"), 's"a"\n2') == "lost\nn1\n3\n3\n\n"
    client.set(keys[2], "nX k1", px=5000)
    assert run(client, keys, params(flags="c"), 's"a"\n2') == "lost\nn1\n3\n3\n\n"
    assert stored(client, keys) == (before[0], before[1], "nX k1")
    client.set(keys[2], "n1 k1", px=5000)
    assert run(client, keys, params(flags="c"), 's"a"\n2') == "applied\nn1\n4\n4\n\n"
    assert client.exists(keys[2]) == 0
    assert client.hgetall(keys[1]) == {"#n": "1", "k1": "1 4 n1 "}


def test_the_schema_guard(client, keys) -> None:
    """A newer stored schema refuses every write; an older one all but a replace, which moves it."""
    put_doc(client, keys, {**DOC, "#m": "2"})
    before = stored(client, keys)
    assert run(client, keys, params(schema=1), 's"a"\n2') == "newer_schema\nn1\n3\n3\n2\n"
    assert run(client, keys, params(schema=1, mode="x", expected=3), '"a"\n2') == (
        "newer_schema\nn1\n3\n3\n2\n"
    )
    assert stored(client, keys) == before
    assert run(client, keys, params(schema=3, mode="i"), '"a"\n1') == "stale_schema\nn1\n3\n3\n2\n"
    assert stored(client, keys) == before
    assert run(client, keys, params(schema=2), 's"a"\n2') == "applied\nn1\n4\n4\n\n"
    reply = run(client, keys, params(op_key="k2", schema=3, mode="x", expected=4), '"a"\n5')
    assert reply == "applied\nn1\n5\n5\n\n"
    assert client.hgetall(keys[0]) == {"#v": "5", "#s": "4", "#m": "3", '"a"': "5"}


def test_no_schema_field_means_schema_one(client, keys) -> None:
    """Without '#m' the stored schema is 1: a writer of 2 is stale; creating stores '#m' only above 1."""
    put_doc(client, keys)
    assert run(client, keys, params(schema=2), 's"a"\n2') == "stale_schema\nn1\n3\n3\n1\n"
    assert run(client, keys, params(schema=1), 's"a"\n2') == "applied\nn1\n4\n4\n\n"
    assert "#m" not in client.hgetall(keys[0])
    client.delete(keys[0])
    assert run(client, keys, params(op_key="k2", schema=2), 's"a"\n2') == "applied\nn1\n1\n1\n\n"
    assert client.hget(keys[0], "#m") == "2"


# -- stored data that is not ours -------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "body", "why"),
    [
        ({**DOC, "#v": "x"}, 's"a"\n2', "the version or size field is not a whole number"),
        ({**DOC, "#s": "-1"}, 's"a"\n2', "the version or size field is not a whole number"),
        (
            {**DOC, "#m": "two"},
            's"a"\n2',
            "the schema field is not a whole number from 1 to 999999999",
        ),
        (
            {**DOC, "#m": "0"},
            's"a"\n2',
            "the schema field is not a whole number from 1 to 999999999",
        ),
        ({'"a"': "1"}, 's"a"\n2', "the hash has no version field"),
        ({**DOC, "foo": "1"}, 'd"b"', "the hash has a field that is not a chatstate path"),
    ],
)
def test_corrupt_documents(client, keys, fields: dict[str, str], body: str, why: str) -> None:
    """A malformed document answers corrupt with the key and the reason; nothing changes."""
    put_doc(client, keys, fields)
    argv1 = params(schema=1)
    assert run(client, keys, argv1, body) == f"corrupt\n{keys[0]}\n{why}"
    assert client.hgetall(keys[0]) == fields
    assert client.exists(keys[1]) == 0


def test_a_foreign_field_passes_the_fast_path(client, keys) -> None:
    """Only the whole-document path reads every field: a small edit leaves a stray one alone."""
    put_doc(client, keys, {**DOC, "foo": "1"})
    assert run(client, keys, params(), 's"a"\n2') == "applied\nn1\n4\n4\n\n"
    assert client.hget(keys[0], "foo") == "1"


@pytest.mark.parametrize(
    ("target", "value", "why"),
    [
        (0, "string", "the key holds a string, not a chatstate hash"),
        (1, "string", "the key is not a chatstate operation log"),
        (1, {"#n": "x"}, "the operation count is not a number"),
        (1, {"#n": "1", "k1": "garbage"}, "an operation record is malformed"),
        (2, {"a": "1"}, "the key is not a chatstate claim"),
        (2, "no-space", "the claim is malformed"),
    ],
)
def test_corrupt_keys(client, keys, target: int, value: object, why: str) -> None:
    """A key of the wrong type or shape answers corrupt naming that key."""
    if isinstance(value, dict):
        client.hset(keys[target], mapping=value)
    else:
        client.set(keys[target], value)  # type: ignore[arg-type]
    mode, flags = ("c", "") if target == 2 else ("e", "")
    argv1 = params(mode=mode, flags=flags, lease=1000 if mode == "c" else "")
    assert run(client, keys, argv1, 's"a"\n2') == f"corrupt\n{keys[target]}\n{why}"


@pytest.mark.parametrize(
    "argv1",
    [
        "k1\nn1\n\n60000\n\n1000\ne\n\n\n\n0",  # the schema line is missing
        "k1\nn1\n\n60000\n\n1000\ne\n\n\n\n2\n",  # want is not 0 or 1
        "k1\nn1\n\n-1\n\n1000\ne\n\n\n\n0\n",  # a negative dedupe
        "k 1\nn1\n\n60000\n\n1000\ne\n\n\n\n0\n",  # a space in the op key
    ],
)
def test_malformed_arguments_are_an_error(client, keys, argv1: str) -> None:
    """Parameters that do not match the expected shape are an error reply, nothing written."""
    with pytest.raises(redis.ResponseError, match="chatstate: malformed arguments"):
        run(client, keys, argv1, 's"a"\n2')
    assert client.exists(*keys) == 0


# -- the load script and the Python packing ----------------------------------------


def test_load_script_echoes_and_dumps(client, keys) -> None:
    """LOAD answers ok, the echo, then fields and values; a non-hash is corrupt."""
    put_doc(client, keys)
    reply = str(client.eval(LOAD_SCRIPT, 1, keys[0], "e1"))
    head, items = reply.split("\n")[:2], reply.split("\n")[2:]
    assert head == ["ok", "e1"]
    assert dict(zip(items[0::2], items[1::2], strict=True)) == DOC
    assert client.eval(LOAD_SCRIPT, 1, keys[2], "e2") == "ok\ne2\n"
    client.set(keys[2], "x")
    assert client.eval(LOAD_SCRIPT, 1, keys[2], "e3") == (
        f"corrupt\n{keys[2]}\nthe key holds a string, not a chatstate hash"
    )


def test_write_args_packs_what_the_script_reads(client, keys) -> None:
    """write_args gives the hand-written arguments, and EVALSHA runs them like EVAL."""
    edits = Write(
        Edits((("s", ("a",), 2), ("d", ("b", "c"), None))), "k1", "n1", "", 5000, 1000, 60_000
    )
    assert write_args(edits) == [params(ttl=5000, want=1), 's"a"\n2\nd"b""c"']
    bump = Write(Increment(("m", "n"), -5), "k2", "n2", "dg", None, 1000, 60_000, schema=1)
    assert write_args(bump, fresh=True) == [
        params(op_key="k2", nonce="n2", digest="dg", mode="i", flags="n", want=1, schema=1),
        '"m""n"\n"m"\n-5',
    ]
    put_doc(client, keys)
    sha = client.script_load(APPLY_SCRIPT)
    reply = str(client.evalsha(sha, 3, *keys, *write_args(bump, fresh=True)))
    assert reply.split("\n")[:5] == ["applied", "n2", "4", "4", "-5"]


@pytest.mark.parametrize("stored", ["0", "01", "1000000000", "2.5", "-1"])
def test_a_stored_schema_outside_1_to_999999999_is_corrupt(
    redis_url: str, namespace: str, stored: str
) -> None:
    """Reads and writes refuse a #m that no backend could have stored (0, 10 digits, ...)."""
    backend = RedisBackend.from_url(redis_url, namespace=namespace)
    svc = StateService(backend, StateData(schema_version=2, migrations={1: dict}))
    svc.update("u", {"a": 1})
    backend.client.hset(f"{namespace}:{{u}}", "#m", stored)
    with pytest.raises(CorruptStateError, match="schema field"):
        svc.update("u", {"a": 2})
    with pytest.raises(CorruptStateError, match="schema field"):
        svc.get("u")
    svc.close()
