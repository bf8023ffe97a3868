"""Batch sweeps: one model, loaded once, timed at every batch size of every prompt/generation setting.

A sweep is data (configs/bench/*.json, or built from `cpugen bench`'s options):

    {"name": "small-host", "model": "gptj-1b", "layers": null, "backend": "auto", "repeat": 3, "warmup": 1,
     "settings": [{"name": "setting1", "prompt_len": 1024, "gen_len": 100, "batch_sizes": [1, 4, "auto"]}]}

Every row is planned before the model is loaded (`auto` is the planner's largest batch); a batch the
planner says cannot fit becomes a row "does not fit (needs X GiB, budget Y GiB)" and is not run.
Each batch that runs gets `warmup` warm-up passes, then `repeat` timed prefill+decode runs over one
KV cache; its record holds the median over repeats, with min and max. Peak RSS starts afresh before
each batch (where the kernel allows), so each row's peak is its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from cpugen import knobs
from cpugen.errors import CpugenError
from cpugen.host import contention
from cpugen.host.memory import peak_rss_bytes, reset_peak_rss, rss_file_bytes
from cpugen.model import shapes
from cpugen.model.config import preset_dir
from cpugen.perf import roofline
from cpugen.perf.measure import make_record, measure, needs, note_stale
from cpugen.perf.record import RunRecord, count
from cpugen.runtime import distributed, planner
from cpugen.runtime.session import DTYPES, Session, check_lengths, log, open_session


@dataclass
class Setting:
    name: str
    prompt_len: int
    gen_len: int
    batch_sizes: list  # positive ints and "auto"
    judge: list | None = None  # the figures the nightly job judges in this setting's rows (default: the sweep's)


@dataclass
class Sweep:
    name: str
    model: str
    settings: list[Setting]
    description: str = ""
    layers: int | None = None
    backend: str = "auto"
    dtype: str = "bfloat16"
    threads: int | None = None
    seed: int = 0
    repeat: int = 1
    warmup: int = 1
    memory_budget: str | None = None
    host_memory: str | None = None
    max_batch_size: int | None = None  # caps "auto"
    compare: bool = True  # False: the nightly job keeps the records but never judges them (a smoke sweep)
    judge: list | None = None  # the figures the nightly job judges (default: every tracked one)
    source: str = field(default="", compare=False)  # where it was read from, for messages


# --- sweep definitions ----------------------------------------------------------------------------------
def sweep_dir():
    return preset_dir() / "bench"


def sweep_names() -> list[str]:
    try:
        return sorted(p.name[:-5] for p in sweep_dir().iterdir() if p.name.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def load_sweep(spec: str) -> Sweep:
    """A sweep by path (a JSON file) or by name (configs/bench/<name>.json)."""
    p = Path(spec)
    if p.suffix == ".json" or "/" in spec or p.exists():
        if not p.is_file():
            raise CpugenError(f"sweep {spec}: no such file")
        text, source = _read(p), str(p)
    else:
        f = sweep_dir() / f"{spec}.json"
        if not f.is_file():
            raise CpugenError(f"unknown sweep {spec!r}: use a JSON path or one of {', '.join(sweep_names())}")
        text, source = f.read_text(), f"sweep {spec}"
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise CpugenError(f"{source} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return from_dict(d, source)


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError as e:
        raise CpugenError(f"cannot read sweep {p}: {e.strerror}") from None


_OPTIONAL = {"description": str, "layers": int, "backend": str, "dtype": str, "threads": int, "seed": int,
             "repeat": int, "warmup": int, "memory_budget": str, "host_memory": str, "max_batch_size": int}


def from_dict(d, source: str = "sweep") -> Sweep:
    def bad(what: str):
        raise CpugenError(f"{source}: {what}")

    if not isinstance(d, dict):
        bad("must be a JSON object")
    known = {f.name for f in fields(Sweep)} - {"source"}
    unknown = sorted(set(d) - known)
    if unknown:
        bad(f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    for k in ("name", "model", "settings"):
        if k not in d:
            bad(f"missing {k!r}")
    if not isinstance(d["name"], str) or not isinstance(d["model"], str):
        bad("name and model must be strings")
    def check_judge(j, where):
        from cpugen.perf.history import TRACKED

        if j is not None and (not isinstance(j, list) or not j or not all(isinstance(x, str) for x in j)
                              or not set(j) <= TRACKED.keys()):
            bad(f"{where} must be a non-empty list of figures from {', '.join(TRACKED)}, not {j!r}")

    check_judge(d.get("judge"), "judge")
    if not isinstance(d.get("compare", True), bool):
        bad(f"compare must be true or false, not {d['compare']!r}")
    for k, t in _OPTIONAL.items():
        v = d.get(k)
        if v is not None and (not isinstance(v, t) or isinstance(v, bool)):
            bad(f"{k} must be a{'n integer' if t is int else ' string'}, not {v!r}")
    for k in ("layers", "threads", "repeat", "max_batch_size"):
        if d.get(k) is not None and d[k] < 1:
            bad(f"{k} must be at least 1, not {d[k]}")
    if d.get("warmup") is not None and d["warmup"] < 0:
        bad(f"warmup must be 0 or more, not {d['warmup']}")
    if d.get("dtype") is not None and d["dtype"] not in DTYPES:
        bad(f"dtype must be one of {', '.join(DTYPES)}, not {d['dtype']!r}")
    if not isinstance(d["settings"], list) or not d["settings"]:
        bad("settings must be a non-empty list")
    settings = []
    for i, s in enumerate(d["settings"]):
        where = f"settings[{i}]"
        if not isinstance(s, dict):
            bad(f"{where} must be an object")
        extra = sorted(set(s) - {"name", "prompt_len", "gen_len", "batch_sizes", "judge"})
        if extra:
            bad(f"{where}: unknown keys {', '.join(extra)}")
        for k in ("prompt_len", "gen_len"):
            if not isinstance(s.get(k), int) or isinstance(s.get(k), bool) or s[k] < 1:
                bad(f"{where}.{k} must be a positive integer, not {s.get(k)!r}")
        bs = s.get("batch_sizes")
        if not isinstance(bs, list) or not bs or not all(
                b == "auto" or (isinstance(b, int) and not isinstance(b, bool) and b >= 1) for b in bs):
            bad(f"{where}.batch_sizes must be a non-empty list of positive integers or \"auto\", not {bs!r}")
        check_judge(s.get("judge"), f"{where}.judge")
        settings.append(Setting(s.get("name") or f"{s['prompt_len']}+{s['gen_len']}", s["prompt_len"],
                                s["gen_len"], list(bs), s.get("judge")))
    return Sweep(**{k: v for k, v in d.items() if k != "settings" and v is not None}, settings=settings,
                 source=source)


def parse_batch_sizes(s: str) -> list:
    out = []
    for x in s.split(","):
        x = x.strip()
        if not x:
            continue
        if x == "auto":
            out.append(x)
            continue
        try:
            n = int(x)
        except ValueError:
            raise CpugenError(f"--batch-sizes: expected numbers or auto separated by commas, got {x!r}") from None
        if n < 1:
            raise CpugenError(f"--batch-sizes: a batch size must be at least 1, not {n}")
        out.append(n)
    if not out:
        raise CpugenError("--batch-sizes is empty: give e.g. 1,4,8,16,auto")
    return out


def settings_from(prompt_lens: list[int], gen_lens: list[int], batch_sizes: list) -> list[Setting]:
    """--prompt-len 1024,512 --gen-len 100,50: one setting per pair (a single value pairs with every other)."""
    n = max(len(prompt_lens), len(gen_lens))
    if len(prompt_lens) not in (1, n) or len(gen_lens) not in (1, n):
        raise CpugenError(f"--prompt-len has {len(prompt_lens)} values and --gen-len {len(gen_lens)}: give as many "
                          "of each (one setting per pair), or one of either")
    ps = prompt_lens * n if len(prompt_lens) == 1 else prompt_lens
    gs = gen_lens * n if len(gen_lens) == 1 else gen_lens
    return [Setting(f"{p}+{g}", p, g, list(batch_sizes)) for p, g in zip(ps, gs)]


# --- running a sweep ------------------------------------------------------------------------------------
@dataclass
class Row:
    setting: Setting
    request: int | str  # the batch size as asked for, or "auto"
    plan: planner.Plan
    status: str = "ok"


def does_not_fit(p: planner.Plan) -> str:
    return f"does not fit (needs {planner.fmt(planner.needed(p))}, budget {planner.fmt(p.budget_bytes)})"


def plan_rows(sweep: Sweep, s: Session) -> list[Row]:
    """Every row planned before anything large is allocated, against one measurement of the runtime."""
    measured = dict(overhead=planner.runtime_overhead(), file_backed=rss_file_bytes())
    split = dict(tp=s.tp, ranks_per_host=s.group.sharing if s.group and sweep.host_memory is None else 1)
    rows = []
    for st in sweep.settings:
        for b in st.batch_sizes:
            auto = b == "auto"
            p = planner.plan(s.cfg, st.prompt_len, st.gen_len, s.itemsize, s.backend, sweep.memory_budget,
                             sweep.host_memory, sweep.max_batch_size if auto else None, None if auto else b,
                             **measured, **split)
            if auto and p.batch_size == 0:  # not even batch 1: show what batch 1 needs
                p = planner.plan(s.cfg, st.prompt_len, st.gen_len, s.itemsize, s.backend, sweep.memory_budget,
                                 sweep.host_memory, batch_size=1, **measured, **split)
            rows.append(Row(st, b, p, "ok" if planner.needed(p) <= p.budget_bytes else does_not_fit(p)))
    return distributed.same(s.group, rows)  # every rank runs rank 0's rows


def run_sweep(sweep: Sweep, quiet: bool = False, on_record=None, limits: bool | None = None) -> list[RunRecord]:
    """Runs every row of the sweep; `on_record(record)` as each finishes (the nightly job appends it
    to the history at once, so a crash later loses nothing measured before). `limits`: read the
    machine's limits right before and after each row (about a second each) and judge the row
    against them instead of the cached ones (default: as CPUGEN_LIMITS says, measured)."""
    if limits is None:
        limits = knobs.current().limits == "measured"
    s = open_session(sweep.model, layers=sweep.layers, backend=sweep.backend, dtype=sweep.dtype,
                     threads=sweep.threads, seed=sweep.seed, quiet=quiet)
    for st in sweep.settings:
        check_lengths(s.cfg, st.prompt_len, st.gen_len)
    say = log(quiet)
    rows = plan_rows(sweep, s)
    runnable = [r for r in rows if r.status == "ok"]
    say(f"sweep {sweep.name}: {s.cfg.name}, {s.cfg.n_layer} layers, {count(shapes.n_params(s.cfg))} parameters, "
        f"{len(rows)} rows ({len(rows) - len(runnable)} do not fit), {sweep.repeat} repeats each, backend "
        f"{s.backend}, {s.threads} threads")
    if runnable:
        s.check_build_room(runnable[0].plan)
        s.load()
    records = []
    for i, row in enumerate(rows):
        st, p = row.setting, row.plan
        where = f"[{i + 1}/{len(rows)}] {st.name}"
        extra = {"batch_request": row.request}
        if row.status != "ok":
            say(f"{where}: batch {row.request}: {row.status}")
            rec = make_record(s, p, st.prompt_len, st.gen_len, None, status=row.status, extra=extra)
        else:
            say(f"{where}: " + needs(p, s))
            # what else had the CPUs while the row and the limits read around it ran (the figures are
            # judged against both; a row alone can be shorter than the OS's ticks can tell)
            with contention.Watch() as others:
                before = roofline.probe(s.threads) if limits else None
                reset = reset_peak_rss()
                timings, warmup_s = measure(s, p, st.prompt_len, st.gen_len, sweep.repeat, sweep.warmup)
                peak = peak_rss_bytes()
                around = (before, roofline.probe(s.threads)) if limits else None
            rec = make_record(s, p, st.prompt_len, st.gen_len, timings, warmup_s=warmup_s, limits=around,
                              peak_rss=peak,
                              extra={**extra, "peak_rss_since": "batch start" if reset else "process start",
                                     **others.result})
            note_stale(rec)
        rec.sweep, rec.setting = sweep.name, st.name
        records.append(rec)
        if on_record:
            on_record(rec)
    return records
