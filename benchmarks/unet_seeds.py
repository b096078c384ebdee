"""How much of a U-Net comparison is the seed? Retrain U-Nets of a finished project under more seeds.

``quality.py`` compares U-Nets trained once each (one ``base.seed``): the WSSS U-Net on the selected
pseudo-masks, the label-free one on the rectangle-GrabCut masks, the supervised one on GT. This script
retrains each of them with other seeds on exactly the same masks and schedule and scores every run on the
same evaluation images, so a difference between two rows can be read against the spread of one row.

For each extra seed it makes a sibling project ``<workdir>/seed-<n>/``: ``params.yaml`` is the source
project's with ``base.seed`` replaced, and ``data/``, ``masks/``, ``cams/`` and ``reports/pseudo/`` are
symlinks to the source project's (read only: nothing of the source project is written). There it runs
``wsss train-unet --masks <source>`` and ``wsss evaluate --model unet-<source>``. The source project's own
models are the first seed (its ``base.seed``), read from its reports, not retrained.

Seeds are paired: the same seed gives every mask source the same initial weights and batch order, so the
per-seed difference between two sources is printed beside their means.

Each U-Net is also scanned over decision thresholds (``THRESHOLDS``): the threshold with the best **val**
IoU (ties: the one nearest 0.5), the product's guarded choice (``train_unet.decision``,
:mod:`wsss.decision`) and the test IoU at each, with and without horizontal-flip TTA. That measures what
choosing the threshold on val gives each U-Net, with and without the guard; the test split chooses nothing.

    python benchmarks/unet_seeds.py --project WORK --masks best prior-grabcut gt --seeds 1 2 \\
        --out benchmarks/results/unet-seeds-cpu.json

``WORK`` is a ``quality.py --workdir`` without ``--eval-root`` (the U-Nets are scored on its test split);
``best`` resolves there as in the source project (its ``reports/pseudo`` is linked), so ``unet-best`` trains on
the same selected pseudo-masks.
Takes one ``train-unet`` + ``evaluate`` per (source, extra seed): about 5 min each for the cpu profile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import Runner, StepFailed, deep_merge, machine, read_json, shown, write_params  # noqa: E402

from wsss.io import write_json, write_text  # noqa: E402

LINKED = ("data", "masks", "cams", "reports/pseudo")
THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, required=True,
                    help="a finished wsss project (quality.py --workdir) whose U-Nets were trained and evaluated")
    ap.add_argument("--masks", nargs="+", default=["best", "prior-grabcut", "gt"],
                    help="mask sources to retrain (train-unet --masks), e.g. best prior-grabcut gt")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="extra base.seed values")
    ap.add_argument("--workdir", type=Path, default=None, help="where the seed projects go (default <project>-seeds)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/unet-seeds.json"))
    ap.add_argument("--no-thresholds", dest="thresholds", action="store_false",
                    help="skip the decision-threshold scan (val and test inference of every U-Net, plain and flipped)")
    args = ap.parse_args(argv)
    if not (args.project / "params.yaml").is_file():
        ap.error(f"--project {args.project}: no params.yaml (a wsss project folder is needed)")
    return args


def base_seed(project: Path) -> int:
    """The ``base.seed`` a project's params.yaml sets (0 when it sets none, wsss's default)."""
    params = yaml.safe_load((project / "params.yaml").read_text()) or {}
    return int((params.get("base") or {}).get("seed", 0))


def sibling_project(source: Path, dest: Path, overrides: dict[str, Any]) -> Path:
    """``dest``: the source project's params with ``overrides`` merged on, its inputs (:data:`LINKED`)
    linked, not copied, so nothing of the source project is written."""
    params = yaml.safe_load((source / "params.yaml").read_text()) or {}
    write_params(dest, deep_merge(params, overrides))
    for rel in LINKED:
        target, link = source / rel, dest / rel
        if target.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target.resolve(), target_is_directory=True)
    return dest


def seed_project(source: Path, dest: Path, seed: int) -> Path:
    """``dest``: the source project's params with ``base.seed = seed``, its inputs linked."""
    return sibling_project(source, dest, {"base": {"seed": seed}})


def scores(project: Path, masks: str) -> dict[str, Any] | None:
    """A trained and evaluated U-Net's scores: last val fg IoU (training report) and test fg IoU / Dice."""
    training = project / "reports" / "training" / f"unet-{masks}.json"
    ev = project / "reports" / "eval" / f"{masks}.json"
    if not (training.is_file() and ev.is_file()):
        return None
    t, e = read_json(training), read_json(ev)
    return {"val_iou": t.get("last_val_iou_mean"), "test_iou": e.get("iou_mean"), "test_dice": e.get("dice_mean"),
            "n_test": e.get("n_images"), "steps": (e.get("training") or {}).get("steps")}


def choose_threshold(val: dict[float, Any], test: dict[float, Any], min_gain_se: float) -> dict[str, float]:
    """Per-image val and test IoUs by threshold -> the val best (ties: nearest 0.5), the product's guarded
    choice (:func:`wsss.decision.choose_threshold` with ``min_gain_se``) and the mean IoUs there and at 0.5.
    Test only scores: it never enters a choice."""
    import numpy as np

    from wsss.decision import choose_threshold as choose

    best, guarded = choose(val, 0.0), choose(val, min_gain_se)

    def mean(ious: dict[float, Any], t: float) -> float:
        return float(np.mean(ious[t]))

    return {"threshold": best.threshold, "val_iou": mean(val, best.threshold), "test_iou": mean(test, best.threshold),
            "val_iou_default": mean(val, 0.5), "test_iou_default": mean(test, 0.5),
            "guarded_threshold": guarded.threshold, "guarded_test_iou": mean(test, guarded.threshold),
            "gain": best.gain, "gain_se": best.gain_se}


def scan_thresholds(project: Path, masks: str) -> dict[str, dict[str, float]]:
    """``unet-<masks>`` of ``project`` on its val and test pets with GT, at every threshold of
    :data:`THRESHOLDS`, plain and with flip TTA: :func:`choose_threshold` of each, guarded by the
    project's ``train_unet.decision.min_gain_se``."""
    from wsss.config import load_params
    from wsss.data.manifest import load_manifest, official_test_rows, pets
    from wsss.data.readers import read_mask, read_rgb
    from wsss.device import precision_from, prepare_model
    from wsss.evaluation import per_image_ious
    from wsss.inference import predict_probs
    from wsss.models.loading import load_model_dir
    from wsss.paths import Paths

    paths = Paths(project)
    params = load_params(project / "params.yaml")
    net, meta = load_model_dir(paths.model_dir(f"unet-{masks}"), "unet")
    prec = precision_from(None, params)
    net = prepare_model(net, prec)
    splits = {"val": pets(load_manifest(paths.manifest), "val", with_mask=True).sort_values("id"),
              "test": official_test_rows(paths.manifest)}
    by_kind: dict[bool, dict[str, dict[float, Any]]] = {False: {}, True: {}}
    for split, rows in splits.items():
        probs: dict[bool, list[Any]] = {False: [], True: []}
        gts = []
        records = list(rows.itertuples())
        for i in range(0, len(records), params.evaluate.batch_size):
            chunk = records[i : i + params.evaluate.batch_size]
            images = [read_rgb(paths.prepared / r.image_path) for r in chunk]
            for flip in (False, True):  # the product's flip TTA (one more plain pass: simpler than sharing it)
                probs[flip] += predict_probs(net, images, meta.input_size, prec, flip=flip)
            gts += [read_mask(paths.prepared / r.mask_path) for r in chunk]
        for flip in (False, True):
            by_kind[flip][split] = per_image_ious(zip(probs[flip], gts, strict=True), THRESHOLDS)
    guard = params.train_unet.decision.min_gain_se
    return {"plain": choose_threshold(by_kind[False]["val"], by_kind[False]["test"], guard),
            "flip_tta": choose_threshold(by_kind[True]["val"], by_kind[True]["test"], guard)}


def spread(values: list[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation, min and max in % (sd None below two values)."""
    pct = [100.0 * v for v in values]
    return {"n": len(pct), "mean": round(statistics.fmean(pct), 2) if pct else None,
            "sd": round(statistics.stdev(pct), 2) if len(pct) > 1 else None,
            "min": round(min(pct), 2) if pct else None, "max": round(max(pct), 2) if pct else None}


def summarise(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per source: val and test spread over seeds; per pair of sources: the per-seed test difference."""
    per_source = {m: {"val": spread([r["val_iou"] for r in by_seed.values() if r.get("val_iou") is not None]),
                      "test": spread([r["test_iou"] for r in by_seed.values() if r.get("test_iou") is not None])}
                  for m, by_seed in runs.items()}
    names = list(runs)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            seeds = sorted(set(runs[a]) & set(runs[b]))
            diffs = [runs[a][s]["test_iou"] - runs[b][s]["test_iou"] for s in seeds]
            vdiffs = [runs[a][s]["val_iou"] - runs[b][s]["val_iou"] for s in seeds]
            pairs[f"{a} - {b}"] = {"seeds": seeds, "test": spread(diffs), "val": spread(vdiffs),
                                   "test_per_seed": [round(100 * d, 2) for d in diffs]}
    thresholds = {}
    for m, by_seed in runs.items():
        scans = [r["thresholds"] for r in by_seed.values() if r.get("thresholds")]
        if scans:
            thresholds[m] = {kind: {"thresholds": [sc[kind]["threshold"] for sc in scans],
                                    "test_at_default": spread([sc[kind]["test_iou_default"] for sc in scans]),
                                    "test_at_chosen": spread([sc[kind]["test_iou"] for sc in scans]),
                                    "guarded_thresholds": [sc[kind].get("guarded_threshold") for sc in scans],
                                    "test_at_guarded": spread([sc[kind]["guarded_test_iou"] for sc in scans
                                                               if "guarded_test_iou" in sc[kind]])}
                             for kind in ("plain", "flip_tta")}
    return {"per_source": per_source, "paired_differences": pairs, "decision_thresholds": thresholds}


def to_markdown(result: dict[str, Any]) -> str:
    def cell(s: dict[str, Any]) -> str:
        if s.get("mean") is None:
            return "—"
        sd = f" ± {s['sd']:.2f}" if s.get("sd") is not None else ""
        return f"{s['mean']:.2f}{sd} ({s['min']:.1f}–{s['max']:.1f})"

    out = [f"# U-Net seed spread: `{result['project']}`", "",
           f"{result['machine']}. Seeds {', '.join(map(str, result['seeds']))} (the first is the project's own "
           f"models). Every U-Net: same masks, same `train_unet` schedule; fg IoU % as mean ± sd (min–max); "
           f"test = {result.get('n_test', '?')} images never used to train or choose.", "",
           "| masks | val IoU | test IoU | per seed (test) |", "|---|---|---|---|"]
    order = result["masks"]  # the --masks order (the JSON's keys are sorted)
    for m in order:
        s = result["summary"]["per_source"][m]
        runs = sorted(result["runs"][m].items(), key=lambda kv: int(kv[0]))
        per = ", ".join(f"{round(100 * r['test_iou'], 2):.1f}" for _, r in runs)  # rounded as the spread is
        out.append(f"| `{m}` | {cell(s['val'])} | {cell(s['test'])} | {per} |")
    out += ["", "Paired by seed (same initial weights and batch order), test and val fg IoU differences in points:", "",
            "| difference | test | val | test per seed |", "|---|---|---|---|"]
    pairs = result["summary"]["paired_differences"]
    for name in (f"{a} - {b}" for i, a in enumerate(order) for b in order[i + 1:]):
        p = pairs[name]
        out.append(f"| {name} | {cell(p['test'])} | {cell(p['val'])} | {', '.join(f'{d:+.1f}' for d in p['test_per_seed'])} |")
    thresholds = result["summary"].get("decision_thresholds") or {}
    if thresholds:
        def chosen(xs: list[Any]) -> str:
            return ", ".join("—" if x is None else f"{x:g}" for x in xs)

        out += ["", "Decision threshold chosen on **val** for each U-Net, test fg IoU at 0.5, at the val best and "
                "at the product's guarded choice (`train_unet.decision`: the val best only where its paired val "
                "gain over 0.5 exceeds `min_gain_se` standard errors), plain and with horizontal-flip TTA (the "
                "product's default):", "",
                "| masks | val best per seed | test at 0.5 | test at val best | flip TTA: val best | flip TTA: "
                "test at 0.5 | flip TTA: test at val best | flip TTA: guarded choice | flip TTA: test at guarded |",
                "|---|---|---|---|---|---|---|---|---|"]
        for m in (m for m in order if m in thresholds):
            p, f = thresholds[m]["plain"], thresholds[m]["flip_tta"]
            out.append(f"| `{m}` | {chosen(p['thresholds'])} | {cell(p['test_at_default'])} | "
                       f"{cell(p['test_at_chosen'])} | {chosen(f['thresholds'])} | "
                       f"{cell(f['test_at_default'])} | {cell(f['test_at_chosen'])} | "
                       f"{chosen(f.get('guarded_thresholds') or [])} | {cell(f.get('test_at_guarded') or {})} |")
    out += ["", f"Total {result['total_seconds'] / 60:.1f} min in this invocation (U-Nets a previous one trained "
            "and evaluated are reused, not retrained); every step it ran is in the JSON."]
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace, runner_for: Any = None) -> dict[str, Any]:
    """Retrain and evaluate; returns the result (also written as JSON + markdown to ``args.out``)."""
    project = args.project.resolve()
    workdir = (args.workdir or project.with_name(project.name + "-seeds")).resolve()
    first = base_seed(project)
    seeds = [first, *[s for s in args.seeds if s != first]]
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    scan = scan_thresholds if args.thresholds else None
    start, steps = time.perf_counter(), []
    for m in args.masks:
        own = scores(project, m)
        if own is None:
            raise StepFailed(f"{project}: unet-{m} has no training or evaluation report; run quality.py first")
        runs[m] = {first: {**own, **({"thresholds": scan(project, m)} if scan else {})}}
    for seed in seeds[1:]:
        dest = seed_project(project, workdir / f"seed-{seed}", seed)
        runner = (runner_for or (lambda root: Runner(root, root / "unet-seeds.log")))(dest)
        for m in args.masks:
            if scores(dest, m) is None:  # a rerun keeps what a killed run finished
                runner(f"train-unet {m} (seed {seed})", "train-unet", "--masks", m)
                runner(f"evaluate unet-{m} (seed {seed})", "evaluate", "--model", f"unet-{m}")
            result = scores(dest, m)
            if result is None:
                raise StepFailed(f"{dest}: unet-{m} left no reports")
            runs[m][seed] = {**result, **({"thresholds": scan(dest, m)} if scan else {})}
        steps += runner.steps
    n_test = {r["n_test"] for by_seed in runs.values() for r in by_seed.values()}
    result = {"project": shown(project), "workdir": shown(workdir), "machine": machine(), "seeds": seeds,
              "masks": list(args.masks), "n_test": n_test.pop() if len(n_test) == 1 else sorted(n_test),
              "runs": {m: {str(s): r for s, r in by_seed.items()} for m, by_seed in runs.items()},
              "summary": summarise(runs), "steps": steps, "total_seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, result, to_markdown)
    return result


def write_result(out: Path, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """``out`` (JSON) and its ``.md`` twin, each atomic as every wsss report: a killed run leaves the previous whole."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))


def cli(argv: list[str] | None, parse: Callable[[list[str] | None], argparse.Namespace],
        run_with: Callable[[argparse.Namespace], dict[str, Any]], markdown: Callable[[dict[str, Any]], str]) -> int:
    """A benchmark's ``main``: parse, run, print the markdown; a failed step is one line and exit 1."""
    try:
        result = run_with(parse(argv))
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(argv, parse_args, run, to_markdown)


if __name__ == "__main__":
    sys.exit(main())
