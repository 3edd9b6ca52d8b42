"""What an upstream's refusal really means, for the replies Microsoft 365, Google and relays give.

A 535 says only "authentication unsuccessful"; the operator needs the
cause (SMTP AUTH switched off for the tenant, an app password needed, a
mailbox the app may not send as). `diagnose()` looks the reply up in
DIAGNOSES, a table in the order it is searched: the session step, the
basic code, the enhanced code and words of the text, and the cause in
words with what to do. Upstream errors, `faxgw check-upstream` and
`faxgw oauth test` all say it.

A diagnosis marked `setup` is the gateway's set-up, not the fax: a refusal
after the data (Microsoft's SendAsDenied) then defers the job for the
operator instead of rejecting it for good.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Diagnosis:
    steps: frozenset[str]  # "connect", "starttls", "auth", "mail", "rcpt", "data"
    codes: frozenset[int]  # basic reply codes (empty: any)
    enhanced: str | None  # enhanced code prefix, e.g. "5.7.139" (None: any)
    words: re.Pattern[str] | None  # in the reply's text (None: any)
    cause: str
    setup: bool = True  # the gateway's set-up is wrong, not this fax


def _rule(steps: str, codes: str, enhanced: str | None, words: str | None, cause: str, *,
          setup: bool = True) -> Diagnosis:
    return Diagnosis(frozenset(steps.split()), frozenset(int(c) for c in codes.split()), enhanced,
                     re.compile(words, re.IGNORECASE) if words else None, cause, setup)


SEND_AS = ("the mailbox may not send as upstream.account_sender (SendAsDenied): give the mailbox Send As on that"
           " address (Add-RecipientPermission) or set account_sender to the mailbox itself")
RELAY = ("the upstream will not relay to greenfax.com for this host: authenticate, or allow-list this machine's"
         " address in its relay settings (Microsoft 365: an inbound connector; Google: the SMTP relay service)")

DIAGNOSES = (
    _rule("auth", "535", "5.7.139", r"SmtpClientAuthentication is disabled",
          "SMTP AUTH is disabled for the tenant or the mailbox: in the Microsoft 365 admin center enable"
          " Authenticated SMTP for the mailbox (Set-CASMailbox -Identity MAILBOX -SmtpClientAuthenticationDisabled"
          " $false; tenant-wide: Set-TransportConfig -SmtpClientAuthenticationDisabled $false)"),
    _rule("auth", "535", "5.7.139", r"basic authentication is disabled|security defaults",
          "Microsoft 365 no longer takes passwords for SMTP (basic authentication is disabled for the tenant):"
          " set [upstream] auth = \"xoauth2\" (deploy/OPERATIONS.md, \"Microsoft 365\")"),
    _rule("auth", "535", "5.7.139", None,
          "Microsoft 365 refused the login for a tenant setting (Conditional Access, security defaults, or SMTP"
          " AUTH disabled): see the reply's text, and deploy/OPERATIONS.md, \"Microsoft 365\""),
    _rule("auth", "535", "5.7.3", None,
          "Microsoft 365 refused the credentials: for auth = \"xoauth2\" check that the app has the"
          " SMTP.SendAsApp permission (admin consent granted), that its service principal is registered in"
          " Exchange Online (New-ServicePrincipal) and has FullAccess to the mailbox (Add-MailboxPermission),"
          " and that upstream.oauth.user is that mailbox; for a password, check it"),
    _rule("auth", "534", "5.7.9", r"application-specific password|app password",
          "Google needs an app password for this account (2-step verification is on), or OAuth: set"
          " [upstream] auth = \"xoauth2\" (deploy/OPERATIONS.md, \"Google Workspace\")"),
    _rule("auth", "534", "5.7.14", None,
          "Google wants a browser sign-in for this account first (a web login is required): sign in at"
          " accounts.google.com as this user, or use auth = \"xoauth2\""),
    _rule("auth", "535", "5.7.8", None,
          "Google refused the credentials: for auth = \"xoauth2\" check that upstream.oauth.user is the mailbox"
          " the token was issued for (or, for a service account, that domain-wide delegation grants"
          " https://mail.google.com/); for a password, check it or use an app password"),
    _rule("auth", "454", None, None,
          "the upstream could not check the credentials just now (a temporary failure): it is tried again",
          setup=False),
    _rule("auth", "504 502", None, r"unrecognized authentication|not supported|unknown",
          "the upstream does not take this AUTH mechanism: check [upstream] auth and what its EHLO offers"),
    _rule("mail rcpt connect auth", "530", "5.7.0", r"STARTTLS",
          "the upstream requires STARTTLS before anything else: set [upstream] tls = \"starttls\""),
    _rule("mail rcpt", "530 550 554", None, r"auth(entication)? required|must authenticate|not authenticated",
          "the upstream requires a login: set [upstream] username/password, or auth = \"xoauth2\""),
    _rule("mail rcpt data", "550 554", "5.7.60", None,
          SEND_AS),
    _rule("mail rcpt data", "550 554", None, r"SendAsDenied|not allowed to send as|send as this sender",
          SEND_AS),
    _rule("mail rcpt data", "550 553 554", "5.7.1", r"submission not allowed|sender address rejected|not owned",
          "the upstream does not let this login send as upstream.account_sender: set account_sender to the"
          " authenticated mailbox, or allow the address as an alias or Send As"),
    _rule("rcpt", "550 554", "5.7.54", None,
          RELAY),
    _rule("rcpt", "550 554 553", None, r"relay(ing)? (access )?(denied|not permitted)|unable to relay|not permitted to relay",
          RELAY),
    _rule("mail rcpt data", "550 554 552", "5.4.5", r"daily|limit|quota",
          "the upstream's sending limit for this account is used up (e.g. Google's daily limit): faxes wait and"
          " go when it resets", setup=False),
)


def diagnose(step: str, code: int | None, message: str | None) -> Diagnosis | None:
    """The first diagnosis in DIAGNOSES that fits the reply to `step`, or None."""
    if code is None:
        return None
    text = (message or "").strip()
    enhanced = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", text)
    for rule in DIAGNOSES:
        if step not in rule.steps or (rule.codes and code not in rule.codes):
            continue
        if rule.enhanced is not None and not (enhanced and enhanced[1] == rule.enhanced):
            continue
        if rule.words is not None and not rule.words.search(text):
            continue
        return rule
    return None
