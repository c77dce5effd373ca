"""`python -m console.cli`: the `refund` command line."""

from console.cli import main

main()
