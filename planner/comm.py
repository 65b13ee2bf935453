"""Communication time: ring collectives and point-to-point transfers.

Ring algorithms (Patarasuk & Yuan 2009; NCCL's default for large messages): with n ranks and
an M-byte buffer, all-reduce moves 2(n-1)/n x M bytes through each rank's link, all-gather
and reduce-scatter (n-1)/n x M (M the unsharded size), in 2(n-1) and (n-1) latency steps.
Time = steps x latency + volume / (link bandwidth x efficiency), the efficiency being what
NCCL's bus bandwidth reaches of the link (calibrated).

Ranks are placed tensor-parallel fastest, then data-parallel, then pipeline (Megatron-LM's
default order), so a group stays inside a node when it fits: tp when tp <= GPUs per node, dp
when tp x dp <= GPUs per node. A group that spans nodes runs at each GPU's network bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.configs import GPUSpec, TrainConfig


@dataclass(frozen=True)
class CommConstants:
    intra_node_efficiency: float
    inter_node_efficiency: float
    intra_node_latency_s: float
    inter_node_latency_s: float


@dataclass(frozen=True)
class Link:
    bandwidth_gb_s: float
    latency_s: float
    spans_nodes: bool


def _link(gpu: GPUSpec, spans_nodes: bool, constants: CommConstants) -> Link:
    if spans_nodes:
        return Link(gpu.inter_node_bandwidth_gb_s * constants.inter_node_efficiency, constants.inter_node_latency_s, True)
    return Link(gpu.intra_node_bandwidth_gb_s * constants.intra_node_efficiency, constants.intra_node_latency_s, False)


@dataclass(frozen=True)
class Placement:
    """Which link each process group's collectives run over."""

    tp: Link
    dp: Link
    pp: Link


def placement(gpu: GPUSpec, train: TrainConfig, gpus_per_node: int, constants: CommConstants) -> Placement:
    per_node = min(gpus_per_node, train.gpus)
    return Placement(
        tp=_link(gpu, train.tp > per_node, constants),
        dp=_link(gpu, train.tp * train.dp > per_node, constants),
        pp=_link(gpu, train.tp * train.dp * train.pp > per_node and train.pp > 1, constants),
    )


def all_reduce_s(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * nbytes / (link.bandwidth_gb_s * 1e9)


def all_gather_s(nbytes: float, n: int, link: Link) -> float:
    """``nbytes``: the gathered (unsharded) size. Reduce-scatter costs the same."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * link.latency_s + (n - 1) / n * nbytes / (link.bandwidth_gb_s * 1e9)


reduce_scatter_s = all_gather_s


def p2p_s(nbytes: float, link: Link) -> float:
    if nbytes <= 0:
        return 0.0
    return link.latency_s + nbytes / (link.bandwidth_gb_s * 1e9)


def host_transfer_s(nbytes: float, gpu: GPUSpec, efficiency: float) -> float:
    """Copy between GPU and host memory over PCIe (or C2C)."""
    return nbytes / (gpu.host_link_bandwidth_gb_s * efficiency * 1e9) if nbytes > 0 else 0.0
