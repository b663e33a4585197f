"""The asyncio I/O shells: the one body of each sync/async twin (see tools/unasync.py)."""
