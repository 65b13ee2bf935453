"""What one rank holds of torchtitan's own DeepSeek models under expert, tensor and data
parallelism: every parameter's global shape, the rank's local shape and its placements, as
torchtitan 0.3.0 shards them (ParallelDims.from_config, set_deepseek_v3_sharding_config,
parallelize_deepseekv3 with FSDP2), built on the meta device in a fake process group on a CPU.

    python validation/torchtitan_shards.py FLAVOR WORLD EP TP        # one layout, JSON on stdout
    python validation/torchtitan_shards.py --write                   # the committed layouts

Ground truth for the planner's per-rank expert sharding (issue 24): torchtitan stores routed
experts Shard(0) over ``ep`` and, over efsdp = dp_shard * cp * tp / ep, Shard(1) when
efsdp * ep exceeds the experts, else Shard(0) (torchtitan/distributed/fsdp.py:224-233).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).with_name("torchtitan_shards.json")
LAYOUTS = [("16B", 16, 8, 2), ("16B", 16, 4, 2), ("16B", 8, 1, 2), ("debugmodel", 16, 4, 2)]


def shards(flavor: str, world: int, ep: int, tp: int) -> dict:
    """Run in a process of its own: it initialises a fake process group of ``world`` ranks."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    import torchtitan.distributed.parallel_dims as parallel_dims_module

    parallel_dims_module.device_type = "cpu"  # the meshes on this machine's device (no CUDA)
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.deepseek_v3 import model_registry
    from torchtitan.models.deepseek_v3.parallelize import parallelize_deepseekv3
    from torchtitan.models.deepseek_v3.sharding import set_deepseek_v3_sharding_config

    parallelism = ParallelismConfig(expert_parallel_degree=ep, tensor_parallel_degree=tp,
                                    data_parallel_shard_degree=world // tp, spmd_backend="partial_dtensor")
    dims = ParallelDims.from_config(parallelism, world)
    spec = model_registry(flavor)
    # what the trainer's update_from_config does (models/deepseek_v3/model.py)
    set_deepseek_v3_sharding_config(spec.model, enable_sp=True, enable_ep=ep > 1)
    with torch.device("meta"):
        model = spec.model.build()
    model = parallelize_deepseekv3(model, parallel_dims=dims, training=TrainingConfig(), parallelism=parallelism,
                                   compile_config=CompileConfig(), ac_config=None, dump_folder="/tmp")
    params = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        params[name] = dict(shape=list(p.shape), local=list(local.shape),
                            placements=[str(x) for x in getattr(p, "placements", ())])
    return dict(flavor=flavor, world=world, ep=ep, tp=tp, dp_shard=world // tp, params=params)


def run(flavor: str, world: int, ep: int, tp: int) -> dict:
    """``shards`` in a fresh interpreter (the fake process group is per process)."""
    done = subprocess.run([sys.executable, __file__, flavor, str(world), str(ep), str(tp)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    if sys.argv[1:] == ["--write"]:
        import torch
        import torchtitan

        from strategies.files import write_atomic

        layouts = [run(*layout) for layout in LAYOUTS]
        write_atomic(OUT, json.dumps(dict(versions=dict(torchtitan=getattr(torchtitan, "__version__", "0.3.0"),
                                                        torch=torch.__version__), layouts=layouts), indent=1) + "\n")
        print(f"wrote {OUT} ({len(layouts)} layouts)")
        return
    flavor, world, ep, tp = sys.argv[1], *map(int, sys.argv[2:5])
    print(json.dumps(shards(flavor, world, ep, tp)))


if __name__ == "__main__":
    main()
