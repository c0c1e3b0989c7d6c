"""`python -m serve.control`, the command earlier releases documented: kept so scripts that call
it keep working. The control client lives in serve/process/control.py."""

import sys

from .process.control import main

if __name__ == "__main__":
    sys.exit(main())
