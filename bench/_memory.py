"""Peak resident memory of this process (standard library only: TRL's side imports it too)."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory image, in MB.

    Linux's ``VmHWM`` (``/proc/self/status``) starts afresh at ``exec``. ``ru_maxrss`` does not: a child
    started by ``subprocess`` reports at least the parent's resident size at the fork, which would floor the
    figure of every benchmark subprocess at its driver's memory. ``ru_maxrss`` is the fallback elsewhere.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
