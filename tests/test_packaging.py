"""What a wheel ships: every package folder of the source tree is named in setup.py's ``packages``."""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_kwargs():
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return {kw.arg: kw.value for kw in node.keywords}
    raise AssertionError("setup.py has no setup(...) call")


def test_every_package_folder_is_in_the_wheel():
    kwargs = _setup_kwargs()
    packages = set(ast.literal_eval(kwargs["packages"]))
    package_dir = ast.literal_eval(kwargs["package_dir"])
    found = set()
    for name, folder in package_dir.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    missing = sorted(found - packages)
    assert missing == [], f"setup.py's packages leaves out {missing}: a wheel would not ship them"
    assert all(os.path.isfile(ROOT / package_dir.get(p, p.replace(".", "/")) / "__init__.py")
               for p in packages if p in package_dir)


def test_the_shipped_ranks_are_package_data():
    data = ast.literal_eval(_setup_kwargs()["package_data"])
    assert "assets/*.tiktoken" in data["gptfast"]
    assert list((ROOT / "gptfast" / "assets").glob("*.tiktoken"))
