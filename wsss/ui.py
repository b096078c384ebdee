"""Console output: one rich console and progress bars with the same columns everywhere."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress() -> Progress:
    """A rich progress display (spinner, description, bar, n/total, elapsed, remaining)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


@contextlib.contextmanager
def task(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Context yielding ``advance(n=1, info='')`` for one progress bar."""
    with progress() as prog:
        tid = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None, completed: int | None = None,
                    total: int | None = None) -> None:
            kwargs: dict = {"info": info} if info is not None else {}
            if total is not None:
                kwargs["total"] = total
            if completed is not None:
                prog.update(tid, completed=completed, **kwargs)
            else:
                prog.update(tid, advance=n, **kwargs)

        yield advance
