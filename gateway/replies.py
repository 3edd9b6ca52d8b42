"""Every SMTP reply the intake gives, by name, shared by code and tests.

Each refusal names the problem and the recipient or attachment concerned,
and says what the sender can do about it.
"""

from __future__ import annotations

from gateway.models import Refusal, Reply

SANDBOX_NOTE = "SANDBOX: nothing is faxed"


def queued(codes: list[str], *, sandbox: bool, held: dict[str, list[str]] | None = None) -> Reply:
    """The 250 to DATA; `held` names the jobs that wait for an operator, each with short reasons."""
    text = "queued as " + " ".join(codes)
    if held:
        # Jobs held for the same reasons are named together, so that the
        # reply stays one short line for a message to many numbers.
        groups: dict[str, list[str]] = {}
        for code, reasons in held.items():
            groups.setdefault(", ".join(reasons), []).append(code)
        text += "; held until an operator releases " + ("it" if len(held) == 1 else "them") + ": " + "; ".join(
            f"{' '.join(group)} ({reasons})" for reasons, group in groups.items())
    return Reply(250, "2.0.0", f"{text} ({SANDBOX_NOTE})" if sandbox else text)


SENDER_OK = Reply(250, "2.1.0", "Sender OK")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax: unbalanced < and >; write MAIL FROM:<address>")


def recipient_ok(number: str) -> Reply:
    return Reply(250, "2.1.5", f"Fax recipient OK: {number}")


# --- who may send ---

CLIENT_NOT_ALLOWED = Reply(
    550, "5.7.1", "Client host {client} may not send faxes here; authenticate or ask the administrator to allow its network"
)
SENDER_NOT_ALLOWED = Reply(550, "5.7.1", "Sender <{sender}> is not allowed to send faxes")

# --- recipients ---

NOT_A_FAX_RECIPIENT = Reply(
    550, "5.7.1", "Relay denied: <{address}> is not a fax address (use <number>@{domain}); this gateway only sends faxes"
)
BAD_NUMBER = Reply(553, "5.1.3", "<{address}>: {problem}")
BAD_ADDRESS = Reply(553, "5.1.3", "<{address}>: {problem}")
ADDRESS_AS_WRITTEN = Reply(
    553, "5.1.3", "<{address}>: use a plain address such as <12125550123@{domain}> (no quotes, comments or routes)"
)
NUMBER_REFUSED = Reply(550, "5.7.1", "<{address}>: {problem}")
NO_NUMBER_IN_SUBJECT = Reply(
    550, "5.1.3", "No fax number found in the subject for <{address}>; write e.g. \"Fax: +1 212 555 0123\""
)
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients in one message (limit {limit}); send the rest in another message")

STATUS_RECIPIENT_OK = Reply(250, "2.1.5", "Status address OK")
STATUS_ONLY_LISTENER = Reply(550, "5.7.1", "<{address}> is not a status address; this listener takes status mail only")
NULL_SENDER_NO_FAX = Reply(550, "5.7.1", "The null sender <> cannot send faxes")
BILLING_CODE_REQUIRED = Reply(
    550, "5.7.1", "A billing code is required for every fax: write [billing: CODE] in the subject, or send the"
    " header {header}: CODE")
STATUS_KEPT = Reply(250, "2.0.0", "Kept for review: not recognised as a status mail (see faxgw unmatched)")
STATUS_APPLIED = Reply(250, "2.0.0", "Status report {outcome}{for_job}")
MIXED_KINDS = Reply(
    452, "4.5.3", "Status mail and faxes cannot share one message; send the rest in another message"
)

# --- limits (gateway/outbound/quotas.py): which limit, and when it resets ---

# {limit} and {needed} are counted phrases: "100 faxes", "1 page", "2 concurrent connections".
CONNECTION_LIMIT = Reply(421, "4.7.0", "Limit of {limit} for {who} reached; resets when one of them closes")
GATEWAY_BUSY = Reply(421, "4.3.2", "Too many connections to this gateway right now; try again in a few minutes")
SESSION_LIMIT = Reply(421, "4.7.0", "Limit of {limit} for {who} reached; resets when one of them closes")
MESSAGE_RATE_LIMIT = Reply(
    451, "4.7.1", "Limit of {limit} per minute for {who} reached; resets at {at} {zone} (in {seconds} s)"
)
DAILY_LIMIT = Reply(451, "4.7.1", "Limit of {limit} per day for {who} reached ({detail}); resets at 00:00 {zone}")
OVER_DAILY_LIMIT = Reply(
    550, "5.7.1", "This message needs {needed}, more than the limit of {limit} per day for {who};"
    " split it or ask the administrator"
)
DUPLICATE_FAX = Reply(
    550, "5.7.1", "Duplicate fax: the same documents went to {number} as job {code} at {at} {zone}, less than"
    " {window} ago; not sent again"
)

# --- the protocol (aiosmtpd's wording, with enhanced codes where it had none) ---

NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
VRFY_UNREADABLE = Reply(502, "5.5.2", "Could not VRFY that address")
MAIL_OK = Reply(250, "", "OK")

# --- the session ---

SESSION_TOO_LONG = Reply(421, "4.4.2", "Session longer than {limit}; closing, connect again to go on")
TOO_MANY_JUNK = Reply(
    421, "4.7.0", "Too many NOOP, RSET, VRFY or HELP commands ({limit}) without a message; closing"
)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors ({limit}) without a message; closing")
AUTH_NOT_HERE = Reply(502, "5.5.1", "AUTH is not offered on this listener: it takes status mail only")
AUTH_BUSY = Reply(
    454, "4.7.0", "Too many logins for this user at the same time; try again in a minute"
)

# --- AUTH ---

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")

# --- size and data ---

SIZE_DECLARED_TOO_BIG = Reply(552, "5.3.4", "Message size {size} exceeds the limit of {limit} bytes")
DATA_TOO_BIG = Reply(552, "5.3.4", "Message exceeds the limit of {limit} bytes")
LINE_TOO_LONG = Reply(
    552, "5.6.0", "Message has a line longer than {limit} octets; send documents as attachments (base64)"
)
BARE_LF = Reply(
    550, "5.6.0", "Message has bare LF line endings; SMTP requires CRLF (configure the program to use CRLF, or ask the administrator to set smtp.bare_lf = \"normalize\")"
)
BARE_CR = Reply(550, "5.6.0", "Message has a bare CR (carriage return without line feed); SMTP requires CRLF line endings")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header exceeds the limit of {limit}; send a shorter header")
NO_HEADERS = Reply(550, "5.6.0", "Message has no header section; send a complete RFC 5322 message")

# --- content ---

NOTHING_TO_FAX = Reply(
    550, "5.7.0", "Nothing to fax: attach the document (PDF, TIFF or an office file) to the email"
)
TYPE_NOT_FAXABLE = Reply(
    554, "5.6.3", "Attachment {name} is of type {content_type}, which cannot be faxed; allowed are PDF, TIFF, images and office documents"
)

# --- the gateway's own trouble ---

STORE_FULL = Reply(452, "4.3.1", "Insufficient system storage; the message was not accepted, try again later")
STORE_FAILED = Reply(451, "4.3.0", "Local error while storing the message; it was not accepted, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Local error in processing; try again later")


MIME_UNREADABLE = Reply(554, "5.6.0", "The message cannot be read as MIME ({problem}); attach the documents to a"
                                      " plain message")
_WINMAIL_FIX = ("send the email as HTML or plain text (Outlook: File > Options > Mail > Compose messages in"
                " HTML format) so the documents are attached as they are")
WINMAIL_REFUSED = {  # by the kind of tnef.TnefError
    "damaged": Reply(554, "5.6.3", "The attachment winmail.dat (Outlook Rich Text) is damaged and its documents"
                                   f" cannot be read: {_WINMAIL_FIX}"),
    "empty": Reply(554, "5.6.3", "The attachment winmail.dat (Outlook Rich Text) holds no document to fax:"
                                 f" {_WINMAIL_FIX}"),
    "layout": Reply(554, "5.6.3", "The attachment winmail.dat (Outlook Rich Text) cannot be unwrapped in this"
                                  f" message: {_WINMAIL_FIX}"),
}


def fill(reply: Reply, **values: object) -> Reply:
    """The reply with its placeholders filled in."""
    return Reply(reply.code, reply.enhanced, reply.text.format(**values))


def refuse(reply: Reply, check: str, **values: object) -> Refusal:
    """A refusal by the check named `check` (a bounded label for logs and metrics), its placeholders filled in."""
    return Refusal(fill(reply, **values), check)
