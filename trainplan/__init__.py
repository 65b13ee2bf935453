"""trainplan: plan, run and profile distributed training.

The planner (``planner``) is pure arithmetic; the strategy layer (``strategies``) runs layouts
with PyTorch's own engines; the profiler (``profiler``) measures runs and compares.
"""

__version__ = "0.1.0"


def track(model, optimizer):
    """Measure your own training loop per phase and component; ``.compare(estimate)`` puts it
    next to the planner's prediction. See ``profiler.track``."""
    from profiler.track import track as _track

    return _track(model, optimizer)


def estimate(model, gpu, train, calibration=None):
    """The planner's prediction for one layout (``planner.estimate.estimate``)."""
    from planner.estimate import estimate as _estimate

    return _estimate(model, gpu, train, calibration)
