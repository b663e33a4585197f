"""The chatstate command line: find, export, fix and check the state of a bot's users.

``chatstate`` (the console script) and ``python -m chatstate`` run :func:`main`.
Every command but ``mermaid`` works on one backend, chosen with ``--redis URL``
(or ``CHATSTATE_REDIS_URL``) or ``--sqlite PATH`` (or ``CHATSTATE_SQLITE_PATH``):

- on Redis and SQLite: ``state``, ``export``, ``import``, ``delete``, ``erase``,
  ``users``, ``migrate`` and ``reencrypt``, through the public
  :class:`~chatstate.state.StateService` (``users()`` lists the ids);
- on Redis only: ``stats``, ``doctor`` and ``bench`` (on a SQLite file they say
  so, exit status 2). Redis also takes ``--namespace NS`` (or
  ``CHATSTATE_NAMESPACE``), ``--cluster``, and a bot's ``key_secret`` in
  ``CHATSTATE_KEY_SECRET``.

``chatstate --version`` prints the version. Exit status: 0 when all went well,
1 when an operation failed (one line on standard error), 2 for a usage error.
No password or key secret ever appears in any output; progress goes to standard
error on a terminal (``--progress`` forces it). docs/operations.md ("The command
line") describes every command and option.

The package: ``_commands`` holds the table of commands (``COMMANDS``) and one
module per command or small family; ``_parser`` declares the parser from the
table; ``_core`` dispatches and maps errors to exit statuses (``_errors``);
``_backends`` chooses and opens the backend; ``_console`` writes, scrubbed;
``_loading`` imports ``--rules`` and flows.
"""

from chatstate.cli._core import main

__all__ = ["main"]
