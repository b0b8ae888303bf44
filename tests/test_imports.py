"""Imports run one way, lowest first (README, "Files"), read from the source with `ast`: module-level
and function-level imports alike. Run: OMP_NUM_THREADS=1 python -m pytest tests/test_imports.py"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the order: a file may import only files of a lower rank (never an equal one: no peer cycles)
ORDER = {"shapes": 0, "common": 1, "train": 2, "tokenizer": 3, "attention": 3, "model": 4, "sample": 5, "evaluate": 6,
         "judge": 7, "vit": 8, "sft": 9, "rl": 10, "run": 11, "bench": 11}
TOP = max(ORDER.values()) + 1  # tests sit above everything
FILES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f != "conftest.py")
TESTS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py"))


def imports(path):
    """[(line, imported project module, [names taken from it] or None, [X._name attributes used])]."""
    tree = ast.parse(open(path).read(), path)
    aliases, out = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ORDER:
                    aliases[a.asname or a.name] = a.name
                    out.append((node.lineno, a.name, None))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in ORDER:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    private = [(n.lineno, aliases[n.value.id], n.attr) for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
               and n.attr.startswith("_") and not n.attr.startswith("__")]
    return out, private


def test_every_file_has_a_place_in_the_order():
    assert set(FILES) <= set(ORDER), f"add {sorted(set(FILES) - set(ORDER))} to ORDER (and README, Files)"


@pytest.mark.parametrize("name", FILES)
def test_no_file_imports_upward_or_anothers_private_names(name):
    found, private = imports(os.path.join(ROOT, name + ".py"))
    for line, mod, names in found:
        assert ORDER[mod] < ORDER[name], f"{name}.py:{line} imports {mod} (rank {ORDER[mod]} >= {ORDER[name]})"
        assert not [n for n in names or () if n.startswith("_")], f"{name}.py:{line} takes {names} from {mod}"
    assert not private, f"{name}.py uses another file's private names: {private}"


@pytest.mark.parametrize("name", TESTS)
def test_tests_import_no_private_names_and_not_bench(name):
    # tests may poke a module's privates as attributes (monkeypatch, white-box checks), never import them
    found, _ = imports(os.path.join(ROOT, "tests", name + ".py"))
    for line, mod, names in found:
        assert mod != "bench", f"tests/{name}.py:{line} imports bench.py"
        assert not [n for n in names or () if n.startswith("_")], f"tests/{name}.py:{line} takes {names} from {mod}"


def test_the_checker_imports_no_torch():
    # shapes.py is numpy/PIL only: the world and its checker run without torch
    tree = ast.parse(open(os.path.join(ROOT, "shapes.py")).read())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in mods
