"""Value types for command-line options: each refusal says what the option takes (argparse
names the option)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def seconds(minimum: float, inclusive: bool) -> Callable[[str], float]:
    """A number of seconds above `minimum`, or equal to it too when `inclusive`."""
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"{text!r}: use a number of seconds {bound}")
        return value
    return parse


def whole_number(minimum: int) -> Callable[[str], int]:
    """A whole number >= `minimum` (a count of runs, repeats, requests)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: use a whole number >= {minimum}")
        return value
    return parse
