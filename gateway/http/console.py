"""The web console: the fax log in a browser, on the [http] listener ([web] enabled = true).

Server-rendered pages (Jinja2, autoescaped), readable without JavaScript;
one small script from the package (static/console.js, never a CDN) reloads
the newest page of the job list's rows every [web] refresh, so that a fax is
seen going from queued to delivered. Pages:

- `/login`, `/logout`: local accounts (`faxgw web-user add`), argon2, failed
  logins slowed like SMTP AUTH (quotas.AuthThrottle); or a trusted reverse
  proxy's user header ([web] trusted_proxies).
- `/`: the jobs `faxgw status` lists, with its filters, newest first, paged
  by keyset (`?before=CODE`), counts per state on top.
- `/jobs/<code>`: the job, its timeline and status reports; the operator
  actions of the CLI (retry, cancel, release) with a reason, recorded as an
  event and in the audit log.

Sessions: a random cookie (Secure, HttpOnly, SameSite=Strict) whose digest
the store keeps (store/webaccess.py); idle and absolute timeouts; a CSRF
token per session on every form, and POSTs from another origin refused.
Viewers see, operators act. Every job page view and action is audited
(who, when, what). Pages carry a CSP without inline script, frame-ancestors
'none' and no-store. No subject, file name or document content is logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from gateway import store
from gateway.config import Settings, in_networks
from gateway.errors import FilterError, InvalidTransition, StoreError, UnknownJob
from gateway.jobfilter import parse_filter
from gateway.logs import log_event
from gateway.models import JobState
from gateway.outbound.thumbnail import Thumbnails, first_page_png
from gateway.outbound.transmission import FINAL as TRANSMISSION_FINAL, transmission_report
from gateway.outbound.mime import inspect
from gateway.outbound.passwords import hash_password, verify_hash
from gateway.outbound.quotas import AuthThrottle
from gateway.rules import RulesInForce
from gateway.store import Writer, iso, utcnow

log = logging.getLogger("faxgw.web")

COOKIE = "faxgw_session"
LOGIN_COOKIE = "faxgw_login"  # the login form's CSRF token (double submit), before there is a session
PAGE_SIZE = 50
COUNTS_FOR = 1.0  # seconds the job list's counts per state are shared before they are counted again
STATES = [state.value for state in JobState]
ON_ITS_WAY = frozenset({"queued", "sending", "submitted"})  # a job page in these states reloads itself
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
                               " connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# What `unknown` means, for the job page (DESIGN.md, job states).
UNKNOWN_EXPLAINED = (
    "The gateway handed this fax to the upstream, but the connection was lost before the upstream said whether it"
    " took it. GreenFax may be sending it, or may never have received it. Check the GreenFax account's log for"
    " this number and time; then either retry (GreenFax has no record: the fax is sent again) or cancel (GreenFax"
    " has it, or it is no longer wanted). The gateway never resends an unknown fax by itself, so that nobody"
    " receives it twice.")
ACTION_LABELS = {"retry": "Retry (send again)", "cancel": "Cancel", "release": "Release (send now)"}


class Refused(Exception):
    """A request the console answers with a page that says what was wrong (never a traceback)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


class Console:
    def __init__(self, settings: Settings, *, writer: Writer, read_store: Callable[[], sqlite3.Connection],
                 rules: RulesInForce, health: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.settings = settings
        self.web = settings.web
        self.writer = writer
        self.read_store = read_store
        self.rules = rules
        self.health = health
        self.throttle = AuthThrottle(settings.limits)
        self._proxy_key = secrets.token_bytes(32)  # CSRF tokens of proxy-authenticated users
        self._dummy: str | None = None
        self.thumbnails = Thumbnails()
        self._counted: tuple[float, dict[str, int]] | None = None  # (when, jobs per state)
        self._counting: asyncio.Task[None] | None = None  # the next count, while it is made
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("gateway.http", "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined)
        self.templates.globals.update(state_class=_state_class, urlencode=urlencode)

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self._guard)
        for method, path, name in ROUTES:
            app.router.add_route(method, path, getattr(self, name))

    # --- the frame: headers, errors, identity -----------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """Security headers on every console page; a Refused becomes a page that says what was wrong."""
        if request.path.startswith(("/api/", "/healthz", "/metrics", "/greenfax/")):
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPNotFound:
            response = self._page("error.html", request, None, status=404, title="Not found",
                                  message=f"There is no page {request.path!r} here.")
        except web.HTTPMethodNotAllowed as exc:
            response = self._page("error.html", request, None, status=405, title="Not allowed",
                                  message=f"{request.method} is not used for {request.path!r}; use the console's"
                                  f" links and buttons ({', '.join(sorted(exc.allowed_methods))}).")
        except web.HTTPException as exc:  # a redirect (to the login): it carries the headers too
            exc.headers.update(SECURITY_HEADERS)
            raise
        except Refused as exc:
            response = self._page("error.html", request, None, status=exc.status, title=exc.title,
                                  message=exc.message)
        except StoreError as exc:
            response = self._page("error.html", request, None, status=503, title="The store cannot be read",
                                  message=f"{exc}. Try again in a moment; /healthz says more.")
        except Exception:  # a bug: logged with its traceback, the browser gets a page that says so
            log.exception("the console failed on %s %s", request.method, request.path)
            response = self._page("error.html", request, None, status=500, title="Something went wrong",
                                  message="The console could not show this page; the gateway's log has the"
                                  " details (an ERROR line from faxgw.web).")
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _who(self, request: web.Request) -> store.WebSession | None:
        """The logged-in user: a trusted proxy's header, or a live session cookie (touched)."""
        header = request.headers.get(self.web.proxy_user_header)
        if header and self.web.trusted_proxies and in_networks(request.remote or "", self.web.trusted_proxies):
            found = await self._read(lambda conn: store.web_user(conn, header))
            if found is None:
                raise Refused(403, "Not a console user", f"The proxy says you are {header!r}, who is not a console"
                              f" user: an administrator adds you with `faxgw web-user add {header} --role viewer`.")
            csrf = hmac.new(self._proxy_key, header.encode(), "sha256").hexdigest()
            return store.WebSession(header, found[0], csrf)
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        now = utcnow()
        idle_since = iso(now - timedelta(seconds=self.web.session_idle))
        created_since = iso(now - timedelta(seconds=self.web.session_max))
        session = await self._read(lambda conn: store.find_session(conn, cookie, idle_since=idle_since,
                                                                   created_since=created_since))
        if session is not None:
            await self.writer.run(store.touch_session, cookie, iso(now))
        return session

    async def _required(self, request: web.Request) -> store.WebSession:
        session = await self._who(request)
        if session is None:
            target = request.path_qs if request.method == "GET" else "/"
            raise web.HTTPSeeOther(f"/login?{urlencode({'next': target})}")
        return session

    def _check_form(self, request: web.Request, form: Any, expected: str) -> None:
        """A POST must carry the page's CSRF token and, when the browser says, come from this origin."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise Refused(403, "Refused", "This form was sent from another site; open the console and try again.")
        given = str(form.get("csrf", ""))
        if not given or not hmac.compare_digest(given.encode(), expected.encode()):
            raise Refused(403, "Refused", "The form was out of date or not sent from the console (its security"
                          " token did not match); reload the page and try again.")

    # --- login --------------------------------------------------------------------------------

    async def login_page(self, request: web.Request, *, problem: str | None = None, status: int = 200
                         ) -> web.Response:
        token = secrets.token_urlsafe(24)
        response = self._page("login.html", request, None, status=status, csrf=token, problem=problem,
                              next=_local(request.query.get("next", "/")))
        self._set_cookie(request, response, LOGIN_COOKIE, token, max_age=3600)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected:
            raise Refused(403, "Refused", "The login form has expired; open /login again.")
        self._check_form(request, form, expected)
        name, password = str(form.get("user", "")).strip(), str(form.get("password", ""))
        client = request.remote or "?"
        if not name or not password:
            return await self.login_page(request, problem="Give your user name and password.", status=400)
        if not self.throttle.begin(name):
            return await self.login_page(request, problem="Too many logins for this user at once; wait a moment.",
                                         status=429)
        try:
            found = await self._read(lambda conn: store.web_user(conn, name))
            ok = await asyncio.to_thread(verify_hash, found[1] if found else self._dummy_hash(), password)
            ok = ok and found is not None
            if not ok:
                count, delay = self.throttle.failed(client, name)
                await asyncio.sleep(delay)
        finally:
            self.throttle.end(name)
        if not ok:
            log_event(log, "web-login", level=logging.WARNING, client=client, user=name, result="failed",
                      failures=count)
            return await self.login_page(request, problem="Wrong user name or password.", status=401)
        now = iso(utcnow())

        def begin(conn: sqlite3.Connection) -> str:
            cookie = store.open_session(conn, name, now)
            store.audit(conn, now, name, "login", None, f"from {client}")
            return cookie

        cookie = await self.writer.run(begin)
        log_event(log, "web-login", client=client, user=name, result="ok")
        response = _see_other(_local(str(form.get("next", "/"))))
        self._set_cookie(request, response, COOKIE, cookie)
        response.del_cookie(LOGIN_COOKIE, path="/")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = await self._required(request)
        form = await request.post()
        self._check_form(request, form, session.csrf)
        cookie = request.cookies.get(COOKIE, "")
        now = iso(utcnow())

        def end(conn: sqlite3.Connection) -> None:
            store.close_session(conn, cookie)
            store.audit(conn, now, session.user, "logout", None)

        await self.writer.run(end)
        response = _see_other("/login")
        response.del_cookie(COOKIE, path="/")
        return response

    def _dummy_hash(self) -> str:
        """Verified when the user is unknown, so that an unknown name costs as much as a wrong password."""
        if self._dummy is None:
            self._dummy = hash_password(secrets.token_hex(16))
        return self._dummy

    def _set_cookie(self, request: web.Request, response: web.StreamResponse, name: str, value: str, *,
                    max_age: int | None = None) -> None:
        response.set_cookie(name, value, path="/", secure=True, httponly=True, samesite="Strict", max_age=max_age)

    # --- jobs -----------------------------------------------------------------------------------

    async def jobs(self, request: web.Request) -> web.Response:
        session = await self._required(request)
        query = request.query
        chosen = {key: query.get(key, "").strip() for key in ("state", "number", "sender", "since", "text", "billing")}
        before = query.get("before", "").strip() or None
        try:
            spec = parse_filter(states=(chosen["state"],) if chosen["state"] else (), number=chosen["number"] or None,
                                sender=chosen["sender"] or None, since=chosen["since"] or None,
                                text=chosen["text"] or None, limit=PAGE_SIZE + 1,
                                region=self.rules.addressing.numbers.default_region)
        except FilterError as exc:
            raise Refused(400, "That filter cannot be used", f"{exc}.") from None

        rows, counts = await asyncio.gather(  # both at once: on two cores a recount hides the rows' query
            self._read(lambda conn: store.list_jobs(conn, **spec.as_query(), before=before,
                                                    billing_code=chosen["billing"] or None)),
            self._counts())
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        filters = {key: value for key, value in chosen.items() if value}
        older = f"/?{urlencode({**filters, 'before': rows[-1]['code']})}" if more and rows else None
        template = "jobrows.html" if request.headers.get("X-Console-Part") == "rows" else "jobs.html"
        return self._page(template, request, session, rows=rows, counts=counts, states=STATES, chosen=chosen,
                          older=older, newest="/?" + urlencode(filters) if before else None,
                          refresh=int(self.web.refresh * 1000) if not before else 0)

    async def _counts(self) -> dict[str, int]:
        """Jobs per state, counted at most once a second for all browsers (a full count of a million jobs takes
        tens of milliseconds; every open job list asks for it every [web] refresh). Pages asking while a count
        is made wait for that one count; a page never shows counts older than a second beside fresh rows."""
        if self._counted is not None and time.monotonic() - self._counted[0] < COUNTS_FOR:
            return self._counted[1]
        if self._counting is None:
            self._counting = asyncio.create_task(self._count())
        await asyncio.shield(self._counting)
        assert self._counted is not None
        return self._counted[1]

    async def _count(self) -> None:
        try:
            counts, _oldest = await self._read(store.job_counts)
            self._counted = (time.monotonic(), counts)
        finally:
            self._counting = None

    async def job(self, request: web.Request) -> web.Response:
        session = await self._required(request)
        code = request.match_info["code"].upper()

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            job: dict[str, Any] = dict(store.get_job(conn, code))
            job["reports"] = store.reports_for_job(conn, code)
            job["audit"] = store.audit_log(conn, target=code, limit=20)
            raw = store.job_message(conn, code)
            job["size"] = len(raw)
            job["message"] = inspect(raw) if raw else None  # None: purged after the retention period
            return job

        try:
            job = await self._read(read)
        except UnknownJob:
            raise Refused(404, "No such job", f"There is no job with code {code!r}: a job code looks like"
                          " FX7K3M9Q (from the SMTP reply, the subject tag, or the job list).") from None
        await self.writer.run(store.audit, iso(utcnow()), session.user, "view", code)
        actions = [name for name, (allowed, _target) in store.ACTIONS.items()
                   if JobState(job["state"]) in allowed] if session.role == "operator" else []
        return self._page("job.html", request, session, job=job, actions=actions, labels=ACTION_LABELS,
                          final=job["state"] in TRANSMISSION_FINAL,
                          unknown_explained=UNKNOWN_EXPLAINED if job["state"] == "unknown" else None,
                          reload=int(self.web.refresh * 1000) if job["state"] in ON_ITS_WAY else 0)

    async def act(self, request: web.Request) -> web.StreamResponse:
        session = await self._required(request)
        form = await request.post()
        self._check_form(request, form, session.csrf)
        code, action = request.match_info["code"].upper(), request.match_info["action"]
        if action not in store.ACTIONS:
            raise Refused(404, "No such action", f"{action!r} is not an action; the actions are"
                          f" {', '.join(store.ACTIONS)}.")
        if session.role != "operator":
            raise Refused(403, "Not allowed", f"{session.user} is a viewer: only an operator may {action} a job.")
        reason = " ".join(str(form.get("reason", "")).split())[:500]
        if not reason:
            raise Refused(400, "A reason is needed", "Say why (it is recorded in the job's history); go back and"
                          " fill in the reason.")
        now = iso(utcnow())

        def apply(conn: sqlite3.Connection) -> JobState:
            state = store.operator_action(conn, code, action, now, source=f"web:{session.user}",
                                          reason=reason)
            store.audit(conn, now, session.user, action, code, reason)
            return state

        try:
            state = await self.writer.run(apply)
        except UnknownJob:
            raise Refused(404, "No such job", f"There is no job with code {code!r}.") from None
        except InvalidTransition as exc:
            raise Refused(409, "Not done", f"{exc}.") from None
        log_event(log, "web-action", user=session.user, code=code, action=action, state=state.value)
        return _see_other(f"/jobs/{code}")

    async def thumbnail(self, request: web.Request) -> web.Response:
        """The first page of the job's first document (PNG), rendered on demand and kept a while."""
        await self._required(request)
        code = request.match_info["code"].upper()
        known, png = self.thumbnails.get(code)
        if not known:
            try:
                raw = await self._read(lambda conn: store.job_message(conn, code))
            except UnknownJob:
                raise Refused(404, "No such job", f"There is no job with code {code!r}.") from None
            png = await asyncio.to_thread(first_page_png, raw)
            if raw:  # a purged message is not remembered: nothing to render, ever
                self.thumbnails.put(code, png)
        if png is None:
            raise Refused(404, "No picture", "This fax has no document that can be shown, or it was purged after"
                          " the retention period.")
        return web.Response(body=png, content_type="image/png")

    async def transmission(self, request: web.Request) -> web.Response:
        """The one-page PDF transmission report of a job in a final state."""
        session = await self._required(request)
        code = request.match_info["code"].upper()
        try:
            job = await self._read(lambda conn: dict(store.get_job(conn, code)))
        except UnknownJob:
            raise Refused(404, "No such job", f"There is no job with code {code!r}.") from None
        if job["state"] not in TRANSMISSION_FINAL:
            raise Refused(409, "Not finished", f"{code} is {job['state']}: the transmission report is made once the"
                          " fax is delivered, failed, rejected, expired or cancelled.")
        known, png = self.thumbnails.get(code)
        if not known:
            raw = await self._read(lambda conn: store.job_message(conn, code))
            png = await asyncio.to_thread(first_page_png, raw)
        body = await asyncio.to_thread(transmission_report, job, thumbnail=png,
                                       currency=self.settings.greenfax.currency, hostname=self.settings.smtp.hostname)
        await self.writer.run(store.audit, iso(utcnow()), session.user, "transmission-report", code)
        return web.Response(body=body, content_type="application/pdf", headers={
            "Content-Disposition": f'attachment; filename="fax-{code}.pdf"'})

    # --- queue, unmatched reports, health -----------------------------------------------------

    async def queue(self, request: web.Request) -> web.Response:
        session = await self._required(request)
        rows = await self._read(store.waiting_jobs)
        return self._page("queue.html", request, session, rows=rows)

    async def unmatched(self, request: web.Request) -> web.Response:
        session = await self._required(request)
        window = timedelta(seconds=self.settings.status.match_window)

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            reports = store.list_reports(conn, limit=100)
            for report in reports:
                received = store.parse_iso(report["received_at"])
                report["candidates"] = store.link_candidates(conn, report["number"], iso(received - window),
                                                             iso(received))
            return reports

        return self._page("unmatched.html", request, session, reports=await self._read(read))

    async def link(self, request: web.Request) -> web.StreamResponse:
        from gateway.status.correlate import CorrelationPolicy, match_by_hand

        session = await self._required(request)
        form = await request.post()
        self._check_form(request, form, session.csrf)
        if session.role != "operator":
            raise Refused(403, "Not allowed", f"{session.user} is a viewer: only an operator may link a report.")
        try:
            report_id = int(request.match_info["report"])
        except ValueError:
            raise Refused(404, "No such report", "A status report is named by its number.") from None
        code = str(form.get("code", "")).strip().upper()
        if not code:
            raise Refused(400, "Which job?", "Choose the job the report is about, or type its code.")
        now = iso(utcnow())
        policy = CorrelationPolicy.from_settings(self.settings)

        def apply(conn: sqlite3.Connection) -> str:
            outcome = match_by_hand(conn, report_id, code, now, policy)
            store.audit(conn, now, session.user, "link", code, f"status report #{report_id}: {outcome.kind}")
            return outcome.kind

        try:
            kind = await self.writer.run(apply)
        except UnknownJob as exc:
            raise Refused(404, "Not found", f"{exc}.") from None
        except InvalidTransition as exc:
            raise Refused(409, "Not done", f"{exc}.") from None
        log_event(log, "web-action", user=session.user, code=code, action="link", report=report_id, outcome=kind)
        return _see_other(f"/jobs/{code}")

    async def health_page(self, request: web.Request) -> web.Response:
        session = await self._required(request)
        report = await self.health()
        return self._page("health.html", request, session, report=report)

    # --- the cost report -------------------------------------------------------------------------

    def _report_range(self, request: web.Request) -> tuple[str, str, str, str, str]:
        """since and until (dates, until inclusive) and the period of ?since=&until=&by=; the last 30 days by default."""
        from datetime import date

        query = request.query
        by = query.get("by", "day")
        if by not in ("day", "month"):
            raise Refused(400, "That report cannot be made", f"by={by!r}: expected day or month.")
        try:
            until = date.fromisoformat(query["until"]) if query.get("until") else utcnow().date()
            since = date.fromisoformat(query["since"]) if query.get("since") else until - timedelta(days=29)
        except ValueError:
            raise Refused(400, "That report cannot be made", "since and until are dates such as 2026-11-01.") \
                from None
        if since > until:
            raise Refused(400, "That report cannot be made", f"since ({since}) is after until ({until}).")
        return since.isoformat(), until.isoformat(), f"{since.isoformat()}T00:00:00", \
            f"{(until + timedelta(days=1)).isoformat()}T00:00:00", by

    async def reports(self, request: web.Request) -> web.Response:
        session = await self._required(request)
        since, until, start, end, by = self._report_range(request)
        rows = await self._read(lambda conn: store.cost_report(conn, since=start, until=end, by=by))
        totals = {"faxes": sum(r["faxes"] for r in rows), "delivered": sum(r["delivered"] for r in rows),
                  "pages": sum(r["pages"] for r in rows), "cost": sum((r["cost"] for r in rows), start=0)}
        per_period: dict[str, Any] = {}
        for row in rows:
            per_period[row["period"]] = per_period.get(row["period"], 0) + row["pages"]
        return self._page("reports.html", request, session, rows=rows, totals=totals, since=since, until=until,
                          by=by, chart=_bars(per_period), currency=self.settings.greenfax.currency,
                          csv="/reports.csv?" + urlencode({"since": since, "until": until, "by": by}))

    async def reports_csv(self, request: web.Request) -> web.Response:
        import csv
        import io

        await self._required(request)
        since, until, start, end, by = self._report_range(request)
        rows = await self._read(lambda conn: store.cost_report(conn, since=start, until=end, by=by))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow([by, "sender", "billing_code", "faxes", "delivered", "pages",
                         f"cost ({self.settings.greenfax.currency})"])
        for row in rows:
            writer.writerow([row["period"], _csv_safe(row["sender"]), _csv_safe(row["billing_code"]), row["faxes"],
                             row["delivered"], row["pages"], row["cost"]])
        return web.Response(text=out.getvalue(), content_type="text/csv", charset="utf-8", headers={
            "Content-Disposition": f'attachment; filename="fax-costs-{since}-{until}-{by}.csv"'})

    # --- pieces ------------------------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise Refused(404, "Not found", "There is no such file.")
        body = resources.files("gateway.http").joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=STATIC[name], headers={"Cache-Control": "max-age=3600"})

    def _page(self, template: str, request: web.Request, session: store.WebSession | None, *, status: int = 200,
              **values: Any) -> web.Response:
        body = self.templates.get_template(template).render(session=session, path=request.path, **values)
        return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def run() -> Any:
            conn = self.read_store()
            try:
                return fn(conn)
            finally:
                conn.close()

        return await asyncio.to_thread(run)


STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
# The console's pages: method, path, and the Console method that answers.
ROUTES = [
    ("GET", "/", "jobs"), ("GET", "/login", "login_page"), ("POST", "/login", "login"),
    ("POST", "/logout", "logout"), ("GET", "/jobs/{code}", "job"), ("POST", "/jobs/{code}/{action}", "act"),
    ("GET", "/queue", "queue"), ("GET", "/unmatched", "unmatched"), ("POST", "/unmatched/{report}", "link"),
    ("GET", "/health", "health_page"), ("GET", "/reports", "reports"), ("GET", "/reports.csv", "reports_csv"),
    ("GET", "/static/{name}", "static"), ("GET", "/jobs/{code}/thumbnail.png", "thumbnail"),
    ("GET", "/jobs/{code}/report.pdf", "transmission"),
]


def _bars(values: dict[str, int], *, width: int = 720, height: int = 160) -> list[dict[str, Any]]:
    """An SVG bar chart's bars (x, y, w, h, label, value) for values in order; drawn by the template."""
    if not values:
        return []
    top = max(values.values()) or 1
    step = width / len(values)
    return [{"x": round(i * step + step * 0.1, 1), "w": round(step * 0.8, 1),
             "h": round(value / top * (height - 20), 1), "y": round(height - value / top * (height - 20), 1),
             "label": label, "value": value} for i, (label, value) in enumerate(values.items())]


def _csv_safe(text: str) -> str:
    """A cell a spreadsheet will not run as a formula (CSV injection: a sender may begin with = + - @)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _local(target: str) -> str:
    """A redirect target on this site only (no //host, no scheme): anything else is the job list."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _state_class(state: str) -> str:
    return {"delivered": "good", "submitted": "busy", "sending": "busy", "queued": "busy", "deferred": "wait",
            "held": "wait", "unknown": "warn", "failed": "bad", "rejected": "bad", "expired": "bad",
            "cancelled": "off"}.get(state, "off")
