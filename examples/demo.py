"""A scripted chat on the in-memory backend: state updated, preserved, reset, deduplicated.

Run it with ``make demo`` (or ``python examples/demo.py``). No server is needed.
"""

from __future__ import annotations

from chatstate import CachedUser, StateData, StateService

RULES = StateData(preserved=["jwt_token", "profile"], replaced=["draft"])


def bot_reply(user: CachedUser, text: str) -> str:  # noqa: PLR0911 - one reply per branch
    """A tiny bot: a menu, a two-step transfer form and a login, all in user state."""
    state = user.state
    step = state.get("step")
    if text == "hi":
        state.reset()
        name = state.get("profile", {}).get("name", "stranger")
        return f"Hello {name}! Reply 'login', 'transfer' or 'bye'."
    if text == "login":
        # Tokens and profiles are preserved: only set_preserved changes them.
        state.set_preserved("jwt_token", "eyJhbGciOi...demo")
        state.set_preserved("profile", {"name": "Ana", "phone": "+34600000000"})
        return "Logged in as Ana."
    if text == "transfer":
        state.update({"step": "amount", "draft": {"kind": "transfer"}})
        return "How many credits?"
    if step == "amount":
        if not text.isdigit():
            return "Please send a whole number of credits."
        state.update({"step": "recipient", "draft": {**state["draft"], "amount": int(text)}})
        return "Who should receive them?"
    if step == "recipient":
        draft = {**state["draft"], "to": text}
        state.update({"step": None, "draft": None, "history": [*state.get("history", []), draft]})
        return f"Sent {draft['amount']} credits to {text}."
    return "Sorry, I did not get that. Say 'hi' for the menu."


def main() -> None:
    """Play a short conversation and show the state after every message."""
    service = StateService(rules=RULES)
    script = ["hi", "login", "hi", "transfer", "ten", "10", "bob", "hi"]
    for text in script:
        user = CachedUser("+34600000000", service)  # one per incoming message
        reply = bot_reply(user, text)
        shown = {k: ("<redacted>" if k == "jwt_token" else v) for k, v in user.state.items()}
        print(f"user> {text}")
        print(f"bot > {reply}")
        print(f"      state v{user.state.version}: {shown}")

    # A webhook redelivers a message: the same message id is applied once.
    first = service.update_once("+34600000000", {"last_seen": "wamid.42"}, op_id="wamid.42")
    again = service.update_once("+34600000000", {"last_seen": "wamid.42"}, op_id="wamid.42")
    print(f"message wamid.42 first delivery: {first.status}; redelivery: {again.status}")


if __name__ == "__main__":
    main()
