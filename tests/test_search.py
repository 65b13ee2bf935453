"""Layout search, ranking and recommendation."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from planner.calibration import default_calibration
from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from planner.errors import ConfigError, LayoutError
from planner.memory import estimate_memory, peak_bytes
from planner.search import SearchSpace, enumerate_configs, search
from planner.step_time import estimate_step
from trainplan.cli import plan_command

LLAMA7B, LLAMA70B = load_model("llama-2-7b"), load_model("llama-2-70b")
H100 = load_gpu("h100-sxm-80gb")


def test_recommendation_is_the_fastest_that_fits():
    space = SearchSpace(gpus=8, global_batch=64)
    result = search(LLAMA7B, H100, space, top=0)
    cal = default_calibration()
    best_speed = max(
        estimate_step(LLAMA7B, H100, t, cal).tokens_per_s
        for t in enumerate_configs(LLAMA7B, space)
        if peak_bytes(LLAMA7B, t, cal.overheads) <= H100.memory_bytes
    )
    assert result.recommended.throughput.tokens_per_s == pytest.approx(best_speed)
    speeds = [c.throughput.tokens_per_s for c in result.candidates]
    assert speeds == sorted(speeds, reverse=True)
    assert all(c.fits for c in result.candidates)
    assert len(result.candidates) == result.num_fitting
    assert "tokens/s per GPU" in result.reason and "headroom" in result.reason


def test_search_meets_the_global_batch_with_micro_batch_and_accumulation():
    result = search(LLAMA7B, H100, SearchSpace(gpus=8, global_batch=256), top=0)
    for c in result.candidates:
        t = c.train
        assert t.micro_batch * t.dp * t.grad_accum == 256
    assert len({c.train.micro_batch for c in result.candidates}) > 2


def test_sort_by_memory():
    result = search(LLAMA7B, H100, SearchSpace(gpus=8), top=5, sort="memory")
    peaks = [c.memory.peak for c in result.candidates]
    assert peaks == sorted(peaks)


def test_tensor_parallel_stays_inside_a_node():
    gpt3 = load_model("gpt3-175b")  # 96 heads: tp 16 would divide them
    fixed = {"seq_len": 2048}
    configs = enumerate_configs(gpt3, SearchSpace(gpus=32, gpus_per_node=8, global_batch=32, fixed=fixed))
    assert max(t.tp for t in configs) == 8
    with pytest.raises(LayoutError, match="tp=16 spans nodes"):
        enumerate_configs(gpt3, SearchSpace(gpus=32, gpus_per_node=8, tp=[16], fixed=fixed))
    allowed = enumerate_configs(gpt3, SearchSpace(gpus=32, gpus_per_node=8, tp=[16], allow_cross_node_tp=True,
                                                  global_batch=32, fixed=fixed))
    assert allowed and all(t.tp == 16 for t in allowed)


def test_every_strategy_is_summarised_with_a_reason():
    result = search(LLAMA7B, H100, SearchSpace(gpus=8, tp=[1], pp=[1]))
    labels = [s.strategy for s in result.strategies]
    assert labels == ["DDP", "ZeRO-1", "ZeRO-2", "ZeRO-2+offload", "ZeRO-3", "ZeRO-3+offload"]
    ddp = result.strategies[0]
    assert not ddp.fits and "does not fit" in ddp.note
    assert "DDP does not fit" in result.reason
    slower = [s for s in result.strategies if s.fits and s.note != "recommended"]
    assert slower and all("slower" in s.note or "as fast" in s.note for s in slower)


def test_nothing_fits_shows_closest_and_what_to_change():
    result = search(load_model("llama-3.1-405b"), H100, SearchSpace(gpus=8))
    assert result.recommended is None and result.num_fitting == 0
    assert result.candidates and result.reason.startswith("the closest layout")
    assert any("the GPUs" in a for a in result.advice)
    cli = CliRunner().invoke(plan_command, ["--model", "405b", "--gpus", "8"])
    assert cli.exit_code == 1
    assert "closest layouts" in cli.stdout
    assert cli.stderr.startswith("error: nothing fits") and len(cli.stderr.strip().splitlines()) == 1


def test_global_batch_not_divisible_is_a_clear_error():
    cli = CliRunner().invoke(plan_command, ["--model", "7b", "--gpus", "8", "--strategy", "zero2", "--tp", "1",
                                            "--pp", "1", "--global-batch", "12"])
    assert cli.exit_code == 2
    assert "global batch 12 is not divisible" in cli.stderr


@pytest.mark.parametrize(("pp", "schedule", "chunks"), [(4, "1f1b", 1), (8, "gpipe", 1), (5, "1f1b", 1),
                                                        (4, "interleaved", 2)])
def test_fast_peak_equals_the_worst_of_all_stages(pp, schedule, chunks):
    """The search screens with a few representative stages; it must agree with all stages."""
    model = load_model("llama-2-13b")
    train = TrainConfig(gpus=8 * pp, pp=pp, zero_stage=1, global_batch=64, schedule=schedule, chunks=chunks,
                        micro_batch=1)
    cal = default_calibration()
    full = estimate_memory(model, H100, train, cal.overheads, search_micro_batch=False)
    assert peak_bytes(model, train, cal.overheads) == full.memory.peak


def test_pytorch_pipelines_with_fewer_micro_batches_than_stages_use_gpipe():
    """torch.distributed.pipelining's Schedule1F1B refuses fewer micro-batches than stages
    (strategies/pipeline.py says so at run time); the search offers GPipe there, which is the
    same schedule, so every candidate it proposes for the pytorch engine can run."""

    configs = enumerate_configs(load_model("tiny-llama"), SearchSpace(gpus=2, pp=[2], tp=[1], global_batch=1,
                                                                      fixed=dict(engine="pytorch")))
    assert configs and all(c.schedule == "gpipe" for c in configs if c.num_microbatches < c.pp)


@pytest.mark.parametrize("model, gpu, gpus, global_batch", [("70b", "a100-80gb", 64, None), ("8b", "h100", 64, 512),
                                                            ("405b", "h100", 1024, 1024), ("7b", "h100", 8, 64)])
def test_skipping_larger_micro_batches_loses_no_fitting_candidate(model, gpu, gpus, global_batch):
    """The screen skips a layout's larger micro-batches once one does not fit (not under GPipe):
    computing every candidate gives the same verdicts, and each skipped one is above the memory."""
    from planner.calibration import default_calibration
    from planner.memory import memory_limits, screen_memory
    from planner.search import _screen, enumerate_configs

    m, g, cal = load_model(model), load_gpu(gpu), default_calibration()
    configs = enumerate_configs(m, SearchSpace(gpus=gpus, global_batch=global_batch))
    screened = _screen(m, g, configs, cal, 8)
    skipped = [c for c in screened if c.peak is None]
    assert skipped
    for c in skipped:
        peak, host = screen_memory(m, c.train, cal.overheads)
        assert not all(limit.fits for limit in memory_limits(g, peak, host * min(8, c.train.gpus)))


def _screened(model, gpu, configs, cal):
    from planner.search import _screen

    return [(c.train, c.peak, c.host_per_node, c.fits, c.throughput) for c in _screen(model, gpu, configs, cal, 8)]


def test_the_forked_screen_answers_as_one_process(monkeypatch):
    """A large search splits its screen by tensor x pipeline x context layout between the process
    and a forked child: every candidate's peak, host bytes, verdict and step time are the same,
    in the same order, as on one core -- and when the child fails, the parent computes its half."""
    from planner import search as S

    m, g, cal = load_model("70b"), load_gpu("a100-80gb"), default_calibration()
    configs = enumerate_configs(m, SearchSpace(gpus=64))
    monkeypatch.setenv("TRAINPLAN_SEARCH_WORKERS", "1")
    one = _screened(m, g, configs, cal)
    assert S._screen_workers(10**6) == 1
    monkeypatch.setenv("TRAINPLAN_SEARCH_WORKERS", "2")
    assert S._screen_workers(1) == 2
    assert _screened(m, g, configs, cal) == one

    def child_fails(conn, *args):
        conn.send(None)
        conn.close()

    monkeypatch.setattr(S, "_screen_child", child_fails)
    assert _screened(m, g, configs, cal) == one


def test_the_forked_screen_raises_what_one_process_raises(monkeypatch):
    """The first candidate's step is estimated in the parent: fp8 on an A100 is refused the same."""
    monkeypatch.setenv("TRAINPLAN_SEARCH_WORKERS", "2")
    space = SearchSpace(gpus=16, fixed=dict(precision="fp8-tensorwise", compile=True))
    with pytest.raises(ConfigError, match="fp8 tensor cores"):
        search(load_model("8b"), load_gpu("a100-80gb"), space)


def test_an_interrupted_forked_screen_leaves_no_child(monkeypatch):
    """Ctrl-C (or any error) in the parent's half ends the child too: nothing waits on a pipe
    that nobody reads."""
    import multiprocessing

    from planner import search as S

    m, g, cal = load_model("70b"), load_gpu("a100-80gb"), default_calibration()
    configs = enumerate_configs(m, SearchSpace(gpus=64))
    monkeypatch.setenv("TRAINPLAN_SEARCH_WORKERS", "2")
    real = S._screen_share

    def interrupted(model, gpu, configs, cal, gpus_per_node, share):
        if multiprocessing.parent_process() is None:  # the parent's half
            raise KeyboardInterrupt
        return real(model, gpu, configs, cal, gpus_per_node, share)

    monkeypatch.setattr(S, "_screen_share", interrupted)
    with pytest.raises(KeyboardInterrupt):
        S._screen(m, g, configs, cal, 8)
    assert not multiprocessing.active_children()
