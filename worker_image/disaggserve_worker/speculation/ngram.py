"""Prompt-lookup proposals: copy what followed the latest earlier occurrence of the last n tokens.

Free to compute (no model), and strong exactly where speculation pays most: outputs that
repeat spans of the prompt or of themselves (summaries, code edits, RAG answers).

Incremental (`NgramIndex`, one per request): a history only grows, so each n-gram's latest
start is kept in a dict as tokens arrive and a lookup is one dict probe per n. Why: searching
the whole history with numpy at every step cost ~0.1 ms per request, a tenth of a one-request
decode step of the CPU engine, paid on every step the controller asked for proposals.
"""

from __future__ import annotations

from collections.abc import Sequence

BULK_TOKENS = 8  # more new tokens than this are indexed in one pass (`NgramIndex.extend`)


class NgramIndex:
    """The latest start of every n-gram (n_min..n_max) of one growing history."""

    def __init__(self, n_min: int, n_max: int):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram sizes need 1 <= min ({n_min}) <= max ({n_max})")
        self.n_min, self.n_max = n_min, n_max
        self.history: list[int] = []
        self.matched = 0  # the n-gram length behind the last proposal (0: none): how far to trust it
        # latest[n][gram] = the largest start s of `gram` among the n-grams that end before the
        # history's last token (a match must leave at least one token to copy).
        self._latest: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(n_min, n_max + 1)}

    def extend(self, tokens: Sequence[int]) -> None:
        history = self.history
        if len(tokens) > BULK_TOKENS:
            # A prompt at once: each n's grams as one zip of shifted slices into the dict (later
            # starts overwrite earlier ones, as token by token). Why: the speculator indexes every
            # request it looks up, and at a batch of 30 on non-repetitive text those builds, token
            # by token, were ~250 us of every engine step (~2 % of the engine's CPU, speculating
            # or not); this way a 400-token prompt takes ~150 us instead of ~420.
            old = len(history)
            history.extend(tokens)
            last = len(history) - 1  # the n-grams end before the history's last token
            for n, latest in self._latest.items():
                lo, hi = max(0, old - n), last - n + 1  # the starts not indexed yet
                if hi > lo:
                    grams = zip(*(history[lo + j:hi + j] for j in range(n)), strict=True)
                    latest.update(zip(grams, range(lo, hi), strict=True))
            return
        for token in tokens:
            history.append(token)
            end = len(history) - 1  # the n-grams ending just before the new last token
            for n, latest in self._latest.items():
                if end >= n:
                    latest[tuple(history[end - n:end])] = end - n

    def sync(self, *parts: Sequence[int]) -> None:
        """Catch up with a history given as consecutive parts (prompt, generated tokens), of
        which this index has seen a prefix."""
        seen = len(self.history)
        if len(parts) == 2 and seen >= len(parts[0]):  # the usual case: only generated tokens are new
            prompt, tokens = parts
            if seen < len(prompt) + len(tokens):
                self.extend(tokens[seen - len(prompt):])
            return
        for part in parts:
            if seen < len(part):
                self.extend(part[seen:])
            seen = max(0, seen - len(part))

    def propose(self, k: int) -> list[int]:
        """Up to k tokens; longer n-grams first (more specific), the most recent match wins
        (recent context predicts the continuation better, and loops repeat the latest lap)."""
        history = self.history
        self.matched = 0
        if k <= 0 or len(history) < self.n_min + 1:
            return []
        # Every longer match ends in a match of the shortest n-gram: without one there is none, and
        # on text that does not repeat that one probe is all a lookup costs (not n_max of them).
        if tuple(history[-self.n_min:]) not in self._latest[self.n_min]:
            return []
        for n in range(min(self.n_max, len(history) - 1), self.n_min - 1, -1):
            start = self._latest[n].get(tuple(history[-n:]))
            if start is not None:
                self.matched = n
                start += n
                copied = history[start:start + k]
                # Overlapping copy (as in LZ77): a match one loop-period back runs into the tail,
                # and the loop goes on with the tokens just proposed — a period-P loop still
                # yields k proposals, not P.
                while len(copied) < k:
                    copied.append(copied[len(copied) - (len(history) - start)])
                return copied
        return []


class NgramProposer:
    """Stateless lookups over a whole history (benches and tests; the speculator keeps an
    `NgramIndex` per request)."""

    def __init__(self, n_min: int, n_max: int):
        NgramIndex(n_min, n_max)  # validates the sizes
        self.n_min, self.n_max = n_min, n_max

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        index = NgramIndex(self.n_min, self.n_max)
        index.extend(history)
        return index.propose(k)
