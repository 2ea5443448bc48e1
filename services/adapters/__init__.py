"""The edges: the Alpaca SDK, Postgres, the simulated broker and market, the params sources.

Adapters translate between the outside world and the domain's types; decisions are not made here.
"""
