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


def field_option(model, *decls: str, field: str | None = None, **overrides):
    """``click.option(*decls)`` for a field of the pydantic ``model`` (``field``: its name, else
    the parameter name among ``decls``, else the long flag's: ``--lora-rank`` is ``lora_rank``),
    with what the model already says: a
    ``Choice`` of its ``Literal``'s values, an ``IntRange`` of an integer's bounds, its default,
    and its description as the help. ``overrides`` win: a flag left open for the search
    (``default=None``), a help text that says more than the field's description."""
    from typing import Literal, get_args, get_origin

    import annotated_types

    named = [d for d in decls if d.isidentifier()]  # click's parameter name, when the flag's is not
    name = field or (named or [next(d for d in decls if d.startswith("--")).split("/")[0][2:].replace("-", "_")])[0]
    info = model.model_fields[name]
    kwargs: dict = {"default": info.default}
    if info.description:
        kwargs["help"] = info.description
    if get_origin(info.annotation) is Literal:
        kwargs["type"] = click.Choice(list(get_args(info.annotation)))
    elif info.annotation is bool and not any("/" in d for d in decls):
        kwargs = {"is_flag": True} | ({"help": info.description} if info.description else {})  # off unless given
    elif info.annotation is int:
        bounds = {"min": None, "max": None}
        for rule in info.metadata:
            if isinstance(rule, annotated_types.Gt):
                bounds["min"] = rule.gt + 1
            elif isinstance(rule, annotated_types.Ge):
                bounds["min"] = rule.ge
            elif isinstance(rule, annotated_types.Le):
                bounds["max"] = rule.le
        kwargs["type"] = click.IntRange(**bounds)
    return click.option(*decls, **(kwargs | overrides))
