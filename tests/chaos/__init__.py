"""The chaos harness (issue 17): a wallet bot in worker processes under an at-least-once dispatcher.

- :mod:`chaos.bot`: the bot (register, top up, transfer, balance) over :class:`AsyncRouter`;
  every money movement is a call to a fake bank, keyed by the message's idempotency key.
- :mod:`chaos.worker`: one worker process: messages in on stdin, the platform's sends,
  bank calls, acknowledgements and crashes out on stdout, as JSON lines.
- :mod:`chaos.dispatcher`: the test process: users with scripted conversations, an
  at-least-once platform (duplicates, swaps, redeliveries), the bank, and the faults
  (killed workers, killed connections, flushed scripts, a killed server).
- :mod:`chaos.checker`: reads the history and the stored states and counts what went wrong.

``tests/bots/test_chaos.py`` runs a short round in ``make test``; ``tools/chaos.py`` runs long ones.
"""
