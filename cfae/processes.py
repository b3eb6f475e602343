"""The process a run lives in: its identity, whether it is still alive, its memory allocator's and OpenMP's
settings, the machine it computes on and the commit of its code (git's process: the one cfae starts itself;
Hydra's launchers start the runs' processes, as cfae/launch.py asks).

Runs and trials carry the identity of the process that runs them (`host:pid:start`), so the next sweep or
study on the same store can tell one that is still running from one whose process was killed (kill -9, out
of memory, a lost machine) and mark it as such instead of leaving it RUNNING for ever.
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket
import subprocess
import sys
import time
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


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large blocks from its heap and keep freed ones for reuse.

    By default glibc maps every block above 32 MB afresh and unmaps it when freed, so each new large
    tensor (a 138k x 500 weight gradient at ML-20M's size: 277 MB, every step) pays the kernel for zeroed
    pages: allocating and filling one takes 63 ms, 17 ms with this setting (benchmarks/kernels.py). The
    price: memory freed during training stays with the process for reuse. Linux with glibc only (the role
    jemalloc or tcmalloc play in PyTorch's CPU tuning guides); returns whether it took effect. The command
    lines call it (`keep_freed_memory: true` in conf/train.yaml); a notebook's process is left as it is.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 2**31 - 1)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def machine() -> str:
    """What this process computes on, for the record beside every timing: the CPU model and its cores as
    this process may use, and the GPU torch sees ("AMD EPYC, 2 cores, no GPU")."""
    import torch  # here, not at the top: `processes` stays light for the sweeper's liveness checks

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {usable_cores()} cores, {gpu}"


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPU cores this process may use, not all the machine has: those it may run on (its affinity, where
    the OS says), and no more than its container's CPU quota (cgroup v2's `cpu.max`, rounded up) allows."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        return cores
    return cores if quota == "max" else max(1, min(cores, -(-int(quota) // int(period))))


SPIN = 10_000  # OpenMP rounds an idle thread spins before it sleeps (libgomp's default: 300,000)


def openmp_spins_briefly() -> None:
    """Have the OpenMP threads of torch's CPU kernels spin at most `SPIN` rounds waiting for work before they
    sleep (libgomp's GOMP_SPINCOUNT). With libgomp's default a run beside processes that keep the cores busy
    slows far more than its share of the CPU: its threads spin in each other's way at every parallel step
    (docs/performance.md, benchmarks/shared_machine.py). The command lines call it before torch loads (libgomp
    reads it once, then); a GOMP_SPINCOUNT or OMP_WAIT_POLICY already set wins, and a notebook's process is
    left as it is."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN)


def device_clock(device=None) -> float:
    """`time.perf_counter()` once `device` (a torch.device) has done the work queued on it: a CUDA GPU runs
    asynchronously, so its clock is read after a synchronisation."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter()


def git_commit() -> str:
    """The commit of the cfae checkout, with '-dirty' if it has uncommitted changes; 'unknown' outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
