"""Dependencies point one way: cli -> train/export -> kernels -> core; the core never imports torch at module level.

Read from the source with `ast` (every import, also those inside functions), so a new back-edge fails
here before it becomes a cycle or pulls torch into the bedside `predict`.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# layer -> (its source folder, the leader_edge subpackages it may import)
LAYERS = {
    "core": (ROOT / "leader_edge", set()),
    "kernels": (ROOT / "kernels", {"kernels"}),
    "train": (ROOT / "train", {"kernels", "train"}),
    "export": (ROOT / "export", {"kernels", "train", "export"}),
}
UPPER = {"cli", "train", "export", "kernels"}  # leader_edge.<these> are not part of the core


def _modules(folder: Path, layer: str):
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder)
        if layer == "core" and (rel.parts[0] == "cli" or rel.name == "__main__.py"):
            continue  # the CLI (and `python -m leader_edge`) sits on top and may import anything
        yield path


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno, id(node) in top))
    return out


@pytest.mark.parametrize("layer", list(LAYERS))
def test_each_layer_imports_only_the_layers_below_it(layer):
    folder, allowed = LAYERS[layer]
    wrong = []
    for path in _modules(folder, layer):
        for module, line, _ in _imports(path):
            parts = module.split(".")
            if parts[0] == "leader_edge" and len(parts) > 1 and parts[1] in UPPER and parts[1] not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_no_torch_at_module_level():
    # The training stack (and plotting); pyarrow/pandas stay allowed: MIMIC sources need them, and
    # tests/test_lean_install.py checks that `predict` runs with the base install alone.
    heavy = ("torch", "triton", "transformers", "peft", "safetensors", "onnx", "onnxscript", "matplotlib")
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module} at module level"
             for path in _modules(ROOT / "leader_edge", "core")
             for module, line, top in _imports(path) if top and module.split(".")[0] in heavy]
    assert not wrong, "\n".join(wrong)
