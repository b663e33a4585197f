"""The asyncio body of the PostgreSQL backends; ``../_sync`` is generated from it."""
