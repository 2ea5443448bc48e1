"""The simulated paper broker, market and option chain that stand in for Alpaca offline."""
