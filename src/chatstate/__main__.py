"""``python -m chatstate``: the command line (:mod:`chatstate.cli`)."""

from chatstate.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
