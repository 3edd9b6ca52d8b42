"""Runners: the gateway's background loops, one shape for all, run under one supervisor.

After GNU Mailman's core/runner.py: a runner works in rounds (`step()`);
the base calls them for as long as the gateway runs and never stops on an
error. A round that raises is logged with its traceback (`event=runner-error`),
recorded in the runner's state (health and metrics show it), and the next
round comes after a backoff; a round that succeeds clears the error. The
item that failed is the round's to set aside (the forwarder defers its job,
the notifier retries its notice later): the base only keeps the loop alive.

`Supervisor` runs every runner as a task of one asyncio.TaskGroup, so that
they live and end together with the service, and reports each runner's
liveness and last error (/healthz, faxgw_runner_up, faxgw_runner_errors_total).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.logs import format_event, log_event
from gateway.units import backoff

log = logging.getLogger("faxgw.runner")


@dataclass
class RunnerState:
    """What /healthz says of one runner."""

    name: str
    running: bool = False
    failures: int = 0  # rounds in a row that raised
    last_error: str | None = None
    last_error_at: datetime | None = None
    last_ok_at: datetime | None = None

    @property
    def failing(self) -> bool:
        return not self.running or self.failures > 0


class Runner:
    """A background loop of rounds; subclasses implement `step()` (and `prepare()` where they need it)."""

    name = "runner"
    idle = 60.0  # seconds a round waits for a wake() when step() asks to wait (returns None)
    retry_initial = 1.0  # the backoff after a round that raised...
    retry_max = 300.0  # ...up to this
    # Failures that are part of the job (a server down, a network error): logged as `error_event` at
    # WARNING without a traceback. Anything else is a bug: logged at ERROR with its traceback.
    expected: tuple[type[BaseException], ...] = ()
    error_event = "runner-error"
    logger = log

    def __init__(self, *, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self.loop_state = RunnerState(self.name)
        self.stopping = False
        self.on_error: Callable[[str], None] = lambda name: None  # the supervisor counts errors
        self._wake = asyncio.Event()
        self._prepared = False

    def wake(self) -> None:
        """There is work: start the next round now."""
        self._wake.set()

    def stop(self) -> None:
        """End after the round in progress."""
        self.stopping = True
        self._wake.set()

    async def prepare(self) -> None:
        """Once, before the first round (retried like a round until it succeeds)."""

    async def step(self) -> float | None:
        """One round; the seconds until the next (0: at once, None: when woken, or after `idle`)."""
        raise NotImplementedError

    def retry_delay(self, failures: int) -> float:
        return backoff(failures, self.retry_initial, self.retry_max)

    async def run(self) -> None:
        self.loop_state.running = True
        try:
            while not self.stopping:
                self._wake.clear()  # set again by a wake() during the round: the next one starts at once
                try:
                    if not self._prepared:
                        await self.prepare()
                        self._prepared = True
                    delay = await self.step()
                except Exception as exc:  # the loop goes on: log, record, back off
                    delay = self._failed(exc)
                else:
                    if self.loop_state.failures:
                        log_event(self.logger, "runner-recovered", runner=self.name, after=self.loop_state.failures)
                    self.loop_state.failures = 0
                    self.loop_state.last_ok_at = self.clock()
                await self._wait(self.idle if delay is None else delay)
        finally:
            self.loop_state.running = False

    def _failed(self, exc: Exception) -> float:
        state = self.loop_state
        state.failures += 1
        state.last_error = self.describe_error(exc)
        state.last_error_at = self.clock()
        delay = self.retry_delay(state.failures)
        known = isinstance(exc, self.expected)
        line = format_event(self.error_event, runner=self.name, **self.where(), failures=state.failures,
                            problem=state.last_error, retry_in=f"{delay:g}s")
        self.logger.log(logging.WARNING if known else logging.ERROR, "%s", line, exc_info=None if known else exc,
                        extra={"event": self.error_event})
        self.on_error(self.name)
        return delay

    def describe_error(self, exc: BaseException) -> str:
        """A failure in words for logs and health (a runner whose errors may quote a secret masks it here)."""
        return f"{type(exc).__name__}: {exc}"

    def where(self) -> dict[str, str]:
        """Fields that say what a failing round was talking to (a server), for its log line."""
        return {}

    async def _wait(self, seconds: float) -> None:
        if seconds <= 0 or self.stopping:
            return
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass


class Supervisor:
    """Every runner as a task of one TaskGroup; their states for health and metrics."""

    def __init__(self, *, metrics: Any = None) -> None:
        self.runners: dict[str, Runner] = {}
        self.metrics = metrics
        self._group: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()

    def add(self, runner: Runner) -> None:
        assert self._group is not None, "start() the supervisor first"
        self.runners[runner.name] = runner
        if self.metrics is not None:
            runner.on_error = lambda name: self.metrics.runner_errors.labels(name).inc()
            self.metrics.runner_errors.labels(runner.name)  # shown at 0 from the start
        self._tasks[runner.name] = self._group.create_task(runner.run(), name=runner.name)

    async def end(self, name: str, *, grace: float = 0) -> None:
        """Stop one runner: after its round, within `grace` seconds, else cancelled."""
        runner, task = self.runners.get(name), self._tasks.pop(name, None)
        if runner is None or task is None:
            return
        runner.stop()
        if grace:
            await asyncio.wait({task}, timeout=grace)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.end(name)
        if self._group is not None:
            group, self._group = self._group, None
            await group.__aexit__(None, None, None)

    def report(self) -> dict[str, dict[str, Any]]:
        """Each runner's state, for /healthz (times as the store writes them)."""
        from gateway.store import iso

        out = {}
        for name, runner in self.runners.items():
            state = runner.loop_state
            if self.metrics is not None:
                self.metrics.runner_up.labels(name).set(1 if state.running else 0)
            out[name] = {"running": state.running, "failures": state.failures, "last_error": state.last_error,
                         "last_error_at": iso(state.last_error_at) if state.last_error_at else None,
                         "last_ok_at": iso(state.last_ok_at) if state.last_ok_at else None}
        return out

    def failing(self) -> list[str]:
        return [f"{name}: {'not running' if not r.loop_state.running else r.loop_state.last_error}"
                for name, r in self.runners.items() if r.loop_state.failing]
