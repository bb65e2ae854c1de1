import numpy as np
import pytest
import torch

from common.compression import decode, encode, expected_arrays


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(40, 10) * 4


@pytest.mark.parametrize("method", ["float32", "float16", "topk"])
def test_encoded_arrays_match_what_the_server_expects(logits, method):
    encoded = encode(logits, method=method, k=3)
    expected = expected_arrays(method=method, k=3, rows=40, classes=10)
    assert {k: (v.shape, str(v.dtype)) for k, v in encoded.items()} == expected


def test_float_modes_send_log_probabilities(logits):
    logp = torch.log_softmax(logits, dim=1)
    assert torch.allclose(decode(encode(logits, method="float32", k=3), method="float32", classes=10), logp)
    half = decode(encode(logits, method="float16", k=3), method="float16", classes=10)
    assert torch.allclose(half.exp(), logp.exp(), atol=1e-3)


def test_large_logits_lose_nothing_that_matters_in_float16():
    # float16 has a step of 0.5 at 1,000: raw logits of that size would move the
    # probabilities; log-probabilities are precise where the probability mass is.
    logits = torch.tensor([[1000.0, 999.0, 990.0, -5.0]])
    half = decode(encode(logits, method="float16", k=2), method="float16", classes=4).exp()
    assert torch.allclose(half, logits.softmax(1), atol=2e-3)
    top = decode(encode(logits, method="topk", k=2), method="topk", classes=4).exp()
    assert torch.allclose(top[0, :2], logits.softmax(1)[0, :2], atol=2e-3)


def test_topk_round_trip_keeps_topk_probabilities_and_spreads_the_rest(logits):
    """Stated tolerance: top-k probabilities within 1% relative (log-probabilities travel as
    float16, whose relative precision is 2^-11); the rebuilt distribution differs from the
    original by at most the tail mass (+1%) in total variation."""
    k = 3
    rebuilt = decode(encode(logits, method="topk", k=k), method="topk", classes=10).softmax(1)
    original = logits.softmax(1)
    top = original.topk(k, dim=1)
    assert torch.allclose(rebuilt.gather(1, top.indices), top.values, rtol=1e-2, atol=1e-4)
    tail = 1 - top.values.sum(1)
    tv = 0.5 * (rebuilt - original).abs().sum(1)
    assert torch.all(tv <= tail + 1e-2)
    assert torch.allclose(rebuilt.sum(1), torch.ones(40), atol=1e-5)
    assert torch.equal(rebuilt.argmax(1), original.argmax(1))


def test_topk_sends_fewer_bytes(logits):
    size = lambda method: sum(a.nbytes for a in encode(logits, method=method, k=3).values())  # noqa: E731
    assert size("topk") < size("float16") < size("float32")
    assert size("float32") == 40 * 10 * 4 and size("topk") == 40 * 3 * (2 + 2)
    assert np.dtype("uint16").itemsize == 2
