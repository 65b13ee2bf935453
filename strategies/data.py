"""Training data: a deterministic function of the global sample index.

Sample i is the same tokens whatever the layout, so DDP on 4 ranks, a 2-stage pipeline and a
single process all see the same global batch and must reach the same loss. Synthetic samples
are arithmetic progressions modulo the vocabulary with a per-sample start and stride (learnable
from context, so the loss falls); a token file (``--data tokens.bin``: uint16 or int32 tokens,
by extension ``.u16``/``.bin`` or ``.i32``) is read as consecutive windows instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from planner.errors import ConfigFileError


class SyntheticTokens:
    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def sample(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start, stride = torch.randint(0, self.vocab_size, (2,), generator=g).tolist()
        return (start + (stride | 1) * torch.arange(self.seq_len + 1)) % self.vocab_size


class TokenFile:
    def __init__(self, path: str, vocab_size: int, seq_len: int):
        import numpy as np

        file = Path(path)
        if not file.is_file():
            raise ConfigFileError(f"token file {path} does not exist")
        dtype = np.int32 if file.suffix == ".i32" else np.uint16
        self.tokens = np.memmap(file, dtype=dtype, mode="r")
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.windows = (len(self.tokens) - 1) // seq_len
        if self.windows < 1:
            raise ConfigFileError(f"token file {path} holds fewer than {seq_len + 1} tokens")

    def sample(self, index: int) -> torch.Tensor:
        start = (index % self.windows) * self.seq_len
        window = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype("int64"))
        return window.clamp_(max=self.vocab_size - 1)


def batch(source, first_index: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of samples first_index .. first_index + size - 1 (real
    tensors, also when a simulated rank runs under FakeTensorMode)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        samples = torch.stack([source.sample(first_index + i) for i in range(size)])
        return samples[:, :-1].contiguous().to(device), samples[:, 1:].contiguous().to(device)
