"""The package's shape, read from the source with `ast` (nothing is imported): no import circle between modules,
packages that follow the pipeline (a stage imports only earlier stages and the floors below them), a training loop
that fits on a screen, no long module without a stated reason.

Conventions checked here:
- An import is any `import`/`from … import` anywhere in a module: top level, inside functions, under
  `if TYPE_CHECKING:`. `from pkg import name` counts as importing `pkg.name` when that is a module, else `pkg`.
- A module longer than MAX_LINES says why in its docstring, on a line that starts with "Long because" followed by
  the reason (at least a few words), e.g. "Long because the training and the inference path share the weights."
"""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dspark_train"
MAX_LINES = 450
MAX_TRAIN_LINES = 80
REASON = re.compile(r"^\s*Long because(\s+\S+){3,}", re.MULTILINE)


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every .py file of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> dict[str, int]:
    """The package modules `name` imports, wherever the import statement sits → the line of the first one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is this package, 2 its parent, ...
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            candidates = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                          for alias in node.names]
        else:
            continue
        for dotted in candidates:
            while dotted and dotted not in MODULES:  # `import a.b.c` of a package module: the deepest that exists
                dotted = dotted.rpartition(".")[0]
            if dotted and dotted != name:
                found[dotted] = min(found.get(dotted, node.lineno), node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module → {module it imports: line of that import}."""
    return {name: _imports(name, path) for name, path in MODULES.items()}


def _groups(graph) -> list[set]:
    """Tarjan's strongly connected components with more than one module: each holds an import circle."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while not group or w != v:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _circle_through(start: str, graph, group: set) -> list[str]:
    """A shortest import path start → … → start inside `group` (breadth first)."""
    paths, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            if start in graph[v]:
                return paths[v] + [start]
            for w in sorted(set(graph[v]) & group):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in an import circle that cannot be walked")  # not for a real component


def import_cycles(graph) -> list[list[str]]:
    """One concrete circle a → b → … → a per group of mutually importing modules."""
    return [_circle_through(min(group), graph, group) for group in _groups(graph)]


def test_the_import_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "dspark_train.config" in graph["dspark_train.training.loop"]  # top level, relative
    assert "dspark_train.target" in graph["dspark_train.training.loop"]  # inside a function
    assert "dspark_train.config" in graph["dspark_train.drafters.model"]  # `from ..config import`
    assert "dspark_train.decoding.tree" in graph["dspark_train.decoding"]  # a package's __init__
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_a_stated_reason_is_recognised():
    assert REASON.search("The drafter.\n\nLong because the two paths share one set of weights.\n")
    assert not REASON.search("Long because.") and not REASON.search("Not long because it is short.")


def test_no_import_circle_between_modules():
    """No two modules import each other, directly or through others (a → b → c → a), at any level."""
    graph = import_graph()
    cycles = import_cycles(graph)
    if cycles:
        shown = ["  " + " → ".join(f"{a} (line {graph[a][b]})" for a, b in zip(c, c[1:])) + f" → {c[-1]}"
                 for c in cycles]
        pytest.fail("import circles (a (line n) → b: a imports b at line n, possibly inside a function):\n"
                    + "\n".join(shown), pytrace=False)


def _function(path: Path, name: str) -> ast.FunctionDef:
    return next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_the_training_loop_fits_on_a_screen():
    fn = _function(PACKAGE / "training" / "loop.py", "train")
    lines = fn.end_lineno - fn.lineno + 1  # from `def` to the last line, docstring included
    assert lines <= MAX_TRAIN_LINES, f"train.train is {lines} lines (limit {MAX_TRAIN_LINES}): move a phase out"
    assert fn.args.args and fn.args.args[0].arg == "recipe"  # the function this test means, not a namesake


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short_or_says_why(name):
    path = MODULES[name]
    source = path.read_text()
    lines = len(source.splitlines())
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(source)) or ""
    if not REASON.search(doc):
        pytest.fail(f"{path.relative_to(PACKAGE.parent)} has {lines} lines (> {MAX_LINES}): split it, or state the "
                    "reason in its docstring on a line starting 'Long because …'", pytrace=False)


# --------------------------------------------------------------------------- the house by pipeline stage
STAGES = ("data", "training", "calibration", "artifacts", "evaluation")  # the pipeline, in order
FLOORS = ("policy", "drafters", "decoding")  # shared by the stages; import no stage
# what everyone uses
GROUND = ("config", "layout", "hardware", "target", "runlock", "recipe_codec", "shipped", "runrecord")
TOP = ("cli", "demo", "plan", "train")  # commands and entry points: they may import anything


def unit(module: str) -> str:
    """The package-level unit of a module: its subpackage (data, training, …, drafters, decoding, policy) or, on
    the ground floor, the module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dspark_train"


def package_graph(graph=None) -> dict[str, set[str]]:
    """unit → the units it imports (edges within a unit left out)."""
    graph = graph or import_graph()
    out: dict[str, set[str]] = {}
    for a, imports in graph.items():
        out.setdefault(unit(a), set()).update(unit(b) for b in imports if unit(b) != unit(a))
    return out


def allowed(u: str) -> set[str]:
    """The units `u` may import."""
    if u in STAGES:
        return set(GROUND) | set(FLOORS) | set(STAGES[:STAGES.index(u)])
    if u == "policy":
        return set(GROUND)
    if u in ("drafters", "decoding"):
        return set(GROUND) | {"policy", "drafters"}
    if u in GROUND:
        return set(GROUND)
    return set(GROUND) | set(FLOORS) | set(STAGES) | set(TOP)


def test_every_module_lives_in_a_stage_a_floor_or_on_the_ground():
    units = {unit(m) for m in MODULES} - {"dspark_train"}
    assert units == set(STAGES) | set(FLOORS) | set(GROUND) | set(TOP), units


def test_package_arrows_run_one_way():
    """No stage imports a later stage; `decoding/`, `drafters/` and `policy/` import no stage; the ground floor
    imports only itself (listing each offending import with its line)."""
    graph = import_graph()
    bad = [f"{a} (line {line}) → {b}: {unit(a)} may not import {unit(b)}"
           for a, imports in sorted(graph.items()) for b, line in sorted(imports.items())
           if unit(b) != unit(a) and unit(b) not in allowed(unit(a))]
    assert not bad, "\n".join(bad)
    packages = package_graph(graph)
    assert "decoding" not in packages["policy"] and not packages["decoding"] & set(STAGES)


def test_no_module_shares_a_standard_library_name():
    """[O3] A module named like a standard-library one (decoding/copy.py was) reads as that module at every import
    site and shadows it for scripts run from its folder."""
    import sys

    clash = [name for name in MODULES if name.rpartition(".")[2] in sys.stdlib_module_names]
    assert not clash, clash


SECTIONS_OF = {"data": ("data",), "training": ("train", "distributed", "logging"), "calibration": ("calibrate",),
               "artifacts": ("export",)}  # the recipe sections each stage owns


def later_settings_read(source: str, stage: str) -> list[str]:
    """`x.<section>` reads in `source` of a recipe section that a later stage owns, as "line N: .section"."""
    later = {s for st in STAGES[STAGES.index(stage) + 1:] for s in SECTIONS_OF.get(st, ())}
    return [f"line {node.lineno}: .{node.attr}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and node.attr in later]


def test_a_stage_reads_no_later_stages_settings():
    """[O3] The recipe's sections follow the stages too: `data/` reads no `train.*` (the feature cache's keys are
    `data.feature_cache*`, the run directory `Recipe.run_dir`), no stage reads a later one's section."""
    assert later_settings_read("recipe.train.output_dir\nrecipe.data.root", "data") == ["line 1: .train"]
    bad = [f"{name}: {hit}" for name, path in MODULES.items() if unit(name) in STAGES
           for hit in later_settings_read(path.read_text(), unit(name))]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- the benchmarks' house
BENCH = PACKAGE.parent / "bench"
# private names of *other* projects' objects that a check has to reach (what it verifies lives there)
FOREIGN_PRIVATE = {("engine_check.py", "_attn_implementation"): "speculators' layer config: eager attention",
                   ("engine_check.py", "_backbone_forward"): "speculators' drafter: its logits before the head"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.AST) -> str:
    """The name an attribute chain starts from (`a` of `a.b.c`), '' if it starts elsewhere."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else ""


def bench_breaches(source: str, filename: str = "x.py") -> list[str]:
    """What a bench/ module must not do: import a private name (or through a private module) of dspark_train; reach
    a private attribute of anything (FOREIGN_PRIVATE excepted), by name or as a string handed to a call (`setattr(x,
    "_y", …)`, a patch helper's argument); monkeypatch dspark_train: assign to an attribute of something imported
    from it, setattr/delattr on it, or hand one of its modules to anything but an attribute read; touch sys.path;
    import a sibling other than as `bench.<name>`."""
    tree = ast.parse(source, filename)
    siblings = {p.stem for p in BENCH.glob("*.py")} - {"__init__", "bench"}  # `bench` is the package itself
    ours, modules, out = set(), set(), []  # names bound to dspark_train objects; those bound to its modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top == "dspark_train":
                    ours.add((a.asname or a.name).split(".")[0])
                    modules.add((a.asname or a.name).split(".")[0])
                    if any(map(_private, a.name.split("."))):
                        out.append(f"line {node.lineno}: imports the private module {a.name}")
                elif top in siblings:
                    out.append(f"line {node.lineno}: `import {a.name}`: import siblings as bench.{a.name}")
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level or parts[0] in siblings:
                out.append(f"line {node.lineno}: `from {'.' * node.level}{node.module or ''} import …`: import "
                           "siblings as `from bench.<name> import …`")
            elif parts[0] == "dspark_train":
                ours.update(a.asname or a.name for a in node.names)
                modules.update(a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES)
                for name in [p for p in parts if _private(p)] + [a.name for a in node.names if _private(a.name)]:
                    out.append(f"line {node.lineno}: imports the private name {name} from {node.module}")
    read = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # `x` of every `x.y`
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and (Path(filename).name, node.attr) \
                not in FOREIGN_PRIVATE:
            out.append(f"line {node.lineno}: reaches the private attribute .{node.attr}")
        if isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend", "remove") and \
                isinstance(node.value, ast.Attribute) and node.value.attr == "path" and _root(node.value) == "sys":
            out.append(f"line {node.lineno}: sys.path.{node.attr}: bench runs as `python -m bench.<name>` from the "
                       "repo root, dspark_train is installed")
        if isinstance(node, ast.Name) and node.id in modules and isinstance(node.ctx, ast.Load) and \
                id(node) not in read:
            out.append(f"line {node.lineno}: hands the dspark_train module {node.id} around (to patch it?): read "
                       "its names only")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and _root(t) in ours:
                out.append(f"line {node.lineno}: assigns to {ast.unparse(t)}, part of dspark_train (monkeypatching)")
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") and node.args and \
                    _root(node.args[0]) in ours:
                out.append(f"line {node.lineno}: {node.func.id} on {ast.unparse(node.args[0])}, part of dspark_train")
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.isidentifier() and \
                        _private(arg.value) and arg.value.strip("_"):
                    out.append(f"line {node.lineno}: names the private attribute {arg.value!r} in a call")
    return out


def test_bench_breaches_are_recognised():
    bad = """import sys
from dspark_train.data.regenerate import _part_path, generate_batch
from dspark_train.decoding import decoder as decoder_module
from dspark_train.decoding._inner import x
from resultfile import write_result
from .resultfile import write_result
sys.path.insert(0, "..")
full = drafter._full(logits)
decoder_module.draft_tree = wrapped
setattr(decoder_module, "keep_slots", wrapped)
setattr(dec, "_accept", wrapped)
patch(dec, "_round", "trace + stop")
patch(decoder_module, "find_stop", "trace + stop")
"""
    found = bench_breaches(bad)
    for line in (2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13):  # line 3, importing a public module, is fine
        assert any(f.startswith(f"line {line}:") for f in found), (line, found)
    good = """from dspark_train.decoding import SpeculativeDecoder, decoder
import dspark_train.target
from bench.resultfile import write_result
t = dspark_train.target.load_target(c)
d = decoder.SpeculativeDecoder(t)
x = obj.__class__
setattr(recipe.drafter, "head", "none")
"_".join(a.split("_"))
"""
    assert not bench_breaches(good)
    assert not bench_breaches("model._backbone_forward(x)\n", "engine_check.py")


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_uses_only_the_public_api(path):
    """bench/ (the checkout's benchmarks) uses dspark_train as a user would: public names, no monkeypatching (the
    decoder records its own phase timings), no sys.path hacks, siblings imported one way (`bench.<name>`)."""
    found = bench_breaches(path.read_text(), path.name)
    assert not found, f"{path.relative_to(PACKAGE.parent)}:\n" + "\n".join(found)


def test_no_module_resolves_paths_against_its_own_location():
    """[O3] The package runs where it is installed: nothing in it reads `__file__` or `__path__` to find files
    beside itself (the shipped recipes and configs are package data, found through importlib.resources:
    shipped.py). Relative paths mean the recipe's folder or the current directory (config.py)."""
    bad = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}" for name, path in MODULES.items()
           for node in ast.walk(ast.parse(path.read_text(), str(path)))
           if isinstance(node, ast.Name) and node.id in ("__file__", "__path__")
           or isinstance(node, ast.Attribute) and node.attr in ("__file__", "__path__")]
    assert not bad, "resolves against the package's own location: " + ", ".join(bad)
