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

from planner.errors import ConfigFileError, shown


class SyntheticTokens:
    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def sample(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start, stride = torch.randint(0, self.vocab_size, (2,), generator=g).tolist()
        return (start + (stride | 1) * torch.arange(self.seq_len + 1)) % self.vocab_size


TOKEN_DTYPES = {".bin": "uint16", ".u16": "uint16", ".i32": "int32"}
"""Token file extensions and their element types (nanoGPT's ``.bin`` files are uint16)."""


def check_token_file(path: str, vocab_size: int, seq_len: int, scan: bool = True):
    """The file's tokens as a read-only array, or one ConfigFileError line saying why not: an
    unknown extension, not a regular file, empty, a size that is not a whole number of tokens,
    fewer than one window of ``seq_len + 1`` tokens, or (``scan``) an id outside the
    vocabulary. The launcher checks before any rank starts; each rank re-checks without the
    full scan."""
    import numpy as np

    from planner.inputs import regular_file

    file = Path(path)
    dtype = TOKEN_DTYPES.get(file.suffix)
    if dtype is None:
        raise ConfigFileError(f"token file {shown(path)}: unsupported extension {shown(file.suffix)}; use "
                              f"{', '.join(TOKEN_DTYPES)} (uint16, or int32 for .i32)")
    try:
        regular_file(file, "token file")
    except ConfigFileError as exc:
        if "trainplan reads at most" not in str(exc):  # token files may be large
            raise
    size, itemsize = file.stat().st_size, np.dtype(dtype).itemsize
    if size == 0:
        raise ConfigFileError(f"token file {shown(path)} is empty")
    if size % itemsize:
        raise ConfigFileError(f"token file {shown(path)} has {size} bytes, not a whole number of {dtype} tokens")
    tokens = np.memmap(file, dtype=dtype, mode="r")
    if len(tokens) < seq_len + 1:
        raise ConfigFileError(f"token file {shown(path)} holds {len(tokens)} tokens, fewer than one window of "
                              f"seq len + 1 = {seq_len + 1}")
    if scan:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            raise ConfigFileError(f"token file {shown(path)} holds token id {bad}, outside the model's vocabulary "
                                  f"of {vocab_size}")
    return tokens


class TokenFile:
    def __init__(self, path: str, vocab_size: int, seq_len: int):
        self.tokens = check_token_file(path, vocab_size, seq_len, scan=False)
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.windows = (len(self.tokens) - 1) // seq_len

    def sample(self, index: int) -> torch.Tensor:
        start = (index % self.windows) * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype("int64"))


def batch(source, first_index: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of samples first_index .. first_index + size - 1 (real
    tensors, also when a simulated rank runs under FakeTensorMode)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        samples = torch.stack([source.sample(first_index + i) for i in range(size)])
        return samples[:, :-1].contiguous().to(device), samples[:, 1:].contiguous().to(device)
