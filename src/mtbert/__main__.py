"""`python -m mtbert ...` is `mtbert ...`."""
import sys

from mtbert.apps.cli import main

sys.exit(main())
