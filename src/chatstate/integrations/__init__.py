"""Bridges between chatstate and the bot and web frameworks people already use.

Each bridge is a module of its own, imported only when you import it, and
needs its framework installed (an optional extra of chatstate):

- :mod:`chatstate.integrations.aiogram` (``pip install 'chatstate[aiogram]'``):
  aiogram 3's FSM storage, event isolation and an update dedupe middleware.
- :mod:`chatstate.integrations.telegram` (``pip install 'chatstate[telegram]'``):
  a python-telegram-bot 22 persistence.
- :mod:`chatstate.integrations.pywa` (``pip install 'chatstate[pywa]'``): runs a
  chatstate ``Router`` or ``AsyncRouter`` from pywa's WhatsApp handlers (sync and async).
- :mod:`chatstate.integrations.telebot` (``pip install 'chatstate[telebot]'``):
  pyTelegramBotAPI's state storage (sync and asyncio) and update dedupe middlewares.
- :mod:`chatstate.integrations.starlette` (``pip install 'chatstate[starlette]'``):
  a lifespan that opens a state service and a dependency that hands it to
  Starlette and FastAPI endpoints.
- :mod:`chatstate.integrations.prometheus` (``pip install 'chatstate[prometheus]'``):
  an observer that exports operations, durations, errors and flow steps as
  Prometheus metrics.
- :mod:`chatstate.integrations.otel` (``pip install 'chatstate[otel]'``): an
  observer that makes OpenTelemetry spans and duration metrics.

This package itself imports none of them.
"""

__all__: list[str] = []
