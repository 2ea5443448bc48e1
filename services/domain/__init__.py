"""Pure decision logic: no I/O, no SDK, no driver. `now` and every input are passed in.

The seed's pure modules keep their paths and belong to this layer too (see pyproject.toml's
layers contract): `services/dispatcher/risk/gates.py`, `services/dispatcher/alpaca/options.py`,
`services/signal_engine/rules.py`, `services/watchlist_engine/scoring.py`.
"""
