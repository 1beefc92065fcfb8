"""This host's processes: whether one is alive, and what tells this boot from others.

Temp files (node stores) and leases (batches) name their owner by pid and boot; a pid alone
names a process only until the machine restarts and hands it out again.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

__all__ = ["boot_marker", "process_alive"]


@functools.cache
def boot_marker() -> str:
    """The first 8 hex digits of the kernel's boot id ("0" where it cannot be read)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text()
    except OSError:
        return "0"
    marker = boot_id.strip().lower()[:8]
    return marker if re.fullmatch(r"[0-9a-f]{8}", marker) else "0"


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (POSIX signal 0)."""
    if pid <= 0:
        return False  # 0 and negative ids would signal process groups, not a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    except OverflowError:
        return False  # larger than any pid the kernel can hand out
    return True
