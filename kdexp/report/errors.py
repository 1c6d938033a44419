"""The error ``kdexp report`` raises for bad input."""

from __future__ import annotations

from kdexp.core.errors import KdexpError


class ReportError(KdexpError, ValueError):
    """No records, an unknown metric or axis, or runs that must not be averaged together.

    The message says what is wrong and how to fix it; the CLI prints it as
    ``kdexp report: error: …`` and exits with 2.
    """
