"""The user-error type of the command line.

Code at the CLI boundary (config validation, dataset lookup, device checks, file checks) raises
:class:`UsageError`; ``fastdd.cli.main`` prints it as one line and exits 2. Anything else keeps its
traceback, so internal bugs are not disguised as user mistakes.
"""
from __future__ import annotations


class UsageError(Exception):
    """A mistake of the user (bad flag value, missing data, unavailable device, damaged file)."""
