"""How long one flow step takes on the memory backend (target: <= 100 us).

    python benchmarks/bench_flow.py [--steps 20000]

A two-step flow is driven through the sync Router; each message is one step
(validation, the conditional write of the transition, the next prompt).
"""

from __future__ import annotations

import argparse
import time

from chatstate import MemoryBackend, StateData, StateService
from chatstate.flow import Flow, Menu, MenuItem, Message, Router, Step


def _number(answer: str) -> int:
    return int(answer)


class Order(Flow):
    """Quantity, then a note; then it starts over."""

    quantity = Step("How many?", clean=_number, next="note")
    note = Step("Any note?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    args = parser.parse_args()
    service = StateService(MemoryBackend(), StateData(preserved=["jwt_token"]))
    router = Router(service, main_menu=Menu("Menu", [MenuItem("order", "Order", flow=Order)]))
    service.update("bench", {"profile": {"name": "Ana", "lang": "es"}, "history": list(range(20))})
    cycle = ["order", "3", "leave at the door"]
    for i in range(300):
        router.handle(Message("bench", text=cycle[i % 3], message_id=f"w{i}"))
    start = time.perf_counter()
    for i in range(args.steps):
        router.handle(Message("bench", text=cycle[i % 3], message_id=f"m{i}"))
    per_step = (time.perf_counter() - start) / args.steps * 1e6
    print(f"flow step on the memory backend: {per_step:.1f} us per message (target <= 100 us)")


if __name__ == "__main__":
    main()
