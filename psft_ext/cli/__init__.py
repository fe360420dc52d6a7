"""The ``psft`` command line: ``psft demo``, ``psft train``, ``psft bench`` (see ``psft --help``).

Each subcommand lives in its own module, imported only when it runs, so ``psft --help`` needs
neither transformers nor matplotlib.
"""
