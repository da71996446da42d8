"""``python -m mailworker``: the ``mailworker`` command, for when the script is not on PATH."""

import sys

from mailworker.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
