"""Which cell of the paper's tables a map variant's numbers fill.

Map variants are ``<method>_<model>`` (see ``make_cams.variant_name``). ``map_slot`` is the only place
here that reads that grammar.

===============================  ======================  ==============================================
variant                          paper row               paper column
===============================  ======================  ==============================================
``cam_imagenet``                 CAM                     Pretrained
``cam_classifier-species``       CAM                     2-Class
``cam_classifier-breed``         CAM                     37-Class
``cam_classifier-species-bg``    CAM                     2/bg (Table 2)
``cam_classifier-breed-bg``      CAM                     37/bg (Table 2)
``ecs_classifier-<labels>``      CAM+ECS                 as for CAM
``ccam_ccam-imagenet``           CCAM                    Pretrained (``ccam-pre-*`` or ``ccam-none``
                                                         stand in when no ImageNet-init CCAM exists)
``ccam_ccam-cls-species``        CCAM                    2-Class
``ccam_ccam-cls-breed``          CCAM                    37-Class
``ccam_ccam-cls-<labels>-bg``    CCAM                    2/bg, 37/bg (Table 2)
``ccam-ecs_ccam-cls-breed-ecs``  CCAM+ECS                37-Class (any ``-ecs`` model or the
                                                         ``ccam-ecs`` method gives a CCAM+ECS row)
``ccam*_ccam-*-perbreed``        Table 3 CCAM / +dCRF    37-Class (class-specific)
``ccam*_ccam-*-perspecies``      Table 3 CCAM / +dCRF    2-Class (class-specific; no stage makes one yet)
``ensemble``                     own table               (no paper counterpart; ``docs/seed-paper.md``,
                                                         B10)
===============================  ======================  ==============================================
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wsss.reporting.paper import LABEL_COLUMNS


@dataclass(frozen=True)
class Slot:
    """Where a map variant's numbers go: Tables 1–2 (``maps``) or Table 3 (``class-specific``)."""

    table: str
    row: str
    column: str
    rank: int = 0  # lower wins when several variants fill one cell
    note: str = ""


def map_slot(variant: str) -> Slot | None:
    """The paper cell a map variant stands for (see the module docstring), or None."""
    # lead: parse with wsss.variants at merge
    method, sep, model = variant.partition("_")
    if not sep:
        return None
    if method in ("cam", "ecs"):
        row = "CAM" if method == "cam" else "CAM+ECS"
        if model == "imagenet":
            return Slot("maps", row, "Pretrained")
        column = LABEL_COLUMNS.get(model.removeprefix("classifier-")) if model.startswith("classifier-") else None
        return Slot("maps", row, column) if column else None
    if method not in ("ccam", "ccam-ecs") or not model.startswith("ccam-"):
        return None
    rest = model.removeprefix("ccam-")
    specific = ""
    for suffix in ("-perbreed", "-perspecies"):
        if rest.endswith(suffix):
            specific, rest = suffix, rest.removesuffix(suffix)
    ecs = rest.endswith("-ecs") or method == "ccam-ecs"
    rest = rest.removesuffix("-ecs")
    if rest == "imagenet":
        column, rank, note = "Pretrained", 0, ""
    elif rest.startswith("pre-"):
        column, rank, note = "Pretrained", 1, f"self-supervised init {rest.removeprefix('pre-')}, not ImageNet"
    elif rest == "none":
        column, rank, note = "Pretrained", 2, "random init, not ImageNet"
    elif rest.startswith("cls-") and rest.removeprefix("cls-") in LABEL_COLUMNS:
        column, rank, note = LABEL_COLUMNS[rest.removeprefix("cls-")], 0, ""
    else:
        return None
    if specific:
        # Table 3's class-specific columns; ECS and init only order the candidates.
        col = "37-Class" if specific == "-perbreed" else "2-Class"
        return Slot("class-specific", "CCAM", col, rank + (10 if ecs else 0), note)
    return Slot("maps", "CCAM+ECS" if ecs else "CCAM", column, rank, note)


def pick(variants: Iterable[str], table: str, row: str, column: str) -> str | None:
    """The best-ranked variant filling one cell (ties: alphabetical), or None."""
    found = [(slot.rank, v) for v in variants if (slot := map_slot(v)) is not None
             and (slot.table, slot.row, slot.column) == (table, row, column)]
    return min(found)[1] if found else None
