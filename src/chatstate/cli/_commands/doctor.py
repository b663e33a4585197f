"""``chatstate doctor`` (Redis only): the server checked against what chatstate needs.

What it is (Redis or Valkey, version, mode, role), persistence, eviction, the
ACL chatstate needs and whether the user has it (``ACL DRYRUN``), that the Lua
scripts load, Cluster slot coverage and latency. A check the user may not run
is a warning, never a crash.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import time
from collections.abc import Callable
from typing import Any, Final

import redis.exceptions as rex

from chatstate.cli._backends import RedisStore, redis_store
from chatstate.cli._commands.stats import byte_size
from chatstate.cli._console import Console
from chatstate.cli._errors import refused
from chatstate.state.redis import APPLY_SCRIPT, LOAD_SCRIPT, map_redis_errors

__all__ = ["ACL_COMMANDS", "Report", "acl_rule", "add_arguments", "run"]

ACL_COMMANDS: Final = (
    "evalsha", "eval", "script|load", "hgetall", "ping", "hmget", "hget", "hset", "hdel",
    "hincrby", "exists", "type", "del", "pexpire", "pttl", "get", "set",
    "zadd", "zrem", "zrangebyscore", "scan",
)  # fmt: skip
"""The commands the library runs (docs/backends.md, "The ACL chatstate needs")."""

_SLOTS: Final = 16384


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--acl-user and --strict."""
    parser.add_argument(
        "--acl-user",
        metavar="NAME",
        help="check this ACL user's rights (default: the user of the URL)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")


class Report:
    """The doctor's findings, printed as they come."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.worst = "ok"

    def add(self, status: str, name: str, detail: str) -> None:
        """One finding: ``ok``, ``warn``, ``fail`` or ``skip``."""
        order = ["ok", "skip", "warn", "fail"]
        if order.index(status) > order.index(self.worst):
            self.worst = status
        self.console.out(f"{status:<5} {name:<12} {detail}")


def acl_rule(namespace: str, user: str = "mybot") -> str:
    """The ``ACL SETUSER`` line that gives ``user`` exactly what chatstate needs."""
    commands = " ".join("+" + c for c in ACL_COMMANDS)
    return f"ACL SETUSER {user} on >PASSWORD ~{_glob_escape(namespace)}:* -@all {commands}"


def _dry_runs(namespace: str) -> list[tuple[str, tuple[str, ...]]]:
    key = f"{namespace}:{{chatstate-doctor}}"
    index = f"{namespace}:deadlines:{{0}}"
    sha = "0" * 40
    arguments: dict[str, tuple[str, ...]] = {
        "evalsha": ("EVALSHA", sha, "1", key),
        "eval": ("EVAL", "return 1", "1", key),
        "script|load": ("SCRIPT", "LOAD", "return 1"),
        "hgetall": ("HGETALL", key),
        "ping": ("PING",),
        "hmget": ("HMGET", key, "#v"),
        "hget": ("HGET", key, "#v"),
        "hset": ("HSET", key, "#v", "1"),
        "hdel": ("HDEL", key, "#v"),
        "hincrby": ("HINCRBY", key, "#n", "1"),
        "exists": ("EXISTS", key),
        "type": ("TYPE", key),
        "del": ("DEL", key),
        "pexpire": ("PEXPIRE", key, "1000"),
        "pttl": ("PTTL", key),
        "get": ("GET", key),
        "set": ("SET", key, "1", "NX", "PX", "1000"),
        "zadd": ("ZADD", index, "LT", "1", "u"),
        "zrem": ("ZREM", index, "u"),
        "zrangebyscore": ("ZRANGEBYSCORE", index, "-inf", "1", "WITHSCORES", "LIMIT", "0", "1"),
        "scan": ("SCAN", "0", "MATCH", key, "COUNT", "1"),
    }
    return [(name, arguments[name]) for name in ACL_COMMANDS]


def _check_acl(node: Any, namespace: str, user: str | None) -> tuple[str, str]:
    try:
        name = user or _text(node.execute_command("ACL", "WHOAMI"))
        missing = []
        for command, arguments in _dry_runs(namespace):
            answer = _text(node.execute_command("ACL", "DRYRUN", name, *arguments))
            if answer != "OK":
                missing.append(f"{command} ({answer})")
    except rex.ResponseError as exc:
        text = str(exc)
        if refused(exc):
            return "warn", (
                "cannot check: this user may not run ACL WHOAMI / ACL DRYRUN; run doctor as an "
                "admin with --acl-user NAME"
            )
        if "unknown subcommand" in text.lower() or "unknown command" in text.lower():
            return "warn", "cannot check: the server has no ACL DRYRUN (Redis 7 or later has)"
        return "fail", f"cannot check user {user or '(current)'}: {text}"
    if missing:
        return "fail", f"user {name!r} may not run: " + "; ".join(missing)
    return "ok", (
        f"user {name!r} may run all {len(ACL_COMMANDS)} commands chatstate needs "
        f"on {namespace}:* keys"
    )


def _config(node: Any, name: str) -> str | None:
    try:
        values = node.config_get(name)
    except rex.ResponseError:
        return None
    value = values.get(name, values.get(name.encode())) if values else None
    return None if value is None else _text(value)


def _check_persistence(node: Any) -> tuple[str, str]:
    appendonly = _config(node, "appendonly")
    if appendonly is None:  # CONFIG refused (a managed service): INFO still tells AOF
        aof = str(node.info("persistence").get("aof_enabled", "?"))
        if aof == "1":
            return "ok", "appendonly yes (CONFIG GET refused: appendfsync and save unknown)"
        return "warn", (
            "appendonly no (CONFIG GET refused): a restart loses the writes since the last "
            "snapshot, and the op ids that make redeliveries duplicates"
        )
    fsync = _config(node, "appendfsync") or "?"
    save = _config(node, "save")
    described = f"appendonly {appendonly}, appendfsync {fsync}, save {save!r}"
    if appendonly == "yes":
        if fsync == "no":
            return "warn", described + ": the OS flushes when it likes; use everysec or always"
        return "ok", described
    if save:
        return "warn", (
            described + ": RDB snapshots only, a crash loses the writes (and op ids) since "
            "the last one; set appendonly yes"
        )
    return "warn", described + ": no persistence, a restart loses every user's state"


def _check_memory(node: Any) -> tuple[str, str]:
    info = node.info("memory")
    policy = str(info.get("maxmemory_policy", "?"))
    limit = int(info.get("maxmemory", 0) or 0)
    used = int(info.get("used_memory", 0) or 0)
    size = (
        f"used {byte_size(used)} of {byte_size(limit)}"
        if limit
        else f"used {byte_size(used)}, no limit"
    )
    if policy != "noeviction":
        return "warn", (
            f"maxmemory-policy {policy} ({size}): eviction drops users' states and op logs "
            "silently; set noeviction (writes then fail with StoreFullError)"
        )
    if limit and used > 0.9 * limit:
        return "warn", f"maxmemory-policy noeviction, {size}: over 90% full"
    return "ok", f"maxmemory-policy noeviction ({size})"


def _server_line(node: Any) -> tuple[str, str, dict[str, Any]]:
    info = node.info("server")
    kind = (
        "Valkey"
        if "valkey_version" in info or str(info.get("server_name", "")).lower() == "valkey"
        else "Redis"
    )
    version = str(info.get("valkey_version" if kind == "Valkey" else "redis_version", "?"))
    mode = str(info.get("redis_mode", info.get("server_mode", "standalone")))
    role = str(node.info("replication").get("role", "?"))
    detail = f"{kind} {version}, {mode}, role {role}"
    try:
        major = int(version.split(".", maxsplit=1)[0])
    except ValueError:
        major = 0
    if role not in {"master", "primary", "?"}:
        return "fail", detail + ": a read-only replica; point --redis at the primary", info
    if mode == "sentinel":
        return "fail", detail + ": point --redis at the primary Sentinel names", info
    if major < 7:
        return "warn", detail + ": chatstate supports Redis and Valkey 7 and later", info
    return "ok", detail, info


def _check_slots(node: Any, primaries: int) -> tuple[str, str]:
    state = _text(node.execute_command("CLUSTER", "INFO"))
    ranges = sorted((int(r[0]), int(r[1])) for r in node.execute_command("CLUSTER", "SLOTS"))
    covered = 0
    gaps: list[str] = []
    nxt = 0
    for low, high in ranges:
        if low > nxt:
            gaps.append(f"{nxt}-{low - 1}")
        covered += max(0, high - max(low, nxt) + 1)
        nxt = max(nxt, high + 1)
    if nxt < _SLOTS:
        gaps.append(f"{nxt}-{_SLOTS - 1}")
    ok = "cluster_state:ok" in state
    detail = f"{covered}/{_SLOTS} slots covered by {primaries} primaries"
    if gaps or not ok:
        return "fail", detail + (f"; uncovered {', '.join(gaps[:5])}" if gaps else "") + (
            "" if ok else "; cluster_state is not ok"
        )
    return "ok", detail + ", cluster_state ok"


def _latency(node: Any, count: int = 10) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        node.ping()
        times.append(time.perf_counter() - start)
    return times


def _attempt(report: Report, name: str, check: Callable[[], tuple[str, str]]) -> None:
    try:
        status, detail = check()
    except rex.ResponseError as exc:
        status, detail = "warn", f"cannot tell: {exc}"
    report.add(status, name, detail)


def _check_scripts(node: Any) -> tuple[str, str]:
    try:
        apply, load = (
            _text(node.execute_command("SCRIPT", "LOAD", s)) for s in (APPLY_SCRIPT, LOAD_SCRIPT)
        )
    except rex.ResponseError as exc:
        return "fail", f"SCRIPT LOAD failed: {exc}"
    return "ok", f"both load (apply {apply[:12]}..., load {load[:12]}...)"


def _check_latency(node: Any) -> tuple[str, str]:
    times = _latency(node)
    return "ok", (
        f"{statistics.median(times) * 1000:.2f} ms median of {len(times)} pings "
        f"(max {max(times) * 1000:.2f} ms)"
    )


def _check_node(
    report: Report, node: Any, label: str, namespace: str, acl_user: str | None
) -> bool:
    """Run every check of one node; True when it says it is part of a Cluster."""
    cluster_mode = False
    try:
        status, detail, info = _server_line(node)
        cluster_mode = info.get("redis_mode", info.get("server_mode")) == "cluster"
    except rex.ResponseError as exc:
        status, detail = "warn", f"INFO refused: {exc}"
    report.add(status, "server" + label, detail)
    _attempt(report, "persistence" + label, lambda: _check_persistence(node))
    _attempt(report, "memory" + label, lambda: _check_memory(node))
    status, detail = _check_acl(node, namespace, acl_user)
    report.add(status, "acl" + label, detail)
    return cluster_mode


def run(args: argparse.Namespace, console: Console) -> int:
    """Check the server against what chatstate needs."""
    where = redis_store(args)
    namespace = where.namespace
    report = Report(console)
    with where.client() as client:
        with map_redis_errors("PING"):
            client.ping()
        nodes = RedisStore.nodes(client)
        console.out(f"chatstate doctor: namespace {namespace!r}, {len(nodes)} primary node(s)")
        cluster_mode = False
        with map_redis_errors("INFO"):
            for address, node in nodes:
                label = "" if len(nodes) == 1 else f" {address}"
                cluster_mode = (
                    _check_node(report, node, label, namespace, args.acl_user) or cluster_mode
                )
                _attempt(report, "scripts" + label, functools.partial(_check_scripts, node))
                _attempt(report, "latency" + label, functools.partial(_check_latency, node))
            if where.cluster:
                _attempt(report, "cluster", lambda: _check_slots(nodes[0][1], len(nodes)))
            elif cluster_mode:
                report.add("fail", "cluster", "this node is part of a Cluster: pass --cluster")
            else:
                report.add("skip", "cluster", "not a cluster")
    console.out()
    console.out("The ACL chatstate needs (the CLI's users, stats and doctor need more):")
    console.out("  " + acl_rule(namespace, args.acl_user or "mybot"))
    if report.worst == "fail" or (args.strict and report.worst == "warn"):
        return 1
    return 0
