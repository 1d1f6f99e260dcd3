import math

import pytest
import torch

import graphopt
from graphopt.analysis.quality import divergence, perplexity, token_windows
from graphopt.errors import GraphoptError


class Uniform(torch.nn.Module):
    """Predicts every one of V tokens with equal probability: perplexity must be exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(ids.shape[0], ids.shape[1], self.vocab)


class Shifted(torch.nn.Module):
    """Logits of a fixed random model plus a constant per position: the same distribution."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, ids):
        return self.base(ids) + 3.0


class Fixed(torch.nn.Module):
    def __init__(self, vocab, seed):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, ids):
        return self.table[ids]


def _windows(vocab=50, count=3, seq=9):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, seq), generator=g) for _ in range(count)]


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    result = perplexity(Uniform(50), _windows(), progress=False)
    assert result.perplexity == pytest.approx(50, rel=1e-12)
    assert result.tokens == 3 * 8 and result.windows == 3


def test_perplexity_matches_a_hand_computed_cross_entropy():
    model = Fixed(50, 1)
    windows = _windows()
    nll = sum(float(torch.nn.functional.cross_entropy(model(w).detach()[0, :-1], w[0, 1:], reduction="sum"))
              for w in windows)
    assert perplexity(model, windows, progress=False).perplexity == pytest.approx(math.exp(nll / 24), rel=1e-6)


def test_divergence_is_zero_for_the_same_distribution_and_positive_otherwise():
    base = Fixed(50, 1)
    same = divergence(base, Shifted(base), _windows(), progress=False)
    assert same.kl == pytest.approx(0, abs=1e-12) and same.js == pytest.approx(0, abs=1e-12)
    assert same.top1_agreement == 1.0
    other = divergence(base, Fixed(50, 2), _windows(), progress=False)
    assert other.kl > 0 and 0 < other.js <= math.log(2) and other.top1_agreement < 1


def test_js_of_disjoint_point_masses_is_ln2():
    class PointMass(torch.nn.Module):
        def __init__(self, token):
            super().__init__()
            self.token = token

        def forward(self, ids):
            logits = torch.full((1, ids.shape[1], 4), -1e4)
            logits[..., self.token] = 0
            return logits

    result = divergence(PointMass(0), PointMass(1), _windows(4, 1, 5), progress=False)
    assert result.js == pytest.approx(math.log(2), rel=1e-6)


def test_compiled_model_scores_like_eager():
    bundle = graphopt.models.load("llama")
    windows = _windows(512, 2, 16)
    cm = graphopt.compile(bundle.model, (windows[0],), backend="onnxruntime", progress=False)
    eager = perplexity(bundle.model, windows, progress=False)
    compiled = perplexity(cm, windows, progress=False)
    assert compiled.perplexity == pytest.approx(eager.perplexity, rel=1e-5)
    assert divergence(bundle.model, cm, windows, progress=False).js < 1e-9


def test_windows_need_enough_text():
    class Chars:
        def __call__(self, text, return_tensors):
            class Out:
                input_ids = torch.tensor([[ord(c) for c in text]])
            return Out()

    assert [w.shape for w in token_windows(Chars(), "abcdefghij", 4)] == [(1, 4), (1, 4)]
    assert len(token_windows(Chars(), "abcdefghij", 4, max_tokens=5)) == 1
    with pytest.raises(GraphoptError, match="fewer than one window of 16"):
        token_windows(Chars(), "abc", 16)
