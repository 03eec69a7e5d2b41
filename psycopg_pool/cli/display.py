"""Terminal output for the command line: a live block redrawn in place, tables, numbers.

On a terminal, `LiveDisplay` redraws a few lines in place (cursor movements, no
colours). Anywhere else (a pipe, a file, CI logs, ``TERM=dumb``) it prints one plain
line per update and never writes a control character.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TextIO

_CSI = "\x1b["


def is_terminal(stream: TextIO) -> bool:
    """Can `stream` take cursor movements? A tty whose TERM is not ``dumb``."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


class LiveDisplay:
    """A progress display: a block redrawn in place on a terminal, plain lines elsewhere."""

    def __init__(self, stream: TextIO, terminal: bool) -> None:
        self.stream = stream
        self.terminal = terminal
        self._drawn = 0  # lines of the block currently on screen
        self._gone = False  # the reader of a pipe went away: nothing more to show

    def update(self, block: Sequence[str], line: str) -> None:
        """Show `block` (terminal) or print `line` (anything else)."""
        if self._gone:
            return
        try:
            self._show(block, line)
        except BrokenPipeError:
            # Updates come from a thread of their own: the command's main thread
            # finds the pipe closed when it prints its summary, and ends quietly.
            self._gone = True

    def _show(self, block: Sequence[str], line: str) -> None:
        out = self.stream
        if not self.terminal:
            out.write(line + "\n")
            out.flush()
            return
        parts = []
        if self._drawn:
            parts.append(f"{_CSI}{self._drawn}F")  # to the start of the block's first line
        else:
            parts.append(f"{_CSI}?25l")  # hide the cursor while redrawing
        # A line wider than the terminal wraps onto two rows, and the redraw, which moves
        # up one row per line, would leave a stale copy behind each time.
        width = _columns(out)
        for text in block:
            if width and len(text) >= width:
                text = text[: width - 4] + "..."  # ASCII: any terminal encoding takes it
            parts.append(f"{_CSI}2K{text}\n")
        # A shorter block than last time: clear what is left below it.
        for _ in range(self._drawn - len(block)):
            parts.append(f"{_CSI}2K\n")
        out.write("".join(parts))
        out.flush()
        self._drawn = max(self._drawn, len(block))

    def close(self) -> None:
        """Give the cursor back; the last block stays on screen."""
        if self.terminal and self._drawn:
            self.stream.write(f"{_CSI}?25h")
            self.stream.flush()
        self._drawn = 0


def _columns(stream: TextIO) -> int:
    """The terminal's width, or 0 if it cannot tell."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def progress_bar(done: float, total: float, width: int = 30) -> str:
    frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    full = round(frac * width)
    return "[" + "#" * full + "." * (width - full) + "]"


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> list[str]:
    """Align `rows` in columns: the first one left, the others right."""
    all_rows = [list(header)] if header else []
    all_rows += [list(r) for r in rows]
    if not all_rows:
        return []
    ncols = max(len(r) for r in all_rows)
    for r in all_rows:
        r.extend([""] * (ncols - len(r)))
    widths = [max(len(r[i]) for r in all_rows) for i in range(ncols)]
    lines = []
    for r in all_rows:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def fmt_ms(seconds: float | None) -> str:
    """A duration in milliseconds with 2 or 3 significant digits: '0.042', '1.25', '310'."""
    if seconds is None:
        return "-"
    ms = seconds * 1000.0
    if ms < 0.1:
        return f"{ms:.3f}"
    if ms < 10:
        return f"{ms:.2f}"
    if ms < 100:
        return f"{ms:.1f}"
    return f"{ms:,.0f}"


def fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def fmt_rate(per_second: float) -> str:
    """A rate with 3 significant digits below 100 ('0.42', '7.5'), whole above."""
    if per_second < 100:
        return f"{per_second:.3g}"
    return f"{per_second:,.0f}"


def fmt_seconds(seconds: float) -> str:
    """A setting's duration, as PostgreSQL shows them: '30s', '5min', '1h'."""
    if not seconds:
        return "0"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}min"
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"
