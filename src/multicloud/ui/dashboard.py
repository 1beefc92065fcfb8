"""The live status dashboard: one rich panel for `multicloud run` and `multicloud status`.

A `DashboardView` is a plain snapshot, built either from a live orchestrator or from the
orchestrator's `/status` JSON, so the same `StatusDashboard.render` serves a local run and
a remote cluster. Building a view only reads attributes already in memory (no manifest, no
network), which keeps a refresh cheap enough to run beside the pipeline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.segment import Segment
from rich.style import Style

from multicloud.core.units import display_path, format_bytes

if TYPE_CHECKING:
    from multicloud.core.types import PipelineResult
    from multicloud.pipeline.events import PipelineEvent
    from multicloud.run.live import LiveSnapshot, LiveView
    from multicloud.run.orchestrator import PipelineOrchestrator

__all__ = [
    "DashboardView",
    "StatusDashboard",
    "run_with_dashboard",
    "should_use_dashboard",
    "watch_status",
]

log = logging.getLogger(__name__)

STAGES = ("ingestion", "processing", "distribution", "storage")
MAX_EVENTS = 8
# At this width and above, nodes and events sit side by side; below it they stack.
WIDE = 110
_STATUS_STYLE = {"running": "bold cyan", "completed": "bold green", "failed": "bold red",
                 "idle": "dim"}
_LEVEL_STYLE = {"warning": "yellow", "error": "bold red"}
_MAX_IDS = 6  # unhealthy node ids listed per cloud before "+N more"


@dataclass
class DashboardView:
    """A snapshot of one pipeline run and its cluster, ready to render."""

    status: str = "idle"  # "idle", "running", "completed" or "failed"
    batch_id: str | None = None
    stage: str | None = None  # the stage the run is in, None when not running
    progress_percent: float = 0.0  # committed bytes over total, 0-100
    elapsed_s: float = 0.0
    throughput_mb_s: float = 0.0  # committed MB (10^6 bytes) per second
    eta_s: float | None = None  # seconds left, None when unknown
    total_bytes: int = 0
    stage_bytes: dict[str, int] = field(default_factory=dict)  # stage -> bytes through it
    nodes: list[dict[str, Any]] = field(default_factory=list)  # id, cloud, region, status
    events: list[dict[str, Any]] = field(default_factory=list)  # at, kind, level, detail
    # Counts from a status endpoint, shown only when no per-node list is at hand.
    healthy_nodes: int | None = None
    unhealthy_nodes: int | None = None

    @classmethod
    def from_snapshot(cls, snap: LiveSnapshot, max_events: int = MAX_EVENTS) -> DashboardView:
        """A view of a live run (in-memory state only: cheap to call often)."""
        recent = snap.events[-max_events:] if max_events > 0 else ()
        return cls(
            status=str(snap.status.value),
            batch_id=snap.batch_id,
            stage=snap.stage,
            progress_percent=snap.progress_percent,
            elapsed_s=snap.elapsed_seconds,
            throughput_mb_s=snap.throughput_mb_s,
            eta_s=snap.eta_seconds,
            total_bytes=snap.total_bytes,
            stage_bytes=snap.stage_bytes,
            nodes=[{"id": n.id, "cloud": n.cloud, "region": n.region,
                    "status": "healthy" if n.healthy else "unhealthy"} for n in snap.nodes],
            events=[_event_dict(e) for e in recent],
        )

    @classmethod
    def from_status(cls, status_json: dict[str, Any],
                    nodes: list[dict[str, Any]] | None = None) -> DashboardView:
        """Build a view from the orchestrator's `/status` JSON; missing keys get defaults."""
        s = status_json
        committed = _int(s.get("committed_bytes"))
        raw_stages = s.get("stage_bytes")
        stage_bytes = ({str(k): _int(v) for k, v in raw_stages.items()}
                       if isinstance(raw_stages, dict) else {})
        for stage in ("distribution", "storage"):
            stage_bytes.setdefault(stage, committed)
        raw_events = s.get("events")
        events = [_event_from_json(e) for e in raw_events if isinstance(e, dict)] \
            if isinstance(raw_events, list) else []
        return cls(
            status=str(s.get("status") or "idle"),
            batch_id=_str_or_none(s.get("batch_id")),
            stage=_str_or_none(s.get("stage")),
            progress_percent=_float(s.get("progress_percent")),
            elapsed_s=_float(s.get("elapsed_seconds")),
            throughput_mb_s=_float(s.get("throughput_mb_s")),
            eta_s=_float(s["eta_seconds"]) if s.get("eta_seconds") is not None else None,
            total_bytes=_int(s.get("total_bytes")),
            stage_bytes=stage_bytes,
            nodes=[dict(n) for n in nodes or []],
            events=events,
            healthy_nodes=_int(s["healthy_nodes"]) if "healthy_nodes" in s else None,
            unhealthy_nodes=_int(s["unhealthy_nodes"]) if "unhealthy_nodes" in s else None,
        )

    def node_counts(self) -> tuple[int, int]:
        """(healthy, unhealthy): from the node list, else from the endpoint's counts."""
        if self.nodes:
            healthy = sum(1 for n in self.nodes if _healthy(n))
            return healthy, len(self.nodes) - healthy
        return self.healthy_nodes or 0, self.unhealthy_nodes or 0


class StatusDashboard:
    """Renders a `DashboardView` as one panel; it never prints (the caller owns the console)."""

    def __init__(self, *, max_events: int = MAX_EVENTS,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_events = max_events
        self.clock = clock  # wall clock for the ETA's time of day; injectable for tests

    def display_pipeline_status(self, orchestrator: PipelineOrchestrator) -> RenderableType:
        """The current status of a live orchestrator, as a renderable."""
        return self.render(DashboardView.from_snapshot(orchestrator.live.snapshot(),
                                                       self.max_events))

    def render(self, view: DashboardView) -> RenderableType:
        """The panel: header, a bar per stage, nodes by cloud, the latest events."""
        events = view.events[-self.max_events:] if self.max_events > 0 else []
        return _Frame(view, events, self._eta(view.eta_s))

    def _eta(self, eta_s: float | None) -> str:
        if eta_s is None:
            return "—"
        at = dt.datetime.fromtimestamp(self.clock() + eta_s).astimezone()
        return f"{_duration(eta_s)} (at {at:%H:%M:%S})"


def should_use_dashboard(console: Console) -> bool:
    """Whether to draw live: only on an interactive terminal, never in CI or into a pipe."""
    return console.is_terminal and not console.is_dumb_terminal


async def run_with_dashboard(orchestrator: PipelineOrchestrator, batch_config: dict[str, Any],
                             console: Console, refresh_per_second: float = 4,
                             *, dashboard: StatusDashboard | None = None) -> PipelineResult:
    """Run a batch under a live dashboard; the final frame stays on the console.

    Frames are drawn by one timer task at `refresh_per_second`, and at once on an event
    (a node failure, a finished stage). Progress wakes the timer early only when a frame is
    due anyway, so a run with many small chunks draws no more often than the timer.
    """
    board = dashboard or StatusDashboard()
    period = 1.0 / max(refresh_per_second, 0.1)
    wake = asyncio.Event()
    last_drawn = 0.0

    with Live(console=console, auto_refresh=False, transient=False,
              redirect_stdout=False, redirect_stderr=False) as live:

        def draw() -> None:
            nonlocal last_drawn
            last_drawn = time.monotonic()
            live.update(board.display_pipeline_status(orchestrator), refresh=True)

        def on_progress(_: LiveView) -> None:
            if time.monotonic() - last_drawn >= period:
                wake.set()

        def on_event(_: PipelineEvent) -> None:
            wake.set()

        async def refresh() -> None:
            while True:
                try:
                    async with asyncio.timeout(period):
                        await wake.wait()
                except TimeoutError:
                    pass
                wake.clear()
                _guarded(draw)

        _guarded(draw)
        remove_listener = orchestrator.add_progress_listener(on_progress)
        remove_sink = orchestrator.add_event_sink(on_event)
        refresher = asyncio.create_task(refresh(), name="dashboard-refresh")
        try:
            result = await orchestrator.run_pipeline(batch_config)
        finally:
            remove_listener()
            remove_sink()
            refresher.cancel()
            # gather (not suppress) so a cancellation of *this* task still propagates.
            await asyncio.gather(refresher, return_exceptions=True)
            _guarded(draw)
    return result


async def watch_status(fetch: Callable[[], Awaitable[DashboardView]], console: Console,
                       interval_s: float = 1.0, once: bool = False,
                       *, dashboard: StatusDashboard | None = None) -> None:
    """Render fetched views until cancelled (`status --watch`); `once` prints one frame."""
    board = dashboard or StatusDashboard()
    if once:
        console.print(board.render(await fetch()))
        return
    with Live(console=console, auto_refresh=False, transient=False,
              redirect_stdout=False, redirect_stderr=False) as live:
        while True:
            live.update(board.render(await fetch()), refresh=True)
            await asyncio.sleep(interval_s)


# -- the panel ------------------------------------------------------------------------------
#
# The frame is laid out line by line in fixed-width columns and yielded as segments. Nested
# rich Tables measure every cell of every table on every frame (about 40k Python calls a
# frame); this costs a small fraction of that, so the event loop the dashboard shares with
# the pipeline stays free.


class _Line:
    """One row of the frame: styled pieces, measured in terminal cells."""

    __slots__ = ("pieces", "width")

    def __init__(self, pieces: list[tuple[str, str]] | None = None, width: int = 0) -> None:
        self.pieces = pieces or []
        self.width = width

    def add(self, text: str, style: str = "", width: int | None = None,
            right: bool = False) -> _Line:
        """Append text, cut or padded to width cells when given."""
        # Every piece, once, here: file names reach the frame inside event details (and a
        # batch id comes from argv); undecodable bytes would make the console raise
        # UnicodeEncodeError, and control characters would break the frame.
        text = display_path(text)
        if width is not None:
            text = _fit(text, width, right)
        self.pieces.append((text, style))
        self.width += cell_len(text)
        return self

    def fitted(self, width: int) -> list[tuple[str, str]]:
        """The pieces in exactly width cells: cut with an ellipsis, or padded."""
        out: list[tuple[str, str]] = []
        room = width
        for text, style in self.pieces:
            if room <= 0:
                break
            size = cell_len(text)
            if size > room:
                text, size = _fit(text, room), room
            out.append((text, style))
            room -= size
        if room > 0:
            out.append((" " * room, ""))
        return out

    def segments(self, width: int) -> list[Segment]:
        """The line as segments of exactly width cells."""
        return [Segment(text, Style.parse(style) if style else None)
                for text, style in self.fitted(width)]


class _Frame:
    """The dashboard for one view, drawn at whatever width the console offers."""

    def __init__(self, view: DashboardView, events: list[dict[str, Any]], eta: str) -> None:
        self.view = view
        self.events = events
        self.eta = eta

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        view = self.view
        width = max(options.max_width, 40)
        inner = width - 4  # "│ " and " │"
        lines = [*self._header(inner), _Line()]
        lines += _stage_bars(view, inner, color=console.color_system is not None)
        lines.append(_Line())
        if width >= WIDE:  # nodes beside events
            left = inner // 3
            lines += _beside(_node_lines(view, left),
                             _event_lines(self.events, inner - left - 3), left, gap=3)
        else:
            lines += [*_node_lines(view, inner), _Line(), *_event_lines(self.events, inner)]

        border = Style.parse(_STATUS_STYLE.get(view.status) or "blue")
        title = _Line().add("multicloud pipeline", "bold").add(" · ").add(
            view.status.upper(), _STATUS_STYLE.get(view.status, ""))
        title_width = min(title.width, width - 6)
        yield Segment("╭─ ", border)
        yield from title.segments(title_width)
        yield Segment(" " + "─" * (width - 6 - title_width) + "╮", border)
        yield Segment.line()
        left_side, right_side = Segment("│ ", border), Segment(" │", border)
        for line in lines:
            yield left_side
            yield from line.segments(inner)
            yield right_side
            yield Segment.line()
        yield Segment("╰" + "─" * (width - 2) + "╯", border)
        yield Segment.line()

    def _header(self, inner: int) -> list[_Line]:
        view = self.view
        healthy, unhealthy = view.node_counts()
        half = (inner - 2) // 2
        status_style = _STATUS_STYLE.get(view.status, "")
        rows = [
            ("status", view.status, status_style, "batch", view.batch_id or "—"),
            ("stage", view.stage or "—", "", "progress", f"{view.progress_percent:.1f}%"),
            ("elapsed", _duration(view.elapsed_s), "", "throughput",
             f"{view.throughput_mb_s:.1f} MB/s"),
            ("ETA", self.eta, "", "nodes", None),
        ]
        lines = []
        for left_label, left, left_style, right_label, right in rows:
            line = _Line().add(left_label, "bold", 9).add(left, left_style, half - 9)
            line.add("  ").add(right_label, "bold", 12)
            if right is None:  # the node counts, in two colours
                line.add(f"{healthy} healthy", "green").add(", ").add(
                    f"{unhealthy} unhealthy", "bold red" if unhealthy else "dim")
            else:
                line.add(right)
            lines.append(line)
        return lines


def _stage_bars(view: DashboardView, inner: int, color: bool) -> list[_Line]:
    total = view.total_bytes
    rows = []
    for stage in STAGES:
        done = min(view.stage_bytes.get(stage, 0), total) if total else 0
        if view.status == "completed" or (total and done >= total):
            share = 100.0
        else:
            share = 100.0 * done / total if total else 0.0
        rows.append((stage, share, f"{format_bytes(done)} / {format_bytes(total)}"))
    amount_width = max(len(amount) for _, _, amount in rows)
    bar_width = max(inner - 13 - 7 - 1 - amount_width, 5)
    lines = []
    for stage, share, amount in rows:
        active = view.stage == stage and view.status == "running"
        filled = round(bar_width * share / 100)
        line = _Line().add(stage, "bold" if active else "", 13)
        line.add("━" * filled, "green" if share >= 100 else "cyan")
        # Without colour the rest of the bar is blank, so the filled part still reads.
        line.add(("━" if color else " ") * (bar_width - filled), "grey23")
        line.add(f"{share:.1f}%", "", 7, right=True).add(" ").add(amount, "", amount_width,
                                                                  right=True)
        lines.append(line)
    return lines


def _node_lines(view: DashboardView, width: int) -> list[_Line]:
    rows: list[tuple[str, int, int, list[str]]] = []  # cloud, healthy, unhealthy, down ids
    if view.nodes:
        by_cloud: dict[str, list[dict[str, Any]]] = {}
        for node in view.nodes:
            by_cloud.setdefault(str(node.get("cloud", "?")), []).append(node)
        for cloud, nodes in sorted(by_cloud.items()):
            down = sorted(str(n.get("id", "?")) for n in nodes if not _healthy(n))
            rows.append((cloud, len(nodes) - len(down), len(down), down))
    else:
        rows.append(("all", *view.node_counts(), []))
    cloud_width = max(5, *(len(row[0]) for row in rows))
    lines = [_Line().add("nodes by cloud", "bold"),
             _Line().add("cloud", "bold", cloud_width).add("  ").add("healthy", "bold")
             .add("  ").add("unhealthy", "bold"),
             _Line().add("─" * width, "dim")]
    for cloud, healthy, unhealthy, down in rows:
        line = _Line().add(cloud, "", cloud_width).add("  ")
        line.add(str(healthy), "green", 7, right=True).add("  ")
        if unhealthy:
            line.add(str(unhealthy), "bold red")
            if down:
                more = f" +{len(down) - _MAX_IDS} more" if len(down) > _MAX_IDS else ""
                line.add(f" ({', '.join(down[:_MAX_IDS])}{more})", "red")
        else:
            line.add("0", "dim")
        lines.append(line)
    return lines


def _event_lines(events: list[dict[str, Any]], width: int) -> list[_Line]:
    kinds = [str(e.get("kind", "")) for e in events]
    kind_width = min(max([5, *(len(k) for k in kinds)]), 18)
    indent = 8 + 2 + kind_width + 2
    detail_width = max(width - indent, 10)
    lines = [_Line().add("latest events", "bold"),
             _Line().add("time", "bold", 8).add("  ").add("event", "bold", kind_width)
             .add("  ").add("detail", "bold"),
             _Line().add("─" * width, "dim")]
    for event, kind in zip(events, kinds, strict=True):
        level = str(event.get("level", "info"))
        style = _LEVEL_STYLE.get(level, "")
        # Escaped before wrapping, so the wrapped parts are as wide as what is drawn; line
        # breaks (a multi-line error) read as spaces rather than as escapes.
        detail = display_path(" ".join(str(event.get("detail", "")).splitlines()))
        # One line per event keeps the frame steady (the full text is in the logs), except
        # for an error, which is what the operator most needs to read.
        parts = [detail]
        if level == "error" and detail:
            parts = textwrap.wrap(detail, detail_width, break_on_hyphens=False) or [""]
        lines.append(_Line().add(_clock(event.get("at")), "dim", 8).add("  ")
                     .add(kind, style, kind_width).add("  ").add(parts[0], style))
        lines += [_Line().add(" " * indent).add(part, style) for part in parts[1:]]
    if not events:
        lines.append(_Line().add(" " * 10).add("none yet", "dim"))
    return lines


def _beside(left: list[_Line], right: list[_Line], left_width: int, gap: int) -> list[_Line]:
    """Two blocks of lines side by side, the left one cut or padded to left_width."""
    lines = []
    for i in range(max(len(left), len(right))):
        pieces = (left[i] if i < len(left) else _Line()).fitted(left_width)
        pieces.append((" " * gap, ""))
        width = left_width + gap
        if i < len(right):
            pieces += right[i].pieces
            width += right[i].width
        lines.append(_Line(pieces, width))
    return lines


# -- helpers ---------------------------------------------------------------------------------


def _event_dict(event: PipelineEvent) -> dict[str, Any]:
    return {"at": event.at, "kind": event.kind, "level": event.level, "detail": event.detail}


def _event_from_json(raw: dict[str, Any]) -> dict[str, Any]:
    return {"at": raw.get("at"), "kind": str(raw.get("kind") or ""),
            "level": str(raw.get("level") or "info"), "detail": str(raw.get("detail") or "")}


def _fit(text: str, width: int, right: bool = False) -> str:
    """text in exactly width cells: cut with an ellipsis, or padded (left or right)."""
    size = cell_len(text)
    if size > width:
        return set_cell_size(text, width - 1) + "…" if width > 1 else set_cell_size(text, width)
    pad = " " * (width - size)
    return pad + text if right else text + pad


def _healthy(node: dict[str, Any]) -> bool:
    return str(node.get("status", "healthy")) == "healthy"


def _clock(at: Any) -> str:
    """HH:MM:SS local time of an epoch number or an ISO-8601 string; "" when unreadable."""
    try:
        if isinstance(at, int | float):
            moment = dt.datetime.fromtimestamp(at).astimezone()
        elif isinstance(at, str):
            moment = dt.datetime.fromisoformat(at).astimezone()
        else:
            return ""
    except (ValueError, OverflowError, OSError):
        return str(at) if isinstance(at, str) else ""
    return f"{moment:%H:%M:%S}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return 0


def _str_or_none(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _guarded(draw: Callable[[], None]) -> None:
    """Draw a frame; a rendering bug is logged and must never stop the run."""
    try:
        draw()
    except Exception:
        log.exception("dashboard refresh failed")
