"""Validation of the prepared data: a great-expectations suite over the manifest plus Python checks.

The suite (:func:`build_suite`) holds row-wise expectations written in code and runs in an ephemeral
GX context over the manifest DataFrame; it writes no files (its ``ExpectationSuiteValidationResult``, as
GX serialises it, is returned in :attr:`ValidationResult.gx_result` for the stage to write). Checks that
span rows or read the image and mask files are plain Python (:data:`PYTHON_CHECKS`). Every check becomes
one :class:`CheckResult`.

Class coverage per split (:func:`_check_class_coverage`): both species have pets in train (nothing to
learn otherwise) and in test (every score is computed there; without a species it scores half the
task); every breed of val or test has train images (a class the classifiers never saw). A species or a
breed of train missing from val is a warning only, as is a train breed missing from test: val is carved
from trainval by breed, so a small dataset can lack one there, and model selection still works; a subset
test list may lack a rare breed (the official one has every breed).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from wsss.config import ValidateConfig
from wsss.data.breeds import BREED_SPECIES, BREEDS, NUM_BREEDS, SPECIES
from wsss.data.manifest import COLUMNS, SOURCES, SPLITS

# Non-capturing groups: pandas warns about match groups in str.contains.
MASK_VALUES_REGEX = r"^$|^(?:0|1|255)(?:,(?:0|1|255))*$"
ALLOWED_MASK_VALUES = frozenset({0, 1, 255})
MAX_LISTED = 10  # offending values / files quoted per check

# Plain-Python checks: cross-row ones always run, file ones only with ``cfg.check_files``.
CROSS_ROW_CHECKS = ("split_leak", "class_counts", "class_coverage", "test_masks", "breed_species")
FILE_CHECKS = ("files_exist", "files_decode", "files_size", "mask_pixel_values", "duplicate_content")
PYTHON_CHECKS = CROSS_ROW_CHECKS + FILE_CHECKS


@dataclass
class CheckResult:
    """Outcome of one expectation or Python check."""

    name: str
    kind: str  # "expectation" | "file_check" (any plain-Python check)
    success: bool
    details: str = ""


@dataclass
class ValidationResult:
    """All checks of one validation run."""

    success: bool
    checks: list[CheckResult]
    statistics: dict[str, int] = field(default_factory=dict)
    gx_result: dict[str, Any] | None = None  # the suite's ExpectationSuiteValidationResult.to_json_dict()

    @property
    def failed(self) -> list[CheckResult]:
        """The checks that did not pass."""
        return [c for c in self.checks if not c.success]

    @property
    def warnings(self) -> list[CheckResult]:
        """Passing checks whose details carry a warning."""
        return [c for c in self.checks if c.success and "warning:" in c.details]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for ``reports/validation.json``)."""
        return {
            "success": bool(self.success),
            "statistics": {k: int(v) for k, v in self.statistics.items()},
            "failed": [c.name for c in self.failed],
            "checks": [asdict(c) for c in self.checks],
        }

    def summary(self) -> str:
        """A readable multi-line summary: the verdict, then each failure and warning."""
        s = self.statistics
        verdict = "passed" if self.success else "FAILED"
        lines = [
            f"data validation {verdict}: {s.get('unsuccessful', 0)} of {s.get('evaluated', 0)} checks failed"
        ]
        lines += [f"  FAIL {c.name}: {c.details}" for c in self.failed]
        lines += [f"  WARN {c.name}: {c.details}" for c in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# great-expectations suite


def expectation_name(exp: Any) -> str:
    """A readable, unique name, e.g. ``expect_column_values_to_be_in_set(split | is_background == True)``."""
    column = getattr(exp, "column", None)
    condition = getattr(exp, "row_condition", None)
    inner = column or ""
    if condition is not None:
        inner += f" | {condition!r}"
    return f"{exp.expectation_type}({inner})" if inner else exp.expectation_type


def build_suite(cfg: ValidateConfig) -> list[Any]:
    """The manifest expectations (great-expectations 1.x objects), each named in ``meta["name"]``."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    background = Column("is_background") == True  # noqa: E712 (builds a GX condition, not a bool)
    pet = Column("is_background") == False  # noqa: E712
    with_mask = Column("has_mask") == True  # noqa: E712
    without_mask = Column("has_mask") == False  # noqa: E712
    exps = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(COLUMNS), exact_match=True),
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToNotBeNull(column="image_path"),
        gxe.ExpectColumnValuesToBeUnique(column="image_path"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        # Every score is computed on the test split: a dataset without one must not pass.
        gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=["test"]),
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=list(SOURCES)),
        gxe.ExpectColumnValuesToBeInSet(column="species", value_set=[-1, *range(len(SPECIES))]),
        gxe.ExpectColumnValuesToBeBetween(column="breed", min_value=-1, max_value=NUM_BREEDS - 1),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_side, max_value=cfg.max_side),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_side, max_value=cfg.max_side),
        gxe.ExpectColumnValuesToMatchRegex(column="mask_values", regex=MASK_VALUES_REGEX),
        # A masked pet has pet and non-pet pixels (an all-pet or all-background mask is a broken trimap);
        # prepare drops all-border masks, so border_fraction < 1. Without a mask both are -1.
        gxe.ExpectColumnValuesToBeBetween(
            column="fg_fraction", min_value=0, max_value=1, strict_min=True, strict_max=True,
            row_condition=with_mask & pet,
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="fg_fraction", min_value=0, max_value=0, row_condition=with_mask & background
        ),
        gxe.ExpectColumnValuesToBeInSet(column="fg_fraction", value_set=[-1.0], row_condition=without_mask),
        gxe.ExpectColumnValuesToBeBetween(
            column="border_fraction", min_value=0, max_value=1, strict_max=True, row_condition=with_mask
        ),
        gxe.ExpectColumnValuesToBeInSet(column="border_fraction", value_set=[-1.0], row_condition=without_mask),
        gxe.ExpectColumnValueLengthsToBeBetween(column="mask_path", min_value=1, row_condition=with_mask),
        gxe.ExpectColumnValuesToBeInSet(column="mask_path", value_set=[""], row_condition=without_mask),
        gxe.ExpectColumnValuesToBeInSet(column="species", value_set=[-1], row_condition=background),
        gxe.ExpectColumnValuesToBeInSet(column="breed", value_set=[-1], row_condition=background),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val"], row_condition=background),
        gxe.ExpectColumnValuesToBeInSet(
            column="species", value_set=list(range(len(SPECIES))), row_condition=pet
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="is_background", value_set=[True], row_condition=Column("source") == "background"
        ),
    ]
    for exp in exps:
        exp.meta = {"name": expectation_name(exp)}
    return exps


def _gx_details(res: Any, ids: pd.Series) -> str:
    """Offending values (and the ids of their rows) of one failed GX expectation result."""
    exc = res.exception_info or {}
    if exc.get("raised_exception"):
        return f"error: {exc.get('exception_message')}"
    for info in exc.values():  # several metrics may have raised; they share the message
        if isinstance(info, dict) and info.get("raised_exception"):
            return f"error: {info.get('exception_message')}"
    r = res.result or {}
    mismatch = (r.get("details") or {}).get("mismatched")
    if mismatch:
        parts = [f"{k}: {sorted(map(str, v))}" for k, v in mismatch.items() if v]
        return "columns " + "; ".join(parts)
    if "unexpected_count" in r:
        values = r.get("partial_unexpected_list") or []
        rows = r.get("partial_unexpected_index_list") or []
        text = f"{r['unexpected_count']} unexpected value(s): {_short(values)}"
        row_ids = [str(ids.iloc[i]) for i in rows[:MAX_LISTED] if isinstance(i, (int, np.integer)) and i < len(ids)]
        return text + (f"; ids: {_short(row_ids)}" if row_ids else "")
    if r.get("missing_count"):
        return f"{r['missing_count']} expected value(s) absent: {_short(r.get('partial_missing_list') or [])}"
    return f"observed: {r.get('observed_value')!r}"


def _run_suite(df: pd.DataFrame, cfg: ValidateConfig) -> tuple[list[CheckResult], dict[str, Any]]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        ctx.data_sources.add_pandas(name="wsss")
        .add_dataframe_asset(name="manifest")
        .add_batch_definition_whole_dataframe("whole")
    )
    exps = build_suite(cfg)
    # Passing the expectations at construction stores the suite once (add_expectation re-stores it).
    suite = ctx.suites.add(gx.ExpectationSuite(name="manifest", expectations=exps))
    batch = batch_def.get_batch(batch_parameters={"dataframe": df})
    res = batch.validate(suite, result_format="SUMMARY")
    ids = df["id"] if "id" in df.columns else pd.Series(df.index.astype(str))
    by_name = {r.expectation_config.meta["name"]: r for r in res.results}
    # Report in suite order (GX returns results in its own order).
    out = []
    for exp in exps:
        name = exp.meta["name"]
        r = by_name[name]
        out.append(CheckResult(name, "expectation", bool(r.success), "" if r.success else _gx_details(r, ids)))
    return out, res.to_json_dict()


# --------------------------------------------------------------------------------------------------
# cross-row checks


def _short(items: Iterable[Any], n: int = MAX_LISTED) -> str:
    items = list(items)
    text = ", ".join(str(x) for x in items[:n])
    return text + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _pets(df: pd.DataFrame) -> pd.DataFrame:
    return df[~df["is_background"].astype(bool)]


def _check_split_leak(df: pd.DataFrame, cfg: ValidateConfig) -> tuple[bool, str]:
    """No image (by id or by image file stem) may appear in two splits."""
    stems = df["image_path"].map(lambda p: PurePosixPath(str(p)).stem if isinstance(p, str) and p else None)
    leaks: list[str] = []
    for label, key in (("id", df["id"]), ("image stem", stems)):
        splits = df["split"].groupby(key.to_numpy(), dropna=True).agg(lambda s: sorted(set(map(str, s))))
        leaks += [f"{label} {k} in {'+'.join(v)}" for k, v in splits.items() if len(v) > 1]
    return not leaks, _short(leaks)


def _check_class_counts(df: pd.DataFrame, cfg: ValidateConfig) -> tuple[bool, str]:
    """Each species has >= the floor of train images; breeds under it are only a warning."""
    floor = cfg.min_images_per_class
    pets = _pets(df)
    train = pets[pets["split"] == "train"]
    species_counts = {name: int((train["species"] == i).sum()) for i, name in enumerate(SPECIES)}
    low_species = [f"{n} ({c})" for n, c in species_counts.items() if c < floor]
    present = sorted({int(b) for b in pets["breed"] if 0 <= b < NUM_BREEDS})
    breed_counts = train["breed"].value_counts()
    low_breeds = [f"{BREEDS[b]} ({int(breed_counts.get(b, 0))})" for b in present if breed_counts.get(b, 0) < floor]
    details = "train images: " + ", ".join(f"{n} {c}" for n, c in species_counts.items())
    if low_species:
        details = f"species under the floor of {floor} train images: {_short(low_species)}; " + details
    if low_breeds:
        details += f"; warning: breeds under the floor of {floor} train images: {_short(low_breeds)}"
    return not low_species, details


def _check_class_coverage(df: pd.DataFrame, cfg: ValidateConfig) -> tuple[bool, str]:
    """Per split: both species in train and test (val: a warning); val/test breeds in train (module docstring)."""
    pets = _pets(df)
    by_split = {s: pets[pets["split"] == s] for s in SPLITS}
    problems, warnings = [], []
    for split, rows in by_split.items():
        absent = [name for i, name in enumerate(SPECIES) if not (rows["species"] == i).any()]
        if absent:
            (warnings if split == "val" else problems).append(f"no {'/'.join(absent)} pet in {split}")
    train_breeds = {int(b) for b in by_split["train"]["breed"]}
    for split in ("val", "test"):
        breeds = {int(b) for b in by_split[split]["breed"] if 0 <= b < NUM_BREEDS}
        unseen = sorted(breeds - train_breeds)
        if unseen:
            problems.append(f"{split} breed(s) without train images: {_short(BREEDS[b] for b in unseen)}")
        missing = sorted(b for b in train_breeds - breeds if 0 <= b < NUM_BREEDS)
        if missing:
            warnings.append(f"train breed(s) absent from {split}: {_short(BREEDS[b] for b in missing)}")
    details = "; ".join(problems) or "both species in train and test"
    if warnings:
        details += "; warning: " + "; ".join(warnings)
    return not problems, details


def _check_test_masks(df: pd.DataFrame, cfg: ValidateConfig) -> tuple[bool, str]:
    """Every main-root pet of the test split has a GT mask (the evaluation needs it)."""
    pets = _pets(df)
    test = pets[(pets["split"] == "test") & (pets["source"] == "pets")]
    bad = test[~test["has_mask"].astype(bool) | (test["mask_path"].fillna("").astype(str) == "")]
    details = f"{len(bad)} test pet(s) without a mask: {_short(bad['id'])}" if len(bad) else ""
    return bad.empty, details


def _check_breed_species(df: pd.DataFrame, cfg: ValidateConfig) -> tuple[bool, str]:
    """A pet's species is the species of its breed (out-of-range values are the suite's job)."""
    pets = _pets(df)
    ok_range = pets["breed"].between(0, NUM_BREEDS - 1) & pets["species"].isin(range(len(SPECIES)))
    pets = pets[ok_range]
    expected = pets["breed"].astype(int).map(lambda b: BREED_SPECIES[b])
    bad = pets[pets["species"].astype(int) != expected]
    rows = [f"{r.id} (breed {BREEDS[int(r.breed)]}, species {SPECIES[int(r.species)]})" for r in bad.itertuples()]
    return bad.empty, (f"{len(bad)} row(s): {_short(rows)}" if rows else "")


_CROSS_ROW: dict[str, tuple[Callable[[pd.DataFrame, ValidateConfig], tuple[bool, str]], tuple[str, ...]]] = {
    "split_leak": (_check_split_leak, ("id", "split", "image_path")),
    "class_counts": (_check_class_counts, ("is_background", "split", "species", "breed")),
    "class_coverage": (_check_class_coverage, ("is_background", "split", "species", "breed")),
    "test_masks": (_check_test_masks, ("is_background", "split", "source", "has_mask", "mask_path")),
    "breed_species": (_check_breed_species, ("is_background", "species", "breed")),
}


# --------------------------------------------------------------------------------------------------
# file checks


@dataclass
class _FileTask:
    row_id: str
    rel: str
    is_mask: bool
    size: tuple[Any, Any]  # manifest (width, height)
    mask_values: str
    split: str = ""


@dataclass
class _FileOutcome:
    task: _FileTask
    problem: str = ""  # "" | missing | corrupt
    message: str = ""
    size: tuple[int, int] | None = None
    values: str | None = None  # observed mask values, e.g. "0,1,255"
    mode: str = ""
    digest: str = ""  # of the decoded pixels (mode, size, bytes): equal for equal image content


def _inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` if ``rel`` is a plain relative path that stays inside ``root``."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return root / p


def _inspect(root: Path, task: _FileTask) -> _FileOutcome:
    from PIL import Image

    out = _FileOutcome(task)
    path = _inside(root, task.rel)
    if path is None or not path.is_file():
        out.problem, out.message = "missing", "outside the prepared folder" if path is None else "not found"
        return out
    # Decoding untrusted files raises many exception types (OSError, SyntaxError, ValueError, ...).
    try:
        with Image.open(path) as im:
            im.verify()  # structural checks (PNG CRCs) that load() skips
        with Image.open(path) as im:
            im.load()
            out.size, out.mode = im.size, im.mode
            if not task.is_mask:
                h = hashlib.blake2b(f"{im.mode}:{im.size[0]}x{im.size[1]}:".encode(), digest_size=16)
                h.update(im.tobytes())
                out.digest = h.hexdigest()
            if task.is_mask and im.mode in ("L", "P", "1", "I", "I;16"):
                counts = np.bincount(np.asarray(im).ravel().astype(np.int64), minlength=1)
                out.values = ",".join(str(v) for v in np.flatnonzero(counts))
    except Exception as exc:
        out.problem, out.message = "corrupt", f"{exc.__class__.__name__}: {exc}"
    return out


def _file_tasks(df: pd.DataFrame) -> list[_FileTask]:
    tasks = []
    cols = ["id", "image_path", "mask_path", "width", "height", "mask_values", "split"]
    for row_id, image, mask, w, h, values, split in df[cols].itertuples(index=False, name=None):
        if isinstance(image, str):  # null paths are reported by the suite
            tasks.append(_FileTask(str(row_id), image, False, (w, h), "", str(split)))
        if isinstance(mask, str) and mask:
            tasks.append(_FileTask(str(row_id), mask, True, (w, h), str(values)))
    return tasks


def _run_file_checks(df: pd.DataFrame, root: Path) -> list[CheckResult]:
    tasks = _file_tasks(df)
    # Pillow releases the GIL while decoding, so threads give a real speed-up.
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda t: _inspect(root, t), tasks))

    def fmt(o: _FileOutcome, what: str) -> str:
        return f"{o.task.rel} ({o.task.row_id}: {what})"

    missing = [fmt(o, o.message) for o in outcomes if o.problem == "missing"]
    corrupt = [fmt(o, o.message) for o in outcomes if o.problem == "corrupt"]
    wrong_size, wrong_values = [], []
    for o in outcomes:
        if o.problem:
            continue
        try:
            expected = (int(o.task.size[0]), int(o.task.size[1]))
        except (TypeError, ValueError):
            expected = None
        if o.size != expected:
            wrong_size.append(fmt(o, f"file {o.size[0]}x{o.size[1]}, manifest {o.task.size[0]}x{o.task.size[1]}"))
        if o.task.is_mask:
            if o.values is None:
                wrong_values.append(fmt(o, f"mode {o.mode}, expected a single-channel mask"))
                continue
            observed = {int(v) for v in o.values.split(",")}
            if not observed <= ALLOWED_MASK_VALUES or o.values != o.task.mask_values:
                wrong_values.append(fmt(o, f"values {o.values}, manifest {o.task.mask_values!r}"))
    n = len(outcomes)
    leaks, repeats = _duplicates([o for o in outcomes if o.digest])

    def result(name: str, bad: list[str], what: str) -> CheckResult:
        details = f"{len(bad)} of {n} file(s) {what}: {_short(bad)}" if bad else f"{n} file(s) checked"
        return CheckResult(name, "file_check", not bad, details)

    return [
        result("files_exist", missing, "missing"),
        result("files_decode", corrupt, "do not decode"),
        result("files_size", wrong_size, "differ in size from the manifest"),
        result("mask_pixel_values", wrong_values, "have mask values outside {0,1,255} or unlike mask_values"),
        _duplicate_result(leaks, repeats, sum(1 for o in outcomes if o.digest)),
    ]


def _duplicates(outcomes: list[_FileOutcome]) -> tuple[list[str], list[str]]:
    """Images with equal pixel content: groups spanning splits (leaks), and groups within one split."""
    groups: dict[str, list[_FileTask]] = {}
    for o in outcomes:
        groups.setdefault(o.digest, []).append(o.task)
    leaks, repeats = [], []
    for tasks in groups.values():
        if len(tasks) < 2:
            continue
        text = " = ".join(f"{t.row_id} ({t.split})" for t in sorted(tasks, key=lambda t: (t.split, t.row_id)))
        (leaks if len({t.split for t in tasks}) > 1 else repeats).append(text)
    return sorted(leaks), sorted(repeats)


def _duplicate_result(leaks: list[str], repeats: list[str], n: int) -> CheckResult:
    """Same content in two splits fails (a leak the id check cannot see); within one split it warns."""
    details = (f"{len(leaks)} image content(s) in several splits: {_short(leaks)}" if leaks
               else f"{n} image(s) hashed, no content in two splits")
    if repeats:
        details += f"; warning: {len(repeats)} image content(s) repeated within a split: {_short(repeats)}"
    return CheckResult("duplicate_content", "file_check", not leaks, details)


# --------------------------------------------------------------------------------------------------


def validate_manifest(df: pd.DataFrame, prepared_dir: str | Path, cfg: ValidateConfig) -> ValidationResult:
    """Run the GX suite, the cross-row checks and (if ``cfg.check_files``) the file checks.

    Args:
        df: The manifest (see :mod:`wsss.data.manifest`).
        prepared_dir: The folder the manifest's relative paths point into.
        cfg: Thresholds.

    Returns:
        One :class:`CheckResult` per expectation / check; ``success`` only if all pass.
    """
    df = df.reset_index(drop=True)
    checks, gx_result = _run_suite(df, cfg)
    for name, (fn, needs) in _CROSS_ROW.items():
        missing = [c for c in needs if c not in df.columns]
        if missing:
            checks.append(CheckResult(name, "file_check", False, f"not run: no column(s) {', '.join(missing)}"))
            continue
        # A malformed manifest (wrong dtypes, nulls) must yield a failed check, not a crash.
        try:
            ok, details = fn(df, cfg)
        except Exception as exc:
            ok, details = False, f"not run: {exc.__class__.__name__}: {exc}"
        checks.append(CheckResult(name, "file_check", bool(ok), details))
    if cfg.check_files:
        needs = ("id", "image_path", "mask_path", "width", "height", "mask_values", "split")
        missing = [c for c in needs if c not in df.columns]
        if missing:
            checks += [
                CheckResult(name, "file_check", False, f"not run: no column(s) {', '.join(missing)}")
                for name in FILE_CHECKS
            ]
        else:
            checks += _run_file_checks(df, Path(prepared_dir))
    n_bad = sum(not c.success for c in checks)
    stats = {"evaluated": len(checks), "successful": len(checks) - n_bad, "unsuccessful": n_bad}
    return ValidationResult(success=n_bad == 0, checks=checks, statistics=stats, gx_result=gx_result)
