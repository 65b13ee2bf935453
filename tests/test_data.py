"""Training data is a function of the global sample index, whatever the layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planner.errors import ConfigFileError
from strategies.data import SyntheticTokens, TokenFile, batch


def test_synthetic_samples_depend_only_on_their_index():
    source = SyntheticTokens(vocab_size=512, seq_len=16, seed=3)
    assert torch.equal(source.sample(7), SyntheticTokens(512, 16, 3).sample(7))
    assert not torch.equal(source.sample(7), source.sample(8))
    inputs, targets = batch(source, 6, 2, "cpu")
    assert torch.equal(inputs[1], source.sample(7)[:-1]) and torch.equal(targets[1], source.sample(7)[1:])
    assert inputs.is_contiguous() and int(inputs.max()) < 512


def test_token_file_windows(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    source = TokenFile(str(path), vocab_size=50, seq_len=10)
    assert source.sample(1).tolist() == [min(t, 49) for t in range(10, 21)]
    assert source.windows == 9
    with pytest.raises(ConfigFileError, match="does not exist"):
        TokenFile(str(tmp_path / "missing.bin"), 50, 10)
    with pytest.raises(ConfigFileError, match="fewer than"):
        TokenFile(str(path), 50, 200)
