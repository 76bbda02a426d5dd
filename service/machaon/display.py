"""How the commands show things: tables whose rows stay one line, and progress that is a
spinner or bar on a terminal but plain lines in a pipe or a log file.

The `--wide` convention: a table fits the terminal by default (UIDs shortened to their
end, long text cut with an ellipsis, optional columns left out); with `--wide` every
column and value is printed whole, one line per row however long, for copying and grep.
`--json` always carries the full values.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import rich.progress as bars
from rich.console import Console
from rich.segment import Segments
from rich.table import Table
from rich.text import Text

ELLIPSIS = "…"
UID_WIDTH = 20
GAP = 2  # spaces between columns


def short_uid(uid: str, width: int = UID_WIDTH) -> str:
    """The end of a UID, after an ellipsis: UIDs from one source share their root and differ
    at the end. `machaon studies show` accepts this form while it names one study."""
    return uid if len(uid) <= width else ELLIPSIS + uid[-(width - 1):]


def local_time(iso: str | None) -> str:
    """A time from the store (UTC, ISO 8601 with a Z) as the machine's local time, to the second:
    what people read in tables (--json keeps UTC)."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table_uid(uid: str | None, wide: bool) -> str:
    """A UID in a table: whole with --wide, else its end (`studies show` takes either)."""
    return (uid if wide else short_uid(uid)) if uid else ""


def wide_flag() -> argparse.ArgumentParser:
    """The parent parser of commands that print tables (see the module's docstring)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--wide", action="store_true",
                        help="print every column and value whole, however long the lines, "
                             "instead of fitting the terminal")
    return parser


@dataclass(frozen=True)
class Column:
    header: str
    justify: Literal["left", "right"] = "left"
    cut: bool = False  # may be cut short, with an ellipsis, to fit the terminal
    optional: bool = False  # left out, from the rightmost, when cutting is not enough


def print_table(console: Console, columns: Sequence[Column], rows: Sequence[Sequence[str]],
                wide: bool = False) -> bool:
    """Rows of markup strings as a table, one line per row (see the module's docstring);
    True when a value was cut or a column left out to fit."""
    natural = [max([Text.from_markup(c.header).cell_len] + [Text.from_markup(r[i]).cell_len for r in rows])
               for i, c in enumerate(columns)]
    widths = list(natural)
    shown = list(range(len(columns)))

    def too_wide() -> int:
        return sum(widths[i] for i in shown) + GAP * (len(shown) - 1) - console.width

    if not wide:
        cuttable = [i for i in shown if columns[i].cut]
        minimum = {i: max(len(columns[i].header), 8) for i in cuttable}
        # First cut long text to a readable length, then leave out optional columns, then cut more.
        for floor in (24, 0):
            while too_wide() > 0 and (over := [i for i in cuttable if i in shown
                                               and widths[i] > max(floor, minimum[i])]):
                widths[max(over, key=widths.__getitem__)] -= 1
            while floor and too_wide() > 0 and (optional := [i for i in shown if columns[i].optional]):
                shown.remove(optional[-1])
    table = Table(box=None, padding=(0, GAP // 2), pad_edge=False, show_edge=False)
    for i in shown:
        table.add_column(columns[i].header, justify=columns[i].justify, no_wrap=True, overflow="ellipsis",
                         max_width=widths[i], min_width=widths[i])
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    if wide:  # rendered at its own width, so that no value is wrapped or cut, whatever the terminal
        console.print(Segments(console.render(table, console.options.update_width(
            sum(widths) + GAP * (len(widths) - 1)))), crop=False)
    else:
        console.print(table)
    return widths != natural or len(shown) < len(columns)


@contextmanager
def step(console: Console, text: str) -> Iterator[None]:
    """A spinner while the body runs on a terminal; elsewhere a line when it starts and one when it
    ends, since a spinner's frames would fill a log file."""
    if console.is_interactive:
        with console.status(text):
            yield
        return
    _line(console, f"{text}...")
    started = time.monotonic()
    try:
        yield
    except BaseException:
        _line(console, f"{text}: failed after {time.monotonic() - started:.1f} s")
        raise
    _line(console, f"{text}: done in {time.monotonic() - started:.1f} s")


def _line(console: Console, text: str) -> None:
    """A line as it is: no markup, no colouring, and not wrapped, so that a log keeps it whole."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


class _Count:
    """What `progress` yields: call `advance()` as each item is done."""

    def __init__(self, advance: Callable[[int], None] | None = None):
        self.done = 0
        self._advance = advance

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._advance:
            self._advance(n)


@contextmanager
def progress(console: Console, description: str, total: int) -> Iterator[_Count]:
    """A progress bar on a terminal; elsewhere a line when it starts and one when it ends."""
    if console.is_interactive:
        with bars.Progress(bars.SpinnerColumn(), bars.TextColumn("{task.description}"), bars.BarColumn(),
                           bars.MofNCompleteColumn(), bars.TimeElapsedColumn(), console=console,
                           transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield _Count(lambda n: bar.advance(task, n))
        return
    _line(console, f"{description}: {total} to do...")
    started, count = time.monotonic(), _Count()
    try:
        yield count
    finally:
        _line(console, f"{description}: {count.done} of {total} done in {time.monotonic() - started:.1f} s")
