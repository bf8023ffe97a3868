"""Tensor parallel: a model split over ranks (model/shard.py, runtime/distributed.py) computes what
the single process computes, holds only its share, and fails as one."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import PROMPTS, hf_greedy
from cpugen.host.cpu import cpu_info
from helpers import ROOT, cli

N_NEW = 12


def prompt_args(prompts=PROMPTS):
    return [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]


def generate(*args, tp=1, env=None, timeout=300):
    r = cli("generate", "--dtype", "float32", "--max-new-tokens", str(N_NEW), "--ignore-eos", "--json", "-",
            "--tp", str(tp), *args, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["tokens"]


# --- the arithmetic, in process ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gptj", "llama", "mistral"])
def test_each_ranks_random_weights_are_exactly_its_slices_of_the_single_process_model(checkpoints, family):
    from cpugen.model import shard
    from cpugen.model.shard import Shard
    from cpugen.model.source import resolve
    from cpugen.model.weights import random_model

    cfg, _ = resolve(str(checkpoints[family].path))
    whole = dict(random_model(cfg, torch.float32, 7).named_parameters(remove_duplicate=False))
    for rank in range(2):
        s = Shard(rank, 2)
        part = random_model(cfg, torch.float32, 7, s=s)
        for name, p in part.named_parameters(remove_duplicate=False):
            full = whole[name]
            local = name.split(".", 2)[2] if name.startswith("blocks.") else name
            rows, cols = shard.rows(local, cfg, s), shard.cols(local, cfg, s)
            want = torch.cat([full[a:b] for a, b in rows]) if rows else full
            if cols:
                want = want[:, cols[0]:cols[1]]
            assert torch.equal(p, want), (rank, name)
        # and it holds its share, not the whole
        n = sum(p.numel() for p in {p.data_ptr(): p for p in part.parameters()}.values())
        assert n == shard.n_params_of_rank(cfg, s) < shard.n_params_of_rank(cfg, Shard())


@pytest.mark.parametrize("family", ["opt", "qwen2", "mistral"])
def test_a_checkpoint_is_read_slice_by_slice_into_the_same_tensors(checkpoints, family):
    from cpugen.model.checkpoint import load_checkpoint
    from cpugen.model.shard import Shard
    from cpugen.model.source import resolve

    cfg, path = resolve(str(checkpoints[family].path))
    whole = dict(load_checkpoint(cfg, path, torch.float32).named_parameters(remove_duplicate=False))
    from cpugen.model import shard

    for rank in range(2):
        s = Shard(rank, 2)
        for name, p in load_checkpoint(cfg, path, torch.float32, s=s).named_parameters(remove_duplicate=False):
            local = name.split(".", 2)[2] if name.startswith("blocks.") else name
            if local in shard.ROW_PARALLEL_BIASES:
                assert torch.equal(p, whole[name] if rank == 0 else torch.zeros_like(p)), (rank, name)
                continue
            rows, cols = shard.rows(local, cfg, s), shard.cols(local, cfg, s)
            want = torch.cat([whole[name][a:b] for a, b in rows]) if rows else whole[name]
            if cols:
                want = want[:, cols[0]:cols[1]]
            assert torch.equal(p, want), (rank, name)


def test_a_model_that_cannot_be_split_says_what_would_work():
    from cpugen.errors import CpugenError
    from cpugen.model import shard
    from cpugen.model.source import resolve

    cfg, _ = resolve("tiny-gptj")
    with pytest.raises(CpugenError, match=r"--tp .*would work"):
        shard.check(cfg, 3)


# --- parity: the same tokens as one process, and as transformers -----------------------------------------
@pytest.mark.parametrize("family", ["gptj", "opt", "llama", "mistral"])
def test_tp2_gives_transformers_greedy_tokens_like_tp1(checkpoints, family):
    """GPT-J (one all-reduce a layer), OPT (two, biases), Llama (GQA, split kv heads), Mistral (one kv
    head, replicated on both ranks); a ragged batch of four prompts, one thread per rank."""
    ck = checkpoints[family]
    ref = hf_greedy(ck.hf, PROMPTS, N_NEW)
    assert generate("--model", str(ck.path), *prompt_args(), tp=1) == ref
    assert generate("--model", str(ck.path), "--threads", "1", *prompt_args(), tp=2) == ref


def test_through_gloo_alone_the_tokens_are_the_same(checkpoints):
    ck = checkpoints["opt"]  # two all-reduces a layer, row-parallel biases added once
    assert generate("--model", str(ck.path), "--threads", "1", *prompt_args(), tp=2,
                    env={"CPUGEN_TP_COMM": "gloo"}) == hf_greedy(ck.hf, PROMPTS, N_NEW)


def test_sampling_split_draws_the_same_tokens_as_one_process(checkpoints):
    """Every rank takes rank 0's draw, which is the one process's draw from the same logits."""
    args = ["--model", str(checkpoints["llama"].path), "--temperature", "0.9", "--top-k", "20", "--seed", "3",
            *prompt_args()]
    one = generate(*args, tp=1)
    assert generate(*args, tp=2) == one and one != generate(*args[:-len(prompt_args())], "--seed", "4",
                                                            *prompt_args(), tp=1)


def test_tp2_random_weights_give_tp1s_tokens():
    args = ["--model", "gptj-1b", "--layers", "1", *prompt_args(PROMPTS[:2])]
    assert generate(*args, tp=2) == generate(*args, tp=1)


def test_bf16_split_stays_as_close_to_transformers_as_one_process(checkpoints):
    ck = checkpoints["llama"]
    ref = hf_greedy(ck.hf, PROMPTS, N_NEW)

    def agree(tp):
        r = cli("generate", "--model", str(ck.path), "--dtype", "bfloat16", "--max-new-tokens", str(N_NEW),
                "--ignore-eos", "--json", "-", "--tp", str(tp), *prompt_args())
        assert r.returncode == 0, r.stderr
        toks = json.loads(r.stdout)["tokens"]
        return sum(a == b for x, y in zip(toks, ref) for a, b in zip(x, y)) / sum(map(len, ref))

    one, two = agree(1), agree(2)
    assert two >= one - 0.1, (one, two)


# --- a run's record ------------------------------------------------------------------------------------------
def test_run_tp2_records_ranks_memory_and_collectives(tmp_path):
    out = tmp_path / "r.json"
    r = cli("run", "--model", "gptj-1b", "--layers", "2", "--prompt-len", "16", "--gen-len", "6", "--batch-size", "2",
            "--tp", "2", "--json", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Generate time per token") == 1  # rank 0 alone prints the table
    rec = json.loads(out.read_text())
    assert rec["tp"] == 2 and len(rec["tp_hosts"]) == 2 and rec["tp_hosts"][0] == socket.gethostname()
    peaks = rec["tp_rank_peak_rss_bytes"]
    assert len(peaks) == 2 and rec["tp_max_rank_peak_rss_bytes"] == max(peaks)
    # GPT-J: one all-reduce a block (2) and the logits' gather, per decode step
    assert rec["tp_collectives_per_step"] == 3
    h, V = 2048, 50400
    assert rec["tp_comm_bytes_per_step"] == 2 * (2 * h * 2) + 2 * (V // 2) * 2  # bf16 hidden x2 blocks + logits
    assert 0 < rec["tp_comm_share"] < 1
    # each rank's decode stack, calling the all-reduce between its blocks (torch's ops without AVX2)
    assert rec["decode_blocks"] == ("native-stack" if cpu_info()["avx2"] else "python")


@pytest.mark.skipif(not cpu_info()["avx2"],
                    reason="the native decode stack needs AVX2 and FMA at least")
@pytest.mark.parametrize("family", ["gptj", "llama"])
def test_a_split_models_decode_stack_all_reduces_where_its_python_blocks_do(family):
    """A rank's decode stack calls the group's all-reduce once a block for GPT-J's parallel residual
    (attention and MLP summed first) and twice for Llama's sequential one, on the same partial sums
    as the Python blocks, and hands its vocabulary rows to the gather. Checked in one process with
    a stand-in collective that changes what it is given in place (so a skipped or misplaced call
    changes the logits): the stack's logits equal the Python blocks' exactly, call for call."""
    from cpugen.model.config import from_name
    from cpugen.model.shard import Shard
    from cpugen.model.weights import random_model
    from cpugen.runtime import eager
    from cpugen.runtime.engine import Engine, Prompts, compute_context

    cfg = from_name("gptj-1b" if family == "gptj" else "llama-3-8b").with_layers(2)
    if family == "llama":  # small enough to build in a test, GQA kept
        cfg = cfg.__class__(**{**cfg.__dict__, "n_embd": 512, "n_head": 8, "n_kv_head": 2, "head_dim": 64,
                               "rotary_dim": 64, "intermediate_size": 1024, "vocab_size": 4096})
    model = random_model(cfg, torch.bfloat16, 0, s=Shard(0, 2))
    seen = []

    def reduce(t):  # (B, h) partial sums, changed in place as an all-reduce changes them
        seen.append(t.clone())
        return t.mul_(2)

    for b in model.blocks:
        b.reduce = reduce
    model.gather = lambda logits: torch.cat((logits, logits.flip(-1)), dim=-1)  # (B, V/2) -> (B, V)
    assert eager.install(model)
    assert model.decode_stack is not None, model.stack_refused

    def decode():
        e = Engine(model, 2, 12, torch.bfloat16)
        prompts = Prompts(torch.randint(1000, (2, 6), generator=torch.Generator().manual_seed(0)),
                          torch.ones(2, 6, dtype=torch.bool))
        with compute_context(torch.bfloat16):
            logits, out = e.prefill(prompts), []
            seen.clear()
            for _ in range(3):
                logits = e.decode_one_token(logits.argmax(-1))
                out.append(logits)
        return torch.stack(out), list(seen)

    model.decode_paths.clear()
    stacked, stack_calls = decode()
    assert model.decode_paths == {"native-stack": 3}
    stack = model.decode_stack
    model.decode_stack = None
    per_block, block_calls = decode()
    model.decode_stack = stack
    assert stacked.shape[-1] == 2 * model.lm_head.out_features  # gathered
    assert len(stack_calls) == len(block_calls) == 3 * cfg.n_layer * (1 if family == "gptj" else 2)
    assert all(torch.equal(a.view(-1, a.shape[-1]), b.view(-1, b.shape[-1])) for a, b in zip(stack_calls, block_calls))
    assert torch.equal(stacked, per_block)


# --- many hosts, simulated on one --------------------------------------------------------------------------
def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(args, env=None, n=2, extra=None):
    """n torchrun launchers, one rank each, as on n hosts: --nnodes n --node-rank r, one endpoint."""
    port = _port()
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    procs = []
    for r in range(n):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(n), "--nproc-per-node", "1",
               "--node-rank", str(r), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--max-restarts", "0", "-m", "cpugen", *args, *((extra or {}).get(r, []))]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def test_two_torchrun_nodes_give_the_same_tokens(checkpoints):
    ck = checkpoints["llama"]
    args = ["generate", "--model", str(ck.path), "--dtype", "float32", "--max-new-tokens", str(N_NEW), "--ignore-eos",
            "--json", "-", "--tp", "2", "--threads", "1", *prompt_args()]
    procs = torchrun_nodes(args)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    # the c10d rendezvous numbers the ranks in the order they join, not by --node-rank: either
    # launcher may hold rank 0, and only rank 0 writes the result
    written = [o[0].strip() for o in outs if o[0].strip()]
    assert len(written) == 1, outs
    assert json.loads(written[0].splitlines()[-1])["tokens"] == hf_greedy(ck.hf, PROMPTS, N_NEW)


def test_ranks_started_differently_refuse_to_start():
    args = ["generate", "--model", "tiny-gptj", "--max-new-tokens", "2", "--prompt-ids", "1,2", "--tp", "2"]
    procs = torchrun_nodes(args, extra={1: ["--seed", "5"]})
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    err = "\n".join(o[1] for o in outs)
    assert "was started differently from rank 0" in err and "seed" in err


# --- failure -----------------------------------------------------------------------------------------------
def test_a_rendezvous_that_never_completes_times_out_with_a_clear_error():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_port())}
    t0 = time.monotonic()
    r = cli("generate", "--model", "tiny-gptj", "--prompt-ids", "1,2", "--tp", "2", "--tp-timeout", "5", env=env,
            timeout=120)
    assert r.returncode == 2 and time.monotonic() - t0 < 60
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("cpugen: error: ") and "rendezvous" in line and "did not complete within 5 s" in line


def test_a_rank_killed_mid_decode_ends_every_rank_within_30_s():
    p = subprocess.Popen([sys.executable, "-m", "cpugen", "run", "--model", "gptj-1b", "--layers", "2",
                          "--prompt-len", "8", "--gen-len", "2000", "--batch-size", "1", "--tp", "2",
                          "--dtype", "float32"],
                         cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    ranks = []
    deadline = time.monotonic() + 120
    while len(ranks) < 2 and time.monotonic() < deadline:  # the launcher's children: the ranks
        out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        ranks = [int(x) for x in out]
        time.sleep(0.2)
    assert len(ranks) == 2
    time.sleep(25)  # well into decode: loading takes a few seconds, 2000 steps far longer
    assert p.poll() is None
    victim = max(ranks)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    out, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert p.returncode != 0
    for pid in ranks:  # no rank left behind
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
    assert "cpugen: error:" in err and "killed by SIGKILL" in err, err[-2000:]


def test_a_rank_killed_on_another_host_ends_the_other_within_30_s():
    args = ["run", "--model", "gptj-1b", "--layers", "2", "--prompt-len", "8", "--gen-len", "2000",
            "--batch-size", "1", "--tp", "2", "--threads", "1", "--dtype", "float32"]
    procs = torchrun_nodes(args, env={"CPUGEN_TP_COMM": "gloo"})  # as across hosts: no shared memory
    time.sleep(30)
    assert all(p.poll() is None for p in procs)
    workers = subprocess.run(["pgrep", "-P", str(procs[1].pid)], capture_output=True, text=True).stdout.split()
    assert workers
    os.kill(int(workers[0]), signal.SIGKILL)
    t0 = time.monotonic()
    out, err = procs[0].communicate(timeout=60)
    assert time.monotonic() - t0 < 30 and procs[0].returncode != 0
    # the c10d rendezvous numbers ranks by join order: the survivor may be rank 0 or 1; its one
    # line names itself and what happened
    line = next(x for x in err.splitlines() if x.startswith("cpugen: error: rank "))
    assert re.match(r"cpugen: error: rank [01] \(", line) and "another rank stopped mid-run" in line, err[-2000:]
    procs[1].communicate(timeout=60)


# --- the planner, per rank -------------------------------------------------------------------------------------
def test_plan_tp2_on_two_256_gib_hosts_fits_the_reference_and_tp1_says_what_would():
    for prompt, gen in ((1024, 100), (512, 50)):
        two = cli("plan", "--model", "gptj-175b", "--prompt-len", str(prompt), "--gen-len", str(gen), "--tp", "2",
                  "--host-memory", "256GiB", "--json", "-")
        assert two.returncode == 0, two.stderr
        p = json.loads(two.stdout)
        assert p["tp"] == 2 and p["batch_size"] >= 1
        one = cli("plan", "--model", "gptj-175b", "--prompt-len", str(prompt), "--gen-len", str(gen),
                  "--host-memory", "256GiB")
        assert "largest batch: none" in one.stdout and "--tp 2 over 2 hosts" in one.stderr, one.stderr


def test_a_ranks_plan_holds_its_share():
    from cpugen.model.source import resolve
    from cpugen.runtime import planner

    cfg, _ = resolve("gptj-175b")
    one = planner.plan(cfg, 1024, 100, batch_size=4, memory_budget="2TiB")
    two = planner.plan(cfg, 1024, 100, batch_size=4, memory_budget="2TiB", tp=2)
    # half of every block and of the lm_head, the whole embedding on each rank
    emb = cfg.vocab_size * cfg.n_embd * 2
    assert two.weight_bytes == pytest.approx((one.weight_bytes - emb) / 2 + emb, rel=1e-3)
    assert two.kv_cache_bytes == one.kv_cache_bytes // 2


# --- memory: two ranks run what one process under the same limit cannot ------------------------------------
def _limited(cmd, limit, env):
    """Runs cmd under a hard memory limit of its own (a memory cgroup where this machine lets
    cpugen make one, else a watchdog on its resident memory); (returncode, stderr, how)."""
    import threading

    from cpugen.host.cgroup import CgroupLimit, Watchdog

    lim = CgroupLimit.create(limit) or Watchdog(limit)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lim.preexec)
    box = {}
    t = threading.Thread(target=lambda: box.update(why=lim.watch(p)))
    t.start()
    _, err = p.communicate(timeout=600)
    t.join()
    lim.close()
    return p.returncode, err, box.get("why"), lim.kind


def test_two_ranks_under_their_own_limits_run_what_one_process_cannot(tmp_path):
    from cpugen.model.shard import Shard, n_params_of_rank
    from cpugen.model.source import resolve

    cfg, _ = resolve("gptj-1b")  # all 24 layers: 2.8 GB of bf16 weights, 1.5 GB a rank
    whole = n_params_of_rank(cfg, Shard()) * 2
    limit = int(0.9 * whole)  # less than the whole model's bf16 weights
    assert n_params_of_rank(cfg, Shard(0, 2)) * 2 < 0.7 * limit
    budget = f"{limit}B"
    args = ["run", "--model", "gptj-1b", "--prompt-len", "16", "--gen-len", "4", "--batch-size", "1",
            "--memory-budget", budget]
    base = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # one process: the planner refuses, and, told a budget it does not have, the limit stops it
    code, err, _, kind = _limited([sys.executable, "-m", "cpugen", *args], limit, base)
    assert code == 2 and "needs" in err and "budget" in err, err[-1500:]
    big = [a if a != budget else "100GiB" for a in args]
    code, err, why, _ = _limited([sys.executable, "-m", "cpugen", *big], limit, base)
    assert code != 0 and (code == -signal.SIGKILL or why), (code, err[-1500:])
    # two ranks, each under its own limit of the same size: they run, each within 5% of its plan
    port = _port()
    import threading

    results = {}

    def rank(r):
        env = {**base, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        out = tmp_path / f"rank{r}.json"
        results[r] = _limited([sys.executable, "-m", "cpugen", *args, "--tp", "2", "--threads", "1",
                               "--json", str(out)], limit, env)

    ts = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert [results[r][0] for r in range(2)] == [0, 0], [results[r][1][-1500:] for r in range(2)]
    rec = json.loads((tmp_path / "rank0.json").read_text())
    assert not (tmp_path / "rank1.json").exists()  # rank 0 writes the record
    assert rec["tp"] == 2 and rec["budget_bytes"] == limit
    for peak in rec["tp_rank_peak_rss_bytes"]:
        assert peak < limit
        assert abs(peak - rec["predicted_peak_bytes"]) / rec["predicted_peak_bytes"] < 0.05, (
            peak, rec["predicted_peak_bytes"], kind)


# --- the shared-memory all-reduce, against gloo's ---------------------------------------------------------------
SHM_CHECK = r"""
import json, os, sys, torch, torch.distributed as dist
from cpugen.errors import CpugenError
from cpugen.runtime import distributed
g = distributed.init(2, 10)
out = {"shm": g.comm}
gen = torch.Generator().manual_seed(100 + g.rank)
for dtype in (torch.float32, torch.bfloat16):
    for shape in ((1, 1, 2048), (3, 1, 4096)):
        x = torch.randn(shape, generator=gen).to(dtype)
        both = distributed.gather_object(g, x)
        exact = (both[0].float() + both[1].float()).to(dtype)  # the sum of the inputs, rounded once
        mine = g.all_reduce(x.clone())
        ref = x.clone()
        dist.all_reduce(ref)  # gloo's
        out[f"{dtype} {shape}"] = [torch.equal(mine, exact), (mine.float() - ref.float()).abs().max().item(),
                                   ref.float().abs().max().item()]
logits = torch.full((2, 5), float(g.rank + 1))
out["gather"] = g.gather_logits(logits, 9).tolist()
if sys.argv[1] == "die" and g.rank == 1:
    os._exit(0)  # gone without a word
try:
    for _ in range(3):
        g.all_reduce(torch.ones(8))
    out["after"] = "ok"
except CpugenError as e:
    out["after"] = str(e)
print(json.dumps(out))
os._exit(0)
"""


def _two_ranks(script, *args, env=None):
    port = _port()
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**os.environ, **(env or {}), "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    return [p.communicate(timeout=120) for p in procs], procs


def test_the_shared_memory_all_reduce_is_the_exact_sum_and_agrees_with_gloo():
    outs, procs = _two_ranks(SHM_CHECK, "live")
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    for out, _ in outs:
        res = json.loads(out)
        assert res["shm"] == "shm+gloo"
        for key, (exact, diff, scale) in ((k, v) for k, v in res.items() if k.startswith("torch.")):
            assert exact, key  # every rank: the same bytes, the inputs' sum rounded once
            assert diff <= (0 if "float32" in key else scale * 2**-7), (key, diff)  # gloo's, to bf16's last bit
        # the lm_head's rows, rank 0's first, cut to the vocabulary
        assert res["gather"] == [[1.0] * 5 + [2.0] * 4] * 2
        assert res["after"] == "ok"
    # gloo alone, when told
    outs, _ = _two_ranks(SHM_CHECK, "live", env={"CPUGEN_TP_COMM": "gloo"})
    assert json.loads(outs[0][0])["shm"] == "gloo"


def test_a_peer_gone_from_the_shared_memory_is_an_error_not_a_hang():
    t0 = time.monotonic()
    outs, procs = _two_ranks(SHM_CHECK, "die")
    res = json.loads(outs[0][0])
    assert "another rank stopped mid-run" in res["after"] and time.monotonic() - t0 < 60
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("cpugen-tp-")]  # nothing left behind


# --- the nightly job, split ---------------------------------------------------------------------------------------
def test_the_nightly_job_runs_split_and_rank_0_alone_keeps_the_history(tmp_path):
    sweep = tmp_path / "tiny.json"
    sweep.write_text(json.dumps({"name": "tiny", "model": "gptj-1b", "layers": 1, "backend": "eager", "settings": [
        {"prompt_len": 8, "gen_len": 3, "batch_sizes": [1, 2]}]}))
    hist = tmp_path / "history.jsonl"
    for night in range(2):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "nightly"), "--sweep", str(sweep), "--history",
                            str(hist), "--report-dir", str(tmp_path / f"r{night}"), "--tp", "2", "--quiet",
                            "--min-runs", "1", "--confirm", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode in (0, 1), r.stderr  # 1 only if a tiny figure really fell
        assert r.stdout.startswith(("no regression", "REGRESSION")) and r.stdout.count("report:") == 1
    recs = [json.loads(x) for x in hist.read_text().splitlines()]
    first = [x for x in recs if not x.get("confirmation")]
    assert len(first) == 4 and all(x["tp"] == 2 and x["tp_comm"] == "shm+gloo" for x in recs)  # 2 rows x 2 nights
    assert (tmp_path / "r1" / "report.md").read_text().count("tp 2") >= 2  # its configurations name the split
