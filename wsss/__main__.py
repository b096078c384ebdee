"""``python -m wsss``: the same command line as the ``wsss`` console script."""

from wsss.cli import app

if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses in tests
    app(prog_name="wsss")
