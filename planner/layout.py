"""Where each rank sits: the one rank layout that the planner's communication placement
(``planner/comm.py``), the strategy layer's device mesh (``strategies/mesh.py``) and the
profiler's stage lookup (``profiler/report.py``) share.

Ranks are laid out as a mesh (pp, dp, cp, tp), slowest to fastest -- torchtitan's order
(``ParallelDims._build_mesh_without_ep``: ``["pp", "dp_replicate", "dp_shard", "cp", "tp"]``),
and Megatron-LM's default tensor-fastest placement -- so a tensor-parallel group is the most
tightly packed and stays inside a node when it fits. FSDP, DDP and ZeRO shard and average over
``dp_cp``, the data-parallel and context-parallel axes flattened (torchtitan's ``dp_shard_cp``).
A further axis (expert parallelism) is one more entry in ``MESH_ORDER``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

MESH_ORDER = ("pp", "dp", "cp", "tp")  # slowest to fastest
FLATTENED = {"dp_cp": ("dp", "cp")}  # groups over adjacent axes, as one process group


@dataclass(frozen=True)
class RankLayout:
    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1

    @classmethod
    def of(cls, train) -> RankLayout:
        """The layout of a TrainConfig (or anything with pp, dp, cp, tp)."""
        return cls(pp=train.pp, dp=train.dp, cp=train.cp, tp=train.tp)

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def size(self, axis: str) -> int:
        """Ranks in one group of ``axis`` (a mesh axis or a flattened one, e.g. ``dp_cp``)."""
        return prod(getattr(self, a) for a in FLATTENED.get(axis, (axis,)))

    def stride(self, axis: str) -> int:
        """How far apart the ranks of one group of ``axis`` are: the product of the faster axes
        (tp: 1; cp: tp; dp and dp_cp: cp x tp and tp; pp: dp x cp x tp)."""
        first = FLATTENED.get(axis, (axis,))[-1]
        return prod(getattr(self, a) for a in MESH_ORDER[MESH_ORDER.index(first) + 1:])

    def coordinate(self, rank: int, axis: str) -> int:
        """The index of ``rank`` along a mesh axis."""
        return rank // self.stride(axis) % getattr(self, axis)

    def stage_of(self, rank: int) -> int:
        """The pipeline stage a rank runs."""
        return self.coordinate(rank, "pp")

    def mesh(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(shape, names) of the device mesh, slowest axis first; cp only when it is used
        (then ``dp_cp`` is flattened from it, ``strategies/mesh.py``)."""
        axes = tuple(a for a in MESH_ORDER if a != "cp" or self.cp > 1)
        return tuple(getattr(self, a) for a in axes), axes
