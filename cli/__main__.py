"""`python -m cli` runs the modelpress command."""

from cli.main import main

# Guarded: batch workers are started with "spawn", which imports the main module again.
if __name__ == "__main__":
    main()
