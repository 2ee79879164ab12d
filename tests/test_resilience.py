"""Never stall, never lose: failures, late images, crashes, full disks, bad input.

Every fault here happens for real: files are missing or cut short on disk, the process
is killed, the file system fills, the database is damaged.
"""

import datetime as dt
import os
import sqlite3
import subprocess
import sys
import zipfile

import pytest

from conftest import (SCRIPT, TEST_TZ, TESTS, backup_root, files_named, issues_rows,
                      manifest_of, run_cycle, state_rows, zip_payload, zips_on_disk)
from fake_horos import build_sample_library, local_to_coredata

FAULTS = os.path.join(TESTS, "faults.py")


def run_with_fault(lib, fault, *args, timeout=180):
    env = dict(os.environ, TZ=TEST_TZ)
    return subprocess.run([sys.executable, FAULTS, fault, "--pacs-root", lib.pacs_root]
                          + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def failures(lib):
    return {r["study_uid"]: r for r in state_rows(
        backup_root(lib), "SELECT * FROM failures ORDER BY study_uid")}


def make_failures_due(lib):
    """Time passes: every back-off has run out (the state is a documented format)."""
    conn = sqlite3.connect(os.path.join(backup_root(lib), "export_state.sqlite"))
    conn.execute("UPDATE failures SET next_attempt_at = '2000-01-01T00:00:00Z'")
    conn.commit()
    conn.close()


def exported_uids(lib):
    return {r["study_uid"] for r in state_rows(backup_root(lib))}


def assert_one_good_line(result, *needles):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr


def utc_hours_from_now(text):
    moment = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    return (moment - dt.datetime.now(dt.timezone.utc)).total_seconds() / 3600


# -- failures never block the queue ----------------------------------------------------

def test_broken_studies_at_the_head_do_not_block_the_ones_behind(library):
    for i in range(15):  # the 15 oldest studies: Horos lists files that are not there
        pk = library.add_study("1.2.60.%02d" % i, study_date=dt.datetime(2010, 1, 1 + i))
        se = library.add_series(pk, "CT", "gone", 1)
        library.add_image(se, create_file=False)
    for i in range(15):
        library.add_simple_study("1.2.61.%02d" % i, "MR", images=2,
                                 study_date=dt.datetime(2012, 1, 1 + i))
    library.finish()
    result = run_cycle(library)
    assert result.returncode == 0, result.stderr
    assert exported_uids(library) == {"1.2.61.%02d" % i for i in range(15)}
    failed = failures(library)
    assert set(failed) == {"1.2.60.%02d" % i for i in range(15)}
    for row in failed.values():
        assert row["kind"] == "NO_FILES" and row["attempts"] == 1
        assert 0.9 < utc_hours_from_now(row["next_attempt_at"]) < 1.1
    assert [r["kind"] for r in issues_rows(backup_root(library))] == ["NO_FILES"] * 15
    # While they wait, nothing is attempted.
    again = run_cycle(library)
    assert again.returncode == 0 and "cycle done: 0 studies" in again.stdout
    assert len(issues_rows(backup_root(library))) == 15
    make_failures_due(library)
    run_cycle(library)
    for row in failures(library).values():
        assert row["attempts"] == 2
        assert 5.9 < utc_hours_from_now(row["next_attempt_at"]) < 6.1
    make_failures_due(library)
    run_cycle(library)
    make_failures_due(library)
    run_cycle(library)
    for row in failures(library).values():
        assert row["attempts"] == 4
        assert 23.9 < utc_hours_from_now(row["next_attempt_at"]) < 24.1  # then daily
    assert zips_on_disk(backup_root(library)).keys() == {
        r["zip_path"] for r in state_rows(backup_root(library))}


def study_with_a_missing_file(lib, uid="1.2.62.1"):
    pk = lib.add_study(uid, "LATE^FILES", study_date=dt.datetime(2018, 6, 1))
    se = lib.add_series(pk, "CT", "Axial", 1)
    present = [lib.add_image(se, size=3000) for _ in range(2)]
    absent = lib.add_image(se, create_file=False)
    lib.finish()
    return present, absent


def test_missing_files_are_waited_for_then_exported_partially(library):
    present, absent = study_with_a_missing_file(library)
    root = backup_root(library)
    for attempt in (1, 2):
        result = run_cycle(library, "--missing-retries", "2")
        assert result.returncode == 0
        assert zips_on_disk(root) == {}
        assert failures(library)["1.2.62.1"]["kind"] == "MISSING_FILES"
        assert failures(library)["1.2.62.1"]["attempts"] == attempt
        make_failures_due(library)
    result = run_cycle(library, "--missing-retries", "2")
    assert result.returncode == 0
    (relpath,) = zips_on_disk(root)
    manifest = manifest_of(os.path.join(root, relpath))
    assert manifest["missing"] == [absent]
    assert sorted(e["source"] for e in manifest["files"]) == sorted(present)
    assert [r["kind"] for r in issues_rows(root)] == ["MISSING_FILES", "MISSING_FILES",
                                                      "PARTIAL"]
    assert issues_rows(root)[-1]["extra"] == absent
    row = state_rows(root)[0]
    assert row["missing_count"] == 1 and row["file_count"] == 2
    assert failures(library) == {}


def test_missing_retries_zero_exports_partially_at_once(library):
    _, absent = study_with_a_missing_file(library)
    assert run_cycle(library, "--missing-retries", "0").returncode == 0
    (relpath,) = zips_on_disk(backup_root(library))
    assert manifest_of(os.path.join(backup_root(library), relpath))["missing"] == [absent]
    assert [r["kind"] for r in issues_rows(backup_root(library))] == ["PARTIAL"]


def test_a_file_that_arrives_before_the_retries_run_out_makes_a_complete_zip(library):
    _, absent = study_with_a_missing_file(library)
    run_cycle(library)
    assert zips_on_disk(backup_root(library)) == {}
    os.makedirs(os.path.dirname(absent), exist_ok=True)
    with open(absent, "wb") as handle:
        handle.write(b"late file")
    make_failures_due(library)
    assert run_cycle(library).returncode == 0
    (relpath,) = zips_on_disk(backup_root(library))
    manifest = manifest_of(os.path.join(backup_root(library), relpath))
    assert manifest["missing"] == [] and len(manifest["files"]) == 3


# -- images that arrive late -----------------------------------------------------------

def test_studies_are_exported_only_once_settled(library):
    now = dt.datetime.now()
    library.add_simple_study("1.2.63.1", "CT", images=1, study_date=dt.datetime(2019, 1, 1),
                             date_added=now - dt.timedelta(minutes=5))
    library.add_simple_study("1.2.63.2", "CT", images=1, study_date=dt.datetime(2019, 1, 2),
                             date_added=now - dt.timedelta(hours=3))
    library.finish()
    assert run_cycle(library).returncode == 0   # default: settled after 60 minutes
    assert exported_uids(library) == {"1.2.63.2"}
    assert run_cycle(library, "--settle-minutes", "4").returncode == 0
    assert exported_uids(library) == {"1.2.63.1", "1.2.63.2"}


def test_late_series_reexports_the_study_in_place(library):
    pk = library.add_simple_study("1.2.64.1", "CT", images=2, study_date=dt.datetime(2019, 2, 1))
    library.add_simple_study("1.2.64.2", "MR", images=2, study_date=dt.datetime(2019, 2, 2))
    library.finish()
    root = backup_root(library)
    assert run_cycle(library).returncode == 0
    zips = zips_on_disk(root)
    other = [z for z in zips if z.endswith("1.2.64.2.zip")][0]
    other_stat = os.stat(os.path.join(root, other))
    # A reconstruction arrives an hour later: Horos adds a series and touches dateAdded.
    late = library.add_series(pk, "CT", "MPR coronal", 3)
    library.add_image(late, size=4000)
    library.add_image(late, size=4000)
    library.mark_added(late)
    library.finish()
    assert run_cycle(library).returncode == 0          # not settled yet: unchanged
    assert zips_on_disk(root) == zips
    result = run_cycle(library, "--settle-minutes", "0")
    assert result.returncode == 0, result.stderr
    assert "re-exported" in result.stdout
    after = zips_on_disk(root)
    assert set(after) == set(zips)                     # same names, one ZIP per study
    mine = [z for z in zips if z.endswith("1.2.64.1.zip")][0]
    payload = zip_payload(os.path.join(root, mine))
    assert len(payload) == 4 and any(m.startswith("0003_CT_MPR_coronal/") for m in payload)
    for source in library.study_files["1.2.64.1"]:
        with open(source, "rb") as handle:
            assert handle.read() in payload.values()
    # The unchanged study was not rewritten.
    assert os.stat(os.path.join(root, other)).st_mtime_ns == other_stat.st_mtime_ns
    assert run_cycle(library, "--settle-minutes", "0").returncode == 0
    assert os.stat(os.path.join(root, mine)).st_mtime_ns == \
        os.stat(os.path.join(root, mine)).st_mtime_ns
    assert "cycle done: 0 studies" in run_cycle(library, "--settle-minutes", "0").stdout


def test_horos_roi_sr_added_to_an_exported_study_is_backed_up(library):
    """Horos's own ROI SRs change no count and no dateAdded: only new rows show them."""
    pk = library.add_simple_study("1.2.65.1", "CT", images=2, study_date=dt.datetime(2019, 3, 1))
    roi = library.add_series(pk, "SR", "OsiriX ROI SR", 5002)
    library.add_image(roi, size=500)
    library.finish()
    root = backup_root(library)
    assert run_cycle(library).returncode == 0
    (relpath,) = zips_on_disk(root)
    fingerprint = state_rows(root)[0]["fingerprint"]
    new_roi = library.add_image(roi, size=600)     # a second ROI saved later
    library.finish()
    assert run_cycle(library).returncode == 0
    assert state_rows(root)[0]["fingerprint"] == fingerprint  # counts did not move...
    sources = {e["source"] for e in manifest_of(os.path.join(root, relpath))["files"]}
    assert new_roi in sources                                # ...the backup did anyway
    assert state_rows(root, "SELECT * FROM changed_studies") == []


def test_renamed_patient_gets_a_new_name_and_the_old_zip_goes(library):
    library.add_simple_study("1.2.66.1", "CT", images=2, patient="SMITH^JANE",
                             study_date=dt.datetime(2019, 4, 1))
    library.finish()
    root = backup_root(library)
    assert run_cycle(library).returncode == 0
    (old,) = zips_on_disk(root)
    assert "SMITH_JANE" in old
    library.conn.execute("UPDATE ZSTUDY SET ZNAME = 'JONES^JANE' WHERE ZSTUDYINSTANCEUID = ?",
                         ("1.2.66.1",))
    library.finish()
    assert run_cycle(library).returncode == 0
    (new,) = zips_on_disk(root)
    assert "JONES_JANE" in new and new != old
    assert state_rows(root)[0]["zip_path"] == new
    assert manifest_of(os.path.join(root, new))["study"]["patient_name"] == "JONES^JANE"


def test_kill_between_rename_and_commit_adopts_the_zip(library):
    library.add_simple_study("1.2.67.1", "CT", images=3, study_date=dt.datetime(2019, 5, 1))
    library.finish()
    root = backup_root(library)
    result = run_with_fault(library, "kill-after-rename")
    assert result.returncode == -9
    (relpath,) = zips_on_disk(root)
    assert state_rows(root) == []                      # killed before the commit
    mtime = os.stat(os.path.join(root, relpath)).st_mtime_ns
    result = run_cycle(library)
    assert result.returncode == 0
    assert "adopted" in result.stdout
    assert zips_on_disk(root).keys() == {relpath}
    assert os.stat(os.path.join(root, relpath)).st_mtime_ns == mtime   # not rewritten
    assert state_rows(root)[0]["zip_path"] == relpath
    assert state_rows(root, "SELECT * FROM writes_in_progress") == []


def test_kill_after_a_renamed_reexport_leaves_one_zip(library):
    library.add_simple_study("1.2.68.1", "CT", images=2, patient="OLD^NAME",
                             study_date=dt.datetime(2019, 6, 1))
    library.finish()
    root = backup_root(library)
    run_cycle(library)
    library.conn.execute("UPDATE ZSTUDY SET ZNAME = 'NEW^NAME'")
    library.finish()
    assert run_with_fault(library, "kill-after-rename").returncode == -9
    assert len(zips_on_disk(root)) == 2                # the old and the new, for a moment
    assert "OLD_NAME" in state_rows(root)[0]["zip_path"]
    assert run_cycle(library).returncode == 0
    (only,) = zips_on_disk(root)
    assert "NEW_NAME" in only and state_rows(root)[0]["zip_path"] == only


def test_two_rows_with_one_uid_are_one_zip_with_both(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    assert run_cycle(lib).returncode == 0
    root = backup_root(lib)
    (twin,) = [z for z in zips_on_disk(root) if z.endswith("_1.2.3.4.5.6.7.8.9.1111.zip")]
    manifest = manifest_of(os.path.join(root, twin))
    assert len(manifest["study"]["horos_study_pks"]) == 2
    assert {s["series_uid"] for s in manifest["series"]} == {"1.2.3.4.5.6.7.8.9.1111.1",
                                                              "1.2.3.4.5.6.7.8.9.1111.2"}
    assert {e["source"] for e in manifest["files"]} == lib.study_files["1.2.3.4.5.6.7.8.9.1111"]
    lib.close()


# -- never lose what Horos deleted -----------------------------------------------------

def test_studies_deleted_in_horos_stay_in_the_backup(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    assert run_cycle(lib).returncode == 0
    root = backup_root(lib)
    before = zips_on_disk(root)
    rows = state_rows(root)
    uid = "1.2.392.200036.9116.2.6.1.48.1215.1551385800.1"
    for path in lib.study_files[uid]:
        os.remove(path)
    lib.conn.execute("DELETE FROM ZIMAGE WHERE ZSERIES IN (SELECT se.Z_PK FROM ZSERIES se "
                     "JOIN ZSTUDY st ON st.Z_PK = se.ZSTUDY WHERE st.ZSTUDYINSTANCEUID = ?)",
                     (uid,))
    lib.conn.execute("DELETE FROM ZSERIES WHERE ZSTUDY IN (SELECT Z_PK FROM ZSTUDY WHERE "
                     "ZSTUDYINSTANCEUID = ?)", (uid,))
    lib.conn.execute("DELETE FROM ZSTUDY WHERE ZSTUDYINSTANCEUID = ?", (uid,))
    lib.finish()
    for _ in range(2):
        assert run_cycle(lib).returncode == 0
    assert zips_on_disk(root) == before
    assert state_rows(root) == rows
    lib.close()


# -- disk space ------------------------------------------------------------------------

def test_low_disk_stops_the_cycle_with_disk_low(library):
    library.add_simple_study("1.2.70.1", "CT", images=2, study_date=dt.datetime(2019, 7, 1))
    library.finish()
    result = run_cycle(library, "--min-free-gb", "1000000")
    assert_one_good_line(result, "DISK_LOW" if False else "backup volume low")
    root = backup_root(library)
    assert zips_on_disk(root) == {} and state_rows(root) == []
    assert [r["kind"] for r in issues_rows(root)] == ["DISK_LOW"]
    assert run_cycle(library, "--min-free-gb", "0").returncode == 0
    assert exported_uids(library) == {"1.2.70.1"}


def test_enospc_mid_write_removes_the_part_and_the_next_cycle_continues(library):
    for i in range(3):
        library.add_simple_study("1.2.71.%d" % i, "CT", images=3, size=50000,
                                 study_date=dt.datetime(2019, 8, 1 + i))
    library.finish()
    root = backup_root(library)
    result = run_with_fault(library, "enospc=60000")
    assert_one_good_line(result, "backup volume full")
    assert files_named(root, ".part") == []
    assert zips_on_disk(root) == {} and state_rows(root) == []
    assert [r["kind"] for r in issues_rows(root)] == ["DISK_FULL"]
    assert run_cycle(library).returncode == 0
    assert exported_uids(library) == {"1.2.71.0", "1.2.71.1", "1.2.71.2"}
    assert state_rows(root, "SELECT * FROM writes_in_progress") == []


# -- bad input -------------------------------------------------------------------------

def test_hot_journal_is_try_again_later(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    lib.close()
    # Horos dies in the middle of a write: Database.sql-journal is left hot.
    crash = ("import sqlite3, os, sys\n"
             "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
             "c.execute('PRAGMA cache_size = 1')\n"
             "c.execute('BEGIN')\n"
             "c.execute(\"UPDATE ZSTUDY SET ZNAME = 'X' || ZNAME\")\n"
             "c.execute('INSERT INTO ZLOGENTRY (ZMESSAGE) SELECT ZNAME FROM ZSTUDY')\n"
             "c.execute('UPDATE ZIMAGE SET ZCOMMENT = hex(randomblob(500))')\n"
             "os._exit(9)\n")
    subprocess.run([sys.executable, "-c", crash, lib.db_path], check=False)
    assert os.path.getsize(lib.db_path + "-journal") > 0
    result = run_cycle(lib)
    assert_one_good_line(result, "hot journal", "try again later")
    root = backup_root(lib)
    assert zips_on_disk(root) == {} and state_rows(root) == []
    assert [r["kind"] for r in issues_rows(root)] == ["HOROS_DB_UNREADABLE"]
    # Horos starts again and rolls its journal back; the next cycle works.
    conn = sqlite3.connect(lib.db_path)
    conn.execute("SELECT COUNT(*) FROM ZSTUDY").fetchone()
    conn.close()
    assert run_cycle(lib).returncode == 0
    assert len(zips_on_disk(root)) == 14


def test_odd_dates_are_read_or_unknown(library):
    cases = {  # uid: (stored ZDATE, stored ZDATEOFBIRTH, expected month folder, name dates)
        "1.2.72.1": ("not a date", "garbage", "UNKNOWN_DATE", "UNKNOWN_UNKNOWN"),
        "1.2.72.2": (str(local_to_coredata(dt.datetime(2020, 6, 30, 23, 30))), None,
                     "2020_06", "UNKNOWN_2020-06-30"),
        "1.2.72.3": (1e20, -1e20, "UNKNOWN_DATE", "UNKNOWN_UNKNOWN"),
        "1.2.72.4": (local_to_coredata(dt.datetime(1991, 1, 1, 0, 15)),
                     local_to_coredata(dt.date(1900, 1, 1)), "1991_01",
                     "1900-01-01_1991-01-01"),
        "1.2.72.5": (int(local_to_coredata(dt.datetime(2005, 5, 5, 5, 5))), None,
                     "2005_05", "UNKNOWN_2005-05-05"),
    }
    for uid, (date, birth, _, _) in cases.items():
        pk = library.add_study(uid, "ODD^DATE", study_date=date, birth=birth, raw_date=True)
        library.add_image(library.add_series(pk, "MR", "x", 1), size=300)
    library.finish()
    assert run_cycle(library).returncode == 0
    rows = {r["study_uid"]: r["zip_path"] for r in state_rows(backup_root(library))}
    for uid, (_, _, month, dates) in cases.items():
        assert rows[uid] == "%s/ODD_DATE_%s_%s.zip" % (month, dates, uid)


HOSTILE_NAMES = {
    "1.2.73.1": ("NUL\x00BYTE^NAME", "NUL_BYTE_NAME"),
    "1.2.73.2": ("/etc/../passwd^x", "etc_.._passwd_x"),  # no slash: harmless
    "1.2.73.3": ("..", "UNKNOWN"),
    "1.2.73.4": ("\u202eRIGHT^TO^LEFT\u202c", "RIGHT_TO_LEFT"),
    "1.2.73.5": ("עברית^ARABIC عربي", "ARABIC"),
    "1.2.73.6": ("王^小明", "UNKNOWN"),
    "1.2.73.7": ("X" * 300, None),
}


def test_hostile_names_make_safe_unique_files_and_keep_the_raw_name(library):
    for uid, (name, _) in HOSTILE_NAMES.items():
        pk = library.add_study(uid, name, study_date=dt.datetime(2021, 5, 5), birth=None)
        se = library.add_series(pk, "CT", name, 1)
        library.add_image(se, size=300)
    # Text that is not UTF-8, as a damaged store can hold.
    pk = library.add_study("1.2.73.8", "x", study_date=dt.datetime(2021, 5, 5))
    library.conn.execute("UPDATE ZSTUDY SET ZNAME = CAST(X'4D7546C3FF' AS TEXT) WHERE Z_PK = ?",
                         (pk,))
    library.add_image(library.add_series(pk, "CT", "x", 1), size=300)
    library.finish()
    result = run_cycle(library)
    assert result.returncode == 0, result.stderr
    root = backup_root(library)
    rows = {r["study_uid"]: r["zip_path"] for r in state_rows(root)}
    assert len(rows) == 8
    for uid, (name, safe) in HOSTILE_NAMES.items():
        base = os.path.basename(rows[uid])
        assert rows[uid].startswith("2021_05/")
        if safe is not None:
            assert base == "%s_UNKNOWN_2021-05-05_%s.zip" % (safe, uid)
        assert len(base) <= 128 + 4
        manifest = manifest_of(os.path.join(root, rows[uid]))
        assert manifest["study"]["patient_name"] == name
        for member in zip_payload(os.path.join(root, rows[uid])):
            assert ".." not in member.split("/") and not member.startswith("/")
            assert "\x00" not in member
    assert rows["1.2.73.8"] == "2021_05/MuF_UNKNOWN_2021-05-05_1.2.73.8.zip"


def test_files_older_than_1980_are_stored_byte_for_byte(library):
    pk = library.add_study("1.2.74.1", "OLD^FILE", study_date=dt.datetime(1979, 12, 31, 12))
    se = library.add_series(pk, "CT", "x", 1)
    path = library.add_image(se, size=2000, mtime=86400 * 3)   # 1970-01-04
    library.finish()
    assert run_cycle(library).returncode == 0
    root = backup_root(library)
    (relpath,) = zips_on_disk(root)
    with zipfile.ZipFile(os.path.join(root, relpath)) as archive:
        info = [i for i in archive.infolist() if i.filename != "horos-backup-manifest.json"][0]
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        with open(path, "rb") as handle:
            assert archive.read(info) == handle.read()


def test_more_than_65535_files_uses_zip64(library):
    pk = library.add_study("1.2.75.1", "MANY^FILES", study_date=dt.datetime(2018, 1, 1))
    se = library.add_series(pk, "MR", "fMRI", 1)
    for number in range(1, 65_601):
        library.add_image(se, path_number=number, content=b"%d" % number)
    library.finish()
    result = run_cycle(library, timeout=600)
    assert result.returncode == 0, result.stderr
    root = backup_root(library)
    (relpath,) = zips_on_disk(root)
    with zipfile.ZipFile(os.path.join(root, relpath)) as archive:
        names = archive.namelist()
        assert len(names) == 65_601
        assert archive.read("0001_MR_fMRI/65600.dcm") == b"65600"
        assert archive.testzip() is None
    with open(os.path.join(root, relpath), "rb") as handle:
        handle.seek(-200, os.SEEK_END)
        assert b"PK\x06\x06" in handle.read()      # the ZIP64 end of central directory


def test_a_study_over_4_gib_uses_zip64(library):
    pk = library.add_study("1.2.76.1", "BIG^STUDY", study_date=dt.datetime(2018, 2, 1))
    se = library.add_series(pk, "CT", "huge", 1)
    big = library.add_image(se, content=b"")
    with open(big, "wb") as handle:           # sparse: 4 GiB + 1 MiB of zeros and a tail
        handle.truncate(4 * 1024 ** 3 + 1024 ** 2)
        handle.seek(0, os.SEEK_END)
        handle.write(b"TAIL")
    after = library.add_image(se, content=b"the member after 4 GiB")
    library.finish()
    # Stored: the member after the big one then starts past 4 GiB (ZIP64 offsets too).
    result = run_cycle(library, "--min-free-gb", "0", "--compression", "stored",
                       timeout=900)
    assert result.returncode == 0, result.stderr
    root = backup_root(library)
    (relpath,) = zips_on_disk(root)
    zip_path = os.path.join(root, relpath)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            infos = {os.path.basename(i.filename): i for i in archive.infolist()}
            assert infos[os.path.basename(big)].file_size == os.path.getsize(big)
            assert infos[os.path.basename(after)].header_offset > 0xFFFFFFFF
            assert archive.read(infos[os.path.basename(after)]) == b"the member after 4 GiB"
            with archive.open(infos[os.path.basename(big)]) as member:
                member.seek(os.path.getsize(big) - 4)
                assert member.read() == b"TAIL"
    finally:
        os.remove(zip_path)
        os.remove(big)


def test_a_file_that_shrinks_while_zipped_fails_the_study_not_the_queue(library):
    pk = library.add_study("1.2.77.1", "SHRINK", study_date=dt.datetime(2017, 1, 1))
    se = library.add_series(pk, "CT", "x", 1)
    victim = library.add_image(se, content=os.urandom(3 * 1024 * 1024))  # 3 chunks
    library.add_simple_study("1.2.77.2", "CT", images=1, study_date=dt.datetime(2017, 1, 2))
    library.finish()
    result = run_with_fault(library, "shrink=" + os.path.basename(victim))
    assert result.returncode == 0, result.stderr
    root = backup_root(library)
    assert exported_uids(library) == {"1.2.77.2"}
    assert failures(library)["1.2.77.1"]["kind"] == "FILE_CHANGED"
    assert files_named(root, ".part") == []
    assert [r["kind"] for r in issues_rows(root)] == ["FILE_CHANGED"]
    make_failures_due(library)
    assert run_cycle(library).returncode == 0      # the file is stable again
    assert exported_uids(library) == {"1.2.77.1", "1.2.77.2"}


def test_a_file_that_vanishes_while_zipped_fails_the_study(library):
    pk = library.add_study("1.2.78.1", "VANISH", study_date=dt.datetime(2017, 2, 1))
    se = library.add_series(pk, "CT", "x", 1)
    library.add_image(se, size=1000)
    victim = library.add_image(se, size=1000)
    library.finish()
    result = run_with_fault(library, "vanish=" + os.path.basename(victim))
    assert result.returncode == 0, result.stderr
    assert failures(library)["1.2.78.1"]["kind"] == "FILE_CHANGED"
    assert zips_on_disk(backup_root(library)) == {}


def test_a_zip_that_never_verifies_is_not_kept(library):
    library.add_simple_study("1.2.79.1", "CT", images=2, size=5000,
                             study_date=dt.datetime(2017, 3, 1))
    library.finish()
    result = run_with_fault(library, "corrupt-zip")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("verify failed") == 3
    root = backup_root(library)
    assert zips_on_disk(root) == {} and files_named(root, ".part") == []
    assert failures(library)["1.2.79.1"]["kind"] == "ZIP_BAD"
    assert [r["kind"] for r in issues_rows(root)] == ["ZIP_BAD"]


def test_backup_root_on_another_disk_needs_its_sentinel(library):
    if not os.path.isdir("/dev/shm") or \
            os.stat("/dev/shm").st_dev == os.stat(library.pacs_root).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test folder")
    library.add_simple_study("1.2.80.1", "CT", images=1, study_date=dt.datetime(2017, 4, 1))
    library.finish()
    disk = os.path.join("/dev/shm", "horos-test-%d" % os.getpid())
    os.makedirs(disk)
    try:
        target = os.path.join(disk, "Horos")
        result = run_cycle(library, "--backup-root", target)
        assert_one_good_line(result, ".backup_sentinel")
        assert os.listdir(disk) == []
        unmounted = os.path.join(disk, "NOT_MOUNTED", "Horos")
        assert_one_good_line(run_cycle(library, "--backup-root", unmounted), "mounted")
        assert os.listdir(disk) == []
        open(os.path.join(disk, ".backup_sentinel"), "w").close()
        assert run_cycle(library, "--backup-root", target).returncode == 0
        assert len(zips_on_disk(target)) == 1
    finally:
        subprocess.run(["rm", "-rf", disk], check=True)


def test_state_survives_and_reads_after_the_cycle(library):
    library.add_simple_study("1.2.81.1", "CT", images=1, study_date=dt.datetime(2017, 5, 1))
    library.finish()
    run_cycle(library)
    out = subprocess.run(["sqlite3", os.path.join(backup_root(library), "export_state.sqlite"),
                          "SELECT COUNT(*) FROM exported_studies;"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    assert SCRIPT  # the script path the subprocesses run
