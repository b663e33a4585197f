"""Two real run_due (and broadcast) processes, one killed with SIGKILL mid-run: nothing lost.

Runs ``benchmarks/bench_due.py`` small, in its fixed sequence (``--hold-after``):
the first process sends 40, then holds every send it starts (logged, never
confirmed); the second starts; the first is killed. Only correctness figures are
checked (every reminder sent, the held sends sent again by the survivor under
the same identity, nothing else twice), never timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import servers

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_due.py"


def _run(backend: str, mode: str) -> dict[str, object]:
    argv = [sys.executable, str(BENCH), "--backend", backend, "--mode", mode, "--json"]
    argv += ["--reminders", "300", "--send-ms", "20", "--concurrency", "16", "--rate", "5000"]
    argv += ["--hold-after", "40"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _check(result: dict[str, object]) -> None:
    assert result["all_sent"], result
    assert result["repeats_first_sent_by_killed"], result
    assert isinstance(result["repeats"], int)
    # exactly the sends the killed process held: taken by the platform, never confirmed
    assert result["repeats"] == 16, result
    assert result["by_killed"], "the killed process sent nothing: the kill proved nothing"
    assert result["expected_prefixes_ok"], result


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["due", "broadcast"])
def test_a_killed_process_loses_nothing_on_sqlite(mode: str) -> None:
    """At least once: the survivor sends what the killed one left, under the same identity."""
    _check(_run("sqlite", mode))


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("mode", ["due", "broadcast"])
def test_a_killed_process_loses_nothing_on_redis(mode: str) -> None:
    """The same on a throwaway redis-server."""
    if servers.find_binary("redis") is None:
        pytest.skip("no redis-server on this machine")
    _check(_run("redis", mode))
