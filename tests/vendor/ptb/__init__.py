"""python-telegram-bot v22.8 persistence tests (a package: its conftest is not ``conftest``)."""
