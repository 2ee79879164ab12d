"""How the cycle treats Horos's Database.sql: read-only, briefly, and never stale."""

import datetime as dt
import os
import sqlite3
import time

from conftest import backup_root, file_digest, run_cycle, state_rows, zips_on_disk
from fake_horos import FakeHorosLibrary, build_sample_library
from horos_writer import start_writer, stop_writer


def many_studies(lib, count):
    for i in range(count):
        lib.add_simple_study("1.2.40.%d" % i, "CT" if i % 2 else "MR", images=4, size=20000,
                             study_date=dt.datetime(2016, 1, 1) + dt.timedelta(days=i))
    lib.finish()


def test_horos_committing_every_few_ms_never_sees_database_is_locked(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    many_studies(lib, 45)
    lib.close()
    # Core Data waits on a busy store; 1 s is far shorter than its wait and far longer
    # than any read transaction of the cycle should ever be. A commit every 3 ms.
    proc, stop = start_writer(lib.db_path, tmp_path, timeout=1.0, interval=0.003)
    try:
        for extra in ([], [], ["--use-db-copy"], ["--use-db-copy"]):
            result = run_cycle(lib, *extra)
            assert result.returncode == 0, result.stderr
    finally:
        commits, locked, _worst, out = stop_writer(proc, stop)
    assert locked == 0, out
    assert commits > 50  # it really was committing throughout the cycles
    assert len(state_rows(backup_root(lib))) == 45


def test_database_bytes_unchanged_and_no_journal_left(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    lib.close()
    before = file_digest(lib.db_path)
    mtime = os.stat(lib.db_path).st_mtime_ns
    for extra in ([], ["--use-db-copy"]):
        assert run_cycle(lib, *extra).returncode == 0
    assert file_digest(lib.db_path) == before
    assert os.stat(lib.db_path).st_mtime_ns == mtime
    assert sorted(os.listdir(lib.horos_data)) == sorted(
        ["Database.sql", "DATABASE.noindex", "INCOMING.noindex", "REPORTS", "TEMP.noindex",
         "DECOMPRESSION.noindex", "TOBEINDEXED.noindex"])


def test_db_copy_is_refreshed_whenever_the_source_changed(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    lib.add_simple_study("1.2.50.1", "CT", images=1, study_date=dt.datetime(2018, 1, 1))
    lib.finish()
    copy = os.path.join(backup_root(lib), ".tmp", "dbcopy", "Database_copy.sql")
    assert run_cycle(lib, "--use-db-copy").returncode == 0
    assert os.path.isfile(copy)
    first = os.stat(copy).st_mtime_ns
    assert run_cycle(lib, "--use-db-copy").returncode == 0
    assert os.stat(copy).st_mtime_ns == first  # source unchanged: the copy is reused
    # Horos commits a new study, keeping the file size (same pages) is not enough to hide it.
    lib.add_simple_study("1.2.50.2", "MR", images=1, study_date=dt.datetime(2018, 1, 2))
    lib.finish()
    result = run_cycle(lib, "--use-db-copy")
    assert result.returncode == 0
    assert os.stat(copy).st_mtime_ns != first
    assert {r["study_uid"] for r in state_rows(backup_root(lib))} == {"1.2.50.1", "1.2.50.2"}
    lib.close()


def test_database_locked_past_the_busy_timeout_is_try_again_later(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    lib.close()
    holder = sqlite3.connect(lib.db_path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        result = run_cycle(lib, "--busy-timeout", "0.5")
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "try again later" in result.stderr
    assert waited >= 0.5
    assert zips_on_disk(backup_root(lib)) == {}
    assert state_rows(backup_root(lib)) == []
    assert run_cycle(lib).returncode == 0
