"""The long chaos run (issue 17): several seeds of the harness in ``tests/chaos/``, their figures.

Usage::

    python tools/chaos.py --seeds 1 2 3 4 5 --users 40 --messages 40 --workers 4

Each seed starts its own Redis server (``redis-server`` from PATH, on a random
loopback port) and worker processes, plays every user's conversation under the
faults, and checks the history (see ``tests/chaos/checker.py``). Prints one
Markdown table with a column per seed, then what keeps any seed from the
issue's "done when"; exits 1 if anything does. ``--history DIR`` keeps each
seed's history as JSON lines, ``--logs DIR`` the workers' stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chaos.checker import check, table
from chaos.dispatcher import Config, run


def main(argv: list[str]) -> int:
    """Run the seeds, print the table; 1 when a seed misses the 'done when' figures."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--messages", type=int, default=40, help="per user")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lease", type=float, default=defaults.lease)
    parser.add_argument("--think", type=float, default=1.5, help="a user's longest pause, s")
    parser.add_argument("--kill-every", type=float, default=4.0)
    parser.add_argument("--client-kill-every", type=float, default=3.0)
    parser.add_argument("--script-flush-every", type=float, default=4.0)
    parser.add_argument("--server-kill-every", type=float, default=20.0)
    parser.add_argument("--crash-share", type=float, default=defaults.crash_share)
    parser.add_argument("--shim", action="store_true", help="router.handle(), no acknowledgement")
    parser.add_argument("--history", type=Path, help="keep each seed's history here")
    parser.add_argument("--logs", type=Path, help="keep the workers' stderr here")
    args = parser.parse_args(argv)
    reports = []
    failed = False
    for seed in args.seeds:
        config = Config(
            seed=seed,
            users=args.users,
            messages=args.messages,
            workers=args.workers,
            lease=args.lease,
            think=args.think,
            kill_every=args.kill_every,
            client_kill_every=args.client_kill_every,
            script_flush_every=args.script_flush_every,
            server_kill_every=args.server_kill_every,
            crash_share=args.crash_share,
            shim=args.shim,
            logs=str(args.logs / f"seed-{seed}") if args.logs else "",
        )
        started = time.monotonic()
        result = run(config)
        report = check(result)
        reports.append(report)
        print(f"seed {seed}: {time.monotonic() - started:.0f} s", file=sys.stderr)
        if args.history:
            args.history.mkdir(parents=True, exist_ok=True)
            with (args.history / f"seed-{seed}.jsonl").open("w") as out:
                out.write(json.dumps({"config": dataclasses.asdict(config)}) + "\n")
                out.writelines(json.dumps(r) + "\n" for r in result.history)
            report_file = args.history / f"seed-{seed}.report.json"
            report_file.write_text(json.dumps(dataclasses.asdict(report), indent=1))
        for problem in report.done():
            failed = True
            print(f"seed {seed}: {problem}", file=sys.stderr)
    print(table(reports))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
