"""The package's layering: stages orchestrate, everything they share lives below them.

- no module of ``wsss/stages/`` imports another stage module (``wsss.stages.common`` is the shared
  orchestration helper, not a stage);
- no module below ``stages/`` imports ``wsss.stages`` or ``wsss.cli``.

Found statically with ``ast`` (imports inside functions count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wsss"
STAGES = PACKAGE / "stages"
SHARED_STAGE_MODULES = frozenset({"common"})
# Known violations being removed by the issue-15 refactor (none left: figures take colorize from wsss.viz).
KNOWN_STAGE_IMPORTS: frozenset[tuple[str, str]] = frozenset()


def _imports(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; wsss uses absolute imports only")
    return names


def _stage_modules_imported(path: Path) -> set[str]:
    """Stage modules (``wsss.stages.<x>``) that ``path`` imports, by their short name."""
    out = set()
    for name in _imports(path):
        parts = name.split(".")
        if parts[:2] == ["wsss", "stages"] and len(parts) >= 3:
            out.add(parts[2])
    return out


def test_no_stage_imports_another_stage() -> None:
    stage_names = {p.stem for p in STAGES.glob("*.py")} - {"__init__"}
    found = set()
    for path in sorted(STAGES.glob("*.py")):
        for other in _stage_modules_imported(path) & stage_names:
            if other != path.stem and other not in SHARED_STAGE_MODULES:
                found.add((path.stem, other))
    unexpected = sorted(found - KNOWN_STAGE_IMPORTS)
    assert not unexpected, "stage modules import other stages (move the shared code below stages/): " + ", ".join(
        f"stages/{a}.py -> stages/{b}.py" for a, b in unexpected)
    # The allow-list names only violations that still exist, so it shrinks as they are fixed.
    assert KNOWN_STAGE_IMPORTS <= found, f"fixed, remove from KNOWN_STAGE_IMPORTS: {sorted(KNOWN_STAGE_IMPORTS - found)}"


def test_nothing_below_stages_imports_stages_or_cli() -> None:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "stages" or rel.as_posix() in ("cli.py", "__main__.py"):
            continue
        for name in sorted(_imports(path)):
            if name == "wsss.cli" or name.startswith(("wsss.cli.", "wsss.stages")):
                bad.append(f"wsss/{rel.as_posix()} imports {name}")
    assert not bad, "; ".join(bad)


def test_the_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from wsss.stages.make_cams import compute_maps\n    import wsss.stages.evaluate\n")
    assert _stage_modules_imported(src) == {"make_cams", "evaluate"}
