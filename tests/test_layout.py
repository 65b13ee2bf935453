"""The one rank layout (planner/layout.py) that the planner's placement, the strategy mesh and
the profiler's stage lookup share (issue 22)."""

from planner.configs import TrainConfig
from planner.layout import RankLayout
from strategies.mesh import ParallelDims


def test_tensor_parallel_fastest_then_cp_dp_pp():
    # torchtitan's mesh (pp, dp, cp, tp): rank = ((pp * dp + d) * cp + c) * tp + t
    layout = RankLayout(pp=2, dp=3, cp=2, tp=4)
    assert layout.world == 48
    assert [layout.stride(a) for a in ("tp", "cp", "dp", "dp_cp", "pp")] == [1, 4, 8, 4, 24]
    assert [layout.size(a) for a in ("tp", "cp", "dp", "dp_cp", "pp")] == [4, 2, 3, 6, 2]
    rank = ((1 * 3 + 2) * 2 + 1) * 4 + 3
    assert [layout.coordinate(rank, a) for a in ("pp", "dp", "cp", "tp")] == [1, 2, 1, 3]
    assert layout.stage_of(rank) == 1 and layout.stage_of(23) == 0


def test_the_strategy_mesh_is_the_layout():
    assert ParallelDims(dp=2, tp=2, pp=2, world=8).layout.mesh() == ((2, 2, 2), ("pp", "dp", "tp"))
    assert ParallelDims(dp=2, tp=2, pp=1, world=8, cp=2).layout.mesh() == ((1, 2, 2, 2), ("pp", "dp", "cp", "tp"))


def test_of_a_train_config():
    train = TrainConfig(gpus=16, tp=2, pp=2, cp=2, zero_stage=3, seq_len=4096)
    assert RankLayout.of(train) == RankLayout(pp=2, dp=2, cp=2, tp=2)
    assert RankLayout.of(train).size("dp_cp") == train.shard_world
