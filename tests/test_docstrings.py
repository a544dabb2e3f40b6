"""Every public class shows how it is used in a docstring example, which pytest runs as a
doctest (``--doctest-modules``): the River convention, kept by this test for new classes."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def public_classes_without_an_example(root: Path = ROOT) -> list[str]:
    missing = []
    for path in sorted([*root.joinpath("monitor").rglob("*.py"), *root.joinpath("connectors").rglob("*.py")]):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") \
                    and ">>>" not in (ast.get_docstring(node) or ""):
                missing.append(f"{path.relative_to(root)}: {node.name}")
    return missing


def test_every_public_class_has_a_docstring_example():
    assert public_classes_without_an_example() == []


def test_the_check_sees_a_class_without_one(tmp_path):
    (tmp_path / "monitor").mkdir()
    (tmp_path / "monitor" / "thing.py").write_text('class Thing:\n    """No example."""\n\n\nclass _Private:\n    pass\n')
    assert public_classes_without_an_example(tmp_path) == ["monitor/thing.py: Thing"]
