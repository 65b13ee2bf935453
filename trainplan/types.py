"""Click parameter types shared by the commands (trainplan/cli.py, trainplan/inference_cli.py)."""

from __future__ import annotations

import click


class Finite(click.ParamType):
    """A finite number in [lo, hi]: click's FloatRange lets NaN through (every comparison with
    NaN is false) and has no notion of infinity."""

    name = "number"

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or not self.lo <= number <= self.hi:
            self.fail(f"{value!r} is not a finite number between {self.lo:,} and {self.hi:,}", param, ctx)
        return number
