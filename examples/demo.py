"""The credit-exchange demo bot: a scripted chat by default, or talk to it yourself.

python examples/demo.py                  # scripted, in-memory backend
python examples/demo.py --interactive    # type the messages yourself
python examples/demo.py --redis redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from credit_bot import RULES, build_router, seeded_bank

from chatstate import MemoryBackend, RedisBackend, StateService
from chatstate.flow import Message, render_text

USER = "+34600000000"
SCRIPT = [
    "hi",
    "register",
    "Ana",
    "12",  # not a PIN: the bot asks again
    "4321",
    "hi",
    "login",
    "4321",
    "balance",
    "transfer",
    "lots",  # not a number
    "25",
    "+34611111111",
    "no",  # change the amount
    "30",
    "+34611111111",
    "yes",
    "hi",
]


def show(replies: list[str]) -> None:
    for reply in replies:
        for i, line in enumerate(reply.splitlines()):
            print(("bot > " if i == 0 else "      ") + line)


def main() -> None:
    parser = argparse.ArgumentParser(description="chatstate's credit-exchange demo bot")
    parser.add_argument("--interactive", action="store_true", help="type the messages yourself")
    parser.add_argument("--redis", metavar="URL", help="keep state in Redis instead of memory")
    args = parser.parse_args()
    backend = RedisBackend.from_url(args.redis, namespace="demo") if args.redis else MemoryBackend()
    service = StateService(backend, RULES)
    if args.redis:
        service.delete(USER)
    router = build_router(service, seeded_bank())
    counter = 0

    def send(text: str) -> None:
        nonlocal counter
        counter += 1
        message = Message(USER, text=text, message_id=f"wamid.demo{counter}")
        show([render_text(screen) for screen in router.handle(message)])

    if args.interactive:
        print("Type messages (empty line or Ctrl-D to quit). Try: hi")
        for line in sys.stdin:
            if not line.strip():
                break
            send(line.strip())
    else:
        for text in SCRIPT:
            print(f"user> {text}")
            send(text)
        doc = service.get(USER)
        shown = {k: ("<token>" if k == "jwt_token" else v) for k, v in doc.items()}
        print(f"\nstored state: {shown}")
        # A webhook redelivers a message: the same message id is handled once.
        first = router.handle(Message(USER, text="balance", message_id="wamid.x"))
        again = router.handle(Message(USER, text="balance", message_id="wamid.x"))
        print(f"redelivered message answered again: {bool(again)} (first reply: {len(first)})")
    service.close()


if __name__ == "__main__":
    main()
