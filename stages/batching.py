"""Which rows go together in a micro-batch of `train.batch_tokens`: shared by train (TokenBins) and plan
(which counts the steps before anything is loaded). Plain numpy, no torch."""

from __future__ import annotations

import numpy as np

from stages.errors import StageError


def token_bins(lengths, budget: int, seed: int, split: str) -> list[list[int]]:
    """Row indices by micro-batch. The rows are shuffled once (seeded) and packed in that order, each
    into the current micro-batch while it fits (sequential greedy: with ~250-token rows and a 16k
    budget a bin is ~98% full)."""
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > budget:
        raise StageError(f"train.batch_tokens={budget} is smaller than the longest {split} row "
                         f"({int(lengths.max())} tokens): raise it to at least tokenize.max_length")
    order = np.random.default_rng(seed).permutation(len(lengths))
    bins, current, used = [], [], 0
    for i in order.tolist():
        if current and used + lengths[i] > budget:
            bins.append(current)
            current, used = [], 0
        current.append(i)
        used += int(lengths[i])
    if current:
        bins.append(current)
    return bins
