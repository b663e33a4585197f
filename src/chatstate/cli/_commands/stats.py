"""``chatstate stats`` (Redis only): users, op ids, claims and locks, memory per user."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from typing import Any

from chatstate.cli._backends import redis_store
from chatstate.cli._console import Console
from chatstate.cli._errors import CommandLineError
from chatstate.state.redis import map_redis_errors

__all__ = ["add_arguments", "byte_size", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--sample and --json."""
    parser.add_argument(
        "--sample",
        type=int,
        default=200,
        metavar="N",
        help="users whose MEMORY USAGE is read (default 200)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object")


def byte_size(count: Any) -> str:
    """A number of bytes for people: ``512 B``, ``1.5 KB``, ``2.0 MB``."""
    value = float(count or 0)
    for unit in ("B", "KB", "MB"):
        if value < 1024 or unit == "MB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} MB"  # pragma: no cover - the loop returns


def _batches(items: list[Any], count: int = 500) -> Iterator[list[Any]]:
    for start in range(0, len(items), count):
        yield items[start : start + count]


def run(args: argparse.Namespace, console: Console) -> int:
    """Count users, op logs, claims and locks; sample memory per user."""
    if args.sample < 0:
        raise CommandLineError("--sample must not be negative")
    where = redis_store(args)
    counts = {"doc": 0, "ops": 0, "claim": 0, "lock": 0}
    with where.client() as client:
        ops_keys: dict[int, tuple[Any, list[str]]] = {}
        sample: dict[int, tuple[Any, list[str]]] = {}
        sampled = 0
        for node, key, parsed in where.scan(client, console, kind=None):
            counts[parsed.kind] += 1
            if parsed.kind == "ops":
                ops_keys.setdefault(id(node), (node, []))[1].append(key)
            elif parsed.kind == "doc" and sampled < args.sample:
                sampled += 1
                sample.setdefault(id(node), (node, []))[1].extend([key, key + ":ops"])
        remembered, recorded = _read_op_logs(ops_keys, counts["ops"], console)
        sizes = _memory_usage(sample)
    doc_bytes, ops_bytes = sizes[0::2], sizes[1::2]
    result = {
        "namespace": where.namespace,
        "users": counts["doc"],
        "op_logs": counts["ops"],
        "op_ids_remembered": remembered,
        "writes_recorded": recorded,
        "claims_held": counts["claim"],
        "locks_held": counts["lock"],
        "sampled_users": len(doc_bytes),
        "bytes_per_user": round(statistics.fmean(doc_bytes)) if doc_bytes else None,
        "op_log_bytes_per_user": round(statistics.fmean(ops_bytes)) if ops_bytes else None,
    }
    if args.json:
        console.out(json.dumps(result))
        return 0
    console.out(f"namespace          {where.namespace}")
    console.out(f"users              {counts['doc']}")
    console.out(f"op logs            {counts['ops']}  (users written within the dedupe window)")
    console.out(f"op ids remembered  {remembered}  ({recorded} writes recorded in those logs)")
    console.out(f"claims held        {counts['claim']}")
    console.out(f"locks held         {counts['lock']}")
    if doc_bytes:
        console.out(
            f"memory per user    {byte_size(result['bytes_per_user'])} document + "
            f"{byte_size(result['op_log_bytes_per_user'])} op log  "
            f"(MEMORY USAGE, mean of {len(doc_bytes)} users)"
        )
    return 0


def _read_op_logs(
    ops_keys: dict[int, tuple[Any, list[str]]], total: int, console: Console
) -> tuple[int, int]:
    """The op ids the logs remember, and the writes they have recorded (``#n``)."""
    remembered = recorded = done = 0
    with map_redis_errors("HLEN"):
        for node, keys in ops_keys.values():
            for batch in _batches(keys):
                pipe = node.pipeline(transaction=False)
                for key in batch:
                    pipe.hlen(key)
                    pipe.hget(key, "#n")
                replies = pipe.execute()
                for length, n in zip(replies[0::2], replies[1::2], strict=True):
                    remembered += max(0, int(length) - 1)
                    recorded += int(n or 0)
                done += len(batch)
                console.progress(f"read {done} of {total} operation logs")
    return remembered, recorded


def _memory_usage(sample: dict[int, tuple[Any, list[str]]]) -> list[int]:
    """MEMORY USAGE of each key (a missing key counts 0), node by node."""
    sizes: list[int] = []
    with map_redis_errors("MEMORY USAGE"):
        for node, keys in sample.values():
            for batch in _batches(keys):
                pipe = node.pipeline(transaction=False)
                for key in batch:
                    pipe.memory_usage(key, samples=0)
                sizes += [int(r or 0) for r in pipe.execute()]
    return sizes
