"""The roofline: the cache round trip and the decode roofline formula by hand."""

import torch

from cpugen import flops, roofline
from cpugen.config import from_name
from cpugen.runner import decode_roofline_s


def test_measure_gives_plausible_limits_and_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(roofline, "CACHE", tmp_path / "roofline.json")
    monkeypatch.setattr(roofline, "measure_bandwidth", lambda repeats=7, nbytes=0: (31.0, 30.0, 32.0))
    r = roofline.get(torch.get_num_threads())
    assert r.read_gbps == 31.0 and r.read_spread == (30.0, 32.0) and r.bf16_tflops > 0.01
    again = roofline.load_cached(torch.get_num_threads())
    assert again == r  # from the file, not measured again
    assert roofline.load_cached(torch.get_num_threads() + 1) is None  # another thread count


def test_bandwidth_measurement_reads_memory():
    med, lo, hi = roofline.measure_bandwidth(repeats=3, nbytes=256 << 20)
    assert 1 < lo <= med <= hi < 1000  # GB/s: a real measurement on any machine


def test_decode_roofline_by_hand():
    cfg = from_name("gptj-1b")
    r = roofline.Roofline(read_gbps=30.0, bf16_tflops=0.4, threads=2, cpu="x", torch_version="t")
    B, P, G = 16, 128, 3
    w = flops.streamed_params(cfg) * 2
    want = []
    for c in (P + 1, P + 2):  # the two decode steps of a 3-token generation
        kv = 2 * cfg.n_layer * B * cfg.n_kv_head * c * cfg.head_dim * 2
        want.append(max((w + kv) / 30e9, B * flops.token_flops(cfg, c) / 0.4e12))
    assert decode_roofline_s(cfg, r, B, P, G, 2) == sum(want) / 2
