"""Migrations: numbered SQL applied in order, each once, each in a transaction, tracked with a
checksum; failures roll back and exit non-zero; the schema keeps one NOT NULL account key."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from services.common.migrate import MIGRATIONS_DIR, MigrationError, discover, migrate

REPO = Path(__file__).resolve().parents[1]
ACCOUNT_SCOPED = {
    "dispatch_recommendations",
    "dispatch_executions",
    "active_positions",
    "account_state",
    "kill_switch",
    "kill_switch_history",
}


def real_migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("*.sql"), key=lambda p: int(p.name.split("_", 1)[0]))


@pytest.fixture
def migrations_copy(tmp_path) -> Path:
    """A private copy of migrations/ that a test may edit or extend."""
    target = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, target)
    return target


def next_name(directory: Path, description: str) -> str:
    """The file name of the next migration after those in `directory` (numbering has no gaps)."""
    last = max(int(p.name.split("_", 1)[0]) for p in directory.glob("*.sql"))
    return f"{last + 1:03d}_{description}.sql"


def write(directory: Path, name: str, sql: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(sql)
    return path


def query(url: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def execute(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def recorded(url: str) -> list[tuple]:
    return query(url, "SELECT version, name, checksum FROM schema_migrations ORDER BY version")


def table_exists(url: str, name: str) -> bool:
    return query(url, "SELECT to_regclass(%s) IS NOT NULL", (f"public.{name}",))[0][0]


def test_applies_all_migrations_in_order_and_records_their_checksums(empty_db_url, migrations_copy):
    files = real_migration_files()
    applied = migrate(empty_db_url, migrations_copy)
    assert applied == [p.name for p in files]
    assert recorded(empty_db_url) == [
        (int(p.name.split("_", 1)[0]), p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files
    ]
    assert table_exists(empty_db_url, "dispatch_recommendations")


def test_a_second_run_applies_nothing(empty_db_url, migrations_copy):
    migrate(empty_db_url, migrations_copy)
    before = query(empty_db_url, "SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert migrate(empty_db_url, migrations_copy) == []
    assert query(empty_db_url, "SELECT version, applied_at FROM schema_migrations ORDER BY version") == before


def test_a_new_migration_is_applied_alone_after_the_others(empty_db_url, migrations_copy):
    migrate(empty_db_url, migrations_copy)
    name = next_name(migrations_copy, "extra")
    write(migrations_copy, name, "CREATE TABLE extra_t (id int NOT NULL);")
    assert migrate(empty_db_url, migrations_copy) == [name]
    assert table_exists(empty_db_url, "extra_t")


def test_an_edited_applied_migration_raises_and_names_the_file(empty_db_url, migrations_copy):
    migrate(empty_db_url, migrations_copy)
    first = real_migration_files()[0].name
    edited = migrations_copy / first
    edited.write_text(edited.read_text() + "\n-- a later edit\n")
    write(migrations_copy, next_name(migrations_copy, "pending"), "CREATE TABLE pending_t (id int);")
    with pytest.raises(MigrationError, match=first) as info:
        migrate(empty_db_url, migrations_copy)
    assert "edited" in str(info.value)
    assert not table_exists(empty_db_url, "pending_t")


def test_a_failing_migration_is_rolled_back_not_recorded_and_raises(empty_db_url, migrations_copy):
    broken = next_name(migrations_copy, "broken")
    write(
        migrations_copy,
        broken,
        "CREATE TABLE half_done (id int);\nINSERT INTO half_done VALUES (1);\nINSERT INTO no_such_table VALUES (1);\n",
    )
    with pytest.raises(MigrationError, match=broken):
        migrate(empty_db_url, migrations_copy)
    assert not table_exists(empty_db_url, "half_done")
    versions = [r[0] for r in recorded(empty_db_url)]
    assert versions == [int(p.name.split("_", 1)[0]) for p in real_migration_files()]
    # The lock was released and a fixed file goes through on the next run.
    write(migrations_copy, broken, "CREATE TABLE half_done (id int);\n")
    assert migrate(empty_db_url, migrations_copy) == [broken]
    assert table_exists(empty_db_url, "half_done")


def test_a_failure_stops_the_run_before_later_migrations(empty_db_url, tmp_path):
    d = tmp_path / "m"
    write(d, "001_ok.sql", "CREATE TABLE ok_t (id int);")
    write(d, "002_bad.sql", "CREATE TABLE bad_t (id int); SELECT 1/0;")
    write(d, "003_later.sql", "CREATE TABLE later_t (id int);")
    with pytest.raises(MigrationError, match="002_bad.sql"):
        migrate(empty_db_url, d)
    assert [r[1] for r in recorded(empty_db_url)] == ["001_ok.sql"]
    assert (table_exists(empty_db_url, "ok_t"), table_exists(empty_db_url, "bad_t"), table_exists(empty_db_url, "later_t")) == (
        True, False, False,
    )


def test_two_concurrent_runs_apply_each_file_once(empty_db_url, tmp_path):
    d = tmp_path / "m"
    # Plain CREATE TABLE fails if run twice; the sleep keeps the first run inside its lock
    # while the others arrive.
    write(d, "001_slow.sql", "SELECT pg_sleep(0.2);\nCREATE TABLE slow_t (id int);")
    write(d, "002_next.sql", "CREATE TABLE next_t (id int);")
    write(d, "003_counter.sql", "CREATE TABLE applied_count (n int);\nINSERT INTO applied_count VALUES (1);")
    workers = 4
    barrier = threading.Barrier(workers)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run():
        barrier.wait()
        try:
            results.append(migrate(empty_db_url, d))
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert sorted(name for r in results for name in r) == ["001_slow.sql", "002_next.sql", "003_counter.sql"]
    assert sorted(len(r) for r in results) == [0] * (workers - 1) + [3]
    assert query(empty_db_url, "SELECT count(*) FROM applied_count")[0][0] == 1
    assert len(recorded(empty_db_url)) == 3


def test_a_database_with_unknown_migrations_raises(empty_db_url, tmp_path):
    d = tmp_path / "m"
    write(d, "001_a.sql", "CREATE TABLE a_t (id int);")
    write(d, "002_b.sql", "CREATE TABLE b_t (id int);")
    migrate(empty_db_url, d)
    (d / "002_b.sql").unlink()
    with pytest.raises(MigrationError, match="does not know"):
        migrate(empty_db_url, d)


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(["001_a.sql", "0001_b.sql"], id="duplicate-version"),
        pytest.param(["1_a.sql"], id="short-number"),
        pytest.param(["001-a.sql"], id="dash"),
        pytest.param(["001_Add.sql"], id="uppercase"),
        pytest.param(
            ["001_a.sql", "003_c.sql"],
            id="gap-in-numbering",
        ),
    ],
)
def test_badly_numbered_files_are_refused_before_touching_the_database(tmp_path, names):
    d = tmp_path / "m"
    for name in names:
        write(d, name, "SELECT 1;")
    with pytest.raises(MigrationError):
        discover(d)


def test_an_unreachable_database_raises_migration_error(tmp_path):
    with pytest.raises(MigrationError, match="cannot connect"):
        migrate(f"postgresql:///nope?host={tmp_path}", tmp_path)


def test_real_migrations_are_numbered_without_gaps_or_duplicates():
    versions = [m.version for m in discover()]
    assert versions == list(range(1, len(versions) + 1))


def test_every_account_scoped_table_has_a_not_null_account_id(empty_db_url):
    migrate(empty_db_url)  # the real migrations/ directory
    rows = query(
        empty_db_url,
        """SELECT c.table_name, c.is_nullable
           FROM information_schema.columns c
           JOIN information_schema.tables t
             ON t.table_schema = c.table_schema AND t.table_name = c.table_name
           WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' AND c.column_name = 'account_id'
           ORDER BY c.table_name""",
    )
    nullable = {table: flag for table, flag in rows}
    assert ACCOUNT_SCOPED <= set(nullable), f"missing account_id in {sorted(ACCOUNT_SCOPED - set(nullable))}"
    assert {t: f for t, f in nullable.items() if f != "NO"} == {}


def test_no_table_uses_another_name_for_the_account_key(empty_db_url):
    """One key name everywhere: the old system's two names hid positions from the limits."""
    migrate(empty_db_url)
    rows = query(
        empty_db_url,
        r"""SELECT table_name, column_name FROM information_schema.columns
            WHERE table_schema = 'public'
              AND column_name ~ '(^|_)(account|acct)(_|$)' AND column_name <> 'account_id'
            ORDER BY 1, 2""",
    )
    assert rows == []


def test_timestamps_are_timestamptz(empty_db_url):
    migrate(empty_db_url)
    rows = query(
        empty_db_url,
        """SELECT table_name, column_name FROM information_schema.columns
           WHERE table_schema = 'public' AND data_type = 'timestamp without time zone'""",
    )
    assert rows == []


def _cli() -> list[str]:
    # The CLI of the tree under test (cwd=REPO), not whichever checkout the venv's console
    # script was installed from.
    return [sys.executable, "-m", "services.cli"]


def _admin_cli_present() -> bool:
    return (REPO / "services" / "cli" / "admin.py").exists()


@pytest.mark.skipif(not _admin_cli_present(), reason="services/cli/admin.py (the migrate command) is not in this build")
def test_cli_migrate_exits_non_zero_on_a_failing_migration(empty_db_url):
    # A table already named like one in 001 makes 001's CREATE TABLE fail.
    execute(empty_db_url, "CREATE TABLE lane_telemetry (squatter int)")
    env = {**os.environ, "DATABASE_URL": empty_db_url}
    proc = subprocess.run([*_cli(), "migrate"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "001_" in proc.stderr
    assert not table_exists(empty_db_url, "dispatch_recommendations")


@pytest.mark.skipif(not _admin_cli_present(), reason="services/cli/admin.py (the migrate command) is not in this build")
def test_cli_migrate_exits_zero_and_builds_the_schema(empty_db_url):
    env = {**os.environ, "DATABASE_URL": empty_db_url}
    proc = subprocess.run([*_cli(), "migrate"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(recorded(empty_db_url)) == len(real_migration_files())


def test_exit_order_working_when_the_lifecycle_migration_runs_is_tied_to_the_position_it_closes(
        empty_db_url, migrations_copy):
    """A database in use at the upgrade: a filled entry with its OPEN position, a rejected entry,
    and an exit order still working on a CLOSING position. 008-011 apply, and the working exit's
    later fill closes its position (it used to find no position_id and leave it CLOSING for good)."""
    from datetime import datetime, timezone
    from decimal import Decimal

    from services.adapters.postgres import orders_repo
    from services.domain.lifecycle import Event

    for path in migrations_copy.glob("*.sql"):
        if int(path.name.split("_", 1)[0]) >= 8:
            path.unlink()
    migrate(empty_db_url, migrations_copy)
    t = datetime(2026, 11, 30, 15, 0, tzinfo=timezone.utc)
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        def rec(ticker, action, status):
            return c.execute(
                """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, confidence,
                                                         created_at, status)
                   VALUES ('acct', %s, %s, 'STOCK', 'day_trade', 0.9, %s, %s) RETURNING id""",
                (ticker, action, t, status)).fetchone()[0]

        def execution(rec_id, ticker, side, status, filled):
            return c.execute(
                """INSERT INTO dispatch_executions (account_id, recommendation_id, client_order_id, ticker, instrument,
                                                    symbol, side, qty, est_price, status, filled_qty, filled_avg_price,
                                                    submitted_at, updated_at)
                   VALUES ('acct', %s, %s, %s, 'STOCK', %s, %s, 10, 100, %s, %s, %s, %s, %s) RETURNING id""",
                (rec_id, f"cid-{rec_id}", ticker, ticker, side, status, filled, 100 if filled else None, t, t)
            ).fetchone()[0]

        def position(rec_id, exec_id, ticker, status):
            c.execute(
                """INSERT INTO active_positions (account_id, ticker, instrument, symbol, side, qty, avg_price, status,
                                                 recommendation_id, execution_id, opened_at)
                   VALUES ('acct', %s, 'STOCK', %s, 'long', 10, 100, %s, %s, %s, %s)""",
                (ticker, ticker, status, rec_id, exec_id, t))

        r = rec("MSFT", "BUY", "EXECUTED")
        position(r, execution(r, "MSFT", "buy", "FILLED", 10), "MSFT", "OPEN")
        r = rec("NVDA", "BUY", "REJECTED")
        position(r, execution(r, "NVDA", "buy", "REJECTED", None), "NVDA", "CANCELLED")
        r = rec("AAPL", "BUY", "EXECUTED")
        position(r, execution(r, "AAPL", "buy", "FILLED", 10), "AAPL", "CLOSING")
        exit_rec = rec("AAPL", "EXIT", "SUBMITTING")
        execution(exit_rec, "AAPL", "sell", "ACCEPTED", None)

    migrate(empty_db_url, MIGRATIONS_DIR)

    with psycopg.connect(empty_db_url, row_factory=psycopg.rows.dict_row) as c:
        with c.transaction():
            orders_repo.apply_event(c, "acct", f"cid-{exit_rec}", Event.report("filled", Decimal(10)),
                                    orders_repo.BrokerFacts(filled_avg_price=Decimal(101)), t)
        rows = c.execute("SELECT ticker, status FROM active_positions ORDER BY ticker").fetchall()
        assert [(p["ticker"], p["status"]) for p in rows] == [("AAPL", "CLOSED"), ("MSFT", "OPEN"),
                                                               ("NVDA", "CANCELLED")]
        assert c.execute("SELECT status FROM dispatch_recommendations WHERE id = %s",
                         (exit_rec,)).fetchone()["status"] == "EXECUTED"
