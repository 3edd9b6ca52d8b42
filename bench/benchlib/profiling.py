"""py-spy on a gateway process (optional, `--profile DIR`), and a summary of the stacks it recorded.

py-spy writes raw collapsed stacks (one line per distinct stack, with its
sample count), which open in any flame-graph viewer; `summarize_profile`
turns them into the self and inclusive share per function and per thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import REPO_DIR, procs


class Profiler:
    """`py-spy record` of one process (all threads, raw collapsed stacks) into a file.

    `gil`: sample only the thread holding the GIL (where Python spends CPU, not
    its waits); `rate`: samples per second; `flags`: further py-spy options;
    `settle`: seconds to give py-spy to attach before the measurement goes on.
    """

    def __init__(self, *, gil: bool = False, rate: int = 250, flags: tuple[str, ...] = (),
                 settle: float = 0.3) -> None:
        self.gil = gil
        self.rate = rate
        self.flags = flags
        self.settle = settle
        self.proc: asyncio.subprocess.Process | None = None
        self.path: Path | None = None

    async def start(self, pid: int, path: Path) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.proc = await procs.spawn(exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
                                      "--threads", "--output", str(path), *self.flags,
                                      *(["--gil"] if self.gil else []),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(self.settle)

    async def stop(self, *, interrupt: bool = True) -> Path | None:
        """End the recording (SIGINT; without `interrupt`, wait for py-spy to end with its target);
        returns the file written, if any."""
        if self.proc is None:
            return None
        if interrupt:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        procs.forget(self.proc)
        self.proc = None
        return self.path if self.path is not None and self.path.exists() else None


BOILERPLATE = re.compile(r"\((<frozen runpy>|click/|asyncio/(runners|base_events|events)\.py|threading\.py"
                         r"|gateway/(cli|__main__)\.py)")


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive share of samples per function (and per thread) from py-spy's raw stacks.

    Inclusive shares leave out the start-up frames every stack has (runpy,
    click, the event loop's run methods), so what remains says where the
    time goes.
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if frames and frames[0].startswith("thread ("):
            threads[re.sub(r"^thread \(\d+\):?\s*", "", frames.pop(0)) or "?"] += count
        names = [re.sub(r" \((.*?)(?::\d+)?\)$", lambda m: f" ({_short(m[1])})", f) for f in frames]
        if names:
            own[names[-1]] += count
        for name in set(names):
            if not BOILERPLATE.search(name):
                inclusive[name] += count

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "threads": share(threads), "self": share(own), "inclusive": share(inclusive)}


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3", str(REPO_DIR) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def print_profile(profile: dict[str, Any]) -> None:
    print(f"    py-spy: {profile['samples']} samples -> {profile['file']}")
    print("    threads: " + ", ".join(f"{name} {pct}%" for name, pct in profile["threads"]))
    print("    top self time:")
    for name, pct in profile["self"][:10]:
        print(f"      {pct:5.1f}%  {name}")
    print("    top inclusive time:")
    for name, pct in profile["inclusive"][:12]:
        print(f"      {pct:5.1f}%  {name}")
