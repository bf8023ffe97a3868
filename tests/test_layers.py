"""The package's layering, read from its import statements (every one, inside functions too):
no import cycle between modules, and no layer imports a layer above it."""

import ast
from collections import defaultdict
from pathlib import Path

from helpers import ROOT

PKG = ROOT / "cpugen"
# lowest first: a module may import its own layer and those before it
LAYERS = [
    ("base", ["cpugen.errors", "cpugen.knobs", "cpugen.progress"]),
    ("host", ["cpugen.host"]),
    ("model", ["cpugen.model"]),
    ("runtime", ["cpugen.runtime"]),
    ("perf", ["cpugen.perf"]),
    ("cli", ["cpugen.cli", "cpugen.__main__", "cpugen"]),
]


def layer(mod: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{mod} belongs to no layer: add it to LAYERS"
    return best[0]


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The cpugen modules `name` imports, wherever the import statement stands."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cpugen")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("cpugen"):
                continue
            for a in node.names:  # `from cpugen.runtime import native` imports the module cpugen.runtime.native
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return out - {name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer_and_imports_none_above_it():
    wrong = []
    for m, deps in graph().items():
        for d in deps:
            if layer(d) > layer(m):
                wrong.append(f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the path, 2 done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d.endswith("__init__") or d not in g or d == "cpugen":
                continue
            if state[d] == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif state[d] == 0:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if state[m] == 0:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_an_import_inside_a_function_and_flags_it_upward(tmp_path):
    """The checks above can fail: a host module importing the runtime inside a function is found."""
    planted = tmp_path / "x.py"
    planted.write_text("def f():\n    from cpugen.runtime import native\n    from .memory import rss_bytes\n")
    found = imports("cpugen.host.x", planted, {"cpugen.runtime.native"})
    assert found == {"cpugen.runtime.native", "cpugen.host.memory"}
    assert layer("cpugen.runtime.native") > layer("cpugen.host.x")
