"""The report over a history made by the real pipeline (tests/report_history.py), and its pure
computation on hand-built rows with hand-computed answers."""

from __future__ import annotations

import base64
import json
import struct
from datetime import date, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser

import psycopg
import pytest

from services.adapters.postgres.report_data import gather_report_inputs
from services.adapters.report_render import PLOTS, render_html, render_text
from services.common.db import connect
from services.domain.report import ReportInputs, build_report, equity_curve, execution_rows, trade_rows
from tests.conftest import TEMPLATE
from tests.factories import ACCOUNT, add_bar, et
from tests.report_history import DAY, run_history

SESSION_DAY = date(2026, 11, 30)


@pytest.fixture(scope="module")
def history(pg_server):
    """One recorded morning, shared by this module's tests (they only read it)."""
    name = "report_history"
    admin = pg_server.get_uri("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield run_history(pg_server.get_uri(name))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def report(history):
    with connect(history.url) as conn:
        return build_report(gather_report_inputs(conn, ACCOUNT, DAY, DAY))


def _d(v) -> Decimal:
    return Decimal(v)


# --- over the pipeline's history ---------------------------------------------------------------


def test_json_totals_equal_the_trade_rows_the_day_rows_and_the_brokers_equity_change(history, report):
    doc = json.loads(json.dumps(report.as_json()))
    trades, days, totals = doc["trades"], doc["days"], doc["totals"]
    assert totals["trades"] == len(trades) >= 3  # a history with turnover, or this proves little
    assert {t["exit_reason"] for t in trades} >= {"TAKE_PROFIT", "STOP_LOSS"}
    assert _d(totals["realized_pnl"]) == sum(_d(t["realized_pnl"]) for t in trades)
    assert _d(totals["realized_pnl"]) == sum(_d(d["realized_pnl"]) for d in days)
    assert _d(totals["fees"]) == sum(_d(t["fees"]) for t in trades) == sum(_d(d["fees"]) for d in days)
    assert totals["trades"] == sum(d["trades"] for d in days)
    assert totals["wins"] + totals["losses"] == totals["trades"]
    # The book ended flat: the simulated broker's equity moved by exactly the realized P&L, fees included.
    assert history.end_equity - history.start_equity == _d(totals["realized_pnl"])
    # Each trade's P&L is its gross less its fees, as the position recorded it.
    for t in trades:
        assert _d(t["gross_pnl"]) - _d(t["fees"]) == _d(t["realized_pnl"])
    # The equity curve ends at the total, and the maximum drawdown is its worst drawdown.
    assert _d(doc["equity_curve"][-1]["cumulative_pnl"]) == _d(totals["realized_pnl"])
    assert _d(totals["max_drawdown"]) == max(_d(p["drawdown"]) for p in doc["equity_curve"])
    assert doc["exposure"][-1]["positions"] == 0 and _d(doc["exposure"][-1]["notional"]) == 0


def test_json_decimals_are_strings_and_missing_values_are_null_not_zero(report):
    doc = report.as_json()
    assert isinstance(doc["totals"]["realized_pnl"], str)
    signals = doc["signals"]["rows"]
    late = [s for s in signals if s["forward"]["60"] is None]
    assert late, "the history ends less than an hour after some signals"
    overall = doc["signals"]["overall"]["horizons"]["60"]
    assert overall["missing"] == len(late) and overall["n"] == len(signals) - len(late)
    assert any("without the bar 60 minutes later" in m for m in doc["missing"])


def test_forward_returns_of_the_recorded_signals_are_those_of_their_bars(history, report):
    with connect(history.url) as conn:
        for s in report.signals["rows"]:
            base = conn.execute("SELECT close FROM lane_telemetry WHERE ticker = %s AND ts = %s",
                                (s["ticker"], s["bar_ts"])).fetchone()["close"]
            for h in (5, 15, 60):
                bar = conn.execute("SELECT close FROM lane_telemetry WHERE ticker = %s AND ts = %s",
                                   (s["ticker"], s["bar_ts"] + timedelta(minutes=h))).fetchone()
                got = s["forward"][str(h)]
                if bar is None:
                    assert got is None
                else:
                    sign = 1 if s["direction"] == "BULL" else -1
                    assert got["return"] == bar["close"] / base - 1
                    assert got["directional"] == sign * (bar["close"] / base - 1)


def test_gate_attribution_counts_are_those_of_the_recorded_gate_results(history, report):
    with connect(history.url) as conn:
        rows = conn.execute(
            """SELECT g->>'name' AS gate, count(DISTINCT r.id)::int AS n
               FROM dispatch_recommendations r, jsonb_array_elements(r.gate_results) g
               WHERE r.account_id = %s AND r.action IN ('BUY', 'SELL') AND r.status = 'SKIPPED'
                 AND (g->>'passed')::boolean = false
               GROUP BY 1""", (ACCOUNT,)).fetchall()
        executed = conn.execute(
            "SELECT count(*)::int AS n FROM dispatch_recommendations WHERE account_id = %s "
            "AND action IN ('BUY', 'SELL') AND status = 'EXECUTED'", (ACCOUNT,)).fetchone()["n"]
    assert {a["gate"]: a["blocked"] for a in report.gates["attribution"]} == {r["gate"]: r["n"] for r in rows}
    assert "action_allowed" in {r["gate"] for r in rows}  # bearish signals on an account that may not short
    funnel = report.gates["funnel"]
    assert funnel[-1] == {"stage": "executed", "count": executed}
    counts = [f["count"] for f in funnel[:-1]]
    assert counts == sorted(counts, reverse=True)  # each gate only removes


def test_execution_rows_price_the_option_against_its_quote_and_the_stock_against_its_bar(report):
    rows = report.execution["rows"]
    option = next(r for r in rows if r["instrument"] == "OPTION" and r["role"] == "ENTRY")
    assert option["mid_source"] == "quote" and option["half_spread"] is not None
    assert option["spread_cost"] == option["half_spread"] * option["qty"] * 100
    stock = next(r for r in rows if r["instrument"] == "STOCK" and r["side"] == "buy")
    assert stock["mid_source"] == "decision_price" and stock["spread_cost"] is None
    assert stock["slippage_cost"] == (stock["fill_price"] - stock["mid"]) * stock["qty"]
    assert report.execution["summary"]["slippage_cost"] == sum(r["slippage_cost"] for r in rows)


def test_params_versions_name_the_document_every_decision_was_made_under(history, report):
    with connect(history.url) as conn:
        n = conn.execute("SELECT count(*)::int AS n FROM dispatch_recommendations WHERE account_id = %s "
                         "AND params_hash IS NOT NULL", (ACCOUNT,)).fetchone()["n"]
    [params] = report.params
    assert (params["source"], params["version"], params["decisions"]) == ("test", "1", n)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a["id"]] = a["src"]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_html_is_one_file_with_each_plot_as_an_embedded_png(report, tmp_path):
    page = render_html(report)
    parser = _Images()
    parser.feed(page)
    assert set(parser.images) == set(PLOTS)
    for name, src in parser.images.items():
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), name
        width, height = _png_size(base64.b64decode(src[len(prefix):], validate=True))
        assert width > 200 and height > 100, name
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    for title in ("P&amp;L by day", "Trades", "Execution quality", "Gate attribution", "Params in force"):
        assert title in page


def test_cli_report_writes_json_and_html(history, tmp_path, monkeypatch, capsys):
    from services.cli import main

    monkeypatch.setenv("DATABASE_URL", history.url)
    out = tmp_path / "report.html"
    assert main(["report", "--account", ACCOUNT, "--from", str(DAY), "--to", str(DAY), "--json",
                 "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["period"] == {"from": "2026-11-30", "to": "2026-11-30"}
    assert _d(doc["totals"]["realized_pnl"]) == history.end_equity - history.start_equity
    assert out.read_text().count("data:image/png;base64,") == len(PLOTS)
    assert main(["report", "--account", ACCOUNT, "--from", str(DAY), "--to", str(DAY)]) == 0
    text = capsys.readouterr().out
    assert "Gate attribution" in text and "Signal quality" in text


def test_a_day_outside_the_history_reports_nothing_and_says_so(history):
    with connect(history.url) as conn:
        empty = build_report(gather_report_inputs(conn, ACCOUNT, date(2026, 12, 1), date(2026, 12, 1)))
    assert empty.totals["trades"] == 0 and empty.totals["realized_pnl"] == 0
    assert empty.totals["win_rate"] is None and empty.totals["profit_factor"] is None
    assert any("no closed trade" in m for m in empty.missing)
    page = render_html(empty)
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "n/a" in render_text(empty)


# --- hand-built rows, hand-computed answers ----------------------------------------------------------


def _signal(conn, ticker: str, bar_ts: datetime, action: str, direction: str) -> int:
    reason = {"direction": direction, "outcome": "EMIT",
              "filters": {"momentum": {"passed": True, "value": {"ret_5m": 0.003, "ret_15m": 0.001},
                                       "threshold": {"ret_5m": 0.002, "ret_15m": 0.004} if direction == "BULL"
                                       else {"ret_5m": -0.002, "ret_15m": -0.004}}}}
    if direction == "BEAR":
        reason["filters"]["momentum"]["value"] = {"ret_5m": -0.001, "ret_15m": -0.005}
    return conn.execute(
        """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, bar_ts, reason,
                                                 created_at, status, outcome_code, gate_results, decided_at,
                                                 params_source, params_version, params_hash)
           VALUES (%s, %s, %s, 'STOCK', 'day_trade', %s, %s, %s, 'SKIPPED', 'MAX_POSITIONS', %s, %s, 'ssm', '7', 'abc')
           RETURNING id""",
        (ACCOUNT, ticker, action, bar_ts, json.dumps(reason), bar_ts + timedelta(minutes=1),
         json.dumps([{"name": "trading_hours", "passed": True, "code": "OK"},
                     {"name": "max_positions", "passed": False, "code": "MAX_POSITIONS"}]),
         bar_ts + timedelta(minutes=1))).fetchone()["id"]


def test_forward_returns_from_known_bars_and_a_missing_hour(conn):
    t0 = et("2026-11-30", "10:00")
    for minutes, close in ((0, "100"), (5, "101"), (15, "98.5")):  # no bar at 11:00
        add_bar(conn, "XYZ", t0 + timedelta(minutes=minutes), close)
    add_bar(conn, "XYZ", t0 + timedelta(minutes=16), "120")  # a neighbour of +15, never used for it
    add_bar(conn, "QQQ", t0, "50")
    add_bar(conn, "QQQ", t0 + timedelta(minutes=5), "49")
    bull = _signal(conn, "XYZ", t0, "BUY", "BULL")
    bear = _signal(conn, "QQQ", t0, "SELL", "BEAR")
    report = build_report(gather_report_inputs(conn, ACCOUNT, SESSION_DAY, SESSION_DAY))
    rows = {r["recommendation_id"]: r for r in report.signals["rows"]}
    fw = rows[bull]["forward"]
    assert fw["5"]["return"] == Decimal("0.01") and fw["5"]["hit"] is True
    assert fw["15"]["return"] == Decimal("-0.015") and fw["15"]["hit"] is False
    assert fw["60"] is None
    bear_fw = rows[bear]["forward"]
    assert bear_fw["5"]["return"] == Decimal("-0.02") and bear_fw["5"]["directional"] == Decimal("0.02")
    assert bear_fw["15"] is None and bear_fw["60"] is None
    assert (rows[bull]["rule"], rows[bear]["rule"]) == ("momentum_5m", "momentum_15m")
    overall = report.signals["overall"]["horizons"]
    assert (overall["5"]["n"], overall["5"]["hits"], overall["5"]["hit_rate"]) == (2, 2, Decimal("1.0000"))
    assert (overall["15"]["n"], overall["15"]["missing"]) == (1, 1)
    assert (overall["60"]["n"], overall["60"]["missing"], overall["60"]["mean_directional"]) == (0, 2, None)
    # Both were blocked by max_positions alone: at 5 minutes they would have made 1% + 2%.
    [gate] = report.gates["attribution"]
    assert (gate["gate"], gate["blocked"], gate["sole"], gate["codes"]) == ("max_positions", 2, 2, {"MAX_POSITIONS": 2})
    assert gate["horizons"]["5"]["sum_directional"] == Decimal("0.03") and gate["horizons"]["5"]["verdict"] == "cost"
    assert gate["horizons"]["15"]["verdict"] == "saved" and gate["horizons"]["60"]["verdict"] == "unknown"
    assert [p["version"] for p in report.params] == ["7"]


def _closed(pid: int, pnl: str, closed_at: datetime, fees: str = "1") -> dict:
    return {"id": pid, "ticker": "T", "instrument": "STOCK", "symbol": "T", "side": "long", "qty": Decimal(10),
            "multiplier": 1, "avg_price": Decimal("10"), "status": "CLOSED", "opened_at": closed_at - timedelta(minutes=5),
            "closed_at": closed_at, "close_price": Decimal("10") + (Decimal(pnl) + Decimal(fees)) / 10,
            "exit_reason": "STOP_LOSS", "fees": Decimal(fees), "realized_pnl": Decimal(pnl)}


def test_drawdown_profit_factor_and_days_from_known_trades():
    day1, day2 = et("2026-11-30", "10:00"), et("2026-12-01", "15:59")
    positions = [_closed(1, "50", day1), _closed(2, "-80", day1 + timedelta(minutes=1)),
                 _closed(3, "30", day2), _closed(4, "-10.5", day2 + timedelta(seconds=30))]
    report = build_report(ReportInputs(ACCOUNT, date(2026, 11, 30), date(2026, 12, 1), positions=positions))
    # The curve: 50, -30, 0, -10.5; the peak 50; the worst drawdown 50 - (-30) = 80.
    assert [p["cumulative_pnl"] for p in report.equity_curve] == [Decimal(50), Decimal(-30), Decimal(0), Decimal("-10.5")]
    assert report.totals["max_drawdown"] == Decimal(80)
    assert report.totals["profit_factor"] == (Decimal(80) / Decimal("90.5")).quantize(Decimal("0.0001"))
    assert report.totals["win_rate"] == Decimal("0.5000")
    assert [(d["day"], d["realized_pnl"]) for d in report.days] == [
        (date(2026, 11, 30), Decimal(-30)), (date(2026, 12, 1), Decimal("19.5"))]
    # 15:59 ET on 2026-12-01 is 20:59 UTC: the same ET day, never the next UTC one.
    assert report.days[-1]["trades"] == 2


def test_a_trade_closed_outside_the_period_is_not_in_it_and_no_loss_leaves_the_profit_factor_undefined():
    positions = [_closed(1, "5", et("2026-11-30", "10:00")), _closed(2, "-5", et("2026-11-27", "10:00"))]
    trades = trade_rows(positions, date(2026, 11, 30), date(2026, 11, 30))
    assert [t["position_id"] for t in trades] == [1]
    report = build_report(ReportInputs(ACCOUNT, date(2026, 11, 30), date(2026, 11, 30), positions=positions))
    assert report.totals["profit_factor"] is None
    assert any("no losing trade" in m for m in report.missing)
    assert equity_curve(trades)[1] == 0


def test_slippage_is_a_cost_for_a_sale_below_the_mid():
    [row] = execution_rows([{"id": 1, "recommendation_id": 1, "role": "EXIT", "ticker": "SPY", "instrument": "OPTION",
                             "symbol": "SPY261204C00600000", "side": "sell", "qty": 2, "filled_qty": Decimal(2),
                             "multiplier": 100, "est_price": Decimal("3.00"), "filled_avg_price": Decimal("3.05"),
                             "quote": {"bid": "3.10", "ask": "3.30"}, "filled_at": et("2026-11-30", "10:00")}])
    # Mid 3.20; sold at 3.05: 0.15 a share below it, 30.00 on two contracts; half spread 0.10 -> 20.00.
    assert (row["mid"], row["slippage_per_unit"], row["slippage_cost"]) == (Decimal("3.20"), Decimal("0.15"), Decimal("30.00"))
    assert (row["half_spread"], row["spread_cost"]) == (Decimal("0.10"), Decimal("20.00"))
