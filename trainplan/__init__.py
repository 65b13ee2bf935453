"""trainplan: plan, run and profile distributed training.

The planner (``planner``) is pure arithmetic; the strategy layer (``strategies``) runs layouts
with PyTorch's own engines; the profiler (``profiler``) measures runs and compares.
"""

__version__ = "0.1.0"
