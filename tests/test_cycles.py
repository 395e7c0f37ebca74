"""The lint step's circle check (devstack/cycles.py) finds every loop of imports, however it is
spelled, and names the imports that tie it."""

from __future__ import annotations

from pathlib import Path

from devstack import cycles


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_loops_of_every_spelling_are_found_and_named(tmp_path: Path) -> None:
    repo = tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/app.py": "def make():\n    from pkg import ui  # inside a function\n",
        "pkg/ui.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .app import make\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/a.py": "import pkg.sub.b as b\n",
        "pkg/sub/b.py": "from ..sub import a\n",
        "pkg/plain.py": "import os\nfrom pkg import app\n",  # imports into a circle, is in none
    })
    assert cycles.report(repo, ["pkg"]) == [
        "circle of 2 modules: pkg.app:2 -> pkg.ui, pkg.ui:3 -> pkg.app",
        "circle of 2 modules: pkg.sub.a:1 -> pkg.sub.b, pkg.sub.b:1 -> pkg.sub.a"]


def test_a_tree_without_loops_has_none(tmp_path: Path) -> None:
    repo = tree(tmp_path, {"pkg/__init__.py": "from pkg import base\n", "pkg/base.py": "import json\n",
                           "pkg/top.py": "from pkg.base import x\nfrom pkg import base, missing\n"})
    assert cycles.report(repo, ["pkg"]) == []


def test_this_tree_has_no_circle() -> None:
    assert cycles.report(Path(__file__).resolve().parent.parent) == []
