"""Which process runs a run or a trial, and whether it is still alive.

Runs and trials carry the identity of the process that runs them (`host:pid:start`), so the next sweep or
study on the same store can tell one that is still running from one whose process was killed (kill -9, out
of memory, a lost machine) and mark it as such instead of leaving it RUNNING for ever.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _stat(pid: int) -> tuple[str, str]:
    """The state of process `pid` (R, S, Z for an unreaped zombie, ...) and when it started, in clock ticks
    since boot (Linux); ('', '') where /proc does not say. With the start time a reused pid is not mistaken
    for the process that died."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
    except OSError:
        return "", ""
    return fields[0], fields[19]  # fields 3 and 22 of proc(5)


def this_process() -> str:
    """`host:pid:start` of the calling process."""
    return f"{socket.gethostname()}:{os.getpid()}:{_stat(os.getpid())[1]}"


def has_died(process: str) -> bool:
    """Whether the process named by `this_process()` is known to have ended: only on its own host (a
    process elsewhere is left to Optuna's heartbeats)."""
    host, _, rest = process.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        pass
    state, started = _stat(int(pid))
    return state == "Z" or (bool(start) and started not in ("", start))
