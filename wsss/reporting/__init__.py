"""The parts of ``reports/report.md``; the ``report`` stage (``wsss.stages.report``) puts them together.

- ``paper``: the seed paper's numbers and the layout of its tables (pure data);
- ``slots``: which paper cell a map variant's numbers fill;
- ``inputs``: the stage reports the tables are built from;
- ``markdown``: cell formatting and Markdown tables;
- ``tables``: the report's sections, pure functions of the loaded reports;
- ``registry``: MLflow model registration of the U-Nets (aliases ``champion``, ``supervised``);
- ``figures``: the threshold curves and the map grids (with U-Net predictions).
"""
