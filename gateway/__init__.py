"""greenfax-gateway: a local SMTP smarthost that forwards fax emails to GreenFax.

The flow, a folder per stage (see README, "Architecture"): outbound/
(intake -> policy -> store -> forward -> upstream), status/ (every channel
GreenFax reports by, into the store), store/ (the only SQL), http/ (the
HTTP face), cli/ (the operator's face), ops/ (backup, retention, reload),
and sandbox/ as the stand-in for GreenFax.
"""

__version__ = "0.1.0"
