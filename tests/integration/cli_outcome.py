"""What one `multicloud` command gave back, for the tests that run the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """Exit code and captured output of one finished command."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout parsed as JSON."""
        return json.loads(self.out)

    def error_line(self, *needles: str) -> str:
        """Exit code 2 and stderr of one `error:` line naming every needle, no traceback."""
        assert self.code == 2, (self.code, self.out[-2000:], self.err[-2000:])
        assert "Traceback" not in self.out + self.err, self.err
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("error: "), lines[0]
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        return lines[0]
