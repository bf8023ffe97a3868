"""The AVX2 level's layout choice (cpugen/runtime/layout.py): timed once per host on the real
kernels, cached, and followed by the eager backend; the knob's other values skip the timing."""

from __future__ import annotations

import json
import types

import pytest
import torch

from cpugen import knobs
from cpugen.host.cpu import cpu_info
from cpugen.model.config import from_name
from cpugen.model.transformer import Linear
from cpugen.model.weights import random_model
from cpugen.runtime import distributed, eager, layout, native, stack

pytestmark = pytest.mark.skipif(not cpu_info()["avx2"], reason="the AVX2 level's kernels need AVX2 and FMA")


@pytest.fixture
def avx2(monkeypatch, tmp_path):
    """CPUGEN_ISA=avx2 (every x86 CPU with AVX2 runs it), layout.json in a fresh place, and every
    call of layout.measure counted."""
    monkeypatch.setenv("CPUGEN_ISA", "avx2")
    knobs.reload()
    layout.forget()
    monkeypatch.setattr(layout, "cache_file", lambda: tmp_path / "layout.json")
    calls = []
    real = layout.measure

    def counted(ext, nbytes=None, rounds=layout.ROUNDS):
        calls.append(nbytes)
        return real(ext, 16 << 20, 1)  # the real kernels, on a smaller set: this is about behaviour

    monkeypatch.setattr(layout, "measure", counted)
    ext = native.extension("avx2")
    assert ext is not None
    return types.SimpleNamespace(ext=ext, calls=calls, file=tmp_path / "layout.json")


def _figures(gemv: tuple[float, float], packed: tuple[float, float]) -> dict:
    return {"bytes": 1 << 28, "rounds": 5, "gemv_gbps": dict(zip(("1", "4"), gemv)),
            "packed_gbps": dict(zip(("1", "4"), packed))}


def test_the_choice_is_timed_once_per_host_then_read_from_the_cache(avx2):
    c = layout.choose(avx2.ext)
    assert c["source"] == "measured" and len(avx2.calls) == 1
    for kind in ("gemv_gbps", "packed_gbps"):
        assert set(c[kind]) == {"1", "4"} and all(v > 0 for v in c[kind].values())
    assert c["packed"] == layout.packs_at_load(c)
    saved = json.loads(avx2.file.read_text())
    assert list(saved) == [f"avx2|{layout.roofline.host_key(torch.get_num_threads())}"]
    layout.forget()  # a new process: the file, not this one's memory
    again = layout.choose(avx2.ext)
    assert again["source"] == "cached" and len(avx2.calls) == 1
    assert {k: again[k] for k in ("gemv_gbps", "packed_gbps")} == {k: c[k] for k in ("gemv_gbps", "packed_gbps")}
    assert layout.current() == again


@pytest.mark.parametrize("faster", ["packed", "gemv at one row", "gemv at four rows"])
def test_the_backend_follows_the_figures(avx2, faster):
    """Packed at load only where the packed kernel was at least as fast at both row counts; else
    plain weights under the gemv, packed for decode batches above AVX2_PACK_ABOVE as before."""
    figures = {"packed": _figures((30, 20), (45, 40)), "gemv at one row": _figures((45, 20), (40, 40)),
               "gemv at four rows": _figures((30, 45), (45, 40))}[faster]
    avx2.file.write_text(json.dumps({layout._key(torch.get_num_threads()): figures}))
    model = random_model(from_name("gptj-1b").with_layers(1), torch.bfloat16, 0)  # heads the decode stack takes
    assert eager.install(model) and not avx2.calls
    linears = [m for m in model.modules() if type(m) is Linear and m.weight is not model.wte.weight]  # not a tied lm_head
    if faster == "packed":
        assert eager.decode_matmul(model, "eager", 1) == "cpugen-packed"
        assert all(m.panels is not None and m.weight is None for m in linears)
        assert model.decode_stack_rows == stack.ANY_BATCH
    else:
        assert eager.decode_matmul(model, "eager", 1) == "cpugen-gemv-avx2"
        assert all(m.panels is None and m.weight is not None for m in linears)
        eager.for_batch(model, "eager", torch.bfloat16, eager.AVX2_PACK_ABOVE + 1)
        assert eager.decode_matmul(model, "eager", eager.AVX2_PACK_ABOVE + 1) == "cpugen-packed"
    assert layout.current()["packed"] == (faster == "packed") and layout.current()["source"] == "cached"


@pytest.mark.parametrize("value", ["plain", "packed"])
def test_the_knob_decides_without_timing(avx2, monkeypatch, value):
    monkeypatch.setenv("CPUGEN_LAYOUT", value)
    knobs.reload()
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    eager.choose_layout()
    assert eager.install(model) and not avx2.calls and layout.current() is None
    assert eager.decode_matmul(model, "eager", 1) == ("cpugen-packed" if value == "packed" else "cpugen-gemv-avx2")


def test_every_tensor_parallel_rank_takes_rank_0s_choice(avx2, monkeypatch):
    """A rank other than 0 times nothing: it takes what rank 0 broadcasts (distributed.same), so
    that no rank runs another layout."""
    sent = {**_figures((30, 20), (45, 40)), "packed": True, "source": "measured"}
    seen = []
    monkeypatch.setattr(distributed, "same", lambda g, obj: seen.append(obj) or sent)
    eager.choose_layout(types.SimpleNamespace(rank=1))
    assert seen == [None] and not avx2.calls and layout.current() == sent
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    assert eager.install(model) and eager.decode_matmul(model, "eager", 1) == "cpugen-packed" and not avx2.calls


def test_a_budget_without_room_for_the_timing_keeps_the_plain_layout_untimed(avx2):
    """The timing's buffers (plain and packed) must fit the plan's room before the model loads;
    where they would not, nothing is allocated for it: the gemv's plain layout, and the record says
    why."""
    c = layout.choose(avx2.ext, room_bytes=layout.probe_bytes())  # room for one form, not both
    assert not avx2.calls and not c["packed"] and c["source"].startswith("not timed") and "budget" in c["source"]
    assert not avx2.file.exists()  # nothing cached: a later run with room times it
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    assert eager.install(model) and eager.decode_matmul(model, "eager", 1) == "cpugen-gemv-avx2"
