"""Helpers shared by the ``psft`` subcommands."""

import json
import math
import os

# The seed every command starts from unless told otherwise: transformers' TrainingArguments
# default, so that psft train, psft demo and a Trainer script agree.
DEFAULT_SEED = 42


class CLIError(Exception):
    """A user-facing error: printed as ``psft: error: <message>``, exit status 2, no traceback."""


def progress(iterable=None, show=True, total=None, **kwargs):
    """A tqdm progress bar when ``show`` (and tqdm is installed); otherwise the iterable itself
    (or None when only ``total`` was given), so callers can test ``bar is not None``."""
    if show:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            show = False
    if not show:
        return iterable
    return tqdm(iterable, total=total, dynamic_ncols=True, **kwargs)


def _finite(obj):
    """JSON has no NaN / infinity: they become null (strict parsers reject the bare tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path, obj):
    """Writes ``obj`` to ``path`` through a temporary file and a rename, so a reader never sees a
    half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_finite(obj), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
