"""The stages import one way: train/ makes a learner and export/ consumes it, so neither imports
the other, and what both need lives in learners/; the serving side imports none of them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported(package: str) -> dict[str, set[str]]:
    """Each module of `package` and the top-level packages it imports (relative imports stay inside)."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [("train", {"export"}), ("export", {"train"}),
                                                ("learners", {"train", "export", "serve"}),
                                                ("serve", {"train", "export", "learners"})])
def test_no_stage_imports_one_it_should_not(package, forbidden):
    assert {module: names & forbidden for module, names in imported(package).items() if names & forbidden} == {}


def test_train_and_export_share_the_learner_code_through_learners():
    assert "learners" in imported("train")["train/cli.py"] and "learners" in imported("export")["export/cli.py"]
