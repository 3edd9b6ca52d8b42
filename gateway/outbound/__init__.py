"""Outbound: the fax emails' way in and out (intake, policy, MIME, quotas, forwarder, upstream, notices)."""
