"""`python -m mtbert.cli` (the form torchrun needs) and the `mtbert` console script: see apps.cli."""
import sys

from mtbert.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
