"""Structured logs: one `key=value` line per event on standard error.

Log lines carry job codes, clients, numbers and SMTP replies; never
subjects, bodies, file names or secrets (DESIGN.md, "Privacy").
"""

from __future__ import annotations

import logging
import sys
from typing import Any


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line (addresses, AUTH exchanges) at INFO: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("mail.debug").setLevel(logging.WARNING)
    # pypdf complains about every imperfect PDF the sandbox counts pages of.
    logging.getLogger("pypdf").setLevel(logging.ERROR)


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


def format_event(event: str, **fields: Any) -> str:
    parts = [f"event={event}"]
    parts += [f"{key}={_quote(value)}" for key, value in fields.items() if value is not None and value != ""]
    return " ".join(parts)


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_event(event, **fields))
