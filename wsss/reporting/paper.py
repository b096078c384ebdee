"""The seed paper's numbers (its Tables 1–3, in %) and the layout of those tables.

Pure data, copied from the paper; see ``docs/seed-paper.md#the-papers-numbers``. The CAM and CAM+ECS
values are printed as the paper printed them, with its broken metric (``docs/seed-paper.md``, B3).
"""

from __future__ import annotations

Pair = tuple[float, float]  # (IoU, Dice) in %

PAPER_TABLE1: dict[str, dict[str, Pair]] = {
    "CAM": {"Pretrained": (26.03, 40.51), "2-Class": (12.73, 21.70), "37-Class": (20.89, 33.19)},
    "CAM+ECS": {"Pretrained": (25.68, 40.13), "2-Class": (13.64, 23.13), "37-Class": (20.98, 33.32)},
    "CCAM": {"Pretrained": (68.21, 80.32), "2-Class": (41.07, 55.85), "37-Class": (15.10, 23.93)},
    "CCAM+ECS": {"37-Class": (24.59, 37.31)},
}
PAPER_TABLE2: dict[str, dict[str, Pair]] = {
    "CAM": {"2-Class": (12.73, 21.70), "2/bg": (29.64, 45.27), "37-Class": (20.89, 33.19),
            "37/bg": (20.90, 33.20)},
    "CAM+ECS": {"2-Class": (13.64, 23.13), "2/bg": (29.24, 44.81), "37-Class": (20.98, 33.32),
                "37/bg": (21.44, 33.96)},
    "CCAM": {"2-Class": (41.07, 55.85), "2/bg": (48.58, 63.27), "37-Class": (15.10, 23.93),
             "37/bg": (29.08, 41.76)},
    "CCAM+ECS": {"2/bg": (48.65, 63.44), "37-Class": (24.59, 37.31), "37/bg": (42.80, 58.36)},
}
PAPER_TABLE3: dict[str, dict[str, Pair]] = {
    "CCAM": {"Pretrained": (68.21, 80.32), "2-Class": (52.97, 67.63), "37-Class": (59.78, 73.26),
             "37-Class/U-Net": (59.29, 73.63)},
    "CCAM+dCRF": {"Pretrained": (76.02, 85.64), "2-Class": (51.15, 64.99), "37-Class": (59.79, 72.32),
                  "37-Class/U-Net": (61.58, 75.30)},
}
PAPER_SUPERVISED_UNET: Pair = (68.25, 84.77)

MAP_ROWS = ("CAM", "CAM+ECS", "CCAM", "CCAM+ECS")
TABLE1_COLUMNS = ("Pretrained", "2-Class", "37-Class")
TABLE2_COLUMNS = ("2-Class", "2/bg", "37-Class", "37/bg")
TABLE3_COLUMNS = ("Pretrained", "2-Class", "37-Class", "37-Class/U-Net")
# A classifier's label space -> the paper's column for maps made from it.
LABEL_COLUMNS = {"species": "2-Class", "breed": "37-Class", "species-bg": "2/bg", "breed-bg": "37/bg"}
