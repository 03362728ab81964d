"""The project's imports run one way: common → plumbing → the gold task → stages → the lab's runs.

Read from the source with `ast` (function-level imports count too), so a new import that closes a
circle, or a stage that imports the study, fails here.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each module's layer; a module may import its own layer or those below it, never above.
LAYERS = {
    "common": 0, "lora": 0,                       # no project imports, or none but each other
    "plumbing": 1, "plumbing.amp": 1, "plumbing.chat": 1, "plumbing.checkpoint": 1,
    "plumbing.decode": 1, "plumbing.distributed": 1, "plumbing.gpt_judge": 1,
    "plumbing.hf_models": 1, "plumbing.ppo_setup": 1,
    "gold": 2, "report": 2,                       # the gold task and the report: below every stage
    "sft": 3, "label": 3, "discriminator": 3, "redistribute": 3, "ppo_token": 3, "eval": 3,
    "gold_samples": 4, "study": 4,                # the lab's runs: they drive the stages
}


def module_name(path: Path) -> str:
    if path.parent.name == "plumbing":
        return "plumbing" if path.stem == "__init__" else f"plumbing.{path.stem}"
    return path.stem


def project_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (`import x`, `from x import y`,
    `from plumbing import checkpoint`, and plumbing's relative imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and path.parent.name == "plumbing":
                base = "plumbing" + (f".{base}" if base else "")
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.add(f"{base}.{alias.name}")
                elif base in known:
                    found.add(base)
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    files = sorted([*ROOT.glob("*.py"), *ROOT.glob("plumbing/*.py")])
    known = {module_name(f) for f in files}
    return {module_name(f): project_imports(f, known) for f in files}


def find_cycle(graph: dict[str, set[str]]):
    """One import circle as a list of modules, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_every_module_has_a_layer():
    assert set(import_graph()) == set(LAYERS), "give a new module its layer in LAYERS"


def test_no_import_goes_up_a_layer():
    upward = [f"{module} (layer {LAYERS[module]}) imports {dep} (layer {LAYERS[dep]})"
              for module, deps in import_graph().items() for dep in sorted(deps)
              if LAYERS[dep] > LAYERS[module]]
    assert upward == []


def test_no_import_circles():
    assert find_cycle(import_graph()) is None


def test_find_cycle_finds_a_circle_and_the_graph_is_read_from_the_source():
    # the checker itself: a planted circle is found, and known edges are read off the files
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "gold" in graph["ppo_token"] and "ppo_token" in graph["study"] | graph["gold_samples"]
    assert "plumbing.distributed" in graph["plumbing.checkpoint"]
