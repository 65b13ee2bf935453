"""Real execution of trainplan layouts on PyTorch's own engines (DDP, ZeroRedundancyOptimizer,
FSDP2, DTensor tensor/sequence parallelism, torch.distributed.pipelining), with INT8 and fused
kernels. ``parallelize`` applies them in one fixed order; ``strategies.launch`` runs the ranks."""
