"""Sampling against its definition: top-k, top-p, temperature, and the seed."""

import pytest
import torch

from cpugen.model.config import from_name
from cpugen.runtime.engine import generate
from cpugen.runtime.sampling import Sampling, sample
from cpugen.model.weights import random_model


def _draws(logits, s, n=4000):
    gen = s.generator()
    return torch.stack([sample(logits, s, gen) for _ in range(n)])  # (n, B)


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, Sampling(), None), logits.argmax(-1))
    d = _draws(logits, Sampling(temperature=1.0, top_k=1), 50)
    assert (d == logits.argmax(-1)).all()


def test_frequencies_follow_softmax_at_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = Sampling(temperature=0.7, seed=3)
    freq = torch.bincount(_draws(logits, s)[:, 0], minlength=4).float() / 4000
    want = (logits[0] / 0.7).softmax(-1)
    assert torch.allclose(freq, want, atol=0.03), (freq, want)


def test_top_k_and_top_p_never_leave_their_set():
    logits = torch.tensor([[3.0, 2.5, 1.0, 0.5, 0.0, -2.0]])
    k = _draws(logits, Sampling(temperature=1.0, top_k=2, seed=1), 1000)
    assert set(k.unique().tolist()) == {0, 1}
    p = logits.softmax(-1)[0]  # probs 0.53, 0.32, 0.07, ...: top-p 0.8 keeps {0, 1}, 0.9 adds 2
    assert set(_draws(logits, Sampling(temperature=1.0, top_p=0.8, seed=1), 1000).unique().tolist()) == {0, 1}
    assert p[:2].sum() < 0.9 < p[:3].sum()
    assert set(_draws(logits, Sampling(temperature=1.0, top_p=0.9, seed=1), 1000).unique().tolist()) == {0, 1, 2}


def test_same_seed_same_tokens():
    m = random_model(from_name("tiny-gptj"), torch.float32, 0)
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=11)
    a = generate(m, [[1, 2, 3], [4]], 12, s, torch.float32, ignore_eos=True)
    b = generate(m, [[1, 2, 3], [4]], 12, s, torch.float32, ignore_eos=True)
    c = generate(m, [[1, 2, 3], [4]], 12, Sampling(temperature=1.0, seed=12), torch.float32, ignore_eos=True)
    assert a == b and a != c


def test_eos_and_stop_tokens_end_a_sequence():
    m = random_model(from_name("tiny-gptj"), torch.float32, 0)
    free = generate(m, [[1, 2, 3], [9, 8]], 10, Sampling(), torch.float32, ignore_eos=True)
    stop = free[0][3]  # stop the first sequence at its 4th token
    out = generate(m, [[1, 2, 3], [9, 8]], 10, Sampling(), torch.float32, stop_ids=[stop])
    assert out[0] == free[0][:free[0].index(stop) + 1]
    assert out[1] == free[1][:free[1].index(stop) + 1] if stop in free[1] else out[1] == free[1]
    ignored = generate(m, [[1, 2, 3], [9, 8]], 10, Sampling(), torch.float32, stop_ids=[stop], ignore_eos=True)
    assert ignored == free


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=1.5)])
def test_bad_sampling_settings_are_errors(bad):
    from cpugen.errors import CpugenError
    with pytest.raises(CpugenError):
        Sampling(**bad)
