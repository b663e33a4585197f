"""The sync telebot twins, generated from ``../_async`` by ``tools/unasync.py``: do not edit."""
