"""The transmission report: one page of PDF per final job, as HylaFAX's add-ons and AvantFAX make them.

Code, number, sender, times, pages, duration, result, cost, GreenFax's
reference and the first page's thumbnail, laid out with fpdf2 (pure Python,
no system fonts: the PDF core font Helvetica, so text outside Latin-1 is
shown with replacement marks rather than failing). Downloaded from the job
page (`/jobs/<code>/report.pdf`).
"""

from __future__ import annotations

import io
from typing import Any

FINAL = frozenset({"delivered", "failed", "rejected", "expired", "cancelled"})


def _latin1(text: object) -> str:
    return str(text).encode("latin-1", "replace").decode("latin-1")


def transmission_report(job: dict[str, Any], *, thumbnail: bytes | None, currency: str, hostname: str) -> bytes:
    """The report's PDF bytes for a job in a final state (JobDetail with its events)."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_title(f"Fax transmission report {job['code']}")
    pdf.set_creator("greenfax-gateway")
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 18)
    pdf.cell(0, 12, "Fax transmission report", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 10)
    pdf.cell(0, 6, _latin1(f"greenfax-gateway on {hostname}"), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    result = job["state"].upper()
    reason = job.get("last_result") or ""
    rows = [
        ("Job code", job["code"]), ("Result", result), ("To", job["number"]), ("From", job["sender"]),
        ("Submitted", job["created_at"]), ("Reported", job.get("reported_at") or job["updated_at"]),
        ("Pages", job.get("pages") if job.get("pages") is not None else "-"),
        ("Duration", f"{job['duration']} s" if job.get("duration") is not None else "-"),
        ("Cost", f"{job['cost']} {currency}" if job.get("cost") else "-"),
        ("GreenFax reference", job.get("reference_id") or "-"), ("Attempts", job["attempts"]),
        ("Billing code", job.get("billing_code") or "-"), ("Last result", reason),
    ]
    top = pdf.get_y()
    if thumbnail:
        pdf.image(io.BytesIO(thumbnail), x=140, y=top, w=55)
    for label, value in rows:
        pdf.set_font("Helvetica", "B", 10)
        pdf.cell(40, 7, _latin1(label))
        pdf.set_font("Helvetica", "", 10)
        pdf.multi_cell(90, 7, _latin1(value), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(6)
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(0, 8, "History", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 8)
    for event in job["events"][-14:]:
        line = f"{event['at'][:19].replace('T', ' ')}  {event['state'] or 'note':<10} {event['source']}: {event['detail'] or ''}"
        pdf.multi_cell(0, 4.5, _latin1(line)[:220], new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
