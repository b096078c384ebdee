"""The contract between the DVC pipelines and the code: dvc.yaml may only call what exists, and must declare
what each stage reads.

Checked for ``dvc.yaml`` and every ``pipelines/*/dvc.yaml``, parsed with PyYAML (no DVC import), with
``foreach`` / ``matrix`` expanded and ``${...}`` templates resolved as DVC does (``item``, ``key``, and the
values of the ``params.yaml`` next to the file):

* every stage's ``cmd`` is ``wsss <command> [options]``: the (sub)command and each option exist in the Typer app;
* every params entry (``section`` or dotted ``section.key``) is a field path of :class:`wsss.config.Params`;
* every code dep (a path with a ``wsss`` component) points at an existing file or folder of the package;
* the code deps cover every package file the command runs: the transitive ``wsss`` imports of the command's
  function in ``wsss/cli.py`` and of the stage module, found with ``ast`` (module level and inside functions,
  by name: ``from wsss.x import f`` reaches ``f`` and what it uses). A failure prints the lines to paste under
  the stage's ``deps:`` and the import chain behind each. ``STEERING_MODULES`` lists the few modules exempt;
* and the other way round: no code dep is a package file that no stage of its group runs (a needless rerun);
* the stage module behind each command (``wsss/stages/<x>.py``, found from the ``from wsss.stages import x``
  inside the command in ``wsss/cli.py``) reads only params sections the stage declares. Found statically with
  ``ast``: ``params.<section>`` accesses. A section counts as declared when the stage lists it or any of its
  keys. Two deliberate allowances, listed below: ``base`` keys that only steer execution (device, worker count,
  MLflow experiment name) need no declaration, since declaring them would rerun every GPU stage on a switch of
  device; and a few sections a module reads only under a command-line flag.

Reads through helpers (``stages.common.loader`` -> ``base.num_workers``, ``tracking`` -> ``base.dataset`` /
``base.experiment``) are not followed: only the stage module itself is scanned.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import os
import re
import shlex
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from wsss.cli import app
from wsss.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wsss"
CLI_FILE = PACKAGE / "cli.py"
DVC_FILES = [ROOT / "dvc.yaml", *sorted((ROOT / "pipelines").glob("*/dvc.yaml"))]

# ``base`` keys that change how a stage runs, not what it computes: reading them needs no declaration.
RUNTIME_BASE_KEYS = frozenset({"device", "num_workers", "experiment"})
# (stage module, section) -> the cmd flag under which the module actually uses that section.
CONDITIONAL_READS: dict[tuple[str, str], str] = {
    # train_ccam builds the ECS-target CAM settings from make_cams, used only by --ecs models.
    ("train_ccam", "make_cams"): "--ecs",
}

_TEMPLATE = re.compile(r"\$\{\s*([^}]*?)\s*\}")


# --------------------------------------------------------------------------------------------------
# dvc.yaml expansion


@dataclass(frozen=True)
class Stage:
    """One generated stage: ``name`` as DVC shows it (``group@key``), its resolved definition."""

    dvc_file: Path
    name: str
    spec: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.dvc_file.parent / self.spec.get("wdir", ".")

    @property
    def id(self) -> str:
        return f"{self.dvc_file.parent.relative_to(ROOT).as_posix() or '.'}:{self.name}"


def _select(context: dict[str, Any], expr: str, where: str) -> Any:
    cur: Any = context
    for part in expr.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise AssertionError(f"{where}: template ${{{expr}}} does not resolve")
    return cur


def _interpolate(value: Any, context: dict[str, Any], where: str) -> Any:
    """Resolve ``${...}`` like DVC: a whole-string template keeps the value's type, else str() is spliced in."""
    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value)
        if whole:
            return _select(context, whole.group(1), where)

        def splice(m: re.Match[str]) -> str:
            got = _select(context, m.group(1), where)
            assert not isinstance(got, (dict, list)), f"{where}: ${{{m.group(1)}}} is a {type(got).__name__}"
            return str(got).lower() if isinstance(got, bool) else str(got)

        return _TEMPLATE.sub(splice, value)
    if isinstance(value, list):
        return [_interpolate(v, context, where) for v in value]
    if isinstance(value, dict):
        return {_interpolate(k, context, where): _interpolate(v, context, where) for k, v in value.items()}
    return value


def _vars(dvc_file: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Template variables: the ``params.yaml`` beside the file (DVC's default) plus ``vars:`` entries."""
    context: dict[str, Any] = {}
    default = dvc_file.parent / "params.yaml"
    if default.exists():
        context.update(yaml.safe_load(default.read_text(encoding="utf-8")) or {})
    for entry in data.get("vars", []) or []:
        if isinstance(entry, dict):
            context.update(entry)
        else:
            context.update(yaml.safe_load((dvc_file.parent / str(entry)).read_text(encoding="utf-8")) or {})
    return context


def _iterations(name: str, definition: dict[str, Any], context: dict[str, Any]) -> Iterator[tuple[str, dict]]:
    """(generated name, extra template variables) for each stage of a foreach / matrix group."""
    if "foreach" in definition:
        items = _interpolate(definition["foreach"], context, name)
        if isinstance(items, dict):
            for key, item in items.items():
                yield f"{name}@{key}", {"item": item, "key": key}
        else:
            composite = any(isinstance(i, (dict, list)) for i in items)
            for index, item in enumerate(items):
                yield f"{name}@{index if composite else item}", {"item": item}
    elif "matrix" in definition:
        matrix = _interpolate(definition["matrix"], context, name)
        axes = list(matrix)
        for combo in itertools.product(*(list(enumerate(matrix[a])) for a in axes)):
            item = {a: v for a, (_, v) in zip(axes, combo, strict=True)}
            key = "-".join(f"{a}{i}" if isinstance(v, (dict, list)) else str(v)
                           for a, (i, v) in zip(axes, combo, strict=True))
            yield f"{name}@{key}", {"item": item, "key": key}
    else:
        yield name, {}


def load_stages(dvc_file: Path) -> list[Stage]:
    """Every stage of a dvc.yaml, expanded and with its templates resolved."""
    data = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
    context = _vars(dvc_file, data)
    stages = []
    for name, definition in data["stages"].items():
        template = definition.get("do", {k: v for k, v in definition.items() if k != "matrix"})
        for generated, extra in _iterations(name, definition, context):
            spec = _interpolate(template, {**context, **extra}, f"{dvc_file}:{generated}")
            stages.append(Stage(dvc_file, generated, spec))
    return stages


ALL_STAGES = [s for f in DVC_FILES for s in load_stages(f)]


def _entries(items: list[Any] | None) -> Iterator[str]:
    """Paths of a deps/outs/metrics list (entries are strings or one-key mappings with options)."""
    for item in items or []:
        yield from (item if isinstance(item, dict) else [item])


def _params_entries(stage: Stage) -> list[str]:
    """Dotted params keys of ``params.yaml`` a stage declares (other params files are not wsss params)."""
    keys: list[str] = []
    for item in stage.spec.get("params", []) or []:
        if isinstance(item, str):
            keys.append(item)
        elif isinstance(item, dict):
            for file, listed in item.items():
                if Path(file).name == "params.yaml":
                    keys.extend(listed or [])
    return keys


# --------------------------------------------------------------------------------------------------
# the CLI


def _is_group(cmd: Any) -> bool:
    # Typer vendors its own click, so duck-type instead of isinstance(click.Group).
    return isinstance(getattr(cmd, "commands", None), dict)


@functools.cache
def _root_command() -> Any:
    return typer.main.get_command(app)


def _find_command(tokens: list[str]) -> tuple[Any, list[str], list[str]]:
    """Walk ``tokens`` (after ``wsss``) down the Typer app: (command, its path, the remaining tokens)."""
    cmd: Any = _root_command()
    path: list[str] = []
    rest = list(tokens)
    while _is_group(cmd) and rest and rest[0] in cmd.commands:
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    return cmd, path, rest


def _cli_commands() -> dict[tuple[str, ...], tuple[str, str | None]]:
    """Command path (e.g. ``("tune", "crf")``) -> (its function in ``wsss/cli.py``, the ``wsss.stages``
    module that function imports, or None)."""
    tree = ast.parse(CLI_FILE.read_text(encoding="utf-8"))
    groups: dict[str, tuple[str, ...]] = {"app": ()}
    for node in ast.walk(tree):  # app.add_typer(tune_app, name="tune")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_typer"
                and node.args and isinstance(node.args[0], ast.Name)):
            name = next(k.value.value for k in node.keywords if k.arg == "name")
            groups[node.args[0].id] = (name,)
    out: dict[tuple[str, ...], tuple[str, str | None]] = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for deco in fn.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                    and deco.func.attr == "command" and isinstance(deco.func.value, ast.Name)):
                continue
            name = deco.args[0].value if deco.args else fn.name.replace("_", "-")
            modules = [alias.name for node in ast.walk(fn) if isinstance(node, ast.ImportFrom)
                       and node.module == "wsss.stages" for alias in node.names]
            modules += [node.module.rsplit(".", 1)[1] for node in ast.walk(fn) if isinstance(node, ast.ImportFrom)
                        and node.module and node.module.startswith("wsss.stages.")]
            out[(*groups[deco.func.value.id], name)] = (fn.name, modules[0] if modules else None)
    return out


CLI_COMMANDS = {path: fn for path, (fn, _) in _cli_commands().items()}
STAGE_MODULES = {path: module for path, (_, module) in _cli_commands().items() if module}


@functools.cache
def _params_reads(module: str) -> dict[str, set[str]]:
    """Section -> keys read as ``params.<section>.<key>`` in ``wsss/stages/<module>.py`` (``*``: not seen)."""
    tree = ast.parse((PACKAGE / "stages" / f"{module}.py").read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    sections = {f.name for f in dataclasses.fields(Params)}
    reads: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params"
                and node.attr in sections):
            parent = parents.get(node)
            key = parent.attr if isinstance(parent, ast.Attribute) and parent.value is node else "*"
            reads.setdefault(node.attr, set()).add(key)
    return reads


# --------------------------------------------------------------------------------------------------
# the import graph: which package files a stage executes

# Package modules that only steer execution and cannot change what a stage writes, so a stage need not
# depend on them (an edit to them must not rerun the pipeline). Keep this short.
STEERING_MODULES: dict[str, str] = {
    # Typer wiring: parses the command line and calls the stage; values it passes on come from params.
    "wsss/cli.py": "argument parsing only",
    # `python -m wsss`: the same app as the console script.
    "wsss/__main__.py": "entry point only",
    # The package docstring and __version__ (read by no stage).
    "wsss/__init__.py": "version string only",
    # Rich console and progress bars: what the user sees, never what is written.
    "wsss/ui.py": "console output only",
    # Exception types: they decide how a failure is reported, not what a success writes.
    "wsss/errors.py": "error types only",
}


def _module_file(module: str) -> Path | None:
    """The file behind ``wsss.x.y`` (``wsss/x/y.py`` or ``wsss/x/y/__init__.py``), None if none."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_packages(module: str) -> list[str]:
    """``wsss.a.b`` -> [``wsss``, ``wsss.a``, ``wsss.a.b``]: importing a module runs each package's __init__."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(root: ast.AST) -> Iterator[ast.AST]:
    """Every node under ``root`` (function bodies included) except ``if TYPE_CHECKING:`` blocks."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                stack.extend(child.orelse)
            else:
                stack.append(child)


Unit = tuple[str, str]  # (module, a top-level def or class of it; "" = its top-level statements)


@functools.cache
def _units(module: str) -> dict[str, ast.AST]:
    """A module's import-time code (``""``) and each top-level function and class, apart.

    Import-time code is the top-level statements plus what a definition runs when it is defined:
    decorators, class bases and keywords, and the class body outside its methods."""
    path = _module_file(module)
    assert path is not None, module
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    at_import: list[ast.AST] = [n for n in tree.body if n not in defs.values()]
    for node in defs.values():
        at_import += node.decorator_list
        if isinstance(node, ast.ClassDef):
            at_import += [*node.bases, *node.keywords]
            at_import += [n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    body = ast.Module(body=[n if isinstance(n, ast.stmt) else ast.Expr(n) for n in at_import], type_ignores=[])
    return {"": body, **defs}


def _imported(module: str, name: str | None) -> set[Unit]:
    """What ``import module`` (name None) or ``from module import name`` runs and can call."""
    reached = {(m, "") for m in _with_packages(module) if _module_file(m)}
    if name is None or _module_file(f"{module}.{name}"):  # a module object: any of its code may be called
        target = module if name is None else f"{module}.{name}"
        reached |= {(m, "") for m in _with_packages(target)} | {(target, u) for u in _units(target)}
    elif name in _units(module):
        reached.add((module, name))
    elif "__getattr__" in _units(module):  # PEP 562: the name is made on first access
        reached.add((module, "__getattr__"))
    return reached


@functools.cache
def _edges(unit: Unit) -> frozenset[Unit]:
    """Units that running ``unit`` can run: its imports (module level and inside functions, not under
    ``if TYPE_CHECKING:``) and the top-level defs of its own module it names."""
    module, name = unit
    units = _units(module)
    out: set[Unit] = {(module, "")}
    for node in _runtime_nodes(units[name]):
        if isinstance(node, ast.Name) and node.id in units and node.id != name:
            out.add((module, node.id))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "wsss":
                    out |= _imported(alias.name, None)
        elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
              and node.module.split(".")[0] == "wsss"):
            for alias in node.names:
                out |= _imported(node.module, alias.name)
    out.discard(unit)
    return frozenset(out)


def import_chains(path: tuple[str, ...]) -> dict[str, list[str]]:
    """Every ``wsss`` module ``wsss <path>`` runs code of -> the shortest chain that reaches it, from the
    command's function in ``wsss/cli.py`` (other commands' imports are not followed).

    Reachability is by name: ``from wsss.x import f`` reaches ``f`` (and what it names and imports), not
    the rest of ``wsss.x`` beyond its top-level statements; importing a module object reaches all of it."""
    start: list[Unit] = [("wsss.cli", CLI_COMMANDS[path]), ("wsss.cli", "")]
    via: dict[Unit, Unit | None] = dict.fromkeys(start)
    queue = list(start)
    for unit in queue:  # breadth first: the queue grows while it is walked
        for nxt in sorted(_edges(unit)):
            if nxt not in via:
                via[nxt] = unit
                queue.append(nxt)
    chains: dict[str, list[str]] = {}
    for unit in queue:
        if unit[0] in chains:
            continue
        steps: list[str] = []
        cur: Unit | None = unit
        while cur is not None:
            steps.insert(0, f"{cur[0]}:{cur[1]}" if cur[1] else cur[0])
            cur = via[cur]
        chains[unit[0]] = steps
    return chains


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _only_docstring(path: Path) -> bool:
    """A module whose whole body is its docstring (an empty package ``__init__``) computes nothing."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def missing_code_deps(stage: Stage) -> dict[str, list[str]]:
    """Package files the stage's command executes that its deps do not cover -> their import chain."""
    _, path, _ = _find_command(_tokens(stage)[1:])
    covered = [(stage.folder / dep).resolve() for dep in _entries(stage.spec.get("deps"))]
    missing = {}
    for module, chain in import_chains(tuple(path)).items():
        file = _module_file(module)
        assert file is not None
        if _rel(file) in STEERING_MODULES or _only_docstring(file):
            continue
        if not any(file == dep or file.is_relative_to(dep) for dep in covered):
            missing[_rel(file)] = chain
    return dict(sorted(missing.items()))


def _deps_indent(stage: Stage, group: str) -> int:
    """Indentation of the entries under ``group``'s ``deps:`` in its dvc.yaml (6 when not found)."""
    lines = stage.dvc_file.read_text(encoding="utf-8").splitlines() if stage.dvc_file.is_file() else []
    start = next((i for i, line in enumerate(lines) if line.strip() == f"{group}:"), None)
    for line in lines[start + 1:] if start is not None else []:
        if line.strip() == "deps:":
            return len(line) - len(line.lstrip()) + 2
    return 6


def import_dep_problems(stage: Stage) -> list[str]:
    """Every package file the stage's command imports (transitively) is covered by a dep.

    The message is per stage group (``group@key`` stages share one ``deps:`` block) and holds the exact
    lines to paste, then the import chain that pulls each file in."""
    missing = missing_code_deps(stage)
    if not missing:
        return []
    group = stage.name.split("@", 1)[0]
    prefix = Path(os.path.relpath(ROOT, stage.folder.resolve()))
    pad = " " * _deps_indent(stage, group)
    paste = [f"{pad}- {(prefix / file).as_posix() if prefix != Path('.') else file}" for file in missing]
    why = [f"    {file}: {' -> '.join(chain)}" for file, chain in missing.items()]
    where = stage.dvc_file.relative_to(ROOT).as_posix() if stage.dvc_file.is_relative_to(ROOT) else stage.dvc_file
    return [f"{where}: stage `{group}` imports package code its deps do not cover; add under its `deps:`\n"
            + "\n".join(paste) + "\n  because (import chain):\n" + "\n".join(why)]


def _resolves(dotted: str) -> bool:
    cls: Any = Params
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        cls = typing.get_type_hints(cls)[part]
    return True


def _tokens(stage: Stage) -> list[str]:
    cmd = stage.spec.get("cmd")
    assert isinstance(cmd, str), f"{stage.id}: cmd must be one command string, got {cmd!r}"
    return shlex.split(cmd)


# --------------------------------------------------------------------------------------------------
# checks: each returns the problems it finds (empty = fine), so the tests below can also prove that
# each one fires on a broken dvc.yaml


def cmd_problems(stage: Stage) -> list[str]:
    """The cmd is ``wsss <existing command>`` with existing options; ``--params`` names a file beside it."""
    tokens = _tokens(stage)
    if not tokens or tokens[0] != "wsss":
        return [f"{stage.id}: cmd must call `wsss`, got {stage.spec.get('cmd')!r}"]
    cmd, path, rest = _find_command(tokens[1:])
    if not path or _is_group(cmd):
        return [f"{stage.id}: `{' '.join(tokens)}` is no wsss command"]
    problems = []
    options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    for token in rest:
        if token.startswith("-") and token.split("=", 1)[0] not in options:
            problems.append(f"{stage.id}: `wsss {' '.join(path)}` has no option {token.split('=', 1)[0]}")
    if "--params" in rest:
        value = rest[rest.index("--params") + 1] if rest.index("--params") + 1 < len(rest) else ""
        if not (stage.folder / value).is_file():
            problems.append(f"{stage.id}: --params {value!r} is not a file beside the dvc.yaml")
    return problems


def params_problems(stage: Stage) -> list[str]:
    """Every declared params key is a field path of :class:`Params`."""
    return [f"{stage.id}: params entry {key!r} is not a field of wsss.config.Params"
            for key in _params_entries(stage) if not _resolves(key)]


def code_dep_problems(stage: Stage) -> list[str]:
    """Deps with a ``wsss`` path component exist inside the package."""
    problems = []
    for dep in _entries(stage.spec.get("deps")):
        if "wsss" not in Path(dep).parts:
            continue
        path = (stage.folder / dep).resolve()
        if not path.is_relative_to(PACKAGE):
            problems.append(f"{stage.id}: code dep {dep} resolves to {path}, outside {PACKAGE}")
        elif not path.exists():
            problems.append(f"{stage.id}: code dep {dep} does not exist ({path})")
    return problems


def undeclared_reads(stage: Stage) -> list[str]:
    """Params sections the stage module reads that the stage does not declare."""
    _, path, rest = _find_command(_tokens(stage)[1:])
    module = STAGE_MODULES[tuple(path)]
    declared = {key.split(".", 1)[0] for key in _params_entries(stage)}
    missing = []
    for section, keys in sorted(_params_reads(module).items()):
        if section in declared:
            continue
        if section == "base" and keys <= RUNTIME_BASE_KEYS:
            continue
        flag = CONDITIONAL_READS.get((module, section))
        if flag is not None and flag not in rest:
            continue
        missing.append(section if section != "base" else "base." + "/".join(sorted(keys - RUNTIME_BASE_KEYS)))
    if not missing:
        return []
    return [f"{stage.id}: wsss/stages/{module}.py reads params {', '.join(missing)} but the stage's "
            "`params:` does not list them (add the section, or the keys it reads)"]


def ensemble_problems(stage: Stage) -> list[str]:
    """``make-cams --method ensemble`` depends on the maps of every ``make_cams.ensemble_members``."""
    if "make-cams --method ensemble" not in str(stage.spec.get("cmd")):
        return []
    members = load_params(stage.dvc_file.parent / "params.yaml").make_cams.ensemble_members
    deps = set(_entries(stage.spec.get("deps")))
    missing = [m for m in members if f"cams/{m}" not in deps]
    return [f"{stage.id}: make_cams.ensemble_members {missing} are not deps (cams/<member>)"] if missing else []


def _group(stage: Stage) -> tuple[Path, str]:
    return stage.dvc_file, stage.name.split("@", 1)[0]


@functools.cache
def _group_imports(dvc_file: Path, group: str) -> frozenset[Path]:
    """Package files executed by any stage of a foreach/matrix group (they share one ``deps:`` block)."""
    return frozenset(f for stage in ALL_STAGES if _group(stage) == (dvc_file, group) for f in _imported_files(stage))


def _imported_files(stage: Stage) -> set[Path]:
    _, path, _ = _find_command(_tokens(stage)[1:])
    return {f for m in import_chains(tuple(path)) if (f := _module_file(m)) is not None}


def stale_code_deps(stage: Stage) -> list[str]:
    """Code deps (paths inside the package) that no stage of the group executes: a needless rerun trigger."""
    used = _group_imports(*_group(stage)) | _imported_files(stage)
    problems = []
    for dep in _entries(stage.spec.get("deps")):
        path = (stage.folder / dep).resolve()
        if not path.is_relative_to(PACKAGE) or (path.is_file() and _only_docstring(path)):
            continue
        if not any(f == path or f.is_relative_to(path) for f in used):
            problems.append(f"{stage.dvc_file.relative_to(ROOT)}: stage `{_group(stage)[1]}` lists `{dep}` in its "
                            "deps, but its command never imports it; remove it")
    return problems


CHECKS = (cmd_problems, params_problems, code_dep_problems, undeclared_reads, ensemble_problems,
          import_dep_problems, stale_code_deps)


# --------------------------------------------------------------------------------------------------
# tests


def test_pipelines_found() -> None:
    assert ROOT / "dvc.yaml" in DVC_FILES
    assert len(ALL_STAGES) > len(DVC_FILES)


def test_cli_map_covers_every_command() -> None:
    """The static cli.py scan sees the same commands as Typer (else the module check goes blind)."""
    root = _root_command()

    def paths(cmd: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
        if _is_group(cmd):
            for name, sub in cmd.commands.items():
                yield from paths(sub, (*prefix, name))
        else:
            yield prefix

    without_stage = {("data", "fetch")}  # a download helper, no stage module
    assert set(paths(root)) - without_stage == set(STAGE_MODULES)
    for module in STAGE_MODULES.values():
        assert (PACKAGE / "stages" / f"{module}.py").is_file()


@pytest.mark.parametrize("dvc_file", DVC_FILES, ids=lambda p: p.parent.relative_to(ROOT).as_posix() or ".")
def test_params_file_loads(dvc_file: Path) -> None:
    load_params(dvc_file.parent / "params.yaml")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dvc_file", DVC_FILES, ids=lambda p: p.parent.relative_to(ROOT).as_posix() or ".")
def test_contract(dvc_file: Path, check: Any) -> None:
    # dict.fromkeys: the stages of one foreach / matrix group report a shared deps block once
    problems = list(dict.fromkeys(p for stage in ALL_STAGES if stage.dvc_file == dvc_file for p in check(stage)))
    assert not problems, "\n".join(problems)


BROKEN = {
    "unknown-command": ({"cmd": "wsss train-everything"}, cmd_problems, "is no wsss command"),
    "not-wsss": ({"cmd": "python -m wsss prepare"}, cmd_problems, "must call `wsss`"),
    "unknown-option": ({"cmd": "wsss tune crf --method x --trails 3"}, cmd_problems, "no option --trails"),
    "missing-params-file": ({"cmd": "wsss prepare --params other.yaml"}, cmd_problems, "not a file"),
    "unknown-param": ({"cmd": "wsss prepare", "params": ["prepare.max_sid"]}, params_problems, "max_sid"),
    "missing-code-dep": ({"cmd": "wsss prepare", "deps": ["../wsss/nope.py"]}, code_dep_problems, "does not exist"),
    "code-dep-outside": ({"cmd": "wsss prepare", "deps": ["wsss/stages"]}, code_dep_problems, "outside"),
    "undeclared-section": ({"cmd": "wsss tune crf --method x", "params": ["tune"]}, undeclared_reads, "pseudo"),
    "undeclared-base": ({"cmd": "wsss prepare", "params": ["prepare"]}, undeclared_reads, "base."),
    "conditional-read": ({"cmd": "wsss train-ccam --ecs", "params": ["base.seed", "train_ccam"]},
                         undeclared_reads, "make_cams"),
    "uncovered-import": ({"cmd": "wsss validate", "deps": ["../wsss/stages/validate.py", "../wsss/config.py"]},
                         import_dep_problems, "      - ../wsss/data/validation.py\n"),
    "stale-code-dep": ({"cmd": "wsss validate", "deps": ["../wsss/refine.py"]}, stale_code_deps,
                       "never imports it"),
}


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_checks_catch_a_broken_stage(case: str) -> None:
    spec, check, needle = BROKEN[case]
    stage = Stage(ROOT / "tests" / "dvc.yaml", case, spec)
    problems = check(stage)
    assert problems and needle in problems[0], problems


def test_allowances_stay_narrow() -> None:
    """Device-only base reads and a flag-gated section pass; the same section without the gate does not."""
    make_cams = Stage(ROOT / "dvc.yaml", "m", {"cmd": "wsss make-cams --method cam",
                                              "params": ["make_cams", "evaluate.ellipse_scale"]})
    assert undeclared_reads(make_cams) == []
    plain = {"cmd": "wsss train-ccam --init none", "params": ["base.seed", "train_ccam"]}
    assert undeclared_reads(Stage(ROOT / "dvc.yaml", "c", plain)) == []


def test_steering_modules_exist() -> None:
    """Every allow-listed module is a file of the package (a renamed one must leave the list)."""
    assert all((ROOT / module).is_file() for module in STEERING_MODULES), sorted(STEERING_MODULES)
    assert "wsss/config.py" not in STEERING_MODULES  # the defaults: every stage depends on them


def test_import_graph_follows_what_runs() -> None:
    """Function-level imports, submodules named in ``from wsss.x import y``, PEP 562 names and package
    ``__init__`` files are followed; a name imported from a module does not pull in the rest of it."""
    make_cams = import_chains(("make-cams",))
    assert {"wsss.stages.make_cams", "wsss.cams", "wsss.methods", "wsss.methods.ecs",
            "wsss.models"} <= set(make_cams)
    assert make_cams["wsss.methods.ecs"][-2:] == ["wsss.methods:_build", "wsss.methods.ecs"]
    # `wsss validate` runs cli.py's top level (the typed names) but never the map methods.
    validate = import_chains(("validate",))
    assert "wsss.variants" in validate and "wsss.methods" not in validate
    # `from wsss.variants import MethodName` in wsss.methods does not pull the registry into the CLI.
    assert "wsss.methods:_build" not in {step for chain in validate.values() for step in chain}
    assert "wsss.data.validation" in validate and "wsss.stages.make_cams" not in validate


def test_missing_deps_message_is_pasteable() -> None:
    """The failure names the group once and gives deps lines indented like the file's own."""
    stage = next(s for s in ALL_STAGES if s.name == "make-pseudo@ensemble" and s.dvc_file == ROOT / "dvc.yaml")
    broken = Stage(stage.dvc_file, stage.name, {**stage.spec, "deps": ["wsss/stages/make_pseudo.py"]})
    (message,) = import_dep_problems(broken)
    assert message.startswith("dvc.yaml: stage `make-pseudo`")
    assert "\n      - wsss/cams.py\n" in message and "wsss/cams.py: wsss.cli:" in message
    paper = next(s for s in ALL_STAGES if s.name == "evaluate-baselines" and s.dvc_file != ROOT / "dvc.yaml")
    (message,) = import_dep_problems(Stage(paper.dvc_file, paper.name, {**paper.spec, "deps": []}))
    assert "\n      - ../../wsss/evaluation.py\n" in message


def test_templates_expand_like_dvc(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("base:\n  data_root: raw/pets\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"foreach": {"k1": {"x": 1}}, "do": {"cmd": "wsss prepare ${item.x} ${key}", "deps": ["${base.data_root}"]}},
        "b": {"foreach": ["p", "q"], "do": {"cmd": "wsss validate ${item}"}},
        "c": {"matrix": {"m": ["cam", "ecs"], "n": [1]}, "cmd": "wsss make-cams --method ${item.m} ${key}"},
    }}))
    got = {s.name: s.spec for s in load_stages(tmp_path / "dvc.yaml")}
    assert got["a@k1"] == {"cmd": "wsss prepare 1 k1", "deps": ["raw/pets"]}
    assert got["b@q"]["cmd"] == "wsss validate q"
    assert got["c@ecs-1"]["cmd"] == "wsss make-cams --method ecs ecs-1"
    (tmp_path / "dvc.yaml").write_text("stages:\n  d:\n    cmd: wsss prepare ${nope.key}\n")
    with pytest.raises(AssertionError, match="does not resolve"):
        load_stages(tmp_path / "dvc.yaml")
