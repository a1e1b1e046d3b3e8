"""``python -m meanflow.cli``: the ``meanflow`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
