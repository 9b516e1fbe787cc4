"""Rejection sampling keeps the target's distribution; greedy verification and n-gram lookup."""

from __future__ import annotations

import random

import pytest
import torch
from chi_square import chi_square, critical_value

from disaggserve_worker.speculation.ngram import NgramIndex, NgramProposer
from disaggserve_worker.speculation.rejection import verify_greedy, verify_sampled

VOCAB = 6
DRAWS = 20_000


def _dists(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target p and draft q far apart (q favours what p does not), with zeros on both sides."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(rows, VOCAB, generator=g) ** 3
    q = torch.rand(rows, VOCAB, generator=g) ** 3
    p[:, 0] = 0.0  # target never emits 0: a draft proposing 0 must always be rejected
    q[:, 1] = 0.0  # draft never proposes 1: only the residual can produce it
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def _pair_counts(p: torch.Tensor, q: torch.Tensor | None, k: int, seed: int,
                 propose: str = "sample") -> torch.Tensor:
    """Counts of the first two emitted tokens (V×V) over DRAWS verifications of k proposals.

    Rows of p do not depend on the prefix (synthetic target), so the exact law of the first two
    tokens is p[0] ⊗ p[1]: after an accepted first token the second comes from row 1, after a
    rejection the next step starts over at row 1 as well."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB, VOCAB)
    for _ in range(DRAWS):
        if q is not None:
            proposal = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)]
        else:  # a deterministic proposer: always the same tokens
            proposal = [2, 3, 4][:k]
        out = verify_sampled(p, proposal, q[:k] if q is not None else None, g)
        first = out[0]
        # A step that stopped at a rejection: the target's next token is a fresh draw from row 1.
        second = out[1] if len(out) >= 2 else int(torch.multinomial(p[1], 1, generator=g))
        counts[first, second] += 1
    return counts


def _assert_matches(counts: torch.Tensor, expected_probs: torch.Tensor) -> None:
    expected = (expected_probs * counts.sum()).flatten().tolist()
    stat, df = chi_square(counts.flatten().tolist(), expected)
    assert stat < critical_value(df), f"chi-square {stat:.1f} over {df} df exceeds {critical_value(df):.1f}"


@pytest.mark.parametrize("k", [1, 3])
def test_draft_rejection_sampling_preserves_the_target_distribution(k: int) -> None:
    p, q = _dists(1, k + 1)
    counts = _pair_counts(p, q, k, seed=11)
    _assert_matches(counts, p[0][:, None] * p[1][None, :])


def test_point_mass_proposals_preserve_the_target_distribution() -> None:
    p, _ = _dists(2, 3)
    counts = _pair_counts(p, None, 2, seed=12)
    _assert_matches(counts, p[0][:, None] * p[1][None, :])


def test_the_statistic_rejects_a_sampler_that_accepts_every_draft() -> None:
    """Power check: emitting the draft's tokens unverified (the bug rejection sampling prevents) fails."""
    p, q = _dists(1, 2)
    g = torch.Generator().manual_seed(13)
    counts = torch.zeros(VOCAB)
    for _ in range(DRAWS // 4):
        counts[int(torch.multinomial(q[0], 1, generator=g))] += 1
    stat, df = chi_square(counts.tolist(), (p[0] * counts.sum()).tolist())
    assert stat > 10 * critical_value(df)


def test_identical_distributions_accept_every_proposal() -> None:
    p, _ = _dists(3, 4)
    g = torch.Generator().manual_seed(14)
    accepted = 0
    for _ in range(500):
        proposal = [int(torch.multinomial(p[j], 1, generator=g)) for j in range(3)]
        accepted += len(verify_sampled(p, proposal, p[:3], g)) - 1
    assert accepted == 1500


def test_greedy_verification_takes_the_matching_prefix_then_the_target_token() -> None:
    assert verify_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted + bonus
    assert verify_greedy([5, 9, 7, 8], [5, 6, 7]) == [5, 9]  # mismatch at 2: target's token instead
    assert verify_greedy([4, 6, 7, 8], [5, 6, 7]) == [4]
    assert verify_greedy([3], []) == [3]


@pytest.mark.parametrize(("history", "k", "expected"), [
    ([1, 2, 3, 4, 1, 2], 2, [3, 4]),  # bigram match
    ([1, 2, 3, 9, 2, 3, 7, 2, 3], 3, [7, 2, 3]),  # the most recent match wins
    ([5, 1, 2, 3, 6, 0, 2, 3], 1, [6]),  # longest n first: '2 3' (not '3')
    ([1, 2, 3, 4], 3, []),  # no earlier occurrence
    ([7, 7], 4, [7, 7, 7, 7]),  # a loop continues past the tail (overlapping copy)
    ([1, 5, 6, 9, 5, 6, 9, 5], 5, [6, 9, 5, 6, 9]),  # period-3 loop
    ([1, 2, 1], 0, []),
])
def test_ngram_lookup(history: list[int], k: int, expected: list[int]) -> None:
    assert NgramProposer(1, 3).propose(history, k) == expected


def test_ngram_min_excludes_short_matches() -> None:
    assert NgramProposer(2, 3).propose([4, 5, 9, 5], 2) == []
    assert NgramProposer(1, 3).propose([4, 5, 9, 5], 2) == [9, 5]
    with pytest.raises(ValueError, match="n-gram sizes"):
        NgramProposer(3, 2)


def _searched(history: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """The lookup by search: the latest start of the tail n-gram among those ending before it."""
    for n in range(min(n_max, len(history) - 1), n_min - 1, -1):
        tail = history[-n:]
        starts = [s for s in range(len(history) - n) if history[s:s + n] == tail]
        if starts and k > 0:
            start = starts[-1] + n
            copied = history[start:start + k]
            while len(copied) < k:
                copied.append(copied[len(copied) - (len(history) - start)])
            return copied
    return []


def test_the_incremental_index_finds_what_a_search_finds() -> None:
    """Grown in uneven pieces (a prompt, then accepted runs of 1-5 tokens) over a small vocabulary
    (many matches and loops), every lookup equals a search of the whole history."""
    rng = random.Random(4)
    for n_min, n_max in ((1, 3), (2, 4), (1, 1)):
        prompt = [rng.randrange(6) for _ in range(rng.randrange(1, 30))]
        tokens: list[int] = []
        index = NgramIndex(n_min, n_max)
        for _ in range(60):
            index.sync(prompt, tokens)
            assert len(index) == len(prompt) + len(tokens)
            history = prompt + tokens
            assert index.history == history
            for k in (1, 4):
                assert index.propose(k) == _searched(history, k, n_min, n_max), (history, k)
            tokens += [rng.randrange(6) for _ in range(rng.randrange(1, 6))]


def test_a_match_across_token_boundaries_is_not_a_match() -> None:
    """The history is searched as packed 4-byte tokens: a byte pattern of the tail that straddles
    two tokens later in the history must be skipped for the aligned occurrence before it."""
    tail = 0x01020304
    # 0x03040000 and 0x00000102 pack (little-endian) to 00 00 04 03 | 02 01 00 00, which holds the
    # tail's bytes 04 03 02 01 across their boundary, after the real occurrence at index 1.
    history = [7, tail, 9, 0x03040000, 0x00000102, 5, tail]
    index = NgramIndex(1, 1)
    index.extend(history)
    assert index.propose(2) == [9, 0x03040000] and index.matched == 1
    assert index.propose(2) == _searched(history, 2, 1, 1)
    only_straddling = [0x03040000, 0x00000102, 5, tail]
    assert NgramProposer(1, 1).propose(only_straddling, 2) == []


def test_indexes_grown_in_any_pieces_agree() -> None:
    """A prompt at once, token by token, or in uneven runs: the same history, the same lookups."""
    rng = random.Random(5)
    history = [rng.randrange(8) for _ in range(300)]
    whole, single, runs = NgramIndex(1, 3), NgramIndex(1, 3), NgramIndex(1, 3)
    whole.extend(history)
    for token in history:
        single.extend([token])
    at = 0
    while at < len(history):
        step = rng.randrange(0, 12)
        runs.extend(history[at:at + step])
        at += step
    for index in (single, runs):
        assert index.history == whole.history == history
        assert index.propose(4) == whole.propose(4) == _searched(history, 4, 1, 3)


def test_the_index_says_which_n_gram_length_matched() -> None:
    index = NgramIndex(1, 3)
    index.extend([5, 6, 7, 9, 6, 7])  # the last three tokens never appeared together before
    assert index.propose(2) == [9, 6] and index.matched == 2
    index.extend([8])
    assert index.propose(2) == [] and index.matched == 0
    index.extend([5, 6, 7])
    assert index.propose(1) == [9] and index.matched == 3
