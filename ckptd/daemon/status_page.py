"""The status page's HTML: pure functions, data in (the shapes of ``collect_status`` and ``collect_history``),
a complete document out. No I/O, no clock (``now`` is passed in), no JavaScript, no external assets.

Every value that came from the filesystem or the ledger (watch, run and checkpoint names, reasons, errors) goes
through :func:`esc` (``html.escape(..., quote=True)``), in text, in attributes and in SVG alike. Paths are shown
as their basename, except the run's output directory, which ``ckptd status`` shows too.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

REFRESH_SECONDS = 15
POINT_CLASS = "pt"  # every chart point carries it (and only chart points): tests count them
MAX_CHART_POINTS = 2000  # a larger run's chart is downsampled (see chart_points): the page stays small and fast
MAX_TABLE_ROWS = 200
MAX_ERRORS = 20

# what each kind of point looks like (fixed values, never data)
_POINT_STYLE = {
    "best": {"r": "7", "fill": "#f59e0b", "stroke": "#92400e", "stroke-width": "2"},
    "member": {"r": "5", "fill": "#2563eb", "stroke": "#1e3a8a", "stroke-width": "1"},
    "evicted": {"r": "5", "fill": "#ffffff", "stroke": "#2563eb", "stroke-width": "1.75"},
    "other": {"r": "4", "fill": "#c4c9d2", "stroke": "#9ca3af", "stroke-width": "1"},
}
_LEGEND = (("best", "best"), ("member", "top-k member"), ("evicted", "evicted from the top-k"),
           ("other", "rejected / skipped / other"))
_BADGE = {"ok": "b-ok", "done": "b-ok", "verified": "b-ok", "failed": "b-bad", "error": "b-bad", "invalid": "b-bad",
          "timeout": "b-bad", "running": "b-run", "pending": "b-run", "queued": "b-run", "abandoned": "b-warn",
          "skipped": "b-warn", "superseded": "b-warn"}
_ERROR_STATUSES = ("invalid", "failed", "incomplete")

_CSS = """
:root{color-scheme:light}
*{box-sizing:border-box}
body{margin:0;background:#f5f6f8;color:#1f2937;
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header{background:#111827;color:#f9fafb;padding:10px 24px;display:flex;align-items:baseline;gap:18px}
header a{color:#f9fafb;text-decoration:none;font-weight:600;font-size:16px}
header .crumb{color:#d1d5db;overflow-wrap:anywhere}
header .crumb a{color:#d1d5db;font-weight:400;font-size:14px}
header .meta{color:#9ca3af;font-size:12px;margin-left:auto;white-space:nowrap}
main{max-width:1180px;margin:0 auto;padding:14px 24px 40px}
h1{font-size:20px;margin:6px 0 2px;overflow-wrap:anywhere}
.sub{margin:0 0 12px;color:#6b7280;font-size:12px;overflow-wrap:anywhere}
h2{font-size:13px;margin:22px 0 8px;color:#4b5563;text-transform:uppercase;letter-spacing:.04em}
a{color:#1d4ed8}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px 16px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #e5e7eb}
th,td{padding:6px 10px;text-align:left;border-bottom:1px solid #eef0f3;vertical-align:top}
th{background:#f9fafb;font-weight:600;color:#6b7280;font-size:12px}
td{overflow-wrap:anywhere}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:last-child td{border-bottom:none}
.muted{color:#6b7280}
.small{font-size:12px}
.badge{display:inline-block;padding:0 8px;border-radius:10px;font-size:12px;background:#eef0f3;color:#374151;
  white-space:nowrap}
.b-ok{background:#dcfce7;color:#166534}.b-bad{background:#fee2e2;color:#991b1b}
.b-run{background:#dbeafe;color:#1e40af}.b-warn{background:#fef3c7;color:#92400e}
.err{color:#b91c1c}
.summary{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.summary div{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:8px 12px}
.summary .k{display:block;color:#6b7280;font-size:12px}
.summary .v{display:block;font-size:15px;overflow-wrap:anywhere}
.legend{display:flex;flex-wrap:wrap;gap:18px;font-size:12px;color:#4b5563;margin-top:6px}
.legend span{display:inline-flex;align-items:center;gap:6px}
svg.chart{width:100%;height:auto;display:block}
svg.chart text{font:12px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;fill:#6b7280}
svg.chart .lbl{fill:#92400e;font-weight:600}
.empty{color:#6b7280;font-style:italic}
"""


def esc(value: Any) -> str:
    """HTML-escape anything (quotes too: safe in attributes and in SVG)."""
    return html.escape(str(value), quote=True)


def run_href(watch: str | None, run: str, stream: str = "model") -> str:
    """The run page's URL (unescaped: pass it through :func:`esc` for an attribute)."""
    params = ([("watch", watch)] if watch is not None else []) + [("run", run), ("stream", stream or "model")]
    return "/run?" + urlencode(params, quote_via=quote)


def fmt_metric(value: Any) -> str:
    if value is None:
        return "—"
    try:
        return f"{float(value):.6g}"
    except (TypeError, ValueError):
        return str(value)


def fmt_step(value: Any) -> str:
    return "—" if value is None else str(value)


def fmt_age(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    delta = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta / size:.0f}{unit} ago"
    return f"{delta:.0f}s ago"


def fmt_time(ts: float | None) -> str:
    if not ts:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def basename(path: Any) -> str:
    """The last component of a path (the page never shows where checkpoints live)."""
    if not path:
        return ""
    text = str(path).rstrip("/")
    return text.rsplit("/", 1)[-1] or text


def _badge(status: Any, title: Any = None) -> str:
    cls = _BADGE.get(str(status), "")
    tip = f' title="{esc(title)}"' if title else ""
    return f'<span class="badge {cls}"{tip}>{esc(status)}</span>'


def _age_cell(ts: float | None, now: float) -> str:
    return f'<span title="{esc(fmt_time(ts))}">{esc(fmt_age(ts, now))}</span>'


def page(title: str, body: str, now: float, *, crumb: str = "", refresh: bool = True) -> str:
    """A complete document: inline CSS, optional self-refresh, nothing external."""
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    stamp = f"updated {fmt_time(now)}" + (f" · refreshes every {REFRESH_SECONDS}s" if refresh else "")
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'{meta}<meta name="referrer" content="no-referrer"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>"
            f'<header><a href="/">ckptd</a>'
            + (f'<span class="crumb">{crumb}</span>' if crumb else "")
            + f'<span class="meta">{esc(stamp)}</span></header>'
            f"<main>{body}</main></body></html>\n")


def _table(head: Sequence[str], rows: Iterable[str], empty: str, numeric: Sequence[int] = ()) -> str:
    rows = list(rows)
    if not rows:
        return f'<p class="empty">{esc(empty)}</p>'
    ths = "".join(f'<th class="num">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>"
                  for i, h in enumerate(head))
    return f"<table><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _tr(cells: Sequence[str], numeric: Sequence[int] = ()) -> str:
    """Cells are already-escaped HTML."""
    return "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                            for i, c in enumerate(cells)) + "</tr>"


# --- the runs table ------------------------------------------------------------------------------------------------
def render_index(rows: list[dict[str, Any]], now: float) -> str:
    """``/``: one line per (watch, run, stream) from :func:`ckptd.daemon.status.collect_status`."""
    lines = []
    for r in rows:
        stream = r.get("stream") or "model"
        best = r.get("best")
        best_txt = (f'{esc(fmt_metric(best["metric"]))} <span class="muted small">@ step '
                    f'{esc(fmt_step(best.get("step")))}</span>') if best else '<span class="muted">none yet</span>'
        counts = r.get("checkpoints") or {}
        seen = sum(counts.values())
        seen_tip = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no checkpoints"
        event = r.get("last_event")
        last = (f'{esc(event)} <span class="muted small">{_age_cell(r.get("last_event_at"), now)}</span>'
                if event else '<span class="muted">—</span>')
        export = r.get("export")
        export_txt = _badge(export["status"], export.get("reason")) if export else '<span class="muted">—</span>'
        errors = []
        if r.get("last_error"):
            errors.append(f'<span class="err" title="{esc(r["last_error"])}">⚠ error '
                          f'{esc(fmt_age(r.get("last_error_at"), now))}</span>')
        if r.get("invalid"):
            last_invalid = r.get("last_invalid") or {}
            tip = f'latest {basename(last_invalid.get("source"))}: {last_invalid.get("reason")}' if last_invalid else ""
            errors.append(f'<span class="err" title="{esc(tip)}">{esc(r["invalid"])} invalid</span>')
        link = f'<a href="{esc(run_href(r["watch"], r["run"], stream))}">{esc(r["watch"])} / {esc(r["run"])}</a>'
        lines.append(_tr([link, esc(stream), esc(r.get("mode", "max")), best_txt, esc(len(r.get("members") or [])),
                          f'<span title="{esc(seen_tip)}">{esc(seen)}</span>', last, export_txt,
                          "<br>".join(errors) or '<span class="muted">—</span>'], numeric=(4, 5)))
    table = _table(["Run", "Stream", "Mode", "Best metric", "Top-k", "Seen", "Last event", "Export", "Errors"],
                   lines, "no runs recorded yet (is the daemon running, and does the state_dir match?)",
                   numeric=(4, 5))
    body = f'<h1>Runs</h1><p class="muted small">{esc(len(rows))} run stream(s) in the ledger.</p>{table}'
    return page("ckptd status", body, now)


# --- the chart -----------------------------------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def point_kind(c: dict[str, Any]) -> str:
    if c.get("best"):
        return "best"
    if c.get("member"):
        return "member"
    if c.get("evicted"):
        return "evicted"
    return "other"


def _padded(lo: float, hi: float, frac: float) -> tuple[float, float]:
    span = hi - lo
    pad = (abs(lo) * 0.05 or 1.0) if span == 0 else (span * frac if math.isfinite(span) else 0.0)
    out_lo, out_hi = lo - pad, hi + pad
    if not (math.isfinite(out_lo) and math.isfinite(out_hi)):
        return lo, hi
    return out_lo, out_hi


def _headroom(lo: float, hi: float) -> float:
    out = hi + (hi - lo) * 0.08
    return out if math.isfinite(out) else hi


def _norm(v: float, lo: float, hi: float) -> float:
    """(v - lo) / (hi - lo) without overflow for huge ranges; 0.5 for an empty range."""
    span = hi / 2 - lo / 2
    if span <= 0:
        return 0.5
    out = (v / 2 - lo / 2) / span
    return min(1.0, max(0.0, out)) if math.isfinite(out) else 0.5


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (at most ~count+1 of them; always finite)."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return [lo, hi] if lo != hi else [lo]
    raw = span / count
    if not raw > 0:  # a span of a few subnormals
        return [lo, hi]
    mag = 10.0 ** math.floor(math.log10(raw))
    step = mag
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if span / step <= count:
            break
    if not (math.isfinite(step) and step > 0):
        return [lo, hi]
    first = math.ceil(lo / step)
    ticks = []
    for i in range(count * 3):
        t = (first + i) * step
        if t > hi + step * 1e-9:
            break
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
    return ticks or [lo, hi]


def _tick_label(t: float, integral: bool) -> str:
    if integral and float(t).is_integer() and abs(t) < 1e15:
        return f"{int(t):,}"
    return f"{t:.6g}"


def _point_title(c: dict[str, Any], kind: str) -> str:
    status = str(c.get("status"))
    extra = {"best": " (best)", "member": " (top-k member)", "evicted": " (evicted)"}.get(kind, "")
    lines = [str(c.get("name") or basename(c.get("path"))), f"step {fmt_step(c.get('step'))}",
             f"metric {fmt_metric(c.get('metric'))}", f"status {status}{extra}"]
    if c.get("reason"):
        lines.append(str(c["reason"]))
    return "\n".join(lines)


def _min_max_buckets(ks: list[int], ys: list[float], budget: int) -> list[int]:
    """At most ``budget`` of the indexes ``ks`` (in order): all of them if they fit, else ``budget // 2`` even
    buckets (by order) of which each keeps its lowest and its highest metric (the envelope of the curve)."""
    if len(ks) <= budget:
        return ks
    buckets = budget // 2
    out: list[int] = []
    for b in range(buckets):
        chunk = ks[len(ks) * b // buckets:len(ks) * (b + 1) // buckets]
        if chunk:
            lo, hi = min(chunk, key=lambda k: ys[k]), max(chunk, key=lambda k: ys[k])
            out.extend(sorted({lo, hi}))
    return out


def chart_points(kinds: list[str], ys: list[float], limit: int = MAX_CHART_POINTS) -> list[int]:
    """Which of the plotted checkpoints (in the order seen) the chart draws: all when there are at most ``limit``,
    else the best and the top-k members always, the evicted members while they fit (else their envelope), and of
    the rest the lowest and the highest metric of each of even stretches by order seen (see _min_max_buckets)."""
    if len(kinds) <= limit:
        return list(range(len(kinds)))
    keep = [k for k, kind in enumerate(kinds) if kind in ("best", "member")]
    evicted = [k for k, kind in enumerate(kinds) if kind == "evicted"]
    keep += _min_max_buckets(evicted, ys, max(0, limit - len(keep)))
    others = [k for k, kind in enumerate(kinds) if kind == "other"]
    keep += _min_max_buckets(others, ys, max(0, limit - len(keep)))
    return sorted(keep)


def chart_svg(checkpoints: list[dict[str, Any]], mode: str = "max", width: int = 1100, height: int = 340,
              limit: int = MAX_CHART_POINTS) -> str:
    """Metric vs step: one ``<circle class="pt ...">`` per checkpoint with a (finite) metric, each with a
    ``<title>`` tooltip. x is the step when every plotted checkpoint has one, else the order seen (1, 2, ...).
    Over ``limit`` such checkpoints, :func:`chart_points` picks which are drawn and a note says so (the axes still
    span them all)."""
    plotted = [(i, c, v) for i, c in enumerate(checkpoints) if (v := _finite(c.get("metric"))) is not None]
    if not plotted:
        return '<p class="empty">no checkpoint with a metric yet</p>'
    by_step = all(_finite(c.get("step")) is not None for _, c, _ in plotted)
    all_xs = [float(c["step"]) if by_step else float(i + 1) for i, c, _ in plotted]
    all_ys = [v for _, _, v in plotted]
    x_lo, x_hi = _padded(min(all_xs), max(all_xs), 0.03)
    y_lo, y_hi = _padded(min(all_ys), max(all_ys), 0.08)
    total = len(plotted)
    shown = chart_points([point_kind(c) for _, c, _ in plotted], all_ys, limit)
    plotted = [plotted[k] for k in shown]
    xs = [all_xs[k] for k in shown]
    ys = [all_ys[k] for k in shown]
    y_hi = _headroom(y_lo, y_hi)  # room above the top point for the best's label
    left, right, top, bottom = 78, 22, 18, 46
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return round(left + _norm(x, x_lo, x_hi) * pw, 2)

    def py(y: float) -> float:
        return round(top + (1 - _norm(y, y_lo, y_hi)) * ph, 2)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="metric by step" '
             f'xmlns="http://www.w3.org/2000/svg">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fbfbfc" stroke="#e5e7eb"/>']
    for t in nice_ticks(y_lo, y_hi):
        y = py(t)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y}" y2="{y}" stroke="#eceef1"/>'
                     f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{esc(_tick_label(t, False))}</text>')
    for t in nice_ticks(x_lo, x_hi, 8):
        x = px(t)
        parts.append(f'<line x1="{x}" x2="{x}" y1="{top}" y2="{top + ph}" stroke="#f1f2f4"/>'
                     f'<text x="{x}" y="{top + ph + 18}" text-anchor="middle">{esc(_tick_label(t, True))}</text>')
    better = "higher is better" if mode != "min" else "lower is better"
    x_title = "step" if by_step else "checkpoint (order seen)"
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{esc(x_title)}</text>'
                 f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
                 f"metric ({esc(better)})</text>")
    order = sorted(range(len(plotted)), key=lambda k: (xs[k], k))
    if len(order) > 1:
        pts = " ".join(f"{px(xs[k])},{py(ys[k])}" for k in order)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#cbd5e1" stroke-width="1.5"/>')
    # draw the important points last (on top); the DOM holds exactly one point per plotted checkpoint
    rank = {"other": 0, "evicted": 1, "member": 2, "best": 3}
    best_at = None
    for k in sorted(range(len(plotted)), key=lambda k: (rank[point_kind(plotted[k][1])], xs[k])):
        _, c, _ = plotted[k]
        kind = point_kind(c)
        style = " ".join(f'{a}="{v}"' for a, v in _POINT_STYLE[kind].items())
        parts.append(f'<circle class="{POINT_CLASS} {POINT_CLASS}-{kind}" cx="{px(xs[k])}" cy="{py(ys[k])}" '
                     f"{style}><title>{esc(_point_title(c, kind))}</title></circle>")
        if kind == "best":
            best_at = k
    if best_at is not None:
        x, y = px(xs[best_at]), py(ys[best_at])  # the label sits above the point (below it at the very top)
        anchor, dx = ("end", 8) if x > left + pw - 60 else ("start", -8) if x < left + 60 else ("middle", 0)
        dy = 24 if y < top + 24 else -13
        label = f"best {fmt_metric(ys[best_at])}"
        parts.append(f'<text class="lbl" x="{x + dx}" y="{y + dy}" text-anchor="{anchor}">{esc(label)}</text>')
    parts.append("</svg>")
    if len(plotted) < total:
        parts.append(f'<p class="muted small chart-note">showing {len(plotted):,} of {total:,} checkpoints with a '
                     "metric: the best, the top-k members and the evicted ones, and of the rest the lowest and the "
                     "highest metric of each stretch (by order seen)</p>")
    return "".join(parts)


def _legend() -> str:
    items = []
    for kind, label in _LEGEND:
        style = " ".join(f'{a}="{v}"' for a, v in _POINT_STYLE[kind].items() if a != "r")
        items.append(f'<span><svg width="16" height="16" aria-hidden="true"><circle cx="8" cy="8" r="5" {style}/>'
                     f"</svg>{esc(label)}</span>")
    return f'<div class="legend">{"".join(items)}</div>'


# --- a run's page --------------------------------------------------------------------------------------------------
def _ranked_members(history: dict[str, Any], row: dict[str, Any] | None) -> list[dict[str, Any]]:
    if row and row.get("members") is not None:
        return [{"name": basename(m.get("source")), "step": m.get("step"), "metric": m.get("metric")}
                for m in row["members"]]
    members = [c for c in history.get("checkpoints", []) if c.get("member")]
    sign = -1.0 if history.get("mode", "max") != "min" else 1.0
    members.sort(key=lambda c: (not c.get("best"), sign * (_finite(c.get("metric")) or 0.0)))
    return [{"name": c.get("name") or basename(c.get("path")), "step": c.get("step"), "metric": c.get("metric")}
            for c in members]


def _errors(history: dict[str, Any], row: dict[str, Any] | None) -> list[tuple[float, str, str, str]]:
    """(when, where, what, reason) newest first."""
    out: list[tuple[float, str, str, str]] = []
    if row and row.get("last_error"):
        out.append((row.get("last_error_at") or 0.0, "run", "last error", str(row["last_error"])))
    for c in history.get("checkpoints", []):
        if c.get("status") in _ERROR_STATUSES:
            out.append((c.get("updated_at") or 0.0, str(c.get("name") or basename(c.get("path"))),
                        str(c.get("status")), str(c.get("reason") or "")))
    for e in history.get("exports", []):
        if e.get("status") in ("failed", "error", "timeout"):
            out.append((e.get("finished_at") or e.get("started_at") or 0.0, f"export #{e.get('id')}",
                        str(e.get("status")), str(e.get("reason") or "")))
    out.sort(key=lambda t: -t[0])
    return out[:MAX_ERRORS]


def _role(c: dict[str, Any]) -> str:
    kind = point_kind(c)
    return "" if kind == "other" else f' <span class="muted small">{esc(kind)}</span>'


def render_run(history: dict[str, Any], row: dict[str, Any] | None, now: float) -> str:
    """``/run``: one run stream from :func:`ckptd.daemon.history.collect_history` (plus its status row, when the
    status read has one: the ranked members, the last event and error, the output directory)."""
    watch, run, stream = history.get("watch"), history.get("run"), history.get("stream") or "model"
    mode = history.get("mode", "max")
    checkpoints = list(history.get("checkpoints") or [])
    members = _ranked_members(history, row)
    best = members[0] if members else None
    counts: dict[str, int] = {}
    for c in checkpoints:
        counts[str(c.get("status"))] = counts.get(str(c.get("status")), 0) + 1
    title = f"{watch} / {run}" + (f" [{stream}]" if stream != "model" else "")

    def cell(key: str, value: str, tip: str = "") -> str:
        t = f' title="{esc(tip)}"' if tip else ""
        return f'<div{t}><span class="k">{esc(key)}</span><span class="v">{value}</span></div>'

    best_txt = (f"{esc(fmt_metric(best['metric']))} <span class=\"muted small\">@ step {esc(fmt_step(best['step']))}"
                f"</span>" if best else '<span class="muted">none yet</span>')
    summary = [cell("best metric" + (" (max)" if mode != "min" else " (min)"), best_txt, best["name"] if best else ""),
               cell("top-k members", esc(len(members))),
               cell("checkpoints seen", esc(len(checkpoints)),
                    ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))]
    if row:
        event = row.get("last_event")
        summary.append(cell("last event", (f'{esc(event)} <span class="muted small">'
                                           f'{_age_cell(row.get("last_event_at"), now)}</span>') if event else "—"))
    exports = list(history.get("exports") or [])
    if exports:
        e = exports[-1]
        summary.append(cell("export", _badge(e.get("status"), e.get("reason"))))
    if row and row.get("last_error"):
        summary.append(cell("error", f'<span class="err">⚠ {esc(fmt_age(row.get("last_error_at"), now))}</span>',
                            str(row["last_error"])))

    sub = f'{"lower" if mode == "min" else "higher"} metric is better' + (
        f' · output <code>{esc(row["output"])}</code>' if row and row.get("output") else "")
    body = [f"<h1>{esc(title)}</h1>", f'<p class="sub">{sub}</p>', f'<div class="summary">{"".join(summary)}</div>',
            "<h2>Metric by step</h2>", f'<div class="card">{chart_svg(checkpoints, mode)}{_legend()}</div>']

    body.append("<h2>Average members</h2>")
    body.append(_table(["#", "Checkpoint", "Step", "Metric"],
                       (_tr([esc(i + 1), esc(m["name"]) + (' <span class="badge b-warn">best</span>' if i == 0 else ""),
                             esc(fmt_step(m["step"])), esc(fmt_metric(m["metric"]))], numeric=(0, 2, 3))
                        for i, m in enumerate(members)), "no members yet", numeric=(0, 2, 3)))

    evaluations = list(history.get("evaluations") or [])
    if evaluations:
        body.append("<h2>Evaluations</h2>")
        body.append(_table(
            ["#", "Kind", "Key", "Members", "Value", "Status", "Finished"],
            (_tr([esc(ev.get("id")), esc(ev.get("kind")), esc(ev.get("key")),
                  esc(", ".join(basename(m) for m in ev.get("members") or [])), esc(fmt_metric(ev.get("value"))),
                  _badge(ev.get("status"), ev.get("reason")), _age_cell(ev.get("finished_at"), now)],
                 numeric=(0, 4)) for ev in reversed(evaluations[-MAX_TABLE_ROWS:])),
            "no evaluations", numeric=(0, 4)))

    body.append("<h2>Exports</h2>")
    body.append(_table(
        ["#", "Status", "Source", "Step", "Metric", "Output", "Started", "Finished", "Reason"],
        (_tr([esc(e.get("id")), _badge(e.get("status")), esc(basename(e.get("source"))), esc(fmt_step(e.get("step"))),
              esc(fmt_metric(e.get("metric"))), esc(basename(e.get("path"))), _age_cell(e.get("started_at"), now),
              _age_cell(e.get("finished_at"), now), esc(e.get("reason") or "")], numeric=(0, 3, 4))
         for e in reversed(exports[-MAX_TABLE_ROWS:])),
        "no exports", numeric=(0, 3, 4)))

    errors = _errors(history, row)
    body.append("<h2>Recent errors</h2>")
    body.append(_table(["When", "Where", "What", "Reason"],
                       (_tr([_age_cell(at, now), esc(where), f'<span class="err">{esc(what)}</span>', esc(reason)])
                        for at, where, what, reason in errors), "no errors"))

    body.append("<h2>Checkpoints" + (f" (latest {MAX_TABLE_ROWS})" if len(checkpoints) > MAX_TABLE_ROWS else "")
                + "</h2>")
    if len(checkpoints) > MAX_TABLE_ROWS:
        body.append(f'<p class="muted small table-note">showing the newest {MAX_TABLE_ROWS:,} of '
                    f"{len(checkpoints):,} checkpoints (<code>ckptd history</code> lists them all)</p>")
    body.append(_table(
        ["Checkpoint", "Step", "Metric", "Status", "Seen", "Reason"],
        (_tr([esc(c.get("name") or basename(c.get("path"))), esc(fmt_step(c.get("step"))),
              esc(fmt_metric(c.get("metric"))),
              _badge(c.get("status")) + _role(c),
              _age_cell(c.get("first_seen"), now), esc(c.get("reason") or "")], numeric=(1, 2))
         for c in reversed(checkpoints[-MAX_TABLE_ROWS:])),
        "no checkpoints seen yet", numeric=(1, 2)))

    crumb = f'<a href="/">runs</a> › {esc(title)}'
    return page(f"ckptd · {title}", "".join(body), now, crumb=crumb)


def render_error(code: int, title: str, reason: str, now: float, *, refresh: bool = False) -> str:
    """An error page (a reason, never a traceback)."""
    body = (f'<h1>{esc(code)} {esc(title)}</h1><div class="card"><p class="err">{esc(reason)}</p>'
            '<p><a href="/">all runs</a></p></div>')
    return page(f"ckptd · {code} {title}", body, now, refresh=refresh)
