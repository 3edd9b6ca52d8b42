"""greenfax-gateway: a local SMTP smarthost that forwards fax emails to GreenFax.

The flow, one module per step (see README, "Architecture"):
intake -> policy -> store -> forward -> upstream, with sandbox as the
stand-in for GreenFax and cli as the operator's face.
"""

__version__ = "0.1.0"
