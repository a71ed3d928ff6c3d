"""The one error type conversion raises: it names the file and every problem found, not only the first.

Imports: its own package (`convert`) only.
"""

from __future__ import annotations

from collections.abc import Sequence


class ConversionError(Exception):
    def __init__(self, path: str, problems: Sequence[str]):
        self.path = str(path)
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: cannot convert ({len(self.problems)} problem(s)):\n{listing}")
