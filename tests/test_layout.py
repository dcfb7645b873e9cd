"""The source layout stays as documented: the map of daqd/ in daqd.__doc__ names every module and
package there, and the packages split by job (daqd.dhs, daqd.packetstream, daqd.protocols.cdtp,
daqd.protocols.dcss) re-export every public name their modules define, so `from daqd.dhs import X`
keeps working for all of them."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import daqd

DAQD_DIR = Path(daqd.__file__).resolve().parent


def _map_entries() -> list[str]:
    doc = daqd.__doc__ or ""
    return re.findall(r"^  ([a-z_][a-z0-9_]*/?) ", doc, re.MULTILINE)


def test_the_map_in_daqd_init_names_every_module_and_package_once() -> None:
    entries = _map_entries()
    on_disk = {p.stem for p in DAQD_DIR.glob("*.py") if p.name != "__init__.py"}
    on_disk |= {p.parent.name + "/" for p in DAQD_DIR.glob("*/__init__.py")}
    assert len(entries) == len(set(entries)), "a name is listed twice"
    assert set(entries) == on_disk, (
        f"missing from the map: {sorted(on_disk - set(entries))}; "
        f"listed but not there: {sorted(set(entries) - on_disk)}"
    )


def _public_names(path: Path) -> set[str]:
    """Top-level public classes and functions, and capitalised constants and type aliases."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name) and t.id[:1].isupper())
    return {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize(
    "package", ["daqd.dhs", "daqd.packetstream", "daqd.protocols.cdtp", "daqd.protocols.dcss"]
)
def test_a_package_split_by_job_reexports_every_public_name(package: str) -> None:
    pkg = importlib.import_module(package)
    exported = set(pkg.__all__)
    assert pkg.__file__ is not None
    modules = [p for p in Path(pkg.__file__).parent.glob("*.py") if p.name != "__init__.py"]
    assert len(modules) >= 2
    for path in modules:
        mod = importlib.import_module(f"{package}.{path.stem}")
        public = _public_names(path)
        assert public, path
        assert public <= exported, f"{path.name}: not in {package}.__all__: {public - exported}"
        for name in public:
            assert getattr(pkg, name) is getattr(mod, name), name
    assert {name for name in exported if not hasattr(pkg, name)} == set()


def test_every_package_is_installed_and_none_at_the_top_but_daqd() -> None:
    """pyproject.toml lists the packages (receivers/ and publishers/ install as daqd.receivers
    and daqd.publishers, which find cannot do): the list must match the tree, or a new package
    would be left out of every install."""
    import tomllib

    root = DAQD_DIR.parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {v: k for k, v in setuptools["package-dir"].items()}
    in_tree = set()
    for init in [*DAQD_DIR.rglob("__init__.py"), *root.glob("*/__init__.py")]:
        rel = init.parent.relative_to(root).as_posix()
        top = rel.split("/")[0]
        if top in mapped:
            in_tree.add(mapped[top] + rel[len(top) :].replace("/", "."))
        elif top == "daqd":
            in_tree.add(rel.replace("/", "."))
    assert set(setuptools["packages"]) == in_tree
    assert all(name == "daqd" or name.startswith("daqd.") for name in setuptools["packages"])
