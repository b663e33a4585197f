"""Multi-step conversation flows (in progress; see the flows issue)."""

__all__: list[str] = []
