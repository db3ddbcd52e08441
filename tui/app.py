"""`microseg top`: the live view of a microseg daemon (Textual).

Data flows one way: the source's event stream and its polls feed the model
(tui/model.py) as they arrive; a timer renders the model into the widgets
four times a second, with keyed cell updates (tui/table.py). Keys act on
what is on screen at once, so a key never waits behind the event stream:
the stream is consumed in slices that yield to the loop. A trace (Enter on
a verdict) opens at once and fills in when the daemon's policy has come.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Sparkline, Static, TabbedContent, TabPane

from microseg.control.client import DaemonError
from microseg.tui.filterexpr import FilterError, FilterExpr
from microseg.tui.model import WORLD, FlowRow, Model, RuleRow, endpoint_label
from microseg.tui.table import Cell, SyncedTable, human, num

if TYPE_CHECKING:
    from microseg.policy.evaluate import Evaluator
    from microseg.policy.model import Policy

REFRESH_S = 0.25
STATS_S = 1.0
POLICY_S = 2.0
SESSIONS_S = 2.0
RETRY_S = 1.0
FREEZE_AFTER_S = 1.0  # the first screens are up
SLICE = 2000          # events parsed and folded in per loop turn
TAIL_ROWS = 500       # verdict rows on screen
SESSION_ROWS = 500    # session rows on screen

VERDICT_STYLE = {"allowed": "green", "denied": "bold red", "audit": "bold yellow",
                 "dropped": "magenta"}
VIEWS = ("flows", "verdicts", "sessions", "rules", "matrix")
# view -> sort key -> (column, title)
SORTS: dict[str, dict[str, tuple[str, str]]] = {
    "flows": {"k": ("packets", "Packets"), "b": ("bytes", "Bytes"), "t": ("pps", "Pkts/s"),
              "n": ("sessions", "Sessions")},
    "sessions": {"a": ("age", "Age"), "i": ("idle", "Idle"), "k": ("packets", "Packets"),
                 "b": ("bytes", "Bytes")},
    "rules": {"h": ("hits", "Hits"), "t": ("rate", "Hits/s"), "n": ("name", "Rule")},
}
FLOW_COLUMNS = [("src", "Source"), ("dst", "Destination"), ("proto", "Proto"), ("port", "Port"),
                ("sessions", "Sessions"), ("packets", "Packets"), ("bytes", "Bytes"),
                ("pps", "Pkts/s"), ("bps", "Bytes/s"), ("rule", "Rule"), ("verdict", "Verdict")]
VERDICT_COLUMNS = [("time", "Time"), ("verdict", "Verdict"), ("reason", "Reason"),
                   ("proto", "Proto"), ("src", "Source"), ("dst", "Destination"),
                   ("rule", "Rule"), ("iface", "Interface")]
STAGED_COLUMN = ("staged", "Staged")  # after Verdict, while a candidate is staged
FLOW_KEYS = frozenset({"ip", "from_ip", "to_ip", "port", "protocol", "workload", "rule",
                       "verdict"})
SESSION_KEYS = FLOW_KEYS | {"state"}
RULE_KEYS = frozenset({"rule", "protocol"})
STAGED_RULE_KEYS = frozenset({"rule"})

HELP = """\
[b]microseg top[/b] — live view of the microseg daemon

[b]Views[/b]   1 Flows   2 Verdicts   3 Sessions   4 Rules   5 Matrix
[b]Keys[/b]
  /        filter, the `watch` language: verdict=denied workload=web port=443
           ip=10.0.0.0/8 protocol=udp rule=NAME state=established, a bare word
           (in addresses, workloads, rules), [b]![/b] negates a term. Empty clears.
  Enter    drill into the flow or rule under the cursor: its recent events.
           Verdicts: why — the active policy's trace of a denied or audit
           verdict, or of one a staged policy would change (else: drill in)
  p        pause the screen (data keeps coming; PAUSED shows)
  sort     Flows: k packets, b bytes, t pkts/s, n sessions
           Sessions: a age, i idle, k packets, b bytes
           Rules: h hits, t hits/s, n name          (again: reverse)
  ?        this help          q  quit
  Esc, q   close this help, a drill-in, a trace or the filter box
           (where q is text)

Verdicts: denied red, audit yellow. Matrix: source rows by destination
columns, allowed ✓ / denied ✗ / audit ! since top started.
A staged policy (`microseg policy stage`): STAGED in the header; Flows and
Verdicts: a Staged column, "→ verdict (rule)" where it would decide
otherwise; Rules: its rules and their hits, below the active ones.
"""


def _ep(ep: dict | None, port: bool = True) -> str:
    ep = ep or {}
    ip = ep.get("ip") or "?"
    host = f"[{ip}]" if ":" in ip and port and ep.get("port") is not None else ip
    text = f"{host}:{ep['port']}" if port and ep.get("port") is not None else host
    return f"{text} ({ep['workload']})" if ep.get("workload") else text


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")


class DrillScreen(ModalScreen[None]):
    """A flow's or a rule's recent events. One instance serves every drill
    (as one HelpScreen serves every `?`): each new screen would leave its
    render caches pinned by Textual's StylesCache.get_inner_outer
    lru_cache(1024) — hundreds of live objects per press, for good."""

    BINDINGS = [Binding("escape,q,enter", "dismiss", "Close")]

    def __init__(self) -> None:
        super().__init__()
        self.title_text = ""
        self.rows: list[dict] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="drill"):
            yield Static(id="drill-title")
            table = SyncedTable([("time", "Time"), ("type", "Event"), ("what", "What"),
                                 ("src", "Source"), ("dst", "Destination"), ("rule", "Rule")],
                                id="drill-table")
            yield table

    def show(self, title: str, rows: list[dict]) -> None:
        """What the next push shows."""
        self.title_text, self.rows = title, rows

    def on_screen_resume(self) -> None:
        table = self.query_one(SyncedTable)
        rows = []
        for i, e in enumerate(self.rows):
            what = e.get("verdict") if e["type"] != "session" else \
                f"{e.get('prev_state') or ''}→{e.get('state')}"
            rows.append((str(i), (Cell(e["time"][11:26]), Cell(e["type"]),
                                  Cell(what or "", style=VERDICT_STYLE.get(what or "", "")),
                                  Cell(_ep(e.get("src"))), Cell(_ep(e.get("dst"))),
                                  Cell(e.get("rule") or "default"))))
        table.reset()
        table.sync(rows)
        title = self.title_text + ("" if rows else " — no recent events")
        self.query_one("#drill-title", Static).update(Text(title, style="bold"))


class TraceScreen(ModalScreen[None]):
    """Why a verdict: the active policy's trace of the row's flow
    (docs/policy.md "Tracing a connection"), and what a staged candidate
    said of it. One instance serves every trace, as DrillScreen does."""

    BINDINGS = [Binding("escape,q,enter", "dismiss", "Close")]

    def __init__(self) -> None:
        super().__init__()
        self.title_text = ""
        self.body = Text()
        self.token: object = None  # the trace shown: a late answer to another is dropped

    def compose(self) -> ComposeResult:
        with Vertical(id="trace"):
            yield Static(id="trace-title")
            with VerticalScroll(id="trace-scroll"):
                yield Static(id="trace-body")

    def show(self, token: object, title: str, body: Text) -> None:
        """What the next push shows, or what shows now if it is up."""
        self.token, self.title_text, self.body = token, title, body
        if self.is_mounted:
            self._paint()

    def fill(self, token: object, body: Text) -> None:
        """The trace, once computed: only if it is still the one asked for."""
        if token is self.token:
            self.body = body
            if self.is_mounted:
                self._paint()

    def on_screen_resume(self) -> None:
        self._paint()
        scroll = self.query_one("#trace-scroll", VerticalScroll)
        scroll.scroll_home(animate=False)
        scroll.focus()  # arrows and page keys scroll a long trace

    def _paint(self) -> None:
        self.query_one("#trace-title", Static).update(Text(self.title_text, style="bold"))
        self.query_one("#trace-body", Static).update(self.body)


class TopApp(App[int]):
    TITLE = "microseg top"
    CSS = """
    Screen { layout: vertical; }
    #header { height: 3; padding: 0 1; background: $boost; }
    #sparks { height: 3; }
    .spark { width: 1fr; height: 3; padding: 0 1; }
    .spark Static { height: 1; }
    .spark Sparkline { height: 2; }
    #states { height: 1; padding: 0 1; }
    #views { height: 1fr; }
    #views > ContentSwitcher { height: 1fr; }
    #views TabPane { height: 1fr; padding: 0; }
    #drill SyncedTable { height: 1fr; }
    #staged-rules-title { height: 1; padding: 0 1; display: none; }
    #staged-rules-table { display: none; }
    #rules.staged #staged-rules-title, #rules.staged #staged-rules-table { display: block; }
    #keys { dock: bottom; height: 1; padding: 0 1; background: $panel; }
    #filter { dock: bottom; display: none; }
    #filter.open { display: block; }
    HelpScreen, DrillScreen, TraceScreen { align: center middle; }
    #help { width: 84; height: auto; padding: 1 2; border: round $accent; background: $panel; }
    #drill { width: 90%; height: 80%; border: round $accent; background: $panel; }
    #drill-title { height: 1; padding: 0 1; }
    #trace { width: 90%; height: 80%; border: round $accent; background: $panel; }
    #trace-title { height: 1; padding: 0 1; }
    #trace-scroll { height: 1fr; padding: 0 1; }
    """
    BINDINGS = [
        Binding("q", "close_or_quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help"),
        Binding("slash", "filter", "Filter"),
        Binding("p", "pause", "Pause"),
        Binding("1", "view('flows')", "Flows", show=False),
        Binding("2", "view('verdicts')", "Verdicts", show=False),
        Binding("3", "view('sessions')", "Sessions", show=False),
        Binding("4", "view('rules')", "Rules", show=False),
        Binding("5", "view('matrix')", "Matrix", show=False),
        *[Binding(letter, f"sort('{letter}')", f"Sort {title.lower()}")
          for letter, title in {"k": "packets", "b": "bytes", "t": "rate", "n": "count/name",
                                "a": "age", "i": "idle", "h": "hits"}.items()],
    ]

    def __init__(self, source: Any, *, refresh_s: float = REFRESH_S, poll: bool = True) -> None:
        super().__init__()
        self.source = source
        self.model = Model()
        self.refresh_s = refresh_s
        self.poll = poll
        self.paused = False
        self.filter = FilterExpr()
        self.last_filter = ""
        self.key_latencies: list[float] = []
        self._last_key_time = 0.0
        self._key_pending: float | None = None
        self._shown: dict[str, str] = {}  # what each Static shows
        self._tasks: list[asyncio.Task] = []
        self._tail_seen = 0       # model.events_seen when the tail was last drawn
        self._matrix_cols: list[str] = []
        self._started = time.monotonic()
        self._staged_cols: dict[str, bool] = {}  # table id -> the Staged column is on
        self._verdict_rows: dict[str, dict] = {}  # the Verdicts view's rows by key
        # The active policy for traces, per generation: (generation, Policy,
        # Evaluator), fetched again when the status names another generation.
        self._traced: tuple[int, Policy, Evaluator] | None = None
        self._trace_task: asyncio.Task | None = None

    # -- layout ----------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        with Horizontal(id="sparks"):
            for name, label in (("allowed", "allowed/s"), ("denied", "denied/s"),
                                ("audit", "audit/s"), ("new_sessions", "new sessions/s")):
                with Vertical(classes="spark"):
                    yield Static(label, id=f"spark-label-{name}")
                    yield Sparkline([0.0], id=f"spark-{name}")
        with TabbedContent(initial="flows", id="views"):
            with TabPane("1 Flows", id="flows"):
                yield SyncedTable(FLOW_COLUMNS, id="flows-table")
            with TabPane("2 Verdicts", id="verdicts"):
                yield SyncedTable(VERDICT_COLUMNS, id="verdicts-table")
            with TabPane("3 Sessions", id="sessions"):
                yield Static(id="states")
                yield SyncedTable([("proto", "Proto"), ("state", "State"), ("src", "Source"),
                                   ("dst", "Destination"), ("packets", "Packets"),
                                   ("bytes", "Bytes"), ("age", "Age"), ("idle", "Idle"),
                                   ("rule", "Rule")], id="sessions-table")
            with TabPane("4 Rules", id="rules"):
                yield SyncedTable([("name", "Rule"), ("action", "Action"), ("proto", "Proto"),
                                   ("hits", "Hits"), ("rate", "Hits/s"),
                                   ("last", "Last hit")], id="rules-table")
                # Shown while a candidate is staged (the pane's class "staged").
                yield Static(id="staged-rules-title")
                yield SyncedTable([("name", "Rule"), ("action", "Action"), ("hits", "Hits"),
                                   ("rate", "Hits/s"), ("last", "Last hit")],
                                  id="staged-rules-table")
            with TabPane("5 Matrix", id="matrix"):
                yield SyncedTable([("src", "from \\ to")], id="matrix-table")
        # disabled while closed: nothing can focus it by accident
        yield Input(placeholder="filter: verdict=denied workload=web !protocol=udp  "
                                "(Enter apply, Esc cancel)", id="filter", disabled=True)
        # Key hints for the view on show. Not Textual's Footer: it recomposes
        # (a dozen widgets mounted) on every focus change, and each recompose
        # leaves its keys' watchers on the Footer for good (Textual 8.2) —
        # ~3,000 live objects more per view switch, and ever slower full
        # garbage collections that a key press then waits behind.
        yield Static(id="keys")

    def on_mount(self) -> None:
        self.install_screen(HelpScreen(), "help")
        self.install_screen(DrillScreen(), "drill")
        self.install_screen(TraceScreen(), "trace")
        self.query_one("#flows-table", SyncedTable).focus()
        self.query_one("#matrix-table", SyncedTable).grow_columns = True
        for view, default in (("flows", "packets"), ("sessions", "age"), ("rules", "hits"),
                              ("staged-rules", "hits")):
            self.query_one(f"#{view}-table", SyncedTable).sort_column = default
        self._label_sorts()
        self._render_hints()
        self._tasks.append(asyncio.create_task(self._consume_events()))
        if self.poll:
            self._tasks.append(asyncio.create_task(self._poll(STATS_S, self._stats)))
            self._tasks.append(asyncio.create_task(self._poll(POLICY_S, self._policy)))
            self._tasks.append(asyncio.create_task(self._poll(SESSIONS_S, self._sessions)))
        self.set_interval(self.refresh_s, self.render_model)
        self.render_model()
        self.set_timer(FREEZE_AFTER_S, self._freeze_startup)

    def _freeze_startup(self) -> None:
        # Python's full collections walk every live object; Textual's own
        # (classes, CSS, the widget tree: ~90,000) made each one 40-100 ms
        # here, a pause that a key press can land in. Objects alive once the
        # first screens are up live as long as the app: leave them out of
        # collection from now on (full collections fall to ~10 ms).
        gc.collect()
        gc.freeze()

    async def on_unmount(self) -> None:
        gc.unfreeze()  # collectable again once the app is gone (tests run many)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.source.close()

    # -- data in ---------------------------------------------------------------

    async def _consume_events(self) -> None:
        model = self.model
        while True:
            try:
                async for lines in self.source.events(last=500):
                    model.set_connected(True)
                    for i in range(0, len(lines), SLICE):
                        model.on_lines(lines[i:i + SLICE])
                        await asyncio.sleep(0)  # a key never waits behind a flood
                model.set_connected(False, "the daemon ended the event stream")
            except (DaemonError, OSError) as e:
                model.set_connected(False, str(e))
            await asyncio.sleep(RETRY_S)

    async def _poll(self, every: float, fetch) -> None:
        while True:
            try:
                await fetch()
            except (DaemonError, OSError) as e:
                self.model.set_connected(False, str(e))
            await asyncio.sleep(every)

    async def _stats(self) -> None:
        self.model.on_stats(await self.source.stats())
        self.model.on_status(await self.source.status())

    async def _policy(self) -> None:
        self.model.on_policy(await self.source.policy())
        # The candidate's rules, for the Rules view only: the answer lists up
        # to 10,000 changed flows too (docs/policy.md "Staging").
        if self.model.header.staged is not None and \
                self.query_one(TabbedContent).active == "rules":
            self.model.on_staged(await self.source.staged())

    async def _sessions(self) -> None:
        if self.query_one(TabbedContent).active in ("flows", "sessions"):
            self.model.on_sessions(await self.source.sessions())

    # -- model -> screen --------------------------------------------------------

    def render_model(self) -> None:
        if not self.is_running:
            # Shut down without exit() (Textual's test harness, bench/tui.py):
            # timers still tick while the screens are pruned.
            return
        if self.paused:
            self._render_header()
            return
        self._render_header()
        active = self.query_one(TabbedContent).active
        getattr(self, f"_render_{active}")()

    def _render_header(self) -> None:
        h, m = self.model.header, self.model
        line1 = Text()
        line1.append("microseg top ", style="bold")
        line1.append(f"{self.source.name}  ")
        if h.connected:
            line1.append("● connected", style="green")
            if h.daemon:
                line1.append(f" ({h.daemon})")
        else:
            line1.append("● disconnected — retrying", style="bold red")
            if h.error:
                line1.append(f"  {h.error}", style="red")
        if self.paused:
            line1.append("  PAUSED ", style="bold black on yellow")
        line2 = Text()
        for v in ("allowed", "denied", "audit", "dropped"):
            line2.append(f"{v} ", style=VERDICT_STYLE[v])
            line2.append(f"{human(h.pps[v])}/s  ")
        line2.append(f"new sessions {human(h.new_sessions_ps)}/s  ")
        fill = h.sessions / h.capacity if h.capacity else 0.0
        line2.append(f"sessions {h.sessions:,} ({fill:.1%})  ")
        line2.append(f"events {human(h.events_ps)}/s  ")
        line2.append(f"lost {h.lost:,}", style="bold red" if h.lost else "")
        line3 = Text()
        line3.append(f"policy generation {h.generation} ({h.mode or '?'}, default "
                     f"{h.default or '?'}), last reload: ")
        line3.append(h.last_reload or "-",
                     style="red" if h.last_reload.startswith("rejected") else "")
        if h.staged is not None:
            n = h.staged.get("would_change") or 0
            line3.append("   ")
            line3.append(f" STAGED {_basename(h.staged.get('source'))} · {n:,} would change ",
                         style="bold black on cyan")
        if not self.filter.empty:
            line3.append(f"   filter: {self.filter.text}", style="bold cyan")
        header = Text("\n").join([line1, line2, line3])
        header.no_wrap, header.overflow = True, "ellipsis"  # three lines, whatever the width
        self._update_static("#header", header)
        for name, series in m.history.items():
            if name == "dropped":
                continue
            data = list(series)
            spark = self.query_one(f"#spark-{name}", Sparkline)
            if spark.data != data:
                spark.data = data
            label = "new sessions" if name == "new_sessions" else name
            value = h.new_sessions_ps if name == "new_sessions" else h.pps[name]
            self._update_static(f"#spark-label-{name}", f"{label} {human(value)}/s")

    def _update_static(self, selector: str, content: Text | str) -> None:
        """Only what changed is repainted."""
        key = str(content) if isinstance(content, str) else content.markup
        if self._shown.get(selector) != key:
            self._shown[selector] = key
            self.query_one(selector, Static).update(content)

    def _staged_column(self, table: SyncedTable, base: list[tuple[str, str]],
                       on: bool) -> bool:
        """The Staged column after Verdict, on or off; True when that changed
        (the table starts over)."""
        if self._staged_cols.get(table.id or "", False) == on:
            return False
        self._staged_cols[table.id or ""] = on
        cols = list(base)
        if on:
            cols.insert([k for k, _ in cols].index("verdict") + 1, STAGED_COLUMN)
        table.set_columns(cols)
        self._label_sorts()
        return True

    def _render_flows(self) -> None:
        m = self.model
        table = self.query_one("#flows-table", SyncedTable)
        staged = m.header.staged is not None or bool(m.staged_flows)
        self._staged_column(table, FLOW_COLUMNS, staged)
        rows = []
        for f in m.flows.values():
            if not self.filter.matches(f.as_filter_row(), FLOW_KEYS):
                continue
            style = VERDICT_STYLE.get(f.verdict or "", "")
            port = Cell(str(f.port or ""), f.port or 0, right=True)
            cells = (Cell(_ep(f.src, port=False)), Cell(_ep(f.dst, port=False)),
                     Cell(str(f.protocol)), port,
                     num(f.sessions), num(f.packets), num(f.bytes, unit="B"),
                     num(f.pps), num(f.bps, unit="B"), Cell(f.rule or "default"),
                     Cell(f.verdict or "", style=style))
            if staged:
                cells += (_staged_cell(m.staged_flows.get(f.key)),)
            rows.append((f.key, cells))
        table.sync(rows)

    def _render_verdicts(self) -> None:
        table = self.query_one("#verdicts-table", SyncedTable)
        m = self.model
        if m.header.staged is not None:  # on at once, even before the next event
            self._staged_column(table, VERDICT_COLUMNS, True)
        new = m.events_seen - self._tail_seen
        self._tail_seen = m.events_seen
        if new <= 0 and table.row_count:
            return
        # The newest rows that pass the filter, oldest first: a scrollback of
        # TAIL_ROWS while events trickle in; when more arrive per refresh
        # than fit on screen, a screenful (more would scroll away unseen and
        # cost the keyboard its responsiveness).
        # A table on a hidden tab has no height yet: the screen bounds it.
        screenful = table.size.height or self.size.height
        limit = TAIL_ROWS if new < screenful else screenful + 5
        keep = []
        for e in m.tail_newest_first():
            if self.filter.matches(e):
                keep.append(e)
                if len(keep) >= limit:
                    break
        keep.reverse()
        follow = table.cursor_row >= table.row_count - 1
        # Events carry `staged` while a candidate would decide otherwise; the
        # column stays while such rows are shown, after the candidate is gone.
        staged = m.header.staged is not None or \
            any(e.get("staged") is not None for e in keep)
        if self._staged_column(table, VERDICT_COLUMNS, staged):
            follow = True
        rows = []
        shown = {}
        for e in keep:
            v = e.get("verdict") or ""
            style = VERDICT_STYLE.get(v, "")
            n = e.get("count") or 1  # an aggregated denial stands for n packets
            key = f"{e['seq']}:{e['time']}"
            shown[key] = e
            verdict = Cell(f"{v} x{n}" if n > 1 else v, v, style=style)
            rows.append((key, (
                Cell(e["time"][11:26], e["time"]), verdict,
                *((_staged_cell(e.get("staged")),) if staged else ()),
                Cell(e.get("reason") or ""), Cell(str(e.get("protocol"))),
                Cell(_ep(e.get("src")), style=style if v == "denied" else ""),
                Cell(_ep(e.get("dst")), style=style if v == "denied" else ""),
                Cell(e.get("rule") or "default"), Cell(e.get("interface") or ""))))
        self._verdict_rows = shown
        table.sync(rows)
        if follow and table.row_count:
            table.move_cursor(row=table.row_count - 1, animate=False)

    def _render_sessions(self) -> None:
        m = self.model
        states = Text("by state: ")
        for k, n in sorted(m.by_state.items()):
            states.append(f"{k} ", style="bold")
            states.append(f"{n:,}  ")
        self._update_static("#states", states)
        table = self.query_one("#sessions-table", SyncedTable)
        col = table.sort_column or "age"
        value = {"age": lambda s: s.get("age_s", 0), "idle": lambda s: s.get("idle_s", 0),
                 "packets": lambda s: s["packets"]["orig"] + s["packets"]["reply"],
                 "bytes": lambda s: s["bytes"]["orig"] + s["bytes"]["reply"]}[col]
        shown = [s for s in m.sessions if self.filter.matches(s, SESSION_KEYS)]
        shown.sort(key=value, reverse=table.sort_reverse)
        rows = []
        for s in shown[:SESSION_ROWS]:
            key = f"{s.get('protocol')}|{_ep(s.get('src'))}|{_ep(s.get('dst'))}"
            pk = s["packets"]["orig"] + s["packets"]["reply"]
            by = s["bytes"]["orig"] + s["bytes"]["reply"]
            rows.append((key, (Cell(str(s.get("protocol"))), Cell(s.get("state") or ""),
                               Cell(_ep(s.get("src"))), Cell(_ep(s.get("dst"))), num(pk),
                               num(by, unit="B"), num(s.get("age_s", 0), unit="s"),
                               num(s.get("idle_s", 0), unit="s"),
                               Cell(s.get("rule") or "default"))))
        table.sync(rows)

    def _render_rules(self) -> None:
        m = self.model
        rows = []
        for r in m.rules.values():
            if not self.filter.matches(r.as_filter_row(), RULE_KEYS):
                continue
            c = _rule_cells(r)
            rows.append((r.name, (*c[:2], Cell(r.protocol), *c[2:])))
        self.query_one("#rules-table", SyncedTable).sync(rows)
        staged = m.header.staged
        pane = self.query_one("#rules", TabPane)
        pane.set_class(staged is not None, "staged")
        if staged is None:
            return
        title = Text()
        title.append(" STAGED ", style="bold black on cyan")
        title.append(f" {staged.get('source') or '?'}: its rules, hits since it was staged "
                     f"{(staged.get('since') or '')[11:19]} (the active policy above decides)",
                     style="bold")
        if not m.staged_rules:
            title.append("  reading…", style="dim")
        self._update_static("#staged-rules-title", title)
        # The candidate's rules name no protocol here: protocol terms pass.
        rows = [(r.name, _rule_cells(r)) for r in m.staged_rules.values()
                if self.filter.matches(r.as_filter_row(), STAGED_RULE_KEYS)]
        self.query_one("#staged-rules-table", SyncedTable).sync(rows)

    def _render_matrix(self) -> None:
        m = self.model
        table = self.query_one("#matrix-table", SyncedTable)
        names = list(m.workloads)
        for src, dst in m.matrix:
            for n in (src, dst):
                if n not in names:
                    names.append(n)
        if WORLD in names:  # the world last
            names.remove(WORLD)
            names.append(WORLD)
        if names != self._matrix_cols:
            self._matrix_cols = names
            table.set_columns([("src", "from \\ to"), *[(n, n) for n in names]])
        rows = []
        for src in names:
            cells = [Cell(src, style="bold")]
            for dst in names:
                c = m.matrix.get((src, dst))
                if not c:
                    cells.append(Cell("·", style="dim"))
                    continue
                parts, style = [], "green"
                if c["allowed"]:
                    parts.append(f"{human(c['allowed'])}✓")
                if c["audit"]:
                    parts.append(f"{human(c['audit'])}!")
                    style = "yellow"
                if c["denied"] or c["dropped"]:
                    parts.append(f"{human(c['denied'] + c['dropped'])}✗")
                    style = "bold red"
                cells.append(Cell(" ".join(parts), sum(c.values()), style))
            rows.append((src, tuple(cells)))
        table.sync(rows)

    def _sorted_tables(self, view: str) -> list[SyncedTable]:
        """The tables a view's sort keys sort: the Rules view's candidate too."""
        tables = [self.query_one(f"#{view}-table", SyncedTable)]
        if view == "rules":
            tables.append(self.query_one("#staged-rules-table", SyncedTable))
        return tables

    def _label_sorts(self) -> None:
        for view, keys in SORTS.items():
            for table in self._sorted_tables(view):
                labels = {}
                for letter, (col, title) in keys.items():
                    arrow = ""
                    if table.sort_column == col:
                        arrow = " ▼" if table.sort_reverse else " ▲"
                    labels[col] = f"{title} [{letter}]{arrow}"
                table.set_labels(labels)

    def _render_hints(self) -> None:
        view = self.query_one(TabbedContent).active
        hints = [("q", "quit"), ("?", "help"), ("/", "filter"), ("p", "pause"), ("1-5", "views")]
        if view in ("flows", "rules"):
            hints.append(("Enter", "drill in"))
        text = Text()
        for key, what in hints:
            text.append(key, style="bold #ffa62b")
            text.append(f" {what}  ")
        if view in SORTS:
            text.append("│ sort ", style="dim")
            for letter, (_, title) in SORTS[view].items():
                text.append(letter, style="bold #ffa62b")
                text.append(f" {title.lower()}  ")
        self._update_static("#keys", text)

    # -- keys -------------------------------------------------------------------

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key) and not event.is_forwarded:
            # Keys are taken here, in the order they came, before Textual
            # hands them on: Escape acts at once, so that a key typed right
            # after it reaches what is open then (a fast typist's `p` never
            # lands in the filter box it closed).
            if event.key.startswith("alt+") and event.is_printable:
                # Escape and a key within Textual's escape delay (0.1 s) arrive
                # as one alt+KEY, as Alt+KEY does: nothing here binds Alt with
                # a printable key, so it is the two keys a person typed.
                self._escape()
                event = events.Key(event.key.removeprefix("alt+"), event.character)
            elif event.key == "escape" and self._escape():
                return
        await super().on_event(event)
        if isinstance(event, events.Key) and event.time != self._last_key_time:
            # A key reaches the app twice (on its way in, bubbling up): once.
            self._last_key_time = event.time
            if self._key_pending is None:
                self._key_pending = event.time

    def _display(self, screen, renderable) -> None:
        super()._display(screen, renderable)
        # Key latency: from the key's arrival to the first frame painted
        # after its action ran (what a person waits for).
        if renderable is not None and self._key_pending is not None:
            self.key_latencies.append(time.monotonic() - self._key_pending)
            self._key_pending = None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "sort":
            try:
                active = self.query_one(TabbedContent).active
            except Exception:  # not mounted yet
                return False
            return parameters[0] in SORTS.get(active, {})
        return True

    # A key changes what is shown and returns: fresh data reaches the screen
    # with the next refresh tick (a sync re-renders every visible cell; doing
    # it on a key would make the key wait for it).

    def action_view(self, view: str) -> None:
        self.query_one(TabbedContent).active = view
        table = self.query_one(f"#{view}-table", SyncedTable)
        table.focus()
        if not table.row_count:  # never shown yet: fill it now
            self.render_model()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self._render_hints()  # by key or by mouse

    def action_sort(self, letter: str) -> None:
        view = self.query_one(TabbedContent).active
        col = SORTS[view][letter][0]
        for table in self._sorted_tables(view):
            table.sort_by(col)
        self._label_sorts()

    def _escape(self) -> bool:
        """What Escape does: close the help, a drill-in or a trace, else the
        filter box (not applied). False when nothing was open."""
        if isinstance(self.screen, ModalScreen):
            self.screen.dismiss()
            return True
        if self.query_one("#filter", Input).has_class("open"):
            self._close_filter()
            return True
        return False

    def action_close_or_quit(self) -> None:
        """q closes what is open (as in htop and k9s) and quits from the
        views. Typed into the filter box it is text, and never gets here."""
        if not self._escape():
            self.exit()

    def action_pause(self) -> None:
        self.paused = not self.paused
        self._render_header()

    def action_help(self) -> None:
        self.push_screen("help")

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = self.filter.text or self.last_filter
        box.disabled = False
        box.add_class("open")
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        box = event.input
        try:
            expr = FilterExpr.parse(event.value)
        except FilterError as e:
            box.border_title = str(e)
            box.styles.border = ("round", "red")
            return
        self.filter = expr
        if expr.text:
            self.last_filter = expr.text
        box.border_title = None
        box.styles.border = None
        self._close_filter()
        for table in self.query(SyncedTable):
            if table.id != "matrix-table":
                table.reset()
        self._tail_seen = 0
        self.render_model()

    def _close_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("open")
        box.disabled = True
        self._focus_view()

    def _focus_view(self) -> None:
        active = self.query_one(TabbedContent).active
        table = self.query_one(f"#{active}-table", SyncedTable)
        table.screen.set_focus(table)  # now: the next key is the table's

    def on_synced_table_row_selected(self, event: SyncedTable.RowSelected) -> None:
        table, key = event.table, event.key
        if table.id == "flows-table" and key in self.model.flows:
            f: FlowRow = self.model.flows[key]
            title = (f"flow {endpoint_label(f.src)} → {endpoint_label(f.dst)} {f.protocol}"
                     f"{'/' + str(f.port) if f.port else ''}")
            self._drill(title, self.model.events_of_flow(f))
        elif table.id == "rules-table" and key in self.model.rules:
            self._drill(f"rule {key}", self.model.events_of_rule(key))
        elif table.id == "staged-rules-table" and key in self.model.staged_rules:
            self._drill(f"staged rule {key}: the verdicts it would change",
                        self.model.events_of_staged_rule(key))
        elif table.id == "verdicts-table" and key in self._verdict_rows:
            e = self._verdict_rows[key]
            if e.get("type") == "verdict" and (e.get("verdict") in ("denied", "audit")
                                               or e.get("staged") is not None):
                self._open_trace(key, e)
            else:  # allowed, or a drop (no policy decided it): the flow's events
                src, dst = e.get("src") or {}, e.get("dst") or {}
                port = dst.get("port")
                title = (f"flow {endpoint_label(src)} → {endpoint_label(dst)} "
                         f"{e.get('protocol')}{'/' + str(port) if port else ''}")
                self._drill(title, self.model.events_between(src, dst, e.get("protocol"),
                                                             port))

    def _drill(self, title: str, rows: list[dict]) -> None:
        drill = self.get_screen("drill")
        assert isinstance(drill, DrillScreen)
        drill.show(title, rows)
        self.push_screen(drill)

    # -- tracing a verdict -------------------------------------------------------

    def _open_trace(self, key: str, e: dict) -> None:
        """The trace screen at once; the trace fills it when computed."""
        screen = self.get_screen("trace")
        assert isinstance(screen, TraceScreen)
        src, dst = e.get("src") or {}, e.get("dst") or {}
        port = dst.get("port")
        title = (f"why {e.get('verdict')}: {endpoint_label(src)} → {endpoint_label(dst)} "
                 f"{e.get('protocol')}{'/' + str(port) if port else ''}")
        token = object()
        head = self._event_lines(e)
        screen.show(token, title, Text("\n").join([head, Text("tracing…", style="dim")]))
        self.push_screen(screen)
        if self._trace_task is not None:
            self._trace_task.cancel()
        self._trace_task = asyncio.create_task(self._trace(screen, token, head, e))

    def _event_lines(self, e: dict) -> Text:
        """The event, and what the staged candidate said of it."""
        v, rule = e.get("verdict") or "", e.get("rule")
        n = e.get("count") or 1
        out = Text()
        out.append("event    ")
        out.append(v.upper(), style=VERDICT_STYLE.get(v, ""))
        out.append(f" by {_by(rule)}" + (" (revoked)" if e.get("reason") == "revoked" else "")
                   + f", policy generation {e.get('policy_generation')}, {e.get('time')}"
                   + (f", {n:,} packets" if n > 1 else ""))
        out.append(f"\n         {_ep(e.get('src'))} → {_ep(e.get('dst'))} {e.get('protocol')}")
        st, cand = e.get("staged"), self.model.header.staged
        name = _basename(cand.get("source")) if cand else "the staged policy"
        if st is not None:
            sv = st.get("verdict") or ""
            out.append(f"\nstaged   {name} would decide ")
            out.append(sv.upper(), style=VERDICT_STYLE.get(sv, ""))
            out.append(f" by {_by(st.get('rule'))}")
        elif cand is not None:
            if e.get("reason") == "revoked":
                why = "does not judge revocations"
            elif (e.get("time") or "") < (cand.get("since") or ""):
                why = "was staged after this event"
            else:
                why = "decides the same"
            out.append(f"\nstaged   {name} {why}")
        return out

    async def _trace(self, screen: TraceScreen, token: object, head: Text, e: dict) -> None:
        try:
            body = await self._trace_text(e)
        except (DaemonError, OSError, ValueError) as x:  # TraceError is a ValueError
            body = Text(f"no trace: {x}", style="red")
        screen.fill(token, Text("\n").join([head, Text(), body]))

    async def _trace_text(self, e: dict) -> Text:
        from microseg.cli_trace import render
        from microseg.policy.evaluate import Endpoint, Evaluator, parse_protocol, trace

        generation = self.model.header.generation
        if self._traced is None or (generation and self._traced[0] != generation):
            fetched = await self.source.active_policy()
            # Compiling a large policy takes a while: off the loop.
            evaluator = await asyncio.to_thread(Evaluator, fetched.policy)
            self._traced = (fetched.generation, fetched.policy, evaluator)
        traced_gen, policy, evaluator = self._traced
        proto = parse_protocol(str(e.get("protocol")))
        src, dst = e.get("src") or {}, e.get("dst") or {}
        # (the port counts for tcp and udp only: trace() leaves it out otherwise)
        t = await asyncio.to_thread(trace, policy, src.get("ip"), dst.get("ip"), proto,
                                    dst.get("port"), evaluator)
        out = Text(f"trace of the active policy, generation {traced_gen}"
                   + (f" (the event was judged by generation {e.get('policy_generation')})"
                      if e.get("policy_generation") != traced_gen else "") + ":",
                   style="bold")
        out.append("\n")
        out.append_text(Text.from_ansi(render(t, policy, Endpoint(t.src, t.src_workload),
                                              Endpoint(t.dst, t.dst_workload), True)))
        if t.inconsistency:
            out.append(f"\nwarning: {t.inconsistency}", style="bold red")
        return out


def _by(rule: str | None) -> str:
    return f"rule {rule}" if rule else "the default"


def _basename(path: str | None) -> str:
    return (path or "?").rstrip("/").rsplit("/", 1)[-1] or "?"


def _staged_cell(staged: dict | None) -> Cell:
    """What a staged candidate would decide, where it differs: "→ denied (rule)"."""
    if staged is None:
        return Cell("")
    v = staged.get("verdict") or ""
    return Cell(f"→ {v} ({staged.get('rule') or 'default'})", v,
                style=VERDICT_STYLE.get(v, ""))


def _rule_cells(r: RuleRow) -> tuple[Cell, ...]:
    """Name, action, hits, hits/s, last hit (the Rules view adds the protocol)."""
    never = r.hits == 0
    return (Cell(r.name, r.name, style="dim" if never else "bold"),
            Cell(r.action, style="red" if r.action == "deny" else "green"),
            num(r.hits), num(r.rate),
            Cell("never hit" if never else (r.last_hit or "")[11:19],
                 style="yellow" if never else ""))
