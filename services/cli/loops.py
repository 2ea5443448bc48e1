"""The services' subcommands: each starts one loop (or the demo) with its arguments."""

from __future__ import annotations

from services import demo, ingest, replay, watchdog
from services.dispatcher import main as dispatcher
from services.feature_computer import main as feature_computer
from services.news import main as news
from services.position_manager import main as position_manager
from services.signal_engine import main as signal_engine
from services.watchlist_engine import main as watchlist_engine


def _loop(subparsers, name: str, summary: str, handler, *, interval: float, unit: str = "cycle",
          account: bool = False, tickers: str | None = None):
    """A loop's subcommand: --once, --interval, and the account (--account) or tickers (--tickers) it serves.

    `unit` names one pass in the help: cycle, fetch, check."""
    p = subparsers.add_parser(name, help=summary)
    p.add_argument("--once", action="store_true", help=f"run one {unit} and exit")
    if account:
        p.add_argument("--account", help="account id (default: ACCOUNT_ID)")
    if tickers:
        p.add_argument("--tickers", help=f"comma-separated tickers (default: {tickers})")
    plural = unit + ("es" if unit.endswith("h") else "s")
    p.add_argument("--interval", type=float, default=interval, help=f"seconds between {plural} (default %(default)s)")
    p.set_defaults(handler=handler)
    return p


def register_dispatcher(subparsers) -> None:
    p = subparsers.add_parser("dispatcher", help="decide and execute pending recommendations")
    p.add_argument("--once", action="store_true", help="decide what is pending, then exit")
    p.set_defaults(handler=lambda args: dispatcher.run_dispatcher(once=args.once))


def register_position_manager(subparsers) -> None:
    _loop(subparsers, "position-manager", "mark open positions and write EXITs by the exit rules",
          position_manager.run_command, interval=60.0, account=True)


def register_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run a simulated trading session on the embedded Postgres")
    p.add_argument("--date", default=demo.DEMO_DAY.isoformat(), help="the sell-off session (YYYY-MM-DD); the calm day is the session before it")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--verbose", action="store_true", help="also print the JSON decision log")
    p.set_defaults(handler=demo.cmd_demo)


def register_replay(subparsers) -> None:
    p = subparsers.add_parser("replay", help="run recorded bars (or CSV files) through the pipeline, minute by minute")
    p.add_argument("--from", dest="date_from", help="first session (YYYY-MM-DD) of the recorded bars")
    p.add_argument("--to", dest="date_to", help="last session (YYYY-MM-DD), included")
    p.add_argument("--tickers", help="comma-separated tickers (default: every ticker with bars)")
    p.add_argument("--csv", nargs="+", metavar="PATH", help="CSV files or folders instead of the recorded bars")
    p.add_argument("--tz", default="America/New_York", help="zone of the CSV's naive times")
    p.add_argument("--params", help="a params file (default: config/trading_params.json)")
    p.add_argument("--compare", metavar="B.json", help="replay again with this params file and print both side by side")
    p.add_argument("--seed", type=int, default=7, help="the simulated option market's seed")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    p.add_argument("--workers", type=int, default=2, choices=(1, 2),
                   help="2 (default): a second process reads the watchlist's option liquidity ahead; 1: one process")
    p.add_argument("--verbose", action="store_true", help="also print the JSON decision log")
    p.set_defaults(handler=replay.cmd_replay)


def register_signal_engine(subparsers) -> None:
    _loop(subparsers, "signal-engine", "turn features and sentiment into recommendations",
          signal_engine.run_command, interval=5.0, account=True)


def register_feature_computer(subparsers) -> None:
    _loop(subparsers, "feature-computer", "compute lane_features from lane_telemetry",
          feature_computer.run_command, interval=feature_computer.DEFAULT_INTERVAL_SECONDS)


def register_watchlist_engine(subparsers) -> None:
    _loop(subparsers, "watchlist-engine", "score tickers and select the account's watchlist",
          watchlist_engine.run_command, interval=300.0, account=True)


def register_ingest(subparsers) -> None:
    p = subparsers.add_parser("load-csv", help="load CSV files of 1-minute bars into lane_telemetry")
    p.add_argument("files", nargs="+", metavar="PATH", help="CSV files (.csv or .csv.gz) or folders of them")
    p.add_argument("--ticker", help="the ticker of a single file (default: its name up to the first '_')")
    p.add_argument("--tz", default="America/New_York",
                   help="zone of naive times (default America/New_York); ISO offsets and epoch times ignore it")
    p.add_argument("--skip-bad", action="store_true",
                   help="load a file's good rows and skip its malformed ones (each reported by line)")
    p.set_defaults(handler=ingest.load_csv_command)

    _loop(subparsers, "telemetry", "fetch 1-minute bars from Alpaca into lane_telemetry", ingest.telemetry_command,
          interval=15.0, unit="fetch", tickers="every selected watchlist ticker")


def register_news(subparsers) -> None:
    _loop(subparsers, "news", "score Alpaca news articles into the sentiment table", news.run_command,
          interval=60.0, unit="fetch", tickers="the watchlists' candidates")


def register_watchdog(subparsers) -> None:
    _loop(subparsers, "watchdog", "alert when watched tickers' bars go stale during the session", watchdog.run_command,
          interval=watchdog.DEFAULT_INTERVAL_SECONDS, unit="check", account=True)
