"""The report rendered: the terminal's tables, and one self-contained HTML file with PNG plots.

Both print the same tables (built once by `tables`); the HTML adds five plots drawn with
matplotlib's Agg backend and embedded as base64 data URIs, so the file opens anywhere without
the network or the files beside it. A value the report does not have prints as "n/a", never 0.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime
from decimal import Decimal
from typing import Any

from services.common.market_calendar import ET
from services.domain.report import Report

NA = "n/a"
PLOTS = ("equity_drawdown", "daily_pnl", "gate_funnel", "spread_cost", "forward_return_by_rule")


def _money(v: Decimal | None) -> str:
    return NA if v is None else f"{v:,.2f}"


def _pct(v: Decimal | None, places: int = 3) -> str:
    return NA if v is None else f"{v * 100:.{places}f}%"


def _bps(v: Decimal | None) -> str:
    return NA if v is None else f"{v:.1f}"


def _time(v: datetime | None) -> str:
    return NA if v is None else v.astimezone(ET).strftime("%Y-%m-%d %H:%M")


def _plain(v: Any) -> str:
    return NA if v is None else str(v)


Table = tuple[str, list[str], list[list[str]]]


def tables(report: Report) -> list[Table]:
    """Every table of the report as (title, headers, rows of text), in print order."""
    t = report.totals
    out: list[Table] = [("Totals", ["trades", "wins", "losses", "win rate", "realized P&L", "fees", "profit factor",
                                    "max drawdown", "open positions"],
                         [[str(t["trades"]), str(t["wins"]), str(t["losses"]), _pct(t["win_rate"], 1),
                           _money(t["realized_pnl"]), _money(t["fees"]), _plain(t["profit_factor"]),
                           _money(t["max_drawdown"]), str(t["open_positions"])]])]
    out.append(("P&L by day (ET day of the close)", ["day", "trades", "wins", "losses", "fees", "realized P&L"],
                [[str(d["day"]), str(d["trades"]), str(d["wins"]), str(d["losses"]), _money(d["fees"]),
                  _money(d["realized_pnl"])] for d in report.days]))
    out.append(("Trades", ["position", "ticker", "symbol", "side", "qty", "entry (ET)", "entry", "exit (ET)", "exit",
                           "reason", "fees", "P&L"],
                [[str(r["position_id"]), r["ticker"], r["symbol"], r["side"], str(r["qty"]), _time(r["entry_at"]),
                  _plain(r["entry_price"]), _time(r["exit_at"]), _plain(r["exit_price"]), _plain(r["exit_reason"]),
                  _money(r["fees"]), _money(r["realized_pnl"])] for r in report.trades]))
    if report.open_positions:
        out.append(("Still open (not in the totals)", ["position", "ticker", "symbol", "side", "qty", "entry (ET)",
                                                       "entry", "mark", "status"],
                    [[str(p["position_id"]), p["ticker"], p["symbol"], p["side"], str(p["qty"]), _time(p["entry_at"]),
                      _plain(p["entry_price"]), _plain(p["market_price"]), p["status"]] for p in report.open_positions]))
    s = report.execution["summary"]
    out.append(("Exposure over time (notional held after each open and close)", ["at (ET)", "positions", "notional"],
                [[_time(x["at"]), str(x["positions"]), _money(x["notional"])] for x in report.exposure]))
    out.append(("Execution quality", ["fills", "slippage cost vs mid", "mean slippage (bps)", "with quote",
                                      "spread cost (half spread)", "without quote"],
                [[str(s["fills"]), _money(s["slippage_cost"]), _bps(s["mean_slippage_bps"]),
                  str(s["fills_with_quote"]), _money(s["spread_cost"]), str(s["fills_without_quote"])]]))
    out.append(("Fills", ["execution", "role", "symbol", "side", "qty", "mid", "mid from", "fill", "slippage (bps)",
                          "slippage cost", "half spread", "spread cost"],
                [[str(r["execution_id"]), r["role"], r["symbol"], r["side"], str(r["qty"]), f"{r['mid']:.4f}",
                  r["mid_source"], _plain(r["fill_price"]), _bps(r["slippage_bps"]), _money(r["slippage_cost"]),
                  _plain(r["half_spread"]), _money(r["spread_cost"])] for r in report.execution["rows"]]))
    hs = [str(h) for h in report.horizons]
    out.append(("Signal quality: forward return by rule and direction",
                ["rule", "direction", "signals"] + [f"{h}m mean / hit rate / n (missing)" for h in hs],
                [[g["rule"], g["direction"], str(g["signals"])] + [_stat(g["horizons"][h]) for h in hs]
                 for g in report.signals["by_rule"]]
                + [["all", "", str(report.signals["overall"]["signals"])]
                   + [_stat(report.signals["overall"]["horizons"][h]) for h in hs]]))
    out.append(("Gate funnel (entries)", ["stage", "count"],
                [[f["stage"], str(f["count"])] for f in report.gates["funnel"]]))
    out.append(("Gate attribution: what the blocked entries would have returned",
                ["gate", "blocked", "alone", "codes"] + [f"{h}m sum / verdict / n (missing)" for h in hs],
                [[a["gate"], str(a["blocked"]), str(a["sole"]), ", ".join(f"{k} {v}" for k, v in a["codes"].items())]
                 + [f"{_pct(a['horizons'][h]['sum_directional'])} {a['horizons'][h]['verdict']} "
                    f"{a['horizons'][h]['n']} ({a['horizons'][h]['missing']})" for h in hs]
                 for a in report.gates["attribution"]]))
    out.append(("Params in force", ["source", "version", "hash", "first decision (ET)", "last decision (ET)",
                                    "decisions"],
                [[_plain(p["source"]), _plain(p["version"]), str(p["hash"])[:12], _time(p["first_at"]),
                  _time(p["last_at"]), str(p["decisions"])] for p in report.params]))
    return out


def _stat(s: dict[str, Any]) -> str:
    return f"{_pct(s['mean_directional'])} / {_pct(s['hit_rate'], 1)} / {s['n']} ({s['missing']})"


def render_text(report: Report) -> str:
    lines = [f"Report for {report.account_id} ({report.source}), {report.start} to {report.end} (ET)"]
    for title, headers, rows in tables(report):
        lines += ["", title, "-" * len(title)]
        if not rows:
            lines.append("  (none)")
            continue
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if report.missing:
        lines += ["", "Missing data", "------------"] + [f"- {m}" for m in report.missing]
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------------------


def _figure(title: str, rows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2 * rows), dpi=90)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    axes[0].set_title(title)
    return fig, axes


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _et_times(ax) -> None:
    from matplotlib.dates import DateFormatter

    ax.xaxis.set_major_formatter(DateFormatter("%m-%d %H:%M", tz=ET))
    for label in ax.get_xticklabels():
        label.set_rotation(30)
        label.set_fontsize(8)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def plots(report: Report) -> dict[str, bytes]:
    """The five plots as PNG bytes, by name (PLOTS). An empty series is drawn as a note, not a zero."""
    out = {}
    fig, (eq, dd, ex) = _figure("Equity (realized P&L), drawdown and exposure", rows=3)
    if report.equity_curve:
        # The curve starts at 0 when the first position of the period opened (or at the first close).
        first = report.exposure[0]["at"] if report.exposure else report.equity_curve[0]["at"]
        xs = [first] + [p["at"] for p in report.equity_curve]
        eq.step(xs, [0.0] + [float(p["cumulative_pnl"]) for p in report.equity_curve], where="post")
        dd.fill_between(xs, [0.0] + [-float(p["drawdown"]) for p in report.equity_curve], step="post",
                        color="tab:red")
        eq.set_ylabel("P&L")
        dd.set_ylabel("drawdown")
        _et_times(eq)
        _et_times(dd)
    else:
        _empty(eq, "no closed trade in the period")
        _empty(dd, "no closed trade in the period")
    if report.exposure:
        ex.step([x["at"] for x in report.exposure], [float(x["notional"]) for x in report.exposure], where="post")
        ex.set_ylabel("exposure")
        _et_times(ex)
    else:
        _empty(ex, "no position held in the period")
    out["equity_drawdown"] = _png(fig)

    fig, (ax,) = _figure("Realized P&L by day")
    if report.days:
        values = [float(d["realized_pnl"]) for d in report.days]
        ax.bar([str(d["day"]) for d in report.days], values,
               color=["tab:green" if v >= 0 else "tab:red" for v in values])
        ax.axhline(0, color="black", linewidth=0.5)
    else:
        _empty(ax, "no closed trade in the period")
    out["daily_pnl"] = _png(fig)

    fig, (ax,) = _figure("Gate funnel (entries)")
    funnel = report.gates["funnel"]
    if funnel and funnel[0]["count"]:
        ax.barh([f["stage"] for f in funnel][::-1], [f["count"] for f in funnel][::-1])
    else:
        _empty(ax, "no entry decided in the period")
    out["gate_funnel"] = _png(fig)

    fig, (ax,) = _figure("Cost of execution vs the mid at decision (bps)")
    rows = report.execution["rows"]
    slip = [float(r["slippage_bps"]) for r in rows if r["slippage_bps"] is not None]
    spread = [float(r["spread_bps"]) for r in rows if r["spread_bps"] is not None]
    if slip:
        ax.hist(slip, bins=20, alpha=0.7, label="slippage vs mid")
        if spread:
            ax.hist(spread, bins=20, alpha=0.7, label="half spread (quoted)")
        ax.legend()
    else:
        _empty(ax, "no fill in the period")
    out["spread_cost"] = _png(fig)

    fig, (ax,) = _figure("Mean directional forward return by rule (%)")
    groups = report.signals["by_rule"]
    if groups:
        width = 0.8 / len(report.horizons)
        for i, h in enumerate(report.horizons):
            means = [g["horizons"][str(h)]["mean_directional"] for g in groups]
            xs = [j + i * width for j in range(len(groups))]
            ax.bar([x for x, m in zip(xs, means) if m is not None],
                   [float(m) * 100 for m in means if m is not None], width, label=f"{h} min")
        ax.set_xticks([j + width * (len(report.horizons) - 1) / 2 for j in range(len(groups))],
                      [f"{g['rule']}\n{g['direction']}" for g in groups], fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend()
    else:
        _empty(ax, "no signal in the period")
    out["forward_return_by_rule"] = _png(fig)
    return out


def render_html(report: Report) -> str:
    """One self-contained page: the plots as data URIs, then every table, then what is missing."""
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
             f"<title>ops-pipeline report {e(report.account_id)} {report.start} to {report.end}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}"
             "th{background:#f0f0f0}img{display:block;margin:1em 0}</style></head><body>",
             f"<h1>Report for {e(report.account_id)} ({e(report.source)}), {report.start} to {report.end} (ET)</h1>"]
    for name, png in plots(report).items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<img id="{name}" alt="{name}" src="data:image/png;base64,{data}">')
    for title, headers, rows in tables(report):
        parts.append(f"<h2>{e(title)}</h2>")
        if not rows:
            parts.append("<p>(none)</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    if report.missing:
        parts.append("<h2>Missing data</h2><ul>" + "".join(f"<li>{e(m)}</li>" for m in report.missing) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: Report, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))
