"""The planner: pure arithmetic over the shared vocabulary (planner.configs); never imports torch."""


def clear_caches() -> None:
    """Empty every cache the planner's modules keep (a fresh process's state): for tests that
    compare an answer computed alone with one computed after others, and for benchmarks."""
    import sys

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "planner":
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()
