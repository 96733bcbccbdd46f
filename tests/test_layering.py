"""Dependencies point one way: app -> models -> mlx_cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def loaded_modules(package: str) -> set[str]:
    code = (
        f"import sys, json, pkgutil, importlib, {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def top(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


def test_mlx_cache_imports_only_mlx_numpy_and_stdlib():
    mods = top(loaded_modules("mlx_cache"))
    assert not mods & {"textual", "models", "app", "mlx_lm", "transformers", "huggingface_hub"}


def test_models_does_not_import_textual_or_app():
    mods = top(loaded_modules("models"))
    assert "textual" not in mods and "app" not in mods


@pytest.mark.parametrize("package", ["mlx_cache", "models"])
def test_no_upward_imports_in_source(package):
    from pathlib import Path

    root = Path(__file__).parent.parent / package
    banned = {"mlx_cache": ("from models", "import models", "from app", "import app", "mlx_lm", "textual"),
              "models": ("from app", "import app", "textual")}[package]
    for path in root.rglob("*.py"):
        text = path.read_text()
        for word in banned:
            assert f"\n{word}" not in text and f"    {word}" not in text, f"{path} uses {word}"


def _lint_imports(cwd, config: str | None = None) -> subprocess.CompletedProcess:
    from pathlib import Path

    command = [str(Path(sys.executable).parent / "lint-imports")] + (["--config", config] if config else [])
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_import_contracts_hold():
    """pyproject.toml's import-linter contracts: the layers, and no circles in any package."""
    from pathlib import Path

    r = _lint_imports(Path(__file__).parent.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


def test_import_contracts_catch_a_circle(tmp_path):
    # The same contract on a package with a circle: the check is not vacuous.
    pkg = tmp_path / "circled"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "screen.py").write_text("from . import app\n")
    (pkg / "app.py").write_text("from . import screen\n")
    (tmp_path / "contracts.toml").write_text(
        '[tool.importlinter]\nroot_packages = ["circled"]\n'
        '[[tool.importlinter.contracts]]\nname = "no circles"\ntype = "acyclic_siblings"\nancestors = ["circled"]\n'
    )
    r = _lint_imports(tmp_path, "contracts.toml")
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout + r.stderr


def test_the_first_frame_needs_no_heavy_import(tmp_path):
    """What runs before the app's first frame imports none of the modules that cost a second or more."""
    code = (
        "import sys, json\n"
        "import app.cli, models.embedded\n"
        "from app.tui import make_app\n"
        "make_app()\n"
        "heavy = ['numpy', 'gguf', 'mlx_lm', 'transformers', 'huggingface_hub', 'mlx_cache.kinds', 'models.engine']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))"
    )
    import os

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, KVCHAT_HOME=str(tmp_path)))
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_module_imports_another_modules_private_names():
    """`from x import _name` reaches into another module's insides: what others use is public."""
    import ast
    from pathlib import Path

    root = Path(__file__).parent.parent
    found = []
    for package in ("app", "models", "mlx_cache"):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                    found += [f"{path.relative_to(root)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
