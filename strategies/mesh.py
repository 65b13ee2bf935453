"""The device mesh: ``ParallelDims`` validates dp x tp x pp = world up front (torchtitan's
habit) and builds a (pp, dp, tp) DeviceMesh -- tensor parallel fastest, so a tp group shares
a node, as the planner's placement assumes (``planner/comm.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import LayoutError


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int
    world: int

    def __post_init__(self):
        if self.dp * self.tp * self.pp != self.world:
            raise LayoutError(f"dp x tp x pp = {self.dp} x {self.tp} x {self.pp} = {self.dp * self.tp * self.pp} "
                              f"!= {self.world} ranks")

    def build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
