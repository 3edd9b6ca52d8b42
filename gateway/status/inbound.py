"""The status side of the SMTP intake: status mail and bounces addressed to the gateway.

Mail to the account sender, the return path (with or without a job code)
or another configured status address is not faxed: it is parsed here into
a StatusReport (by the status-mail rules, or as a DSN bounce), applied
through the one correlation path, and stored before the 250. Mail that no
rule recognises is kept too (as `unrecognised`, raw), never dropped silently.

Trust (DESIGN.md, "Correlation and trust"): mail counts as trusted when its
From domain is one of `status.trusted_sender_domains` and, if
`status.require_dkim`, it carries a valid DKIM signature of such a domain.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import dkim

from gateway.config import Settings
from gateway.logs import log_event
from gateway.metrics import Metrics
from gateway.models import Reply
from gateway.status.correlate import CorrelationPolicy, Outcome, apply_report, keep_unrecognised
from gateway.status.dsn import bounce_report, is_dsn, parse_bounce
from gateway.status.mailparse import ParsedMail, parse_mail
from gateway.status.mailrules import MailRules
from gateway.status.report import Channel, StatusReport, dedup_key
from gateway.store import Writer, iso, utcnow

log = logging.getLogger("faxgw.status")


@dataclass(frozen=True)
class Verdict:
    """How one status mail was understood (also what `faxgw rules test` prints)."""

    report: StatusReport
    kind: str  # "rule", "bounce" or "unrecognised"
    explanation: str


class StatusMail:
    """Turns status mail into reports; shared by the SMTP status listener and the IMAP reader."""

    def __init__(self, settings: Settings, rules: MailRules, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.rules = rules
        self.policy = CorrelationPolicy.from_settings(settings)
        up = settings.upstream
        addresses = {a.lower() for a in (up.account_sender, up.return_path, *settings.status.addresses) if a}
        self.addresses = frozenset(addresses)
        local, _, domain = (up.return_path or "").lower().rpartition("@")
        self._bounce_prefix, self._bounce_domain = local + "+", "@" + domain
        self._trusted_domains = tuple(d.lower().lstrip("@") for d in settings.status.trusted_sender_domains)
        self._dkim_keys = {k.lower().rstrip("."): v.encode() for k, v in settings.status.dkim_keys.items()}

    def is_status_address(self, address: str) -> bool:
        address = address.lower()
        if address in self.addresses:
            return True
        return address.startswith(self._bounce_prefix) and address.endswith(self._bounce_domain)

    def understand(self, raw: bytes, *, channel: Channel, envelope_rcpts: tuple[str, ...] = (),
                   trusted_source: bool = False) -> Verdict:
        """Parse one status mail into a report; never raises.

        `trusted_source`: the mail comes from a place only GreenFax writes to
        (the configured IMAP mailbox), so it is trusted whatever its sender.
        """
        mail = parse_mail(raw)
        trusted = trusted_source or self.trusted(mail)
        if is_dsn(mail) or any(self._is_bounce_address(a) for a in envelope_rcpts):
            bounce = parse_bounce(mail, envelope_rcpts)
            if bounce is not None:
                report = bounce_report(mail, bounce)
                return Verdict(report, "bounce", f"DSN: {bounce.action} {bounce.status} for {bounce.recipient}")
        extraction = self.rules.extract(mail, channel=channel, trusted=trusted)
        if extraction is not None:
            fields = ", ".join(f"{k}={v!r}" for k, v in extraction.values.items())
            return Verdict(extraction.report, "rule", f"{extraction.rule.name}: {fields}")
        reasons = "; ".join(self.rules.explain(mail)) or "no rules loaded"
        report = StatusReport(channel=channel, trusted=trusted, raw=raw.decode("utf-8", "replace"),
                              dedup_key=dedup_key("mail", *mail.identity()), rule=None,
                              notes=("not recognised as a status mail",))
        return Verdict(report, "unrecognised", f"no rule recognised it ({reasons})")

    def trusted(self, mail: ParsedMail) -> bool:
        domain = mail.from_addr.rpartition("@")[2]
        if not self._trusted_domain(domain):
            return False
        if not self.settings.status.require_dkim:
            return True
        return self._dkim_valid(mail.raw)

    def _trusted_domain(self, domain: str) -> bool:
        return any(domain == d or domain.endswith("." + d) for d in self._trusted_domains)

    def _dkim_valid(self, raw: bytes) -> bool:
        """A valid DKIM signature by a trusted domain (pinned keys first, then DNS).

        Signatures of other domains are not verified at all: they could not
        make the mail trusted, and verifying them would cost a DNS lookup.
        """
        try:
            verifier = dkim.DKIM(raw)
            signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
        except Exception as exc:  # dkimpy raises on some malformed mail
            log.debug("DKIM: cannot read the mail: %s", exc)
            return False
        for index, value in enumerate(signatures):
            try:
                signer = dkim.util.parse_tag_value(value).get(b"d", b"").decode("ascii").strip().lower()
                if self._trusted_domain(signer.rstrip(".")) and verifier.verify(idx=index, dnsfunc=self._dns):
                    return True
            except Exception as exc:  # a malformed signature is simply not valid
                log.debug("DKIM signature %d not valid: %s", index + 1, exc)
        return False

    def _dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        key = name.decode().lower().rstrip(".")
        if key in self._dkim_keys:
            return self._dkim_keys[key]
        return dkim.dnsplug.get_txt(name, timeout=timeout)

    def _is_bounce_address(self, address: str) -> bool:
        address = address.lower()
        return address.startswith(self._bounce_prefix) and address.endswith(self._bounce_domain)


def status_reply(outcome: Outcome, verdict: Verdict) -> Reply:
    if verdict.kind == "unrecognised":
        return Reply(250, "2.0.0", "Kept for review: not recognised as a status mail (see faxgw unmatched)")
    return Reply(250, "2.0.0", f"Status report {outcome.kind}{' for ' + outcome.job_code if outcome.job_code else ''}")


async def receive(status: StatusMail, writer: Writer, raw: bytes, *, channel: Channel,
                  envelope_rcpts: tuple[str, ...] = (), client: str = "") -> tuple[Outcome, Verdict]:
    """Understand one status mail and apply it in the store (committed when this returns)."""
    # In a worker thread: anyone may send status mail, and a hostile one takes long to parse.
    verdict = await asyncio.to_thread(status.understand, raw, channel=channel, envelope_rcpts=envelope_rcpts)
    return await apply_verdict(status, writer, verdict, client=client), verdict


async def apply_verdict(status: StatusMail, writer: Writer, verdict: Verdict, *, client: str = "") -> Outcome:
    """Store an understood status mail: applied through correlation, or kept unrecognised."""
    report = verdict.report
    if verdict.kind == "unrecognised":
        outcome = await writer.run(keep_unrecognised, report, iso(utcnow()))
    else:
        outcome = await writer.run(apply_report, report, iso(utcnow()), status.policy)
    if status.metrics is not None:
        status.metrics.report(report.channel.value, outcome.kind)
    log_event(log, "status-report", channel=report.channel.value, client=client, kind=verdict.kind,
              rule=report.rule, result=report.result, code=outcome.job_code, outcome=outcome.kind,
              trusted=report.trusted)
    return outcome
