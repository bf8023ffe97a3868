"""Checkpoint loading: file layouts, source dtypes, user errors, --layers, and peak memory.

Oracles: the Hugging Face model that wrote each checkpoint (logits), the safetensors library (tensor
values), the OS (ru_maxrss) for memory. Errors go through the CLI in a fresh process, as a user
sees them.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (PROMPTS, REPO, build_hf, cpugen_prefill_logits, hf_greedy, hf_last_logits, load, rel_err,
                      run_cli)
from safetensors.torch import load_file, save_file

from cpugen.errors import CpugenError

FP32_TOL = 1e-4


# --- layouts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gptj", "llama"])
def test_sharded_safetensors(checkpoints, tmp_path, family):
    hf = checkpoints[family].hf
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    lg, _ = cpugen_prefill_logits(load(tmp_path), PROMPTS)
    assert rel_err(lg, hf_last_logits(hf, PROMPTS)) <= FP32_TOL


def test_sharded_safetensors_missing_shard_is_an_error(checkpoints, tmp_path):
    checkpoints["llama"].hf.save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(CpugenError, match=victim.name):
        load(tmp_path)


def test_pytorch_model_bin_gptj_with_legacy_buffers(checkpoints, tmp_path):
    """A single pytorch_model.bin, as transformers 4.x wrote with safe_serialization=False (that
    option is gone in transformers 5: torch.save of the state dict is the same file). GPT-J 6B's
    original checkpoint also holds each layer's attn.bias / attn.masked_bias buffers: ignored."""
    ck = checkpoints["gptj"]
    shutil.copy(ck.path / "config.json", tmp_path / "config.json")
    sd = dict(ck.hf.state_dict())
    n = ck.hf.config.n_positions
    for i in range(ck.hf.config.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    lg, _ = cpugen_prefill_logits(load(tmp_path), PROMPTS)
    assert rel_err(lg, hf_last_logits(ck.hf, PROMPTS)) <= FP32_TOL


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_sharded_pytorch_model_bin(checkpoints, tmp_path, family):
    """pytorch_model-0000k-of-0000n.bin with pytorch_model.bin.index.json. OPT's state dict holds
    the tied lm_head.weight too, as older OPT checkpoints do."""
    ck = checkpoints[family]
    shutil.copy(ck.path / "config.json", tmp_path / "config.json")
    sd = ck.hf.state_dict()
    names = list(sd)
    parts = [names[0::3], names[1::3], names[2::3]]
    weight_map = {}
    for k, part in enumerate(parts):
        f = f"pytorch_model-{k + 1:05d}-of-{len(parts):05d}.bin"
        torch.save({n: sd[n].clone() for n in part}, tmp_path / f)
        weight_map.update({n: f for n in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    lg, _ = cpugen_prefill_logits(load(tmp_path), PROMPTS)
    assert rel_err(lg, hf_last_logits(ck.hf, PROMPTS)) <= FP32_TOL


# --- source dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("src_dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_source_dtype_loads_into_bf16(checkpoints, tmp_path, src_dtype):
    ck = checkpoints["llama"]
    shutil.copy(ck.path / "config.json", tmp_path / "config.json")
    sd = load_file(ck.path / "model.safetensors")
    save_file({k: v.to(src_dtype) for k, v in sd.items()}, tmp_path / "model.safetensors")
    model = load(tmp_path, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # values: each is the source value rounded once to bf16 (round to nearest even, via fp32)
    def bf16(name):
        return sd[name].to(src_dtype).float().to(torch.bfloat16)
    assert torch.equal(model.wte.weight, bf16("model.embed_tokens.weight"))
    assert torch.equal(model.lm_head.weight, bf16("lm_head.weight"))
    assert torch.equal(model.blocks[1].attn.wo.weight, bf16("model.layers.1.self_attn.o_proj.weight"))
    assert torch.equal(model.blocks[1].mlp.w_out.weight, bf16("model.layers.1.mlp.down_proj.weight"))
    assert torch.equal(model.blocks[0].ln_2.weight, bf16("model.layers.0.post_attention_layernorm.weight"))
    # logits: against HF fp32 running on the source-precision weights (bf16 tolerance: see test_parity)
    hf_src = build_hf("llama", seed=2)
    hf_src.load_state_dict({k: v.to(src_dtype).float() for k, v in sd.items()})
    lg, _ = cpugen_prefill_logits(model, PROMPTS, torch.bfloat16)
    assert rel_err(lg, hf_last_logits(hf_src, PROMPTS)) <= 6e-2


# --- user errors, through the CLI ------------------------------------------------------------------------
# Each case is a broken copy of the llama checkpoint (or a foreign model) given to `cpugen generate`
# in a fresh process. The processes are started two at a time (this machine's cores: each spends
# its ~3 s importing torch), then each test checks its own case.
def _edit(d: Path, fn):
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors")


def _truncate(d: Path, keep):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])


def _set_config(d: Path, **kv):
    f = d / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **kv}))


def _add_layer(sd):  # a third block where config.json says two
    for k in [k for k in sd if k.startswith("model.layers.1.")]:
        sd[k.replace("layers.1.", "layers.2.")] = sd[k].clone()


BROKEN = {
    "missing": lambda d: _edit(d, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight")),
    "unexpected": lambda d: _edit(d, lambda sd: sd.update({"model.layers.0.self_attn.extra_proj.weight":
                                                          torch.zeros(3, 4)})),
    "extra_layer": lambda d: _edit(d, _add_layer),
    # k_proj is (n_kv_head * head_dim, hidden) = (48, 64); write (32, 64)
    "misshaped": lambda d: _edit(d, lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight":
                                                         torch.zeros(32, 64)})),
    "truncated": lambda d: _truncate(d, 0.6),
    "config_cut_short": lambda d: (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden'),
    "config_wrong_value": lambda d: _set_config(d, num_attention_heads="four"),
}
FOREIGN = ("bert", "gpt2", "opt350m")


def _foreign(kind: str, d: Path):
    import transformers as T

    if kind == "bert":
        T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, architectures=["BertForMaskedLM"])).save_pretrained(d)
    elif kind == "gpt2":
        T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                                       architectures=["GPT2LMHeadModel"])).save_pretrained(d)
    else:  # OPT-350m projects 512-d embeddings to its 1024-d hidden size (project_in/project_out)
        hf = build_hf("opt", word_embed_proj_dim=32)
        assert hf.model.decoder.project_in is not None  # HF really built the projections
        hf.save_pretrained(d)


@pytest.fixture(scope="module")
def cli_errors(checkpoints, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    from concurrent.futures import ThreadPoolExecutor

    dirs = {}
    for case, breaks in BROKEN.items():
        d = tmp_path_factory.mktemp(f"broken-{case}")
        shutil.copytree(checkpoints["llama"].path, d, dirs_exist_ok=True)
        breaks(d)
        dirs[case] = d
    for kind in FOREIGN:
        dirs[kind] = tmp_path_factory.mktemp(f"foreign-{kind}")
        _foreign(kind, dirs[kind])
    with ThreadPoolExecutor(2) as pool:
        runs = {case: pool.submit(run_cli, "generate", "--model", str(d), "--prompt-ids", "5,6,7",
                                  "--max-new-tokens", "2") for case, d in dirs.items()}
        return {case: f.result() for case, f in runs.items()}


def _error_line(r: subprocess.CompletedProcess) -> str:
    """The one-line error contract: status 2, one stderr line "cpugen: error: ...", no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("cpugen: error: ")
    assert r.stdout == ""
    return lines[0]


# each bad checkpoint: the fragments its one-line error must hold
ERRORS = {
    "missing": ["missing", "model.layers.1.mlp.down_proj.weight", "(64, 96)"],
    "unexpected": ["unexpected", "model.layers.0.self_attn.extra_proj.weight", "(3, 4)"],
    # not a --layers skip: without --layers a block beyond config.json's count is a mismatch
    "extra_layer": ["unexpected", "model.layers.2."],
    "misshaped": ["model.layers.0.self_attn.k_proj.weight", "(32, 64)", "(48, 64)"],
    "truncated": ["truncated", "model.safetensors"],
    "config_cut_short": ["config.json", "not valid JSON"],
    "config_wrong_value": ["config.json", "num_attention_heads", "'four'"],
}


@pytest.mark.parametrize("case", ERRORS)
def test_a_bad_checkpoint_is_one_line_naming_what_is_wrong(cli_errors, case):
    msg = _error_line(cli_errors[case])
    assert all(f in msg for f in ERRORS[case]), (ERRORS[case], msg)


@pytest.mark.parametrize("case,arch", [("bert", "BertForMaskedLM"), ("gpt2", "GPT2LMHeadModel")])
def test_error_unsupported_architecture(cli_errors, case, arch):
    msg = _error_line(cli_errors[case])
    assert "unsupported architecture" in msg and arch in msg


def test_error_opt_with_projections_refused(cli_errors):
    msg = _error_line(cli_errors["opt350m"])
    assert "word_embed_proj_dim" in msg and "32" in msg and "64" in msg


# the same checks in process, for variants that need no new process to prove the contract again
@pytest.fixture
def llama_copy(checkpoints, tmp_path) -> Path:
    d = tmp_path / "llama"
    shutil.copytree(checkpoints["llama"].path, d)
    return d


@pytest.mark.parametrize("key,value", [("num_attention_heads", "four"), ("hidden_size", "64"),
                                       ("num_attention_heads", 0), ("intermediate_size", None),
                                       ("rms_norm_eps", "small"), ("architectures", "LlamaForCausalLM")])
def test_error_config_values_in_process(llama_copy, key, value):
    """Valid JSON, wrong values: the message names the file and the config.json key."""
    _set_config(llama_copy, **{key: value})
    with pytest.raises(CpugenError) as e:
        load(llama_copy)
    assert "config.json" in str(e.value) and key in str(e.value)


def test_error_gptj_zero_heads_in_process(checkpoints, tmp_path):
    shutil.copytree(checkpoints["gptj"].path, tmp_path / "g")
    _set_config(tmp_path / "g", n_head=0)
    with pytest.raises(CpugenError, match="n_head"):
        load(tmp_path / "g")


@pytest.mark.parametrize("keep", [100, 0.9999])  # inside the JSON header; the last bytes of the data
def test_error_truncated_in_process(llama_copy, keep):
    _truncate(llama_copy, keep)
    with pytest.raises(CpugenError, match="truncated"):
        load(llama_copy)


def test_error_config_not_an_object_in_process(llama_copy):
    (llama_copy / "config.json").write_text('["LlamaForCausalLM"]')
    with pytest.raises(CpugenError, match="config.json.*JSON object"):
        load(llama_copy)


def test_error_corrupt_safetensors_header_in_process(llama_copy):
    """A header that parses but lies: a shape whose bytes do not match its data_offsets."""
    f = llama_copy / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = "model.layers.0.self_attn.k_proj.weight"
    header[name]["shape"] = [48, 65]  # 48 * 65 * 4 bytes != its data_offsets span
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    f.write_bytes(data[:8] + raw + data[8 + n:])
    with pytest.raises(CpugenError, match=name):
        load(llama_copy)


# --- --layers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,n", [("mistral", 2), ("gptj", 1), ("opt", 1)])
def test_layers_loads_first_n_blocks(checkpoints, family, n):
    """Oracle: transformers itself loading the same checkpoint with num_hidden_layers=n."""
    import transformers as T

    ck = checkpoints[family]
    model = load(ck.path, layers=n)
    assert len(model.blocks) == n
    hf_n = T.AutoModelForCausalLM.from_pretrained(ck.path, num_hidden_layers=n, attn_implementation="eager",
                                                  dtype=torch.float32).eval()
    assert hf_n.config.num_hidden_layers == n
    lg, _ = cpugen_prefill_logits(model, PROMPTS)
    assert rel_err(lg, hf_last_logits(hf_n, PROMPTS)) <= FP32_TOL
    full, _ = cpugen_prefill_logits(load(ck.path), PROMPTS)
    assert rel_err(lg, full) > 1e-2  # the dropped blocks mattered


def test_layers_through_cli(checkpoints):
    import transformers as T

    ck = checkpoints["mistral"]
    hf_n = T.AutoModelForCausalLM.from_pretrained(ck.path, num_hidden_layers=1, attn_implementation="eager",
                                                  dtype=torch.float32).eval()
    r = run_cli("generate", "--model", str(ck.path), "--layers", "1", "--dtype", "float32", "--ignore-eos",
                "--max-new-tokens", "10", "--prompt-ids", "5,6,7,8", "--prompt-ids", "9,10", "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == hf_greedy(hf_n, [[5, 6, 7, 8], [9, 10]], 10)


# --- peak memory while loading -----------------------------------------------------------------------------
# A GPT-J-shaped checkpoint: h 2048, 6 blocks (ffn 8192), vocabulary 16384 with an untied lm_head.
# 6 x 50.3M + 2 x 33.6M + small = 369M parameters: fp32 file 1.38 GiB, bf16 model 0.69 GiB.
# Bound: ru_maxrss <= 1.15 x bf16 bytes + 1 GiB = 1.79 GiB.
# A naive loader (whole fp32 state dict in memory, then the bf16 model) peaks at least at
# fp32 + bf16 = 2.06 GiB before counting the interpreter and torch (~0.3 GiB): above the bound
# even with no baseline at all (0.925 x fp32 bytes > 1 GiB for any fp32 file over 1.08 GiB).
# The test runs that naive loader too and asserts it breaks the bound, so the bound is shown to
# discriminate on this machine, not just argued to.
BIG = dict(n_embd=2048, n_head=16, rotary_dim=64, n_layer=6, vocab_size=16384, n_inner=8192, n_positions=2048)

_LAUNCH = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
# ru_maxrss survives exec: a process spawned straight from pytest starts with pytest's own peak
# (vfork) or current size (fork) as its ru_maxrss. A tiny launcher in between has a fresh, small
# address space, so the measured process starts near zero (the script checks it does).
_PRELUDE = """
import json, resource, sys
def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = maxrss()
import torch
"""
_CPUGEN_LOADER = _PRELUDE + """
from cpugen.model.source import resolve
from cpugen.model.weights import load_model, weight_bytes
base = maxrss()
cfg, ck = resolve(sys.argv[1])
model = load_model(cfg, ck, torch.bfloat16, 0)
peak = maxrss()
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
from safetensors import safe_open
with safe_open(str(ck / "model.safetensors"), "pt") as f:
    ok = (torch.equal(model.wte.weight, f.get_tensor("transformer.wte.weight").to(torch.bfloat16))
          and torch.equal(model.lm_head.bias, f.get_tensor("lm_head.bias").to(torch.bfloat16))
          and torch.equal(model.blocks[5].mlp.w_in.weight, f.get_tensor("transformer.h.5.mlp.fc_in.weight").to(torch.bfloat16))
          and torch.equal(model.blocks[3].attn.wqkv.weight[2 * 2048:], f.get_tensor("transformer.h.3.attn.v_proj.weight").to(torch.bfloat16)))
from cpugen.host.memory import huge_page_bytes, thp_mode
print(json.dumps(dict(start=start, base=base, peak=peak, hwm=hwm, weights=weight_bytes(model),
                      huge=huge_page_bytes(), thp=thp_mode(),
                      dtypes=sorted({str(p.dtype) for p in model.parameters()}), values_ok=ok)))
"""
_NAIVE_LOADER = _PRELUDE + """
from safetensors.torch import load_file
base = maxrss()
sd = load_file(sys.argv[1] + "/model.safetensors")  # the whole fp32 state dict
model = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # then the bf16 model
peak = maxrss()
print(json.dumps(dict(start=start, base=base, peak=peak, weights=sum(v.numel() * 2 for v in model.values()))))
"""


def _measure(script: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", _LAUNCH, sys.executable, "-c", script, str(path)],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(path.parent),
                            "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["start"] < 100 * 2**20, res  # the launcher kept pytest's memory out of the number
    return res


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    import transformers as T

    d = tmp_path_factory.mktemp("big-gptj")
    T.GPTJConfig(architectures=["GPTJForCausalLM"], bos_token_id=1, eos_token_id=2, **BIG).save_pretrained(d)
    h, L, V, F = BIG["n_embd"], BIG["n_layer"], BIG["vocab_size"], BIG["n_inner"]
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(max(F, V) * h + 1_000_003, generator=g) * 0.02  # random offsets into one pool: fast

    def mk(*shape):
        n = math.prod(shape)
        o = int(torch.randint(1_000_003, (1,), generator=g))
        return pool[o:o + n].clone().view(shape)

    sd = {"transformer.wte.weight": mk(V, h)}
    for i in range(L):
        p = f"transformer.h.{i}."
        sd |= {p + "ln_1.weight": 1 + mk(h), p + "ln_1.bias": mk(h),
               p + "attn.q_proj.weight": mk(h, h), p + "attn.k_proj.weight": mk(h, h),
               p + "attn.v_proj.weight": mk(h, h), p + "attn.out_proj.weight": mk(h, h),
               p + "mlp.fc_in.weight": mk(F, h), p + "mlp.fc_in.bias": mk(F),
               p + "mlp.fc_out.weight": mk(h, F), p + "mlp.fc_out.bias": mk(h)}
    sd |= {"transformer.ln_f.weight": 1 + mk(h), "transformer.ln_f.bias": mk(h),
           "lm_head.weight": mk(V, h), "lm_head.bias": mk(V)}
    del pool
    save_file(sd, d / "model.safetensors")
    fp32_bytes = sum(v.numel() * 4 for v in sd.values())
    del sd
    assert 1.2e9 <= fp32_bytes <= 1.6e9 and (d / "model.safetensors").stat().st_size >= fp32_bytes
    return d


def test_peak_rss_while_loading_bf16(big_checkpoint):
    res = _measure(_CPUGEN_LOADER, big_checkpoint)
    GiB = 2**30
    bound = 1.15 * res["weights"] + GiB
    assert res["dtypes"] == ["torch.bfloat16"] and res["values_ok"], res
    assert 0.6 * GiB < res["weights"] < 0.8 * GiB, res
    if res["thp"] in ("always", "madvise"):  # the loaded weights sit on huge pages (decode streams them)
        assert res["huge"] > 0.7 * res["weights"], res
    assert res["peak"] <= bound, (f"peak RSS {res['peak'] / GiB:.2f} GiB > bound {bound / GiB:.2f} GiB "
                                  f"(bf16 weights {res['weights'] / GiB:.2f} GiB, after imports "
                                  f"{res['base'] / GiB:.2f} GiB, VmHWM {res['hwm'] / GiB:.2f} GiB)")

    naive = _measure(_NAIVE_LOADER, big_checkpoint)
    assert naive["weights"] == res["weights"]
    assert naive["peak"] > bound, (naive["peak"] / GiB, bound / GiB)  # the bound catches a naive loader
