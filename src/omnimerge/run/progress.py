"""The progress bar of a run: tensors, bytes, elapsed time and ETA on a terminal; quiet in CI and logs."""

from __future__ import annotations

import os
import sys


def progress_enabled(flag: bool | None) -> bool:
    """``flag`` if given, else: on when stderr is a terminal and not in CI."""
    if flag is not None:
        return flag
    return sys.stderr.isatty() and not os.environ.get("CI")


class ProgressBar:
    """Counts output tensors and their bytes; does nothing when not ``enabled``."""

    def __init__(self, enabled: bool, total_tensors: int, total_bytes: int):
        self.bar = None
        self.done = 0
        if enabled:  # (rich is imported only when a bar is shown: it takes a third of a second)
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]merging"), BarColumn(),
                                TextColumn("{task.fields[tensors]}/" + str(total_tensors) + " tensors"),
                                DownloadColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("merge", total=total_bytes, tensors=0)

    def advance(self, nbytes: int) -> None:
        if self.bar:
            self.done += 1
            self.bar.update(self.task, advance=nbytes, tensors=self.done)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
