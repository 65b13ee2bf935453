"""Communication time: collectives as NCCL runs them, and point-to-point transfers.

NCCL predicts each collective's time with a latency-bandwidth model and picks the fastest
algorithm (``ncclTopoTuneModel`` / ``ncclTopoGetAlgoTime`` in NVIDIA/nccl src/graph/tuning.cc,
NCCL 2.30; ``topoGetAlgoInfo`` in src/enqueue.cc keeps the minimum). We follow its structure:

- **Ring** (all-reduce, all-gather, reduce-scatter): n ranks on N nodes move 2(n-1)/n x M
  (all-reduce) or (n-1)/n x M (all-gather, reduce-scatter; M the unsharded size) through the
  ring at its bus bandwidth, in 2(n-1) or n-1 steps, of which 2(N-1) or N-1 cross the network:
  latency = base + intra-node steps x NVLink step latency + network steps x network step
  latency (tuning.cc: ``baseLat + (nsteps - nInterSteps) * intraLat + nInterSteps * interLat``).
- **Tree** (all-reduce only; NCCL's double binary tree): latency grows with log2 of the
  nodes, 2 x ((n/N - 1) x NVLink latency + log2(N) x network latency), and the bandwidth is
  below the ring's (busBw x 0.92 and a per-channel cap, ~0.74 of the ring across more than two
  nodes; algBw = busBw / 2) -- so NCCL takes the tree for small and medium messages across many
  nodes and the ring for large ones.
- **Rings per NIC**: across nodes NCCL builds one ring (channel) per NIC, each crossing the
  network through a different NIC ("NCCL detects the 4 NICs correctly and creates 4 rings,
  each using a different NIC", NVIDIA/nccl#601; PXN lets a GPU reach the node's other NICs over
  NVLink). A group with k ranks on each node therefore drives k NICs: its ring's bus
  bandwidth is min(NVLink bus bandwidth, k x NIC bandwidth) -- a DGX A100 node with 8 x 200 Gb/s
  HDR measures 192 GB/s of all-reduce bus bandwidth across nodes (NVIDIA/nccl#812), not the
  25 GB/s of one NIC.

Ranks are placed as ``planner/layout.py`` lays them out: tensor-parallel fastest, then context-,
data-parallel, pipeline (torchtitan's mesh, Megatron-LM's default order), so a group stays
inside a node when it fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, log2

from planner.configs import GPUSpec, TrainConfig
from planner.layout import RankLayout


@dataclass(frozen=True)
class CommConstants:
    intra_node_efficiency: float
    inter_node_efficiency: float
    intra_node_latency_s: float
    inter_node_latency_s: float
    base_latency_s: float = 8.4e-6
    tree_bandwidth_efficiency: float = 0.74


@dataclass(frozen=True)
class Group:
    """A process group as NCCL runs its collectives: its size, the nodes it spans, its ring's
    bus bandwidth and the latencies of one step inside a node and across nodes."""

    ranks: int
    nodes: int
    bus_bandwidth_gb_s: float
    intra_latency_s: float
    inter_latency_s: float
    base_latency_s: float
    tree_bandwidth_efficiency: float
    p2p_bandwidth_gb_s: float  # one GPU to another (a pipeline hop): one NVLink or one NIC
    intra_bandwidth_gb_s: float = 0.0  # one GPU's NVLink, inside its node

    @property
    def spans_nodes(self) -> bool:
        return self.nodes > 1


def group(gpu: GPUSpec, size: int, stride: int, gpus_per_node: int, constants: CommConstants) -> Group:
    """The group of ``size`` ranks ``stride`` apart (tp: 1, dp: tp, pp: tp x dp)."""
    per_node = 1 if stride >= gpus_per_node else max(1, min(size, gpus_per_node // stride))
    nodes = ceil(size / per_node)
    intra = gpu.intra_node_bandwidth_gb_s * constants.intra_node_efficiency
    inter = gpu.inter_node_bandwidth_gb_s * constants.inter_node_efficiency
    bus = intra if nodes == 1 else min(intra, per_node * inter)
    return Group(ranks=size, nodes=nodes, bus_bandwidth_gb_s=bus, intra_latency_s=constants.intra_node_latency_s,
                 inter_latency_s=constants.inter_node_latency_s, base_latency_s=constants.base_latency_s,
                 tree_bandwidth_efficiency=constants.tree_bandwidth_efficiency,
                 p2p_bandwidth_gb_s=intra if nodes == 1 else inter, intra_bandwidth_gb_s=intra)


@dataclass(frozen=True)
class Placement:
    """Which group each parallelism's collectives run in."""

    tp: Group
    dp: Group  # the shard group with hybrid sharding
    pp: Group
    cp: Group
    replicate: Group | None = None  # HSDP: the ranks that hold the same shard
    ep: Group | None = None  # expert parallel: the ranks a layer's routed rows travel between
    expert_dp: Group | None = None  # expert parallel: the ranks that shard the same experts (efsdp)


def placement(gpu: GPUSpec, train: TrainConfig, gpus_per_node: int, constants: CommConstants) -> Placement:
    """The groups on the rank layout (``planner/layout.py``): FSDP's and DDP's data-parallel
    group is ``dp_cp``, the data- and context-parallel axes flattened."""
    per_node = min(gpus_per_node, train.gpus)
    layout = RankLayout.of(train)

    def on_axis(axis: str) -> Group:
        return group(gpu, layout.size(axis), layout.stride(axis), per_node, constants)

    # expert parallelism (torchtitan's sparse mesh ("pp", "dp_replicate", "efsdp", "ep"), ep
    # fastest over the same ranks as dp_shard x cp x tp): ep adjacent ranks, efsdp ep apart
    experts = dict(ep=group(gpu, train.ep, 1, per_node, constants),
                   expert_dp=group(gpu, train.expert_shard_world, train.ep, per_node, constants)) if train.ep > 1 else {}
    if not train.dp_shard:
        return Placement(tp=on_axis("tp"), dp=on_axis("dp_cp"), pp=on_axis("pp"), cp=on_axis("cp"), **experts)
    # HSDP: dp splits into (dp_replicate, dp_shard), slowest first (torchtitan's mesh order), so a
    # shard group is dp_shard x cp adjacent blocks of tp ranks and its replicas sit
    # dp_shard x cp x tp ranks apart
    shard = group(gpu, train.dp_shard * train.cp, train.tp, per_node, constants)
    replicate = group(gpu, train.dp_replicate, train.dp_shard * train.cp * train.tp, per_node, constants)
    return Placement(tp=on_axis("tp"), dp=shard, pp=on_axis("pp"), cp=on_axis("cp"), replicate=replicate, **experts)


def _ring_latency(g: Group, steps: int, network_steps: int) -> float:
    return g.base_latency_s + (steps - network_steps) * g.intra_latency_s + network_steps * g.inter_latency_s


def all_reduce_s(nbytes: float, n: int, g: Group) -> float:
    """The faster of NCCL's ring and (across nodes) tree all-reduce."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    bandwidth = g.bus_bandwidth_gb_s * 1e9
    ring = _ring_latency(g, 2 * (n - 1), 2 * (g.nodes - 1)) + 2 * (n - 1) / n * nbytes / bandwidth
    if not g.spans_nodes:
        return ring
    tree_latency = g.base_latency_s + 2 * ((n // g.nodes - 1) * g.intra_latency_s
                                           + log2(g.nodes) * g.inter_latency_s)
    tree = tree_latency + 2 * nbytes / (g.tree_bandwidth_efficiency * bandwidth)
    return min(ring, tree)


def all_gather_s(nbytes: float, n: int, g: Group) -> float:
    """``nbytes``: the gathered (unsharded) size; a ring (NCCL's only all-gather and
    reduce-scatter across nodes with several GPUs per node). Reduce-scatter costs the same."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return _ring_latency(g, n - 1, g.nodes - 1) + (n - 1) / n * nbytes / (g.bus_bandwidth_gb_s * 1e9)


reduce_scatter_s = all_gather_s


def all_to_all_s(nbytes: float, n: int, g: Group) -> float:
    """Each rank sends ``nbytes`` split evenly over the ``n`` ranks (its own share stays):
    PyTorch's NCCL all-to-all is concurrent point-to-point transfers (torch/csrc/cuda/nccl.cpp
    ``all2all_single_unequal_split``: ncclGroupStart, one ncclSend and ncclRecv per peer), so the
    peers inside the node take their share over NVLink and the others theirs over the GPU's own
    NIC at the same time -- the slower of the two sets the time, after one step's latency."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    per_node = -(-n // g.nodes)
    inside = (per_node - 1) / n * nbytes / (g.intra_bandwidth_gb_s * 1e9)
    outside = (n - per_node) / n * nbytes / (g.p2p_bandwidth_gb_s * 1e9)
    latency = g.inter_latency_s if g.spans_nodes else g.intra_latency_s
    return g.base_latency_s + latency + max(inside, outside)


def p2p_s(nbytes: float, g: Group) -> float:
    """One pipeline hop: one GPU to the next stage's, over one NVLink or one NIC."""
    if nbytes <= 0:
        return 0.0
    latency = g.inter_latency_s if g.spans_nodes else g.intra_latency_s
    return latency + nbytes / (g.p2p_bandwidth_gb_s * 1e9)


def host_transfer_s(nbytes: float, gpu: GPUSpec, efficiency: float) -> float:
    """Copy between GPU and host memory over PCIe (or C2C)."""
    return nbytes / (gpu.host_link_bandwidth_gb_s * efficiency * 1e9) if nbytes > 0 else 0.0


def bus_bandwidth_gb_s(collective: str, nbytes: float, n: int, g: Group) -> float:
    """What nccl-tests would print as busbw for this collective (its PERFORMANCE.md: algbw x
    2(n-1)/n for all-reduce, x (n-1)/n for all-gather and reduce-scatter) -- for checking the
    model against published nccl-tests figures."""
    seconds = {"all_reduce": all_reduce_s, "all_gather": all_gather_s, "reduce_scatter": reduce_scatter_s}[
        collective](nbytes, n, g)
    factor = 2 * (n - 1) / n if collective == "all_reduce" else (n - 1) / n
    return nbytes / seconds * factor / 1e9
