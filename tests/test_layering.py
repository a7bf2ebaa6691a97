"""The layering rule `server → jaxserve → models → pallas_kernels` (DESIGN.md), read from the
sources by tests/layering.py: no package imports one above it, and no project modules import each
other in a cycle. Imports inside functions count: a lazy import is still a dependency."""

from __future__ import annotations

import textwrap

from tests import layering


def test_no_package_imports_one_above_it():
    upward = layering.upward_report(layering.all_imports())
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles = layering.cycle_report(layering.all_imports())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# The checker itself, on small synthetic trees.

def _tree(root, files: dict[str, str]):
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    for package in layering.RANKS:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return layering.all_imports(root)


def _edges(imports) -> set[tuple[str, str]]:
    return {(imp.importer, imp.imported) for imp in imports}


def test_checker_finds_upward_imports_at_module_level_and_in_functions(tmp_path):
    imports = _tree(tmp_path, {
        "models/llama.py": "import pallas_kernels\nfrom jaxserve.config import EngineConfig\n",
        "pallas_kernels/dispatch.py": """\
            import os

            def choose():
                if os.environ:
                    from models import llama
                return llama
        """,
        "jaxserve/config.py": "",
        "server/main.py": "from jaxserve import config\n",
    })
    upward = layering.upward_imports(imports)
    assert [(imp.where(tmp_path), imp.imported) for imp in upward] == [
        ("pallas_kernels/dispatch.py:5", "models.llama"),  # function-local, inside an `if`
        ("models/llama.py:2", "jaxserve.config"),
    ]
    assert upward[0].text == "from models import llama"


def test_checker_resolves_relative_submodule_and_package_imports(tmp_path):
    imports = _tree(tmp_path, {
        "jaxserve/kv/__init__.py": "from . import pool\n",
        "jaxserve/kv/pool.py": "from ..config import X\nfrom .. import kv\n",
        "jaxserve/kv/manager.py": "from jaxserve.kv import pool, Manager\nimport jaxserve.kv.pool as p\n",
        "jaxserve/config.py": "import jaxserve.missing\nimport numpy\n",
        "jaxserve/bench.py": "import importlib\nimportlib.import_module('server.main')\n",
        "server/main.py": "",
    })
    assert _edges(imports) == {
        ("jaxserve.kv", "jaxserve.kv.pool"),  # `from . import submodule`
        ("jaxserve.kv.pool", "jaxserve.config"),  # a name from a module: that module
        ("jaxserve.kv.pool", "jaxserve.kv"),  # a package: its __init__
        ("jaxserve.kv.manager", "jaxserve.kv.pool"),  # `from package import submodule`
        ("jaxserve.kv.manager", "jaxserve.kv"),  # ... and a name from the package's __init__
        ("jaxserve.config", "jaxserve"),  # no such module: what runs is the package
        ("jaxserve.bench", "server.main"),  # import_module with a literal name
    }
    assert [imp.imported for imp in layering.upward_imports(imports)] == ["server.main"]


def test_checker_finds_cycles_but_not_parent_packages(tmp_path):
    imports = _tree(tmp_path, {
        "models/layers.py": "from models.dp import shard\n",
        "models/dp.py": "def f():\n    from models.layers import Attention\n",
        "models/moe.py": "from models import ep\n",
        "models/ep.py": "import models.router\n",
        "models/router.py": "from . import moe\n",
        # A submodule importing its own package's __init__, which imports it back, is a cycle too.
        "jaxserve/__init__.py": "from jaxserve.config import EngineConfig\n",
        "jaxserve/config.py": "import jaxserve\n",
        # `import a.b` does not count the package `a` (already being imported by then).
        "jaxserve/kv/__init__.py": "from jaxserve.kv.pool import Pool\n",
        "jaxserve/kv/pool.py": "from jaxserve.kv_sizing import size\n",
        "jaxserve/kv_sizing.py": "",
    })
    cycles = layering.import_cycles(imports)
    assert cycles == [["jaxserve", "jaxserve.config"], ["models.dp", "models.layers"],
                      ["models.ep", "models.moe", "models.router"]]
    assert [imp.where(tmp_path) for imp in layering.cycle_edges(cycles[1], imports)] == [
        "models/dp.py:2", "models/layers.py:1"]
    assert layering.upward_imports(imports) == []
