"""The n-gram teacher (model/teacher.py): its distributions against the formula counted by hand."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from llmforge.model.teacher import NgramTeacher


def corpus(vocab: int, n: int = 600, seed: int = 0) -> np.ndarray:
    """Random tokens with repeated phrases, so that n-grams occur once, twice and often."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, vocab, size=rng.integers(2, 6)) for _ in range(8)]
    out: list[int] = []
    while len(out) < n:
        out.extend(phrases[rng.integers(0, 8)] if rng.random() < 0.6 else rng.integers(0, vocab, size=3))
    return np.asarray(out[:n], dtype=np.uint16)


def by_hand(tokens: list[int], vocab: int, order: int, context: list[int]) -> list[float]:
    """Interpolated absolute discounting over a Kneser-Ney continuation unigram, written out."""
    counts = {n: Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)) for n in range(2, order + 1)}
    before = [len({g[0] for g in counts[2] if g[1] == w}) + 0.5 for w in range(vocab)]
    p = [c / sum(before) for c in before]
    for n in range(2, order + 1):
        if len(context) < n - 1:
            break
        seen = {g[-1]: c for g, c in counts[n].items() if list(g[:-1]) == context[len(context) - n + 1:]}
        if not seen:
            continue
        n1 = sum(c == 1 for c in counts[n].values())
        n2 = sum(c == 2 for c in counts[n].values())
        d = min(max(n1 / (n1 + 2 * n2), 0.05), 0.95)
        total = sum(seen.values())
        p = [max(seen.get(w, 0) - d, 0) / total + d * len(seen) / total * p[w] for w in range(vocab)]
    return p


@pytest.mark.parametrize("dense", [True, False], ids=["dense-bigrams", "sparse-bigrams"])
@pytest.mark.parametrize("order", [2, 3, 4])
def test_every_position_gets_the_interpolated_distribution_of_its_window(order: int, dense: bool) -> None:
    vocab = 9
    tokens = corpus(vocab)
    teacher = NgramTeacher.from_tokens(tokens, vocab, order, dense_limit=1 << 20 if dense else 0)
    assert (teacher.dense is not None) == dense
    idx = torch.from_numpy(np.stack([tokens[:12], tokens[200:212], corpus(vocab, 12, seed=5)]).astype(np.int64))
    probs = teacher.probs(idx)
    assert probs.shape == (3, 12, vocab)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 12))
    listed = tokens.tolist()
    for b in range(3):
        for t in range(12):  # a position sees only its own window: the first sees one token
            want = by_hand(listed, vocab, order, idx[b, :t + 1].tolist())
            torch.testing.assert_close(probs[b, t], torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_a_longer_context_resolves_what_a_shorter_one_cannot() -> None:
    # after "0 1" comes 2 or 3 half of the time each; after "2 0 1" always 3, after "3 0 1" always 2
    tokens = np.tile(np.array([0, 1, 2, 0, 1, 3], dtype=np.uint16), 200)
    held = torch.from_numpy(tokens[:61].astype(np.int64)).view(1, -1)
    nll = {}
    for order in (2, 3, 4):
        p = NgramTeacher.from_tokens(tokens, 4, order).probs(held[:, :-1])[:, 3:]  # positions with 3 tokens before
        nll[order] = -p.gather(2, held[:, 4:, None]).log().mean().item()
    assert nll[4] < 0.05 and min(nll[2], nll[3]) > 0.2  # ln 2 on a third of the positions: 0.23


def test_an_order_outside_two_to_four_is_refused_in_one_line() -> None:
    from llmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="order 2, 3 or 4"):
        NgramTeacher.from_tokens(corpus(9), 9, 5)
