"""The package's structure, checked: imports flow downward, and the record's fields are
listed once (records.RECORD_FIELDS), every store's shape checked against that list."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from neonnb import records
from neonnb.drivers import redis as redis_driver
from neonnb.drivers.sql_schema import jobs_table

PACKAGE = Path(records.__file__).resolve().parent
# What a driver may import: the records and the plain modules beside them, nothing above.
BELOW_DRIVERS = {"neonnb.records", "neonnb.errors", "neonnb.config", "neonnb.codec", "neonnb.codec_data",
                 "neonnb._loop", "neonnb.artifacts"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The neonnb modules ``path`` imports, anywhere in it (lazy imports in functions count),
    except under ``if TYPE_CHECKING:`` (annotations only)."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                anchor = package[: len(package) - child.level + 1] if child.level else []
                base = ".".join([*anchor, *([child.module] if child.module else [])])
                for alias in child.names:  # "from . import render" imports a module, not a name
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in _ALL else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name.startswith("neonnb")}


_FILES = sorted(PACKAGE.rglob("*.py"))
_ALL = {_module_name(path) for path in _FILES}
IMPORTS = {_module_name(path): _imports(path) for path in _FILES}


def test_the_import_walk_sees_the_imports_it_checks() -> None:
    assert "neonnb.records" in IMPORTS["neonnb.drivers.memory"]
    assert "neonnb.render" in IMPORTS["neonnb.handles"]
    assert "neonnb.notebook.dashboard" in IMPORTS["neonnb.notebook"]  # a lazy import inside a function


def test_drivers_import_nothing_above_the_records() -> None:
    for module, imported in IMPORTS.items():
        if module.startswith("neonnb.drivers"):
            above = {name for name in imported if not name.startswith("neonnb.drivers") and name not in BELOW_DRIVERS}
            assert not above, f"{module} imports {sorted(above)}, above the records"


def test_the_records_stand_on_the_errors_alone() -> None:
    assert IMPORTS["neonnb.records"] <= {"neonnb.errors"}
    assert IMPORTS["neonnb.render"] <= {"neonnb.records"}


def test_no_core_module_imports_the_notebook_layer() -> None:
    for module, imported in IMPORTS.items():
        if module.startswith("neonnb.notebook") or module == "neonnb":  # the package offers %load_ext
            continue
        upward = {name for name in imported if name.startswith("neonnb.notebook")}
        assert not upward, f"{module} imports {sorted(upward)}"


def test_every_store_keeps_the_fields_the_records_list() -> None:
    fields = records.RECORD_FIELDS
    assert [name for name, _ in records._READERS] == list(fields), "read_record reads each field, in order"
    assert [c.name for c in jobs_table("neonnb_jobs").columns if c.name != "seq"] == list(fields), "SQL columns"
    lua = (PACKAGE / "drivers" / "redis_scripts.lua").read_text()
    [listed] = re.findall(r"local fields = \{([^}]*)\}", lua)
    assert tuple(re.findall(r"'(\w+)'", listed)) == redis_driver.ENQUEUE_FIELDS, "the Lua enqueue field list"
    assert set(redis_driver.ENQUEUE_FIELDS) <= set(fields)


# The runtime under the facade, bottom to top: each may import only what is listed before it
# (and the plain modules the drivers may import). The manager, the CLI and the notebook layer
# stand above all of them.
RUNTIME = ["neonnb.capture", "neonnb.job", "neonnb.drivers", "neonnb.hooks", "neonnb.feed", "neonnb.core",
           "neonnb.render", "neonnb.frames", "neonnb.handles", "neonnb.workflows", "neonnb.scheduler", "neonnb.worker"]


def _layer(module: str) -> int | None:
    for index, prefix in enumerate(RUNTIME):
        if module == prefix or module.startswith(prefix + "."):
            return index
    return None


def test_the_runtime_imports_downward_and_never_the_facade() -> None:
    for module, imported in IMPORTS.items():
        layer = _layer(module)
        if layer is None:
            continue
        for name in imported - BELOW_DRIVERS - {"neonnb.records"}:
            other = _layer(name)
            assert other is not None, f"{module} imports {name}, above the runtime"
            assert other <= layer, f"{module} imports {name}, which sits above it"


def test_workers_know_chains_and_batches_only_as_hooks() -> None:
    for module, imported in IMPORTS.items():
        if module.startswith("neonnb.worker"):
            assert "neonnb.workflows" not in imported, f"{module} imports the workflows"
