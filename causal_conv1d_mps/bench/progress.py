"""A progress bar on stderr for long runs: tqdm when installed, else a one-line bar of our own.

Silent when stderr is not a terminal (CI logs, redirected output), so it never mixes with the table.
"""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, enabled: bool | None = None):
        self.total, self.done = total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._tqdm = None
        if self.enabled:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=total, file=sys.stderr, leave=False, unit="row")
            except ImportError:
                pass

    def step(self, label: str) -> None:
        """Marks the start of the row `label`."""
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_description_str(label)
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label[:60]:<60}")
        sys.stderr.flush()

    def advance(self) -> None:
        self.done += 1
        if self._tqdm is not None:
            self._tqdm.update(1)

    def clear(self) -> None:
        """Erases the bar before stdout prints a line on the same terminal; the next `step` redraws it."""
        if self._tqdm is not None:
            self._tqdm.clear()
        elif self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled:
            self.clear()
