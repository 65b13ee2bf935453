"""The device mesh: ``ParallelDims`` validates dp x tp x pp x cp = world up front (torchtitan's
habit) and builds the DeviceMesh of the planner's rank layout (``planner/layout.py``) -- tensor
parallel fastest, so a tp group shares a node, as the planner's placement assumes."""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import LayoutError
from planner.layout import FLATTENED, RankLayout


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int
    world: int
    cp: int = 1

    def __post_init__(self):
        if self.dp * self.tp * self.pp * self.cp != self.world:
            raise LayoutError(f"dp x tp x pp x cp = {self.dp} x {self.tp} x {self.pp} x {self.cp} = "
                              f"{self.dp * self.tp * self.pp * self.cp} != {self.world} ranks")

    @property
    def layout(self) -> RankLayout:
        return RankLayout(pp=self.pp, dp=self.dp, cp=self.cp, tp=self.tp)

    def build_mesh(self, device_type: str):
        """(pp, dp, tp); with context parallelism (pp, dp, cp, tp), torchtitan's order, plus the
        flattened "dp_cp" dimension that FSDP, DDP and ZeRO-1 shard and reduce over."""
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = self.layout.mesh()
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        if self.cp > 1:
            mesh[FLATTENED["dp_cp"]]._flatten("dp_cp")
        return mesh


def shard_mesh(mesh, cp: int):
    """The ranks that shard and average gradients: dp, or dp x cp with context parallelism."""
    return mesh["dp_cp"] if cp > 1 else mesh["dp"]
