"""A table that is kept in sync, not refilled, and paints only what shows.

`sync()` takes the rows a view should show (key and cells) and changes only
what changed. Cells are `Cell` objects that show styled text and compare by
their sort value, so the table sorts by numbers while it shows `1.2k`.
After a re-sort the cursor stays on the row it was on (by key, not
position): a flow under the cursor stays under it while the ranking moves.

It is a line-API widget (Textual's ScrollView): a paint builds one strip of
segments per visible line from the cells' text — a few hundred segments for
a screenful, about a millisecond — where a DataTable re-renders every
visible cell through Rich after any change, tens of milliseconds that a key
press would wait behind at tens of thousands of events per second.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

GAP = 2           # spaces between columns
MAX_WIDTH = 48    # a column never grows wider than this (text is cut with …)


@dataclass(frozen=True, eq=False, slots=True)
class Cell:
    text: str
    sort: Any = None
    style: str = ""
    right: bool = False

    def _key(self) -> Any:
        return self.text if self.sort is None else self.sort

    def __lt__(self, other: Cell) -> bool:
        a, b = self._key(), other._key()
        try:
            return a < b
        except TypeError:  # None and numbers, names and numbers
            return str(a) < str(b)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cell) and (self.text, self.sort, self.style) == \
            (other.text, other.sort, other.style)

    def __hash__(self) -> int:
        return hash((self.text, self.style))


def num(value: float, *, style: str = "", unit: str = "") -> Cell:
    return Cell(human(value) + unit, value, style, right=True)


def human(v: float) -> str:
    """1234 -> 1.2k, 0.25 -> 0.25, 3 -> 3."""
    a = abs(v)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.1f}{suffix}"
    if a and a < 10 and v != int(v):
        return f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v:.0f}"


_styles: dict[str, Style] = {}


def _style(spec: str) -> Style:
    s = _styles.get(spec)
    if s is None:
        s = _styles[spec] = Style.parse(spec) if spec else Style()
    return s


class SyncedTable(ScrollView, can_focus=True):
    DEFAULT_CSS = """
    SyncedTable { height: 1fr; }
    SyncedTable > .synced-table--header { text-style: bold; background: $panel; }
    SyncedTable > .synced-table--cursor { background: $accent 40%; }
    SyncedTable:focus > .synced-table--cursor { background: $accent; }
    SyncedTable > .synced-table--odd { background: $boost; }
    """
    COMPONENT_CLASSES = {"synced-table--header", "synced-table--cursor", "synced-table--odd"}
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "edge(0)", "First", show=False),
        Binding("end", "edge(1)", "Last", show=False),
        Binding("enter", "select", "Drill in", show=False),
    ]

    class RowSelected(Message):
        """Enter on a row."""

        def __init__(self, table: SyncedTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

    cursor_row: reactive[int] = reactive(0, always_update=False)

    def __init__(self, columns: Sequence[tuple[str, str]], **kw: Any) -> None:
        super().__init__(**kw)
        self._columns = list(columns)
        self._labels = {k: label for k, label in self._columns}
        self._cells: dict[str, tuple] = {}
        self._order: list[str] = []
        self._index: dict[str, int] = {}
        self._widths: list[int] = [len(label) for _, label in self._columns]
        self.sort_column: str | None = None
        self.sort_reverse = True
        self.grow_columns = True  # widths follow the content (kept for callers)

    # -- data ------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._order)

    def get_row_at(self, index: int) -> list[Cell]:
        return list(self._cells[self._order[index]])

    def set_columns(self, columns: Sequence[tuple[str, str]]) -> None:
        """Different columns (the matrix when workloads change): starts over."""
        self._columns = list(columns)
        self._labels = {k: label for k, label in self._columns}
        self.reset()

    def set_labels(self, labels: dict[str, str]) -> None:
        """Column titles (sort keys in them)."""
        changed = False
        for k, new in labels.items():
            if k in self._labels and self._labels[k] != new:
                self._labels[k] = new
                changed = True
        if changed:
            self._relayout()

    def sync(self, rows: Iterable[tuple[str, tuple]]) -> None:
        """Make the table show exactly these rows (in its sort order)."""
        cursor_key = self.cursor_key()
        wanted = dict(rows)
        cells = self._cells
        changed = len(wanted) != len(cells)
        for key, row in wanted.items():
            if not changed and cells.get(key) != row:
                changed = True
        if not changed:
            return
        self._cells = wanted
        if self.sort_column is None:
            self._order = list(wanted)  # unsorted: the caller's order (a time-ordered tail)
        else:
            # Rows that stay keep their relative order among equals: no jitter.
            self._order = [k for k in self._order if k in wanted] + \
                [k for k in wanted if k not in cells]
            self._resort()
        self._relayout()
        self._restore_cursor(cursor_key)

    def _resort(self) -> None:
        if self.sort_column is None:
            return
        col = [k for k, _ in self._columns].index(self.sort_column)
        cells = self._cells
        self._order.sort(key=lambda k: cells[k][col], reverse=self.sort_reverse)

    def _relayout(self) -> None:
        self._index = {k: i for i, k in enumerate(self._order)}
        widths = [len(self._labels[k]) for k, _ in self._columns]
        for row in self._cells.values():
            for i, c in enumerate(row):
                n = len(c.text)
                if n > widths[i]:
                    widths[i] = n
        self._widths = [min(w, MAX_WIDTH) for w in widths]
        self.virtual_size = Size(sum(self._widths) + GAP * len(self._widths),
                                 len(self._order) + 1)
        if self.cursor_row >= len(self._order):
            self.cursor_row = max(0, len(self._order) - 1)
        self.refresh()

    def _restore_cursor(self, key: str | None) -> None:
        if key is not None and key in self._index:
            self.cursor_row = self._index[key]
            self._scroll_to_cursor()

    def cursor_key(self) -> str | None:
        if 0 <= self.cursor_row < len(self._order):
            return self._order[self.cursor_row]
        return None

    def sort_by(self, column: str) -> None:
        """Sort by column; the same column again reverses."""
        if self.sort_column == column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column, self.sort_reverse = column, True
        key = self.cursor_key()
        self._resort()
        self._index = {k: i for i, k in enumerate(self._order)}
        self.refresh()
        self._restore_cursor(key)

    def reset(self) -> None:
        """Empty it (a new filter): the next sync fills it again."""
        self._cells = {}
        self._order = []
        self.cursor_row = 0
        self._relayout()

    # -- cursor -----------------------------------------------------------------

    def move_cursor(self, *, row: int, animate: bool = False, scroll: bool = True) -> None:
        self.cursor_row = max(0, min(row, len(self._order) - 1))
        if scroll:
            self._scroll_to_cursor()

    def watch_cursor_row(self, old: int, new: int) -> None:
        self.refresh()

    def _scroll_to_cursor(self, retry: bool = True) -> None:
        visible = max(1, self.scrollable_content_region.height - 1)
        top = round(self.scroll_y)
        if self.cursor_row < top:
            y = self.cursor_row
        elif self.cursor_row >= top + visible:
            y = self.cursor_row - visible + 1
        else:
            return
        if retry and (y > self.max_scroll_y or not self.show_vertical_scrollbar):
            # The rows have just outgrown the viewport: Textual recomputes the
            # scrollbars and the scroll range at the next layout, and until
            # then scroll_to() clamps to the old range, so try again after it.
            self.call_after_refresh(self._scroll_to_cursor, False)
        self.scroll_to(y=y, animate=False, immediate=True)

    def on_resize(self) -> None:
        # A table on a hidden tab has no height: bring the cursor into view
        # when it is shown.
        self._scroll_to_cursor()

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(row=self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        page = max(1, self.scrollable_content_region.height - 1)
        self.move_cursor(row=self.cursor_row + direction * page)

    def action_edge(self, end: int) -> None:
        self.move_cursor(row=len(self._order) - 1 if end else 0)

    def action_select(self) -> None:
        key = self.cursor_key()
        if key is not None:
            self.post_message(self.RowSelected(self, key))

    # -- painting -----------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        base = self.rich_style
        if y == 0:  # the header stays put while rows scroll
            style = base + self.get_component_rich_style("synced-table--header")
            texts = [self._labels[k] for k, _ in self._columns]
            segs = self._segments(texts, [False] * len(texts), [None] * len(texts), style)
        else:
            i = scroll_y + y - 1
            if i >= len(self._order):
                return Strip.blank(width, base)
            row = self._cells[self._order[i]]
            if i == self.cursor_row:
                style = base + self.get_component_rich_style("synced-table--cursor")
            elif i % 2:
                style = base + self.get_component_rich_style("synced-table--odd")
            else:
                style = base
            segs = self._segments([c.text for c in row], [c.right for c in row],
                                  [c.style for c in row], style)
        return Strip(segs).crop_extend(scroll_x, scroll_x + width, style)

    def _segments(self, texts: list[str], right: list[bool], styles: list[str | None],
                  row_style: Style) -> list[Segment]:
        out = [Segment(" ", row_style)]
        pad = " " * GAP
        for text, w, r, st in zip(texts, self._widths, right, styles, strict=True):
            if len(text) > w:
                text = text[:w - 1] + "…"
            text = text.rjust(w) if r else text.ljust(w)
            out.append(Segment(text, row_style + _style(st) if st else row_style))
            out.append(Segment(pad, row_style))
        return out
