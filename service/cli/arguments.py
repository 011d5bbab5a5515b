"""Argument types the command-line tools share."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least`` (a usage error, exit 2,
    otherwise: a review saw ``-n -1`` end in a traceback)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {text!r}")
        return value

    return parse
