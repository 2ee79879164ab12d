"""Horos never waits: every read of Database.sql is a short transaction of its own.

Horos keeps Database.sql in rollback-journal mode and cannot commit while a reader holds
a transaction; its commits give up after a busy timeout. These tests use real sqlite3
writers (a second connection, a second process), never mocks.
"""

import datetime as dt
import os
import sqlite3
import subprocess
import sys
import time

import horos_backup_export as hbe
from conftest import backup_root, run_cycle, state_rows
from fake_horos import ENTITIES, SCHEMA, FakeHorosLibrary, local_to_coredata
from horos_writer import start_writer, stop_writer

def build_wide_library(pacs_root, studies):
    """A database-only library in Horos's schema, built at once with executemany:
    `studies` studies of 5 series, one image row each (no files)."""
    horos = os.path.join(pacs_root, "Database", "Horos Data")
    os.makedirs(os.path.join(horos, "INCOMING.noindex"))
    open(os.path.join(pacs_root, ".pacs_sentinel"), "w").close()
    db = os.path.join(horos, "Database.sql")
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA)
    added = local_to_coredata(dt.datetime(2024, 1, 1))
    conn.executemany(
        "INSERT INTO ZSTUDY (Z_PK, Z_ENT, Z_OPT, ZSTUDYINSTANCEUID, ZNAME, ZPATIENTID, ZDATE, "
        "ZDATEADDED, ZMODALITY, ZACCESSIONNUMBER, ZSTUDYNAME, ZNUMBEROFIMAGES) "
        "VALUES (?, 5, 1, ?, ?, ?, ?, ?, ?, 'ACC', 'S', 5)",
        [(pk, "1.2.77.%d" % pk, "PAT^%d" % pk, "ID%d" % pk,
          local_to_coredata(dt.datetime(2010, 1, 1) + dt.timedelta(hours=pk)), added,
          "CT" if pk % 2 else "MR") for pk in range(1, studies + 1)])
    conn.executemany(
        "INSERT INTO ZSERIES (Z_PK, Z_ENT, Z_OPT, ZSTUDY, ZMODALITY, ZID, ZSERIESINSTANCEUID, "
        "ZSERIESDESCRIPTION, ZNUMBEROFIMAGES) VALUES (?, 4, 1, ?, 'CT', ?, ?, 'x', 1)",
        [(pk, 1 + (pk - 1) // 5, pk % 5, "1.2.77.0.%d" % pk)
         for pk in range(1, studies * 5 + 1)])
    conn.executemany(
        "INSERT INTO ZIMAGE (Z_PK, Z_ENT, Z_OPT, ZSERIES, ZPATHNUMBER, ZINSTANCENUMBER) "
        "VALUES (?, 2, 1, ?, ?, 1)", [(pk, pk, pk) for pk in range(1, studies * 5 + 1)])
    conn.executemany("INSERT INTO Z_PRIMARYKEY (Z_ENT, Z_NAME, Z_SUPER, Z_MAX) "
                     "VALUES (?, ?, 0, 0)", [(e, n) for n, e in ENTITIES.items()])
    conn.commit()
    conn.execute("PRAGMA journal_mode = DELETE")   # Horos's rollback journal
    conn.close()
    return db


def test_a_horos_like_writer_loses_no_commit_during_a_cycle_a_status_or_a_dry_run(
        tmp_path):
    pacs = str(tmp_path / "PACS")
    db = build_wide_library(pacs, 20000)
    proc, stop = start_writer(db, tmp_path, timeout=0.1)
    results = {}
    try:
        for name, args in (("cycle", ["--min-free-gb", "0"]),
                           ("status", ["status", "--json"]),
                           ("dry run", ["--dry-run", "--horos-chunk-rows", "700"])):
            results[name] = subprocess.run(
                [sys.executable, hbe.__file__, "--pacs-root", pacs, "--clinic-hours", "00-24"]
                + args, capture_output=True, text=True, timeout=300)
            assert results[name].returncode == 0, results[name].stderr
    finally:
        commits, locked, _worst, out = stop_writer(proc, stop)
    assert locked == 0, out
    assert commits > 20, out          # it was committing all along
    runs = state_rows(os.path.join(pacs, "Backup"), "SELECT * FROM runs")
    assert len(runs) == 1
    # The cycle read 20,000 studies in chunks: 10 of the scan, and more for its plans.
    assert runs[0]["horos_transactions"] >= 20000 // hbe.HOROS_CHUNK_ROWS
    assert 0 < runs[0]["horos_longest_seconds"] <= runs[0]["horos_seconds"]
    assert "ready to export" in results["dry run"].stdout


def add_uid_study(lib, uid, pk_hint, series=1):
    pk = lib.add_study(uid, patient="ROW^%d" % pk_hint, patient_id="P%d" % pk_hint,
                       study_date=dt.datetime(2019, 1, pk_hint))
    for number in range(1, series + 1):
        se = lib.add_series(pk, "CT", "s", number)
        lib.add_image(se, size=100)
    return pk


def test_horos_commits_between_two_chunks_of_the_scan(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    # One StudyInstanceUID on two ZSTUDY rows (pks 1 and 5) that fall in different
    # chunks of 2 rows; studies 2-4 and 6 in between.
    pks = [add_uid_study(lib, "1.2.88.1", 1)]
    pks += [add_uid_study(lib, "1.2.88.%d" % i, i) for i in (2, 3, 4)]
    pks.append(add_uid_study(lib, "1.2.88.1", 5))
    pks.append(add_uid_study(lib, "1.2.88.6", 6))
    lib.finish()
    assert pks == [1, 2, 3, 4, 5, 6]
    times = hbe.ReadTimes()
    rows = []
    with hbe.open_horos_reader(lib.db_path, 5.0, chunk_rows=2, times=times) as reader:
        chunks = reader.candidate_chunks()
        rows += next(chunks)                      # pks 1 and 2
        # Horos commits now, between two chunks, from its own connection. A read
        # transaction held across chunks would make this commit fail at once.
        lib.conn.execute("PRAGMA busy_timeout = 0")
        lib.add_series(1, "CT", "late series", 9)          # already read: seen next cycle
        lib.add_series(6, "MR", "late series", 9)          # not read yet: seen now
        lib.conn.execute("UPDATE ZSTUDY SET ZNAME = 'RENAMED^3' WHERE Z_PK = 3")
        lib.conn.commit()
        for chunk in chunks:
            rows += chunk
        studies = hbe.group_candidates(rows)
        fresh = {s.uid: s for s in hbe.read_candidates(reader)}
    assert [row["pk"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert times.transactions == 1 + 4 + 4     # columns; 3 full chunks and the empty end
    seen = {s.uid: s for s in studies}
    assert sorted(seen) == ["1.2.88.1", "1.2.88.2", "1.2.88.3", "1.2.88.4", "1.2.88.6"]
    assert seen["1.2.88.1"].pks == (1, 5)        # one study across two chunks
    # Read after the commit: what this scan saw is what Horos holds now.
    assert seen["1.2.88.3"].fingerprint == fresh["1.2.88.3"].fingerprint
    assert seen["1.2.88.6"].fingerprint == fresh["1.2.88.6"].fingerprint
    assert "MR" in seen["1.2.88.6"].modalities
    # Read before it: the fingerprint is the old one; a cycle that exports the study
    # records it, and the next cycle finds a difference and exports it again.
    assert seen["1.2.88.1"].fingerprint != fresh["1.2.88.1"].fingerprint
    selection = hbe.plan_selection(list(fresh.values()),
                                   {s.uid: s.fingerprint for s in studies}, {}, {},
                                   ("CT", "MR"), "study_date", time.time(), 0)
    assert [(c.study.uid, c.reason) for c in selection.queue] == [("1.2.88.1", "changed")]
    lib.close()


def test_a_cycle_reading_one_row_per_transaction_exports_and_sees_changes(tmp_path):
    """End to end with the smallest chunks: a study on two ZSTUDY rows is one ZIP, and
    a late series makes the next cycle export it again."""
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    first = add_uid_study(lib, "1.2.89.1", 1)
    add_uid_study(lib, "1.2.89.2", 2)
    add_uid_study(lib, "1.2.89.1", 3)
    lib.finish()
    assert run_cycle(lib, "--horos-chunk-rows", "1").returncode == 0
    root = backup_root(lib)
    assert {r["study_uid"] for r in state_rows(root)} == {"1.2.89.1", "1.2.89.2"}
    assert state_rows(root, "SELECT horos_transactions FROM runs")[0][
        "horos_transactions"] >= 1 + 4 + 2       # columns, 3 rows and the end, 2 plans
    se = lib.add_series(first, "CT", "late", 7)
    lib.add_image(se, size=100)
    lib.finish()
    result = run_cycle(lib, "--horos-chunk-rows", "1", "--settle-minutes", "0")
    assert result.returncode == 0
    assert "re-exported" in result.stdout and "cycle done: 1 study" in result.stdout
    lib.close()


def test_a_study_horos_deletes_between_the_scan_and_its_plan_is_skipped(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    for i in (1, 2, 3):
        add_uid_study(lib, "1.2.87.%d" % i, i)
    lib.finish()
    with hbe.open_horos_reader(lib.db_path, 5.0, chunk_rows=2) as reader:
        studies = hbe.read_candidates(reader)
        lib.conn.execute("PRAGMA busy_timeout = 0")
        lib.conn.execute("DELETE FROM ZSTUDY WHERE ZSTUDYINSTANCEUID = '1.2.87.2'")
        lib.conn.commit()
        plans = hbe.read_plans(reader, [hbe.Candidate(s, "new") for s in studies],
                               lib.database_dir)
    assert [p.info.uid for p in plans] == ["1.2.87.1", "1.2.87.3"]
    assert [len(p.files) for p in plans] == [1, 1]
    lib.close()


def test_new_image_rows_are_found_in_chunks(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    pks = [add_uid_study(lib, "1.2.86.%d" % i, i) for i in (1, 2, 3)]
    lib.finish()
    high_water = lib.conn.execute("SELECT MAX(Z_PK) FROM ZIMAGE").fetchone()[0]
    series = {pk: lib.conn.execute("SELECT Z_PK FROM ZSERIES WHERE ZSTUDY = ?",
                                   (pk,)).fetchone()[0] for pk in pks}
    for _ in range(12):                       # 24 new rows, 10 per chunk with chunk_rows=1
        lib.add_image(series[pks[0]], size=10)
        lib.add_image(series[pks[2]], size=10)
    lib.finish()
    times = hbe.ReadTimes()
    with hbe.open_horos_reader(lib.db_path, 5.0, chunk_rows=1, times=times) as reader:
        top = reader.image_high_water()
        touched = reader.new_image_rows(high_water, top)
        assert reader.new_image_rows(top, top).studies == set()
    assert top == high_water + 24
    assert touched.studies == {pks[0], pks[2]}
    assert touched.horos_sr_studies == set()        # the scanner's images, not the reader's
    assert times.transactions == 1 + 1 + 3        # columns, the high-water mark, 10+10+4
    lib.close()
