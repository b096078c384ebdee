"""Stage ``self-train-champion``: every self-training round's val IoU and the round kept.

Reads ``reports/selftrain/r<N>.json`` for N = 1..``self_train.rounds`` (round 0's val IoU is in round 1's
report, scored the same way) and writes ``reports/self-training.json``: the rounds, their val IoU, their
test IoU where ``wsss evaluate`` scored them (shown, never used), and the champion: the best val IoU, with
round 0 (``unet-best``) kept unless a round beats it (:func:`wsss.self_training.choose_champion`).
"""

from __future__ import annotations

from typing import Any

from wsss import tracking
from wsss.config import Params
from wsss.errors import DataError
from wsss.io import read_json, write_json
from wsss.paths import Paths
from wsss.self_training import model_of, summary
from wsss.ui import console
from wsss.variants import UnetId

STAGE = "self-train-champion"


def run_champion(params: Params, paths: Paths) -> dict[str, Any]:
    """Write ``reports/self-training.json``: rounds 0..``self_train.rounds`` with their val IoU (and test
    IoU where evaluated, for the report only) and the champion, chosen on val."""
    rounds: list[dict[str, Any]] = []
    for r in range(1, params.self_train.rounds + 1):
        path = paths.selftrain_report(r)
        if not path.exists():
            raise DataError(f"{path}: self-training round {r} has not run; run `wsss self-train --round {r}`")
        rep = read_json(path)
        if r == 1:
            rounds.append({"round": 0, "model": model_of(0), "val_iou": rep["previous_val_iou"]})
        rounds.append({"round": r, "model": model_of(r), "val_iou": rep["val_iou"], "n_reset": rep["n_reset"],
                       "ignore_fraction": rep["ignore_fraction"]})
    for entry in rounds:  # shown beside, never used to choose
        test = paths.eval_report(UnetId.parse(entry["model"]))
        if test.exists():
            entry["test_iou"] = read_json(test).get("iou_mean")
    out = summary(rounds)
    write_json(paths.self_training_report, out)
    with tracking.stage_run(STAGE, "rounds", params, paths, sections=("self_train",)):
        tracking.log_metrics({"champion_round": out["champion"]["round"], "champion_val_iou": out["champion"]["val_iou"],
                              **{f"round{e['round']}_val_iou": e["val_iou"] for e in rounds}})
    console.print(f"self-training champion: round {out['champion']['round']} ({out['champion']['model']}, val IoU "
                  f"{out['champion']['val_iou']:.3f}); " + ", ".join(f"r{e['round']} {e['val_iou']:.3f}" for e in rounds))
    return out
