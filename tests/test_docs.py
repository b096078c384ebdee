"""The project's own docs (``docs/``): the anchors the code cites exist, links resolve, the seed paper's
numbers match the report's constants, and nothing cites a document outside the repository."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The sections the code, the pipelines and the report point at (``docs/methods.md#ccam``, ...).
ANCHORS = {
    "methods.md": ["cam", "ecs", "ccam", "polarity", "per-breed-contrast", "ensemble", "map-inference",
                   "dense-crf", "grabcut", "refiners", "u-net", "self-training", "baselines"],
    "seed-paper.md": ["the-papers-numbers", "our-protocol"],
    "artefacts.md": ["maps", "masks", "models", "reports", "studies"],
    "extending.md": ["add-a-map-method", "add-a-refiner", "add-a-stage"],
}
SCANNED = ("wsss", "docs", "pipelines", "benchmarks")
SCANNED_SUFFIXES = {".md", ".yaml", ".yml", ".py", ".json"}
# A citation of the research notes, or an absolute path on a development machine.
FOREIGN = re.compile(r"algorithms\.md|research/|(?<![\w.~-])/work/")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_BUG_ID = re.compile(r"\bB(1[0-7]|[1-9])\b")


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Anchors of every heading of a markdown file (code fences skipped)."""
    out, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def test_slug_matches_github() -> None:
    assert slug(" The paper's numbers") == "the-papers-numbers"
    assert slug("U-Net") == "u-net"
    assert slug("Add a map method") == "add-a-map-method"


@pytest.mark.parametrize("page", ANCHORS, ids=str)
def test_cited_anchors_exist(page: str) -> None:
    missing = set(ANCHORS[page]) - anchors(DOCS / page)
    assert not missing, f"docs/{page} lacks the sections {sorted(missing)}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")), ids=str)
def test_links_resolve(page: str) -> None:
    """Every relative link of a docs page names an existing file, and its #anchor a heading there."""
    path = DOCS / page
    problems = []
    for target in _LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not problems, f"docs/{page}: " + "; ".join(problems)


def test_readme_points_at_the_docs() -> None:
    assert "](docs/README.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_cited_bug_id_is_documented() -> None:
    """B1..B17 cited in the code or the pipelines are entries of docs/seed-paper.md."""
    documented = set(re.findall(r"\*\*(B\d+):", (DOCS / "seed-paper.md").read_text(encoding="utf-8")))
    cited = {}
    for folder in ("wsss", "pipelines"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in SCANNED_SUFFIXES and path.is_file():
                for m in _BUG_ID.finditer(path.read_text(encoding="utf-8")):
                    cited.setdefault(f"B{m.group(1)}", path.relative_to(ROOT).as_posix())
    missing = {bug: where for bug, where in cited.items() if bug not in documented}
    assert not missing, f"bug ids cited but not in docs/seed-paper.md: {missing}"
    assert documented == {f"B{i}" for i in range(1, 18)}


def _paper_constants() -> dict[str, object]:
    """The report's ``PAPER_*`` literals, wherever in the package they are defined."""
    found: dict[str, object] = {}
    for path in sorted((ROOT / "wsss").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
            if isinstance(target, ast.Name) and target.id.startswith("PAPER_") and node.value is not None:
                found[target.id] = ast.literal_eval(node.value)
    return found


def test_the_papers_numbers_match_the_report() -> None:
    """Every (IoU, Dice) pair the report prints as the paper's appears in docs/seed-paper.md, and back."""
    constants = _paper_constants()
    assert {"PAPER_TABLE1", "PAPER_TABLE2", "PAPER_TABLE3", "PAPER_SUPERVISED_UNET"} <= set(constants)
    pairs = {tuple(constants["PAPER_SUPERVISED_UNET"])}  # type: ignore[arg-type]
    for name in ("PAPER_TABLE1", "PAPER_TABLE2", "PAPER_TABLE3"):
        table = constants[name]
        assert isinstance(table, dict)
        pairs |= {tuple(pair) for row in table.values() for pair in row.values()}
    text = (DOCS / "seed-paper.md").read_text(encoding="utf-8")
    section = text.split("## The paper's numbers", 1)[1].split("\n## ", 1)[0]
    shown = {(float(a), float(b)) for a, b in re.findall(r"(\d+\.\d\d) / (\d+\.\d\d)", section)}
    assert shown == pairs


def _scanned_files() -> list[Path]:
    return [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and p.suffix in SCANNED_SUFFIXES and "__pycache__" not in p.parts]


def test_foreign_pattern() -> None:
    for bad in ("see algorithms.md §2", "research/style-anchors.md", "--root /work/shared/data"):
        assert FOREIGN.search(bad), bad
    for fine in ("../shared/data/oxford-pet-dev", "docs/methods.md#ccam", "~/work/x", "a/work/b"):
        assert not FOREIGN.search(fine), fine


def test_nothing_cites_outside_the_repository() -> None:
    """No citation of the research notes and no absolute machine path in the package, docs, pipelines or
    benchmarks (use docs/... and repository-relative ``../shared/...`` paths)."""
    hits = []
    for path in _scanned_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FOREIGN.search(line):
                hits.append(f"{path.relative_to(ROOT).as_posix()}:{lineno}: {line.strip()[:100]}")
    assert not hits, "cite docs/ or use repository-relative paths:\n" + "\n".join(hits)


def test_benchmark_results_record_repository_relative_paths() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import quality
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert quality.shown(ROOT / "benchmarks" / "profiles" / "cpu.yaml") == "benchmarks/profiles/cpu.yaml"
    assert quality.shown(ROOT.parent / "shared" / "data") == "../shared/data"
    assert quality.shown(None) is None
    params = quality.shown_params({"base": {"data_root": str(ROOT / "data"), "extra_roots": [str(ROOT / "x")],
                                            "background_root": None}, "prepare": {"max_side": 1}})
    assert params == {"base": {"data_root": "data", "extra_roots": ["x"], "background_root": None},
                      "prepare": {"max_side": 1}}
