"""Kernels the strategy layer runs: fused RMSNorm, attention (SDPA / eager), INT8 linears,
fused and offloaded optimizers."""
