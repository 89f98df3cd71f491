"""The import layers of leantune, checked by parsing every module's imports.

Each layer may import its own layer and the layers below it, never one above:

    0  leantune.base                      errors and small shared helpers
    1  leantune.quant                     ops: every kernel with its reference and dispatch
                                          (4-bit, row ops, chunked CE, 8-bit AdamW, host pool)
    2  leantune.peft_core                 the model: config, checkpoints, 4-bit load/save,
                                          tokenizer, generation, adapters and variants
    3  leantune.train                     data, config, the loop and its parts
    4  leantune.eval                      metrics, runner, report
    5  leantune.serve                     the OpenAI-compatible server (engine + HTTP)
    6  leantune.bench                     benchmarks (of everything below, the server included)
    7  leantune.cli, leantune.demo,       the wiring on top, which alone may import everything
       leantune (__init__, __main__)

On top of the layers, the imports that run when a module is imported (its top-level
statements) form no cycle, inside a package too. Imports inside functions are checked for
direction only. ``docs/architecture.md`` draws the same layers.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("quant", "peft_core", "train", "eval", "bench")
LAYERS = {"base": 0, "quant": 1, "peft_core": 2, "train": 3, "eval": 4, "serve": 5, "bench": 6,
          "cli": 7, "demo": 7, "__main__": 7, "": 7}


def module_name(rel: Path) -> str:
    """``quant/dispatch.py`` -> ``leantune.quant.dispatch``; ``__init__.py`` -> ``leantune``."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["leantune", *parts])


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return LAYERS[top]


def sources() -> dict[str, str]:
    """{module name: source} of every leantune module in the tree."""
    out = {}
    for path in sorted(ROOT.glob("*.py")):
        out[module_name(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    return out


def imports(module: str, source: str, is_pkg: bool) -> list[tuple[str, int, bool]]:
    """(imported leantune module, line, at top level) for each import of ``source``."""
    tree = ast.parse(source)
    top = {id(n) for n in tree.body}
    for n in tree.body:  # `if ...:` / `try:` blocks at module level still run at import
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(m) for m in ast.walk(n)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "leantune" or name.startswith("leantune."):
                found.append((name, node.lineno, id(node) in top))
    return found


def resolve(name: str, known: set[str]) -> str | None:
    """The module an imported name refers to (``from leantune.quant import dispatch`` names
    the module ``leantune.quant.dispatch``; ``...state.QuantState`` names ``...state``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def violations(srcs: dict[str, str]) -> list[str]:
    known = set(srcs)
    problems, graph = [], {m: set() for m in srcs}
    for mod, src in srcs.items():
        is_pkg = mod == "leantune" or any(k.startswith(mod + ".") for k in known)
        for name, line, at_top in imports(mod, src, is_pkg):
            target = resolve(name, known)
            if target is None or target == mod or mod.startswith(target + "."):
                continue  # a parent package's __init__ (empty) or itself
            if layer_of(target) > layer_of(mod):
                problems.append(f"{mod}:{line}: imports {target}, a layer above "
                                f"({layer_of(mod)} -> {layer_of(target)})")
            if at_top:
                graph[mod].add(target)
    # cycles among import-time edges (depth-first search, each cycle reported once)
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return problems


def test_imports_follow_the_layers_and_form_no_cycle():
    problems = violations(sources())
    assert not problems, "\n".join(problems)


def test_every_package_has_a_layer():
    assert {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} <= set(LAYERS)
    assert {m.split(".")[1] for m in sources() if m.count(".")} <= set(LAYERS)


def test_a_planted_upward_import_fails():
    srcs = sources()
    planted = dict(srcs)
    planted["leantune.quant.dispatch"] += "\nfrom leantune.train.loop import train\n"
    problems = violations(planted)
    assert any(p.startswith("leantune.quant.dispatch:") and "leantune.train.loop" in p for p in problems)
    lazy = dict(srcs)  # inside a function too
    lazy["leantune.peft_core.model"] += "\ndef f():\n    from ..eval import runner\n"
    assert any("leantune.eval.runner" in p for p in violations(lazy))


def test_a_planted_cycle_fails():
    planted = dict(sources())
    planted["leantune.base"] += "\nimport leantune.quant.state\n"  # upward and a cycle
    planted["leantune.quant.state"] += "\nfrom leantune.quant import dispatch\n"  # dispatch imports state
    problems = violations(planted)
    assert any(p.startswith("import cycle:") and "leantune.quant.dispatch" in p for p in problems)
