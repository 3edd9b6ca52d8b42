"""The GreenFax stand-in (`faxgw sandbox`, and the upstream of `faxgw serve` with no config)."""

from gateway.sandbox.greenfax import FAULTS, OUTCOMES, Faults, SandboxFax, SandboxHandler, sandbox_handler, start_sandbox

__all__ = ["FAULTS", "OUTCOMES", "Faults", "SandboxFax", "SandboxHandler", "sandbox_handler", "start_sandbox"]
