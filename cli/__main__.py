"""`python -m cli` runs the modelpress command."""

from cli.main import main

main()
