def test_template_database_has_core_tables(conn):
    tables = {r["table_name"] for r in conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert {"lane_telemetry", "lane_features", "dispatch_recommendations", "dispatch_executions",
            "active_positions", "kill_switch", "kill_switch_history", "account_state"} <= tables
