"""`python -m gateway` runs the `faxgw` command."""

from gateway.cli.main import main

main()
