"""The `faxgw` command: `main` (the entry point) and the `cli` group are in gateway/cli/main.py, one module per command group beside it."""

from gateway.cli.main import cli, main

__all__ = ["cli", "main"]
