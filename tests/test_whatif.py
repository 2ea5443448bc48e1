"""params whatif: recorded decisions made again, on their stored inputs, with a candidate document."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from services.adapters.option_data import OptionData
from services.adapters.sim.broker import SimBroker
from services.adapters.sim.market import SimOptionMarket
from services.common.clock import FixedClock
from services.common.db import make_pool
from services.common.market_calendar import nyse_calendar
from services.common.params import as_params
from services.dispatcher.main import Dispatcher
from services.domain.whatif import whatif
from services.adapters.postgres.whatif_data import decisions_with_inputs
from tests.factories import ACCOUNT, add_bar, add_market, add_recommendation, et, pinned_params, recommendation

NOW = et("2026-11-30", "10:00")
LIMITS = {"risk": {"max_open_positions": 5, "max_notional_exposure": 100_000, "max_notional_per_trade": 2_000}}
TICKERS = ["WA", "WB", "WC", "WD", "WE", "WF", "WG"]


@pytest.fixture
def recorded(db_url, conn):
    """Seven entries for seven tickers under a limit of 5 positions: five taken, two denied."""
    clock = FixedClock(NOW)
    pool = make_pool(db_url)
    d = Dispatcher(pool, SimBroker(pool, ACCOUNT, clock), pinned_params(LIMITS), ACCOUNT, clock=clock)
    recs = []
    for i, t in enumerate(TICKERS):
        add_market(conn, t, NOW, 100)
        recs.append(add_recommendation(conn, t, NOW - timedelta(seconds=60 - i)))
    d.refresh_account(force=True)
    d.drain()
    for t in TICKERS:  # the bars after: +1% five minutes on, +2% fifteen on
        add_bar(conn, t, NOW - timedelta(minutes=1) + timedelta(minutes=5), 101)
        add_bar(conn, t, NOW - timedelta(minutes=1) + timedelta(minutes=15), 102)
    yield recs
    pool.close()


def test_every_decision_stores_the_inputs_it_was_made_from(recorded, conn):
    for rec_id in recorded:
        inputs = recommendation(conn, rec_id)["inputs"]
        assert inputs["version"] == 1 and inputs["recommendation"]["id"] == rec_id
        assert Decimal(inputs["bar"]["close"]) == Decimal("100")
    taken = [recommendation(conn, r)["inputs"] for r in recorded[:5]]
    # The counts read again under the account lock, before each order: what the limit was checked on.
    assert [t["capacity"]["open_positions"] for t in taken] == [0, 1, 2, 3, 4]


def test_tightening_max_positions_flips_exactly_the_entries_taken_with_three_or_more_open(recorded, conn):
    statuses = [recommendation(conn, r)["status"] for r in recorded]
    assert statuses == ["EXECUTED"] * 5 + ["SKIPPED"] * 2
    rows = decisions_with_inputs(conn, ACCOUNT, NOW - timedelta(days=1), (5, 15, 60))
    candidate = as_params({**LIMITS, "risk": {**LIMITS["risk"], "max_open_positions": 3}})
    result = whatif(rows, candidate, nyse_calendar(), (5, 15, 60))
    assert (result["decisions"], result["unchanged"], result["flipped"]) == (7, 5, 2)
    assert result["by_kind"] == {"TAKEN -> DENIED by MAX_POSITIONS": 2}
    assert [f.recommendation_id for f in result["flips"]] == recorded[3:5]
    assert result["flips"][0].forward == {"5m": Decimal("0.01"), "15m": Decimal("0.02"), "60m": None}

    same = whatif(rows, as_params(LIMITS), nyse_calendar(), (5, 15, 60))
    assert (same["flipped"], same["unchanged"]) == (0, 7)  # the recorded params decide as recorded


def test_the_whatif_command_prints_the_flips_and_says_the_path_is_not_re_run(recorded, db_url, tmp_path,
                                                                               monkeypatch, capsys):
    from services.cli import main

    doc = json.loads((Path(__file__).parents[1] / "config" / "trading_params.json").read_text())
    doc["risk"].update({"max_open_positions": 3, "max_notional_exposure": 100_000, "max_notional_per_trade": 2_000})
    candidate = tmp_path / "tight.json"
    candidate.write_text(json.dumps(doc))
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("ACCOUNT_ID", ACCOUNT)
    assert main(["params", "whatif", str(candidate), "--since", "2026-11-29"]) == 0
    out = capsys.readouterr().out
    assert "TAKEN -> DENIED by MAX_POSITIONS" in out and "replay" in out and "--compare" in out


def test_an_option_entry_denied_before_its_chain_was_fetched_is_undetermined_where_the_candidate_passes_the_gate(
        db_url, conn):
    """A low-confidence option entry is denied without spending a chain request; a candidate
    that accepts its confidence cannot know which contract it would have chosen, and says so."""
    clock = FixedClock(NOW)
    pool = make_pool(db_url)
    fetched = []
    market = SimOptionMarket(pool)

    def chain(ticker, spot, now, window):
        fetched.append(ticker)
        return market.chain(ticker, spot, now, window)

    strict = {"confidence": {"min_confidence_day_trade": 0.9}}
    d = Dispatcher(pool, SimBroker(pool, ACCOUNT, clock), pinned_params(strict), ACCOUNT, clock=clock,
                   option_data=OptionData(chain))
    add_market(conn, "WA", NOW, 100)
    add_market(conn, "WB", NOW, 100)
    low = add_recommendation(conn, "WA", NOW - timedelta(seconds=30), instrument="OPTION", confidence=0.7)
    high = add_recommendation(conn, "WB", NOW - timedelta(seconds=20), instrument="OPTION", confidence=0.95)
    d.refresh_account(force=True)
    d.drain()
    pool.close()

    assert recommendation(conn, low)["outcome_code"] == "LOW_CONFIDENCE"
    assert recommendation(conn, high)["status"] in ("EXECUTED", "SUBMITTING")
    assert fetched == ["WB"]  # only the chain of the entry that got past the gates
    assert recommendation(conn, low)["inputs"]["option_inputs"]["not_fetched"] is True

    rows = [r for r in decisions_with_inputs(conn, ACCOUNT, NOW - timedelta(days=1), (5,)) if r["id"] == low]
    same = whatif(rows, as_params(strict), nyse_calendar(), (5,))
    assert (same["flipped"], same["undetermined"]) == (0, 0)
    loose = whatif(rows, as_params({"confidence": {"min_confidence_day_trade": 0.5}}), nyse_calendar(), (5,))
    assert (loose["flipped"], loose["undetermined"]) == (1, 1)
    assert loose["by_kind"] == {"DENIED by LOW_CONFIDENCE -> UNDETERMINED (no chain was fetched for it)": 1}
