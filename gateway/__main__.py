"""`python -m gateway` runs the `faxgw` command."""

from gateway.cli import main

main()
