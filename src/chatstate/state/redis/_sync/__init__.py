"""The sync I/O shells, generated from ``_async/`` by tools/unasync.py: do not edit them."""
