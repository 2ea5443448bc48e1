"""Postgres repositories and their named SQL: orders and positions, the kill switch, the request
budget, IV history, the status report."""
