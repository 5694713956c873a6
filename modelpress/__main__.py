"""`python -m modelpress` runs the modelpress command."""

from modelpress.cli.entry import main

# Guarded: batch workers are started with "spawn", which imports the main module again.
if __name__ == "__main__":
    main()
