"""The code's layering, checked rather than hoped for: no import cycles between modules, no imports of another
package's private names, and library code never imports the command line. (The package layers themselves are
import-linter's contract in .importlinter, which .ci/run checks with `lint-imports`.)"""
import ast
from pathlib import Path

import grimp

import megatron_tlt

ROOT = Path(megatron_tlt.__file__).parent


def _graph():
    return grimp.build_graph("megatron_tlt", exclude_type_checking_imports=True)


def _cycle_from(graph, start: str):
    """One import cycle through `start` (a list of modules), or None."""
    for imported in graph.find_modules_directly_imported_by(start):
        chain = graph.find_shortest_chain(importer=imported, imported=start)
        if chain is not None:
            return [start, *chain]
    return None


def test_no_import_cycles_between_modules():
    graph = _graph()
    cycles = [c for m in sorted(graph.modules) if (c := _cycle_from(graph, m)) is not None]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])  # megatron_tlt.<package> (a top-level module is its own package)


def test_no_module_imports_another_packages_private_names():
    offenders = []
    for path in ROOT.rglob("*.py"):
        module = "megatron_tlt." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_tlt"):
                if _package_of(node.module) == _package_of(module.removesuffix(".__init__")):
                    continue
                offenders += [f"{module}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


def test_library_code_never_imports_the_command_line():
    graph = _graph()
    importers = {m for m in graph.find_downstream_modules("megatron_tlt.cli", as_package=True)}
    assert importers <= {"megatron_tlt"} | {m for m in graph.modules if m.startswith("megatron_tlt.cli")}, importers
