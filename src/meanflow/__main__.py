"""``python -m meanflow`` (and ``torchrun ... -m meanflow``): the ``meanflow`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
