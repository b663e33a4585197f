"""A RuleBasedStateMachine drives a service and a plain-dict model side by side."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatstate import StateData, StateService
from chatstate.exceptions import PreservedFieldError, StateTooLargeError
from chatstate.state import stored_size
from strategies import canonical, patches, rfc7396

USERS = st.sampled_from(["ann", "bob", "a:{b}"])
RULES = StateData(preserved=["jwt_token"], max_bytes=2048)


class ServiceModel(RuleBasedStateMachine):
    """The service must behave exactly like a dict of documents with version counters."""

    def __init__(self) -> None:
        super().__init__()
        self.svc = StateService(rules=RULES)
        self.docs: dict[str, dict] = {}
        self.versions: dict[str, int] = {}

    def _bump(self, user: str, doc: dict) -> None:
        self.docs[user] = doc
        self.versions[user] = self.versions.get(user, 0) + 1

    @rule(user=USERS, patch=patches(max_leaves=6))
    def update(self, user, patch) -> None:
        """Merge like RFC 7396, or refuse and leave the model unchanged."""
        current = self.docs.get(user, {})
        try:
            got = self.svc.update(user, patch)
        except PreservedFieldError:
            assert "jwt_token" in patch
            return
        except StateTooLargeError:
            assert stored_size(rfc7396(current, patch)) > RULES.max_bytes  # type: ignore[arg-type]
            return
        expected = rfc7396(current, patch)
        assert canonical(got) == canonical(expected)
        if patch:  # an empty patch changes nothing, not even the version
            self._bump(user, dict(got))

    @rule(user=USERS, token=st.text(min_size=1, max_size=8))
    def login(self, user, token) -> None:
        """Set_preserved writes the token."""
        got = dict(self.svc.set_preserved(user, "jwt_token", token))
        self._bump(user, {**self.docs.get(user, {}), "jwt_token": token})
        assert got == self.docs[user]

    @rule(user=USERS)
    def reset(self, user) -> None:
        """Reset keeps only the token."""
        got = dict(self.svc.reset(user))
        old = self.docs.get(user, {})
        self._bump(user, {"jwt_token": old["jwt_token"]} if "jwt_token" in old else {})
        assert got == self.docs[user]

    @precondition(lambda self: bool(self.docs))
    @rule(data=st.data())
    def delete(self, data) -> None:
        """Delete forgets the user and restarts the version."""
        user = data.draw(st.sampled_from(sorted(self.docs)))
        self.svc.delete(user)
        del self.docs[user]
        del self.versions[user]

    @invariant()
    def matches_model(self) -> None:
        for user in ("ann", "bob", "a:{b}"):
            snap = self.svc.snapshot(user)
            assert canonical(snap.data) == canonical(self.docs.get(user, {}))
            assert snap.version == self.versions.get(user, 0)
            # The size the memory backend keeps incrementally is the document's size.
            record = self.svc.manager.backend._users.get(user)  # type: ignore[attr-defined]
            assert (record.size if record else 0) == stored_size(snap.data)


TestServiceModel = ServiceModel.TestCase
TestServiceModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
