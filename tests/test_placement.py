"""Thread placement and NUMA memory policy, checked against what the operating system reports:
each worker's allowed CPUs in /proc/self/task/<tid>/status, the memory policy in /proc/self/numa_maps.
Multi-node hosts are planned from fake sysfs trees (this machine has one node)."""

import json
import os
import subprocess
import sys

import pytest

from cpugen.host import placement
from helpers import ROOT

CORES = sorted(os.sched_getaffinity(0))


def _python(code: str, **env) -> str:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert p.returncode == 0, p.stderr
    return p.stdout


def _fake_nodes(tmp_path, lists: dict[int, str]):
    for n, cpus in lists.items():
        (tmp_path / f"node{n}").mkdir()
        (tmp_path / f"node{n}" / "cpulist").write_text(cpus + "\n")
    (tmp_path / "possible").write_text("0-9\n")  # not a node: ignored
    return tmp_path


def test_cpulists_parse():
    assert placement.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert placement.parse_cpulist("5") == [5]


def test_nodes_from_sysfs(tmp_path):
    root = _fake_nodes(tmp_path, {0: "0-3", 1: "4-7"})
    assert placement.numa_nodes(root) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert placement.numa_nodes(tmp_path / "absent") == {0: list(range(os.cpu_count()))}


def test_plan_fills_the_node_with_most_allowed_cores_first():
    nodes = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    p = placement.plan(3, {2, 3, 4, 5, 6, 7}, nodes)  # node 1 holds 4 allowed cores, node 0 two
    assert (p.cores, p.nodes, p.memory) == ([4, 5, 6], [1], "memory bound to node 1")
    p = placement.plan(6, set(range(8)), nodes)
    assert (p.cores, p.nodes, p.memory) == ([0, 1, 2, 3, 4, 5], [0, 1], "memory interleaved over nodes 0-1")
    assert "6 threads pinned to cores 0-5; 2 NUMA nodes" in p.describe()
    p = placement.plan(9, set(range(8)), nodes)  # oversubscribed: left to the scheduler
    assert p.cores == [] and "9 threads on 8 usable cores" in p.describe()
    one = placement.plan(2, {0, 1}, {0: [0, 1]})
    assert one.describe() == "2 threads pinned to cores 0-1; 1 NUMA node, memory placement not needed"


PIN_AND_READ_BACK = """
import json, os, torch
from cpugen.runtime import native
from cpugen.host import placement
torch.set_num_threads(len(os.sched_getaffinity(0)))
p = placement.apply(torch.get_num_threads(), pin=native.pinner)
tids = native.extension("threads").worker_tids(torch.get_num_threads())
def allowed(tid):
    for line in open(f"/proc/self/task/{tid}/status"):
        if line.startswith("Cpus_allowed_list:"):
            return placement.parse_cpulist(line.split(":")[1])
x = torch.randn(512, 512); (x @ x).sum()  # the pool keeps its pinning across ops
print(json.dumps({"cores": p.cores, "describe": p.describe(), "tids": tids, "os": [allowed(t) for t in tids]}))
"""


def test_workers_are_pinned_one_core_each_as_the_os_reports():
    got = json.loads(_python(PIN_AND_READ_BACK, CPUGEN_PIN="1"))
    assert got["cores"] == CORES
    assert len(set(got["tids"])) == len(CORES) and -1 not in got["tids"]  # one thread per worker
    assert got["os"] == [[c] for c in CORES]  # worker t may run on cores[t] only
    assert got["describe"].startswith(f"{len(CORES)} threads pinned to cores")


def test_switched_off_pinning_leaves_the_os_mask():
    got = json.loads(_python(PIN_AND_READ_BACK, CPUGEN_PIN="0"))
    assert got["cores"] == [] and "CPUGEN_PIN=0" in got["describe"]
    assert got["os"] == [CORES] * len(CORES)


def test_memory_policy_is_set_as_the_kernel_reports(tmp_path):
    code = """
import torch
from cpugen.host import placement
placement.set_memory_policy([0])
x = torch.ones(64 << 20, dtype=torch.uint8)  # fresh pages under the new policy
print(open("/proc/self/numa_maps").read())
"""
    if not os.path.exists("/proc/self/numa_maps"):
        pytest.fail("this kernel has no NUMA support to check against (/proc/self/numa_maps)")
    assert " bind:0 " in _python(code)
    # two nodes planned from a fake tree: the threads span both, so memory is interleaved over
    # them (the kernel keeps the nodes that exist: here node 0)
    root = _fake_nodes(tmp_path, {0: str(CORES[0]), 1: str(CORES[-1]) if len(CORES) > 1 else "99"})
    code = f"""
import torch
from pathlib import Path
from cpugen.host import placement
from cpugen.runtime import native
p = placement.apply({min(2, len(CORES))}, root=Path({str(root)!r}), pin=native.pinner)
x = torch.ones(64 << 20, dtype=torch.uint8)
print(p.describe())
print(open("/proc/self/numa_maps").read())
"""
    said = _python(code, CPUGEN_PIN="1")
    if len(CORES) > 1:
        assert "2 NUMA nodes, memory interleaved over nodes 0-1" in said.splitlines()[0], said.splitlines()[0]
        assert " interleave:0" in said
    else:
        assert "memory bound to node 0" in said.splitlines()[0] and " bind:0 " in said


def test_run_records_its_placement():
    out = subprocess.run([sys.executable, "-m", "cpugen", "run", "--model", "tiny-gptj", "--prompt-len", "8",
                          "--gen-len", "4", "--batch-size", "1", "--json", "-"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "CPUGEN_PIN": "1"})
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["placement"].startswith(f"{len(CORES)} threads pinned to cores")
    assert rec["cores"] == len(CORES)  # the process's cores, not the main thread's pinned one


def test_each_tensor_parallel_rank_takes_its_own_node_as_the_os_reports(tmp_path):
    # a fake two-node host whose node 0 holds this machine's last core and node 1 its first: each
    # rank must get its own node's cores (not the first cores in order), be confined to them, and
    # bind its memory to its node, as the kernel reports (rank 0: node 0, the one this host has)
    if len(CORES) < 2:
        pytest.fail("this check needs two usable cores, one for each fake node")
    root = _fake_nodes(tmp_path, {0: str(CORES[-1]), 1: str(CORES[0])})
    code = f"""
import functools, json, os, torch
from pathlib import Path
from types import SimpleNamespace
from cpugen.host import placement
from cpugen.runtime import distributed, session
fake = Path({str(root)!r})
distributed.numa_nodes = lambda: placement.numa_nodes(fake)
placement.apply = functools.partial(placement.apply, root=fake)
ranks = [distributed.rank_cores(r, 2) for r in (0, 1)]
p = session.place(1, SimpleNamespace(local_rank=0, local_world=2))
x = torch.ones(64 << 20, dtype=torch.uint8)  # fresh pages under the rank's policy
print(json.dumps(dict(ranks=ranks, affinity=sorted(os.sched_getaffinity(0)), said=p.describe())))
print(open("/proc/self/numa_maps").read())
"""
    out = _python(code, CPUGEN_PIN="1")
    got = json.loads(out.splitlines()[0])
    assert got["ranks"] == [[CORES[-1]], [CORES[0]]], got
    # the main thread, and so every thread started after it, confined to its node's core
    assert got["affinity"] == [CORES[-1]], got
    assert got["said"].startswith(f"1 threads pinned to cores {CORES[-1]}; 2 NUMA nodes, memory bound to node 0"), got
    assert " bind:0 " in out
    # more ranks than nodes with usable cores: an even split of the usable cores, in order
    (tmp_path / "one").mkdir()
    one = _fake_nodes(tmp_path / "one", {0: ",".join(map(str, CORES))})
    code = f"""
import json
from pathlib import Path
from cpugen.host import placement
from cpugen.runtime import distributed
distributed.numa_nodes = lambda: placement.numa_nodes(Path({str(one)!r}))
print(json.dumps([distributed.rank_cores(r, 2) for r in (0, 1)]))
"""
    half = len(CORES) // 2
    assert json.loads(_python(code)) == [CORES[:half], CORES[half:2 * half]]
