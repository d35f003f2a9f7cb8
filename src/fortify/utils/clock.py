"""UTC timestamps for run records, lock records and renamed folders."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> str:
    """The current UTC time as ISO-8601 with seconds, e.g. ``2026-11-22T00:07:01Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_stamp() -> str:
    """The current UTC time for file names, e.g. ``20261122T000701Z``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
