"""``python -m psft_ext``: the ``psft`` command line (see ``psft --help``)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
