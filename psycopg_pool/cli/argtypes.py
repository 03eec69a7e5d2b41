"""Argument types of the command line, refusing values the pool would choke on later."""

from __future__ import annotations

import argparse
import math
import threading


def natural(text: str) -> int:
    """A count that may be 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_number(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def seconds(text: str) -> float:
    """A positive, finite duration that threads and sockets can wait for."""
    value = float(text)
    if not 0 < value <= threading.TIMEOUT_MAX:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds up to {threading.TIMEOUT_MAX:g}, got {text}"
        )
    assert math.isfinite(value)
    return value
