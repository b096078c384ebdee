"""Which cell of the paper's tables a map variant's numbers fill.

Map variants are parsed by :class:`wsss.variants.MapVariant`; ``map_slot`` maps the parsed name to a cell.

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
``ensemble``                     own table               (no paper counterpart; ``docs/seed-paper.md``,
                                                         B10)
===============================  ======================  ==============================================
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wsss.errors import ConfigError
from wsss.reporting.paper import LABEL_COLUMNS
from wsss.variants import CcamId, ClassifierId, ImagenetId, MapVariant


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
    try:
        parsed = MapVariant.parse(variant)
    except ConfigError:
        return None
    model = parsed.model
    if parsed.method in ("cam", "ecs"):
        row = "CAM" if parsed.method == "cam" else "CAM+ECS"
        if isinstance(model, ImagenetId):
            return Slot("maps", row, "Pretrained")
        return Slot("maps", row, LABEL_COLUMNS[model.variant]) if isinstance(model, ClassifierId) else None
    if not isinstance(model, CcamId):
        return None
    init = model.init
    ecs = model.ecs or parsed.method == "ccam-ecs"
    if init.kind == "imagenet":
        column, rank, note = "Pretrained", 0, ""
    elif init.pretrain is not None:
        column, rank, note = "Pretrained", 1, f"self-supervised init {init.pretrain.name}, not ImageNet"
    elif init.kind == "none":
        column, rank, note = "Pretrained", 2, "random init, not ImageNet"
    else:
        column, rank, note = LABEL_COLUMNS[init.classifier.variant], 0, ""
    if model.per_breed:
        # Table 3's class-specific 37-Class column; ECS and init only order the candidates.
        return Slot("class-specific", "CCAM", "37-Class", rank + (10 if ecs else 0), note)
    return Slot("maps", "CCAM+ECS" if ecs else "CCAM", column, rank, note)


def pick(variants: Iterable[str], table: str, row: str, column: str) -> str | None:
    """The best-ranked variant filling one cell (ties: alphabetical), or None."""
    found = [(slot.rank, v) for v in variants if (slot := map_slot(v)) is not None
             and (slot.table, slot.row, slot.column) == (table, row, column)]
    return min(found)[1] if found else None
