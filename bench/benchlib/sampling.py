"""Memory and CPU of process trees, read from /proc (psutil), and the machine's other load.

A relay's tree is walked again at every reading: Postfix's master starts
and reaps smtpd, cleanup and smtp processes during a run, and each new child
counts from its first sample. PSS is summed from each process's
smaps_rollup: a page shared by N processes counts 1/N for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import psutil


def process_tree(pids: list[int]) -> list[psutil.Process]:
    """The processes `pids` and all their children as they are now (those gone are left out)."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs.append(proc)
            procs += proc.children(recursive=True)
    return procs


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup as {field: bytes} (Rss, Pss, Pss_Anon, Pss_File, Pss_Shmem...); {} if gone."""
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[0].endswith(b":") and parts[2] == b"kB":
                fields[parts[0][:-1].decode()] = int(parts[1]) * 1024
    return fields


def _vm_hwm(pid: int) -> int:
    """Peak RSS (VmHWM) of one process, in bytes; 0 if gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# tree_memory()'s sums: its key, the smaps_rollup field.
_SUMMED = {"pss": "Pss", "pss_anon": "Pss_Anon", "pss_file": "Pss_File", "pss_shmem": "Pss_Shmem", "rss": "Rss",
           "anonymous": "Anonymous"}


def tree_memory(pids: list[int]) -> dict[str, int]:
    """The process trees of `pids` as they are now, in bytes: Pss summed (and its Anon, File and Shmem
    parts, Rss and its Anonymous part), the largest single process's VmHWM, and how many processes
    (0: none left)."""
    totals = {"processes": 0, **{key: 0 for key in _SUMMED}, "hwm": 0}
    for proc in process_tree(pids):
        rollup = smaps_rollup(proc.pid)
        totals["processes"] += 1
        for key, name in _SUMMED.items():
            totals[key] += rollup.get(name, 0)
        totals["hwm"] = max(totals["hwm"], _vm_hwm(proc.pid))
    return totals


def thread_seconds(procs: list[psutil.Process]) -> dict[str, float]:
    """CPU seconds per thread ("main" = each process's main thread; others by thread id)."""
    out: dict[str, float] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for thread in proc.threads():
                name = "main" if thread.id == proc.pid else f"thread-{thread.id}"
                if len(procs) > 1:
                    name = f"{proc.name()}-{proc.pid}:{name}"
                out[name] = thread.user_time + thread.system_time
    return out


def process_seconds(pids: list[int]) -> dict[str, float]:
    """CPU seconds per process of the trees of `pids`, by role.

    A child with its root's name is one of its workers ("supervisor",
    "worker1", "worker2"... for the gateway, numbered in the order they were
    started); other processes add up by name (Postfix's smtpd, cleanup,
    smtp...), and "reaped" is what the children that have already exited
    spent.
    """
    out: dict[str, float] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            name = root.name()
            children = sorted(root.children(recursive=True), key=lambda proc: proc.create_time())
            workers = 0
            for proc in [root, *children]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    if proc is root:
                        label = "supervisor" if any(c.name() == name for c in children) else name
                    elif proc.name() == name:
                        workers += 1
                        label = f"worker{workers}"
                    else:
                        label = proc.name()
                    out[label] = out.get(label, 0.0) + times.user + times.system
                    out["reaped"] = out.get("reaped", 0.0) + times.children_user + times.children_system
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent (all cores), to see load we did not cause."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "guest", 0.0) \
        - getattr(times, "guest_nice", 0.0)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def process_cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process (time.process_time), or of process `pid`."""
    if pid is None:
        return time.process_time()
    return cpu_seconds([psutil.Process(pid)])


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of a process tree as it is now, including the children it has already reaped.

    Postfix's master starts and reaps smtpd, cleanup and smtp processes during
    a cell (each serves at most max_use = 100 clients), so the tree is walked
    again at each reading and the exited children's time comes from their
    parent's children_user/children_system.
    """
    total = 0.0
    for proc in process_tree(pids):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


async def wait_idle(limit: float) -> None:
    """Before a cell on a shared machine: wait (up to `limit` s) until others use under 10% of a core."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy_seconds()
        await asyncio.sleep(1.0)
        busy = machine_busy_seconds() - before
        if busy < 0.10 or time.monotonic() > deadline:
            return


class MemorySampler:
    """Samples the summed PSS of a process tree every `interval` seconds; keeps the peak."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_pss = 0
        self.peak_hwm = 0  # the largest single process's own peak RSS, exact (kernel-tracked)
        self.first_pss = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> dict[str, int] | None:
        """Take one sample; returns tree_memory()'s reading (None if the tree is gone)."""
        now = tree_memory(self.pids)
        if not now["processes"]:
            return None
        self.peak_hwm = max(self.peak_hwm, now["hwm"])
        if self.samples == 0:
            self.first_pss = now["pss"]
        self.samples += 1
        self.peak_pss = max(self.peak_pss, now["pss"])
        return now

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self.pids:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self.sample()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
