"""validation/step_accuracy.py: the step-time model against published runs, with the fit/check
split declared in validation/published_steps.json before the planner ran on them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "validation"))

import step_accuracy as sa  # noqa: E402

DATA = json.loads(sa.RUNS.read_text())
RUNS = {r["id"]: r for r in DATA["runs"]}


def test_the_split_is_the_declared_rule():
    """Every eligible run (dense, complete layout) is in exactly one half, every other run is
    excluded with a reason, and the halves are the rule's: the runs' layout groups sorted,
    even-numbered groups fit, odd ones check (a layout never straddles the halves)."""
    fit, check = set(DATA["fit"]), set(DATA["check"])
    excluded = set(DATA["excluded"])
    assert all(DATA["excluded"].values())  # each with its reason
    assert not fit & check and not (fit | check) & excluded
    assert fit | check | excluded == set(RUNS)
    groups = sorted({RUNS[i]["split_group"] for i in fit | check})
    side = {g: ("fit" if n % 2 == 0 else "check") for n, g in enumerate(groups)}
    assert all(side[RUNS[i]["split_group"]] == "fit" for i in fit)
    assert all(side[RUNS[i]["split_group"]] == "check" for i in check)
    assert len({RUNS[i]["stack"] for i in check}) >= 5 and len({RUNS[i]["stack"] for i in fit}) >= 5


def test_the_committed_accuracy_is_what_the_planner_predicts():
    """validation/step_accuracy.json (the README's table) is recomputed from the current planner:
    a change to the step-time model that moves any run fails here until it is rewritten."""
    assert json.loads(sa.RESULT.read_text()) == json.loads(json.dumps(sa.result()))


def test_published_figures_convert_with_the_sources_convention():
    """Narayanan et al. 2021 Table 1, 145.6B on 1,536 A100 at 148 TFLOP/s by their Eq. 3:
    96 l h^2 (1 + s/6h + V/16lh) FLOPs per token -- the same as validation/published.py's
    eq3_tflops_per_gpu, inverted."""
    run = next(r for r in DATA["runs"] if "145.6B" in r["model"] and r.get("tflops_per_gpu") == 148)
    model = sa._spec(run)
    tokens, basis = sa._published_tokens(run, model, 312.0)
    h, layers, s, v = 12288, 80, 2048, 51200
    assert tokens == pytest.approx(148e12 / (96 * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))))
    assert "Eq. 3" in basis


@pytest.mark.parametrize(("predicate", "reason"), [
    (lambda r: r["stack"] == "llm-foundry" and "fp8" in str(r.get("precision")), "Transformer Engine FP8 under"),
    (lambda r: r["gpu"] == "GB200", "no GPU preset"),
])
def test_what_the_planner_does_not_model_is_listed_not_approximated(predicate, reason):
    run = next(r for r in DATA["runs"] if r["id"] in set(DATA["fit"]) | set(DATA["check"]) and predicate(r))
    compared = sa.compare(run, "fit")
    assert compared.predicted is None and reason in compared.refused
