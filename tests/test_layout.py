"""The package's layering (docs/architecture.md): each folder imports only folders below it, nothing imports
``prep/`` (offline preparation) from the training path, and every megatron-core override is registered."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_xopd"
# Lowest first: a folder may import itself and any folder before it.
LAYERS = ["runtime", "ops", "models", "data", "algo", "rollout", "convert", "trainer", "prep"]


def _package_imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """Top-level folders of megatron_xopd (at ``root``) that ``path`` imports (absolute or relative)."""
    folder = path.relative_to(root).parts[0] if path.parent != root else None
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("megatron_xopd."):
                found.add(node.module.split(".")[1])
            elif node.level == 1 and folder is None and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1 and folder is not None:
                found.add(folder)
            elif node.level == 2 and node.module:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("megatron_xopd.")}
    return found & set(LAYERS)


def test_no_folder_imports_a_folder_above_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE:
            continue  # testing.py and the package __init__ sit outside the layers
        folder = path.relative_to(PACKAGE).parts[0]
        for imported in _package_imports(path):
            if LAYERS.index(imported) > LAYERS.index(folder):
                upward.append(f"{path.relative_to(PACKAGE)} imports {imported}/")
    assert upward == []


def test_only_prep_imports_prep():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "prep" in _package_imports(p) and p.relative_to(PACKAGE).parts[0] != "prep"]
    assert offenders == []


def test_the_layer_check_sees_package_imports(tmp_path):
    """The checker itself: relative and absolute imports of other folders, and of its own folder."""
    fake = tmp_path / "megatron_xopd"
    (fake / "models").mkdir(parents=True)
    bad = fake / "models" / "bad.py"
    bad.write_text("from ..trainer.loop import XOPDTrainer\nfrom megatron_xopd.prep import synthesis\n"
                   "from .gpt import build_gpt_model\nimport megatron_xopd.data.cuts\n")
    assert _package_imports(bad, fake) == {"trainer", "prep", "models", "data"}
