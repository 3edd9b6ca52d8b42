"""The job state machine: every change of a job's state goes through `transition()`.

DESIGN.md's job states as a table of allowed moves (MOVES). `transition()`
changes a job only from a state that may move to the new one (and, where the
caller says so, only from the states it expects), sets the columns the move
brings, and writes the event that tells the story in `faxgw show`. A move
the table does not allow is a programming error (ValueError); a job that is
no longer in an expected state is simply not changed (False), which callers
meet in ordinary races (a status report before the upstream's reply).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from gateway.models import JobState

Q, SE, SU = JobState.QUEUED, JobState.SENDING, JobState.SUBMITTED
DE, FA, DF = JobState.DELIVERED, JobState.FAILED, JobState.DEFERRED
HE, UN, RE, EX, CA = JobState.HELD, JobState.UNKNOWN, JobState.REJECTED, JobState.EXPIRED, JobState.CANCELLED

# from -> the states a job may move to from there
MOVES: dict[JobState, frozenset[JobState]] = {
    Q: frozenset({SE, HE, CA}),  # claimed; held (hold rules, a restored backup); cancelled
    DF: frozenset({SE, Q, HE, CA}),  # claimed again; retried now; held; cancelled
    SE: frozenset({SU, DF, RE, UN, HE, EX, Q, DE, FA}),  # the attempt's outcome, or a report first
    SU: frozenset({DE, FA, HE}),  # the result; held after a restore
    UN: frozenset({SU, DE, FA, Q, CA, HE}),  # the service has it / its result; retried; cancelled
    HE: frozenset({Q, CA}),  # released; cancelled
    EX: frozenset({Q}),  # retried
    RE: frozenset({Q}),  # retried
    DE: frozenset(),
    FA: frozenset(),
    CA: frozenset(),
}


def allowed_from(to: JobState) -> frozenset[JobState]:
    return frozenset(state for state, targets in MOVES.items() if to in targets)


@dataclass(frozen=True)
class Expr:
    """A column's new value as an SQL expression over its old one, e.g. Expr("COALESCE(?, pages)", 2)."""

    sql: str
    params: tuple[Any, ...] = ()

    def __init__(self, sql: str, *params: Any) -> None:
        object.__setattr__(self, "sql", sql)
        object.__setattr__(self, "params", params)


INSERT_EVENT = "INSERT INTO events (job_id, at, source, state, detail) VALUES (?, ?, ?, ?, ?)"


def add_event(conn: sqlite3.Connection, job_id: int, now: str, source: str, state: str | None, detail: str) -> None:
    conn.execute(INSERT_EVENT, (job_id, now, source, state, detail))


def transition(conn: sqlite3.Connection, job_id: int, to: JobState, *, now: str, source: str, detail: str,
               expect: frozenset[JobState] | set[JobState] | None = None, **columns: Any) -> bool:
    """Move one job to `to` with its event, from any state MOVES allows (or only from `expect`).

    `columns` are set with the move (a value, or an Expr). Returns whether
    the job moved; a job in any other state is left as it is.
    """
    sources = allowed_from(to)
    if expect is not None:
        if not set(expect) <= sources:
            raise ValueError(f"no move from {sorted(s.value for s in set(expect) - sources)} to {to.value}")
        sources = frozenset(expect)
    sets, params = ["state = ?", "updated_at = ?"], [to.value, now]
    for column, value in columns.items():
        if isinstance(value, Expr):
            sets.append(f"{column} = {value.sql}")
            params.extend(value.params)
        else:
            sets.append(f"{column} = ?")
            params.append(value)
    placeholders = ", ".join("?" * len(sources))
    changed = conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state IN ({placeholders})",
                           (*params, job_id, *(state.value for state in sources))).rowcount
    if changed:
        add_event(conn, job_id, now, source, to.value, detail)
    return bool(changed)
