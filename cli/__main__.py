"""`python -m cli`: the same as the `satset` command."""

from cli.app import main

main()
