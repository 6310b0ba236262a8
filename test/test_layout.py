"""
The source tree a contributor relies on: small modules, no import cycles, a ROS-free core.

A module over 400 lines mixes concerns and hides facts written twice; an import cycle makes the
import order matter and breaks partial imports; the core must import without rclpy so it can be
used (and tested) without ROS. These are read from the source with ``ast``, nothing is imported.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'timebill_ros'
MAX_LINES = 400
# A file may stay longer only with a reason written here.
LONG_FILES_ALLOWED = {}


def _sources():
    for folder in (PACKAGE, ROOT / 'benchmarks', ROOT / 'tools', ROOT / 'launch'):
        yield from sorted(p for p in folder.rglob('*.py') if '__pycache__' not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
        isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING'
    )


def _import_time_imports(path: Path):
    """Yield the modules a file imports when it is imported (module level, not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    module = _module_name(path)
    package = module if path.name == '__init__.py' else module.rpartition('.')[0]

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ('body', 'orelse', 'finalbody'):
                    yield from visit(getattr(node, field, []))
                for handler in getattr(node, 'handlers', []):
                    yield from visit(handler.body)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split('.')
                    base = base[:len(base) - node.level + 1]
                    target = '.'.join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ''
                yield target
                for alias in node.names:  # `from pkg import module` imports pkg.module
                    yield f'{target}.{alias.name}'

    yield from visit(tree.body)


def test_no_source_file_is_over_400_lines():
    """Keep every non-test module at most 400 lines, or name the reason it stays longer."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in _sources()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
        and str(p.relative_to(ROOT)) not in LONG_FILES_ALLOWED
    }
    assert not long, f'modules over {MAX_LINES} lines (split them at a seam): {long}'


def test_the_package_has_no_import_cycle():
    """Find no cycle among the package's modules as they import each other at import time."""
    paths = [p for p in _sources() if p.is_relative_to(PACKAGE)]
    modules = {_module_name(p): p for p in paths}
    graph = {
        name: sorted({m for m in _import_time_imports(path) if m in modules and m != name})
        for name, path in modules.items()
    }
    state, stack, cycles = {}, [], []

    def walk(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 'open':
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 'done'

    for name in sorted(graph):
        if name not in state:
            walk(name)
    assert not cycles, 'import cycles: ' + '; '.join(' -> '.join(c) for c in cycles)


@pytest.mark.parametrize('banned', ['rclpy', 'launch', 'launch_ros'])
def test_the_core_imports_no_ros(banned):
    """Import nothing from ROS in timebill_ros/core, even lazily: the core runs without ROS."""
    offenders = []
    for path in (PACKAGE / 'core').rglob('*.py'):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or '']
            if any(n == banned or n.startswith(banned + '.') for n in names):
                offenders.append(f'{path.relative_to(ROOT)}:{node.lineno}')
    assert not offenders, f'{banned} imported in the core: {offenders}'
