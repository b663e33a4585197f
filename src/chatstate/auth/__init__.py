"""JWT helpers that keep a user's token in preserved state (in progress; see the auth issue)."""

__all__: list[str] = []
