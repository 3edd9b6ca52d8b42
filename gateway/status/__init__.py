"""Status channels: every way GreenFax reports a fax's outcome becomes one StatusReport.

report.py    dedup keys and times of reports (the StatusReport value is in gateway/models.py)
mailparse.py mail-parser behind one function that never raises (plain mail read more quickly)
mailrules.py declarative rules (rules/status/*.toml) that turn a status email into a report
dsn.py       bounces of forwarded faxes (RFC 3464) into reports
correlate.py one correlation and update path for every channel (runs in the store's writer)
batches.py   reports that arrive together written in one store-writer call (Notify)
inbound.py   the status side of the SMTP intake
imap.py      the account sender's mailbox, by IMAP IDLE with a polling fallback
notify.py    GreenFax's HTTP Notify call as a report (gateway/http/server.py serves it)
feedpoll.py  the XML data feed poller (feedxml.py: safe parsing; feedstate.py: its state)

Delivery status notifications to the original sender are gateway/outbound/notices.py.
"""
