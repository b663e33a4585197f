"""The sync PostgreSQL backend, generated from ``../_async`` by ``tools/unasync.py``."""
