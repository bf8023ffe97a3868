"""The AVX2 level's layout choice (cpugen/runtime/layout.py): timed once per host on the real
kernels, cached, and followed by the eager backend; the knob's other values skip the timing."""

from __future__ import annotations

import json
import types

import pytest
import torch

from cpugen import knobs
from cpugen.host import cachefile
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

    def counted(ext, count=None, rounds=layout.ROUNDS):
        calls.append(count)
        return real(ext, 2, 1)  # the real kernels, on two matrices once: this is about behaviour

    monkeypatch.setattr(layout, "measure", counted)
    ext = native.extension("avx2")
    assert ext is not None
    return types.SimpleNamespace(ext=ext, calls=calls, file=tmp_path / "layout.json")


ROWS = ("1", "2", "4")


def _figures(gemv: tuple[float, ...], packed: tuple[float, ...]) -> dict:
    return {"bytes": 1 << 28, "rounds": 5, "gemv_gbps": dict(zip(ROWS, gemv)),
            "packed_gbps": dict(zip(ROWS, packed))}


def test_the_choice_is_timed_once_per_host_then_read_from_the_cache(avx2):
    c = layout.choose(avx2.ext)
    assert c["source"] == "measured" and len(avx2.calls) == 1
    for kind in ("gemv_gbps", "packed_gbps"):
        assert set(c[kind]) == set(ROWS) and all(v > 0 for v in c[kind].values())
    assert c["packed"] == all(c["packed_gbps"][r] >= c["gemv_gbps"][r] for r in ROWS) == (c["pack_above"] == 0)
    saved = json.loads(avx2.file.read_text())
    host = cachefile.host_key(torch.get_num_threads())
    assert list(saved) == [f"avx2|{host}|build={native.build_key('avx2')}"]  # new kernels are timed again
    assert layout.choose(avx2.ext) is layout.choose(avx2.ext) and len(avx2.calls) == 1  # this process's, kept
    layout.forget()  # a new process: the file, not this one's memory
    again = layout.choose(avx2.ext)
    assert again["source"] == "cached" and len(avx2.calls) == 1
    assert {k: again[k] for k in ("gemv_gbps", "packed_gbps")} == {k: c[k] for k in ("gemv_gbps", "packed_gbps")}


def test_a_damaged_cache_entry_is_timed_again(avx2):
    avx2.file.write_text(json.dumps({layout.key(avx2.ext): {"gemv_gbps": {"1": 40.0}, "packed_gbps": {"1": 50.0}}}))
    c = layout.choose(avx2.ext)
    assert c["source"] == "measured" and len(avx2.calls) == 1 and set(c["gemv_gbps"]) == set(ROWS)


def test_a_timing_that_fails_keeps_the_plain_layout(avx2, monkeypatch):
    """No memory for the timing's buffers: the gemv's plain layout, the reason in one line, no
    traceback, nothing cached."""
    def no_memory(ext, count=None, rounds=layout.ROUNDS):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 33554432 bytes.\nmore")

    monkeypatch.setattr(layout, "measure", no_memory)
    said = []
    c = layout.choose(avx2.ext, log=said.append)
    assert c == {"packed": False, "pack_above": layout.PACK_ABOVE,
                 "source": "not timed: DefaultCPUAllocator: not enough memory: you tried to allocate 33554432 bytes."}
    assert len(said) == 2 and "\n" not in said[1] and not avx2.file.exists()


# figures at 1, 2 and 4 rows (gemv, packed), and the largest batch they keep on the plain weights
FIGURES = {"packed everywhere": (_figures((30, 25, 20), (45, 42, 40)), 0),
           "gemv at one row": (_figures((45, 25, 20), (40, 42, 40)), 1),
           "gemv up to two rows": (_figures((45, 45, 20), (40, 42, 40)), 2),
           "gemv at four rows": (_figures((45, 25, 45), (40, 42, 40)), layout.PACK_ABOVE)}


@pytest.mark.parametrize("case", FIGURES)
def test_the_backend_follows_the_figures(avx2, case):
    """Packed at load only where the packed kernel was at least as fast at every row count timed;
    else plain weights under the gemv up to the largest row count where it was faster (where the
    packed kernel led at 4 rows; else up to PACK_ABOVE), and a larger decode batch packs them."""
    figures, keep = FIGURES[case]
    avx2.file.write_text(json.dumps({layout.key(avx2.ext): figures}))
    model = random_model(from_name("gptj-1b").with_layers(1), torch.bfloat16, 0)  # heads the decode stack takes
    assert eager.install(model) and not avx2.calls
    linears = [m for m in model.modules() if type(m) is Linear and m.weight is not model.wte.weight]  # not a tied lm_head
    if keep == 0:
        assert eager.decode_matmul(model, "eager", 1) == "cpugen-packed"
        assert all(m.panels is not None and m.weight is None for m in linears)
        assert model.decode_stack_rows == stack.ANY_BATCH
    else:
        assert eager.decode_matmul(model, "eager", 1) == "cpugen-gemv-avx2"
        assert all(m.panels is None and m.weight is not None for m in linears)
        loaded = [m.weight.clone() for m in linears]
        eager.for_batch(model, "eager", torch.bfloat16, keep)  # at the choice's batch nothing moves
        assert eager.decode_matmul(model, "eager", keep) == "cpugen-gemv-avx2"
        assert all(m.panels is None and m.weight is not None for m in linears)
        plain_rows = model.decode_stack_rows
        eager.for_batch(model, "eager", torch.bfloat16, keep + 1)
        assert eager.decode_matmul(model, "eager", keep + 1) == "cpugen-packed"
        assert all(m.panels is not None and m.weight is None for m in linears)
        assert model.decode_stack is not None and model.decode_stack_rows == stack.ANY_BATCH
        # a smaller batch after it runs what it would run alone: the plain weights, exactly as loaded
        # (the lm_head's 50400 outputs fill 787 panels and half of one more)
        eager.for_batch(model, "eager", torch.bfloat16, keep)
        assert eager.decode_matmul(model, "eager", keep) == "cpugen-gemv-avx2"
        assert all(m.panels is None and torch.equal(m.weight, w) for m, w in zip(linears, loaded))
        assert model.decode_stack is not None and model.decode_stack_rows == plain_rows
    chosen = layout.choose(avx2.ext)
    assert (chosen["packed"], chosen["pack_above"]) == (keep == 0, keep)
    assert chosen["source"] == "cached" and not avx2.calls


@pytest.mark.parametrize("value", ["plain", "packed"])
def test_the_knob_decides_without_timing(avx2, monkeypatch, value):
    monkeypatch.setenv("CPUGEN_LAYOUT", value)
    knobs.reload()
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    assert eager.choose_layout() is None
    assert eager.install(model) and not avx2.calls and not layout._chosen
    assert eager.decode_matmul(model, "eager", 1) == ("cpugen-packed" if value == "packed" else "cpugen-gemv-avx2")
    linears = [m for m in model.modules() if type(m) is Linear and m.weight is not model.wte.weight]
    for batch in (layout.PACK_ABOVE + 1, 1):  # and so they stay, whatever the batch
        eager.for_batch(model, "eager", torch.bfloat16, batch)
        assert all((m.panels is not None) == (value == "packed") for m in linears) and not avx2.calls


def test_every_tensor_parallel_rank_takes_rank_0s_choice(avx2, monkeypatch):
    """A rank other than 0 times nothing: it takes what rank 0 broadcasts (distributed.same), so
    that no rank runs another layout."""
    sent = {**_figures((30, 20), (45, 40)), "packed": True, "source": "measured"}
    seen = []
    monkeypatch.setattr(distributed, "same", lambda g, obj: seen.append(obj) or sent)
    assert eager.choose_layout(types.SimpleNamespace(rank=1)) == sent
    assert seen == [None] and not avx2.calls and layout.choose(avx2.ext) == sent
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    assert eager.install(model) and eager.decode_matmul(model, "eager", 1) == "cpugen-packed" and not avx2.calls


def test_rank_0_times_and_broadcasts_its_choice(avx2, monkeypatch):
    seen = []
    monkeypatch.setattr(distributed, "same", lambda g, obj: seen.append(obj) or obj)
    got = eager.choose_layout(types.SimpleNamespace(rank=0))
    assert len(avx2.calls) == 1 and seen == [got] and got["source"] == "measured" and "gemv_gbps" in got


def test_a_rank_without_the_choice_still_takes_part_in_the_broadcast(monkeypatch):
    """At a level where the AVX2 layout is no choice (here CPUGEN_LAYOUT=plain), a rank still
    joins rank 0's broadcast, so that no rank waits on one that left early, and keeps its own."""
    monkeypatch.setenv("CPUGEN_LAYOUT", "plain")
    knobs.reload()
    seen = []
    monkeypatch.setattr(distributed, "same", lambda g, obj: seen.append(obj) or {"packed": True, "source": "measured"})
    assert eager.choose_layout(types.SimpleNamespace(rank=1)) is None and seen == [None] and not layout._chosen


def test_a_budget_without_room_for_the_timing_keeps_the_plain_layout_untimed(avx2):
    """The timing's buffers (plain and packed) must fit the plan's room before the model loads;
    where they would not, nothing is allocated for it: the gemv's plain layout, and the record says
    why."""
    held = layout.probe_bytes(avx2.ext, layout.probe_matrices())
    assert held >= 2 * layout.MIN_BYTES  # plain and packed
    c = layout.choose(avx2.ext, room_bytes=held - 1)
    assert not avx2.calls and not c["packed"] and c["source"].startswith("not timed") and "budget" in c["source"]
    assert not avx2.file.exists()  # nothing cached: a later run with room times it
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    assert eager.install(model) and eager.decode_matmul(model, "eager", 1) == "cpugen-gemv-avx2"
