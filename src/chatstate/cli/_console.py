"""Standard output and error for the commands: secrets scrubbed, progress throttled."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Console", "scrub_url_passwords", "url_secrets"]

_URL_PASSWORD: Final = re.compile(r"((?:rediss?|unix|valkeys?)://[^:@/\s]*:)([^@\s]+)@")


def scrub_url_passwords(text: str) -> str:
    """``text`` with the password of any Redis URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def url_secrets(url: str | None) -> list[str]:
    """The password in a Redis URL, as written and decoded (what output must never show)."""
    if not url:
        return []
    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found += [parts.password, unquote(parts.password)]
        for name, values in parse_qs(parts.query).items():
            if "pass" in name.lower():
                found += values
    except ValueError:
        pass
    return [s for s in found if s]


class Console:
    """Standard output and error, with the secrets scrubbed and progress throttled.

    Args:
        hidden: Strings no output may show (a URL's password, a key secret).
        progress: Show progress on standard error; ``None``: when it is a terminal.
    """

    def __init__(self, hidden: Sequence[str] = (), *, progress: bool | None = None) -> None:
        self.hidden = sorted(set(hidden), key=len, reverse=True)
        self.tty = sys.stderr.isatty()
        self.show_progress = self.tty if progress is None else progress
        self._last = 0.0
        self._open_line = False

    def scrub(self, text: str) -> str:
        """``text`` without any secret."""
        for secret in self.hidden:
            text = text.replace(secret, "***")
        return scrub_url_passwords(text)

    def out(self, text: str = "") -> None:
        """A line on standard output."""
        self._end_progress()
        sys.stdout.write(self.scrub(text) + "\n")

    def error(self, text: str, *, prefix: str = "chatstate: ") -> None:
        """One line on standard error."""
        self._end_progress()
        sys.stdout.flush()
        sys.stderr.write(prefix + self.scrub(" ".join(text.split())) + "\n")
        sys.stderr.flush()

    def ask(self, question: str) -> bool:
        """Ask a yes/no question on the terminal; True for ``y`` or ``yes``."""
        sys.stderr.write(self.scrub(f"{question} [y/N] "))
        sys.stderr.flush()
        return sys.stdin.readline().strip().lower() in {"y", "yes"}

    def progress(self, text: str, *, final: bool = False) -> None:
        """Show how far a long operation got (at most twice a second; always when ``final``)."""
        if not self.show_progress:
            return
        now = time.monotonic()
        if not final and now - self._last < 0.5:
            return
        self._last = now
        text = self.scrub(text)
        if self.tty and not final:
            sys.stderr.write("\r" + text + "\x1b[K")
            self._open_line = True
        else:
            if self._open_line:
                sys.stderr.write("\r\x1b[K")
                self._open_line = False
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def _end_progress(self) -> None:
        if self._open_line:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._open_line = False
