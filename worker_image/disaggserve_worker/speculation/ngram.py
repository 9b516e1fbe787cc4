"""Prompt-lookup proposals: copy what followed the latest earlier occurrence of the last n tokens.

Free to compute (no model), and strong exactly where speculation pays most: outputs that
repeat spans of the prompt or of themselves (summaries, code edits, RAG answers).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, n_min: int, n_max: int):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram sizes need 1 <= min ({n_min}) <= max ({n_max})")
        self.n_min, self.n_max = n_min, n_max

    def propose(self, history: list[int], k: int) -> list[int]:
        """Up to k tokens; longer n-grams first (more specific), the most recent match wins
        (recent context predicts the continuation better, and loops repeat the latest lap)."""
        if k <= 0 or len(history) < self.n_min + 1:
            return []
        arr = np.asarray(history, dtype=np.int64)
        for n in range(min(self.n_max, len(arr) - 1), self.n_min - 1, -1):
            windows = sliding_window_view(arr[:-1], n)  # every start whose n-gram ends before the tail
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                copied = arr[start:start + k].tolist()
                # Overlapping copy (as in LZ77): a match one loop-period back runs into the tail,
                # and the loop goes on with the tokens just proposed — a period-P loop still
                # yields k proposals, not P.
                while len(copied) < k:
                    copied.append(copied[len(copied) - (len(arr) - start)])
                return copied
        return []
