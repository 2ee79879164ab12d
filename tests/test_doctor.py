"""`doctor`: every check, on healthy and broken installations; it writes nothing."""

import datetime as dt
import json
import os
import shutil
import sqlite3
import sys
import time

import pytest

import horos_backup_export as hbe
from conftest import backup_root, mounted_tmpfs, run_cycle, run_script, tree_snapshot
from fake_horos import FakeHorosLibrary, build_sample_library, write_horos_preferences

ALL_CHECKS = ["python", "pacs_sentinel", "backup_sentinel", "horos_preferences",
              "horos_data", "horos_database", "path_rule", "free_space", "same_disk",
              "file_system", "backup_writable", "state", "last_cycle", "launchd"]


def horos_prefs_for(lib, home, **values):
    """The preferences of a Horos that keeps its library where `lib` is."""
    settings = {"DATABASELOCATION": 1,
                "DATABASELOCATIONURL": os.path.join(lib.pacs_root, "Database"),
                "DefaultFolderSizeForDB": lib.folder_size, "AUTOCLEANINGSPACE": True,
                "AUTOCLEANINGSPACESIZE": 1024}
    settings.update(values)
    return write_horos_preferences(settings, home=str(home))


def doctor(lib, home, *args):
    """(exit code, {name: check}, stdout) of `doctor --json`, and the text form agrees."""
    env = {"HOME": str(home)}
    result = run_cycle(lib, "doctor", "--json", *args, env=env)
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"checks"}
    checks = report["checks"]
    assert [c["name"] for c in checks] == ALL_CHECKS
    for check in checks:
        assert set(check) == {"name", "status", "detail"}
        assert check["status"] in ("ok", "warn", "fail", "skip")
        assert check["detail"]
    text = run_cycle(lib, "doctor", *args, env=env)
    assert text.returncode == result.returncode
    lines = text.stdout.splitlines()
    assert len(lines) == len(ALL_CHECKS) + 1
    for line, check in zip(lines, checks):
        assert line.split()[:2] == [check["status"], check["name"]]
    assert lines[-1].startswith("doctor: %d ok, %d warn, %d fail, %d skip" % tuple(
        sum(1 for c in checks if c["status"] == s) for s in ("ok", "warn", "fail", "skip")))
    return result.returncode, {c["name"]: c for c in checks}, text.stdout


@pytest.fixture
def sample(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    yield lib
    lib.close()


def test_doctor_passes_on_a_healthy_library_and_writes_nothing(tmp_path, sample):
    home = tmp_path / "home"
    horos_prefs_for(sample, home)
    before = tree_snapshot(sample.pacs_root), tree_snapshot(str(home))
    code, checks, text = doctor(sample, home)
    assert code == 0, text
    for name in ("python", "pacs_sentinel", "horos_preferences", "horos_data",
                 "horos_database", "path_rule", "free_space", "backup_writable", "state"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["same_disk"]["status"] == "warn"      # a disk failure would lose both
    assert checks["backup_sentinel"]["status"] == "skip"
    assert checks["last_cycle"]["status"] == "warn"     # no cycle yet
    assert checks["launchd"]["status"] == ("skip" if sys.platform != "darwin" else "fail")
    assert "50 sampled image rows" in checks["path_rule"]["detail"]
    assert "folder size 10000" in checks["path_rule"]["detail"]
    assert "does not exist yet" in checks["backup_writable"]["detail"]
    assert "doctor: " in text and "the backup can run here" in text
    # Nothing written: no BACKUP_ROOT, no log, no lock, no journal next to Database.sql.
    assert not os.path.exists(backup_root(sample))
    assert (tree_snapshot(sample.pacs_root), tree_snapshot(str(home))) == before

    # After a cycle: the state is readable and the last cycle is recent.
    assert run_cycle(sample, env={"HOME": str(home)}).returncode == 0
    before = tree_snapshot(sample.pacs_root)
    code, checks, text = doctor(sample, home)
    assert code == 0, text
    assert checks["state"]["status"] == "ok"
    assert "14 studies exported" in checks["state"]["detail"]
    assert checks["last_cycle"]["status"] == "ok", checks["last_cycle"]
    assert "last successful cycle" in checks["last_cycle"]["detail"]
    assert tree_snapshot(sample.pacs_root) == before   # ZIPs, state, log, lock untouched


def test_the_sample_spreads_over_the_whole_library(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    pk = lib.add_study("1.2.5.1", study_date=dt.datetime(2020, 1, 1))
    se = lib.add_series(pk, "CT", "Axial", 1)
    for _ in range(1000):
        lib.add_image(se, size=200)
    lib.finish()
    # Only the last quarter of the library lost its files: a sample of the first rows
    # alone would not see it.
    for number in range(751, 1001):
        os.remove(os.path.join(lib.database_dir, "10000", "%d.dcm" % number))
    home = tmp_path / "home"
    horos_prefs_for(lib, home)
    code, checks, _ = doctor(lib, home)
    detail = checks["path_rule"]["detail"]
    assert checks["path_rule"]["status"] == "warn", detail
    assert code == 0
    assert "of 200 sampled image rows (Z_PK 1 to 1000)" in detail
    missing = int(detail.split()[0])
    assert 45 <= missing <= 55                          # a quarter of 200
    lib.close()


def test_sample_targets_are_spread_evenly():
    targets = hbe.sample_targets(1, 5_000_000, 200)
    assert len(targets) == 200 and targets[0] == 1 and targets[-1] == 5_000_000
    gaps = {b - a for a, b in zip(targets, targets[1:])}
    assert max(gaps) - min(gaps) <= 1
    assert hbe.sample_targets(7, 9, 200) == [7, 8, 9]


@pytest.mark.parametrize("preference", [1000, "1000", 50000])
def test_a_wrong_folder_size_preference_fails_and_is_named(tmp_path, sample, preference):
    home = tmp_path / "home"
    horos_prefs_for(sample, home, DefaultFolderSizeForDB=preference)
    code, checks, _ = doctor(sample, home)
    assert code == 1
    check = checks["path_rule"]
    assert check["status"] == "fail", check
    assert ("laid out with folder size 10000" in check["detail"]
            and "DefaultFolderSizeForDB says %d" % int(preference) in check["detail"]), check


def test_a_folder_size_1000_library_without_its_preference_fails(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"), folder_size=1000)
    home = tmp_path / "home"
    home.mkdir()
    code, checks, _ = doctor(lib, home)                # no preferences file: defaults
    assert code == 1
    assert checks["horos_preferences"]["status"] == "warn"
    assert "laid out with folder size 1000" in checks["path_rule"]["detail"]
    assert "says 10000" in checks["path_rule"]["detail"]
    horos_prefs_for(lib, home)                          # with them: healthy
    code, checks, _ = doctor(lib, home)
    assert code == 0 and checks["path_rule"]["status"] == "ok", checks["path_rule"]
    lib.close()


def test_a_missing_sentinel_fails_and_nothing_is_created(tmp_path, sample):
    home = tmp_path / "home"
    horos_prefs_for(sample, home)
    os.remove(os.path.join(sample.pacs_root, ".pacs_sentinel"))
    before = tree_snapshot(sample.pacs_root)
    code, checks, _ = doctor(sample, home)
    assert code == 1
    assert checks["pacs_sentinel"]["status"] == "fail"
    assert ".pacs_sentinel is missing" in checks["pacs_sentinel"]["detail"]
    assert "touch" in checks["pacs_sentinel"]["detail"]
    assert tree_snapshot(sample.pacs_root) == before
    assert not os.path.exists(backup_root(sample))


def test_a_database_that_is_not_sqlite_fails(tmp_path, sample):
    home = tmp_path / "home"
    horos_prefs_for(sample, home)
    sample.close()
    with open(sample.db_path, "wb") as handle:
        handle.write(b"this is not a database, it is a note\n" * 200)
    before = tree_snapshot(sample.pacs_root)
    code, checks, _ = doctor(sample, home)
    assert code == 1
    assert checks["horos_database"]["status"] == "fail"
    assert "not a readable SQLite database" in checks["horos_database"]["detail"]
    assert checks["path_rule"]["status"] == "skip"
    assert tree_snapshot(sample.pacs_root) == before


def test_a_database_without_the_columns_we_need_fails(tmp_path, sample):
    home = tmp_path / "home"
    horos_prefs_for(sample, home)
    if hbe.sqlite3.sqlite_version_info < (3, 35):
        pytest.skip("SQLite %s cannot drop a column" % hbe.sqlite3.sqlite_version)
    sample.conn.execute("ALTER TABLE ZIMAGE DROP COLUMN ZPATHNUMBER")
    sample.conn.commit()
    code, checks, _ = doctor(sample, home)
    assert code == 1
    assert "ZPATHNUMBER" in checks["horos_database"]["detail"]


def test_in_place_files_on_an_unmounted_volume_are_named(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    pk = lib.add_study("1.2.6.1", study_date=dt.datetime(2020, 1, 1))
    se = lib.add_series(pk, "CT", "CD import", 1)
    for i in range(8):
        lib.add_image(se, storage="absolute", create_file=False,
                      path_string="/Volumes/HOROS-TEST-CDROM/DICOM/IM%04d" % i)
    lib.add_image(se, size=300)
    lib.finish()
    home = tmp_path / "home"
    horos_prefs_for(lib, home)
    code, checks, _ = doctor(lib, home)
    assert code == 1
    detail = checks["path_rule"]["detail"]
    assert checks["path_rule"]["status"] == "fail"
    assert "/Volumes/HOROS-TEST-CDROM, which is not mounted" in detail, detail
    lib.close()


def test_a_wrong_horos_data_folder_warns_and_names_the_right_one(tmp_path, sample):
    home = tmp_path / "home"
    horos_prefs_for(sample, home)
    # An old copy of the library's database, without its files.
    stale = tmp_path / "old" / "Horos Data"
    stale.mkdir(parents=True)
    shutil.copy(sample.db_path, str(stale / "Database.sql"))
    code, checks, _ = doctor(sample, home, "--horos-data", str(stale))
    assert code == 1
    assert checks["horos_data"]["status"] == "warn"
    assert sample.horos_data in checks["horos_data"]["detail"]
    assert checks["path_rule"]["status"] == "fail"
    assert "the files are in %s" % sample.horos_data in checks["path_rule"]["detail"]


def test_unreadable_default_preferences_fail_the_check_not_the_command(tmp_path, sample):
    home = tmp_path / "home"
    path = write_horos_preferences({"AUTOCLEANINGSPACESIZE": "a lot"}, home=str(home))
    code, checks, _ = doctor(sample, home)
    assert code == 1
    assert checks["horos_preferences"]["status"] == "fail"
    assert path in checks["horos_preferences"]["detail"]
    assert "AUTOCLEANINGSPACESIZE" in checks["horos_preferences"]["detail"]
    with open(path, "wb") as handle:
        handle.write(b"\x00garbage")
    code, checks, _ = doctor(sample, home)
    assert code == 1 and checks["horos_preferences"]["status"] == "fail"


def test_the_reserve_and_a_backup_disk(tmp_path, sample):
    home = tmp_path / "home"
    horos_prefs_for(sample, home, AUTOCLEANINGSPACESIZE=-99)
    code, checks, _ = doctor(sample, home)
    # 1.2 x 99 % of the disk can never be free: cycles would stop at once.
    assert code == 1
    assert checks["free_space"]["status"] == "fail"
    assert "auto-cleaning" in checks["free_space"]["detail"]
    assert "99 %" in checks["horos_preferences"]["detail"]
    # A backup folder on a disk that is not there (its parent missing).
    code, checks, _ = doctor(sample, tmp_path / "home", "--backup-root",
                             str(tmp_path / "NOT_MOUNTED" / "Horos"))
    assert checks["backup_sentinel"]["status"] == "fail"
    assert "mounted" in checks["backup_sentinel"]["detail"]
    assert not os.path.exists(tmp_path / "NOT_MOUNTED")


def one_study_library(pacs_root):
    lib = FakeHorosLibrary(pacs_root)
    lib.add_simple_study("1.2.7.1", images=2, size=500, study_date=dt.datetime(2020, 1, 1))
    lib.finish()
    return lib


def started_ago(lib, seconds):
    """Time passes with no cycle: every recorded run started `seconds` ago (the state
    is a documented format)."""
    conn = sqlite3.connect(os.path.join(backup_root(lib), "export_state.sqlite"))
    conn.execute("UPDATE runs SET started_at = ?", (hbe.utc_iso(time.time() - seconds),))
    conn.commit()
    conn.close()


def test_last_cycle_warns_when_the_last_success_is_old_or_the_last_cycle_failed(tmp_path):
    lib = one_study_library(str(tmp_path / "PACS"))
    home = tmp_path / "home"
    horos_prefs_for(lib, home)
    assert run_cycle(lib, env={"HOME": str(home)}).returncode == 0
    # launchd runs a cycle every 10 minutes: 30 minutes without one is still fine...
    started_ago(lib, 30 * 60)
    code, checks, _ = doctor(lib, home)
    assert checks["last_cycle"]["status"] == "ok", checks["last_cycle"]
    assert code == 0
    # ...45 minutes is not: is the job still loaded?
    started_ago(lib, 45 * 60)
    code, checks, _ = doctor(lib, home)
    check = checks["last_cycle"]
    assert check["status"] == "warn", check
    assert "45 min ago" in check["detail"] and "is the job loaded?" in check["detail"]
    assert code == 0                                    # a warning, not a failure
    # A recent success, then a cycle that failed on the next study Horos received: the
    # latest one is what counts.
    started_ago(lib, 5 * 60)
    lib.add_simple_study("1.2.7.2", images=2, size=500, study_date=dt.datetime(2020, 1, 2))
    lib.finish()
    result = run_cycle(lib, "--min-free-gb", "1000000", env={"HOME": str(home)})
    assert result.returncode == 1 and "backup volume low" in result.stderr
    code, checks, _ = doctor(lib, home)
    check = checks["last_cycle"]
    assert check["status"] == "warn", check
    assert "last successful cycle" in check["detail"] and "5 min ago" in check["detail"]
    assert "the last one ended disk_low: backup volume low" in check["detail"]
    assert code == 0
    lib.close()


def test_a_backup_disk_without_its_sentinel_fails(tmp_path):
    lib = one_study_library(str(tmp_path / "PACS"))
    home = tmp_path / "home"
    horos_prefs_for(lib, home)
    with mounted_tmpfs(tmp_path / "BACKUP", "4m") as backup_disk:
        target = os.path.join(backup_disk, "Horos")
        small = ("--backup-root", target, "--min-free-gb", "0")
        sentinel = os.path.join(backup_disk, ".backup_sentinel")
        before = tree_snapshot(backup_disk)
        code, checks, _ = doctor(lib, home, *small)
        check = checks["backup_sentinel"]
        assert check["status"] == "fail", check
        assert code == 1
        assert "%s is on another disk than %s" % (target, lib.pacs_root) in check["detail"]
        assert "touch %s" % sentinel in check["detail"]
        assert tree_snapshot(backup_disk) == before     # doctor creates nothing
        # A cycle refuses the same disk: what doctor says is what would happen.
        result = run_cycle(lib, *small, env={"HOME": str(home)})
        assert result.returncode == 1 and sentinel in result.stderr
        open(sentinel, "w").close()
        code, checks, _ = doctor(lib, home, *small)
        assert checks["backup_sentinel"]["status"] == "ok", checks["backup_sentinel"]
        assert checks["backup_sentinel"]["detail"] == "%s present" % sentinel
        assert checks["same_disk"]["status"] == "ok"
        assert code == 0
    lib.close()


def test_fat32_is_refused_and_mount_tables_are_read():
    proc = ("/dev/vda / ext4 rw,relatime 0 0\n"
            "/dev/sdb1 /media/pacs\\040backup vfat rw,relatime 0 0\n")
    mounts = hbe.parse_proc_mounts(proc)
    assert mounts == [("/", "ext4"), ("/media/pacs backup", "vfat")]
    mac = ("/dev/disk3s1s1 on / (apfs, sealed, local, read-only, journaled)\n"
           "/dev/disk4s1 on /Volumes/PACS BACKUP (msdos, local, nodev, nosuid, noowners)\n"
           "/dev/disk5s2 on /Volumes/PACS (apfs, local, nodev, nosuid, journaled)\n")
    mac_mounts = hbe.parse_mount_output(mac)
    assert mac_mounts == [("/", "apfs"), ("/Volumes/PACS BACKUP", "msdos"),
                          ("/Volumes/PACS", "apfs")]
    assert {kind for _point, kind in mac_mounts} & hbe.FAT_FILE_SYSTEMS == {"msdos"}
    assert hbe.file_system_type("/", mounts) == "ext4"
    real = hbe.file_system_type(os.getcwd(), hbe.mount_table())
    assert real is not None and real.lower() not in hbe.FAT_FILE_SYSTEMS


def test_explicit_missing_preferences_stop_doctor_with_one_line(tmp_path, sample):
    result = run_cycle(sample, "doctor", "--horos-prefs", str(tmp_path / "nope.plist"),
                       env={"HOME": str(tmp_path)})
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "nope.plist" in result.stderr


def test_doctor_without_a_library_reports_instead_of_crashing(tmp_path):
    result = run_script("doctor", "--pacs-root", str(tmp_path / "not-mounted"),
                        env={"HOME": str(tmp_path)})
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "fail  pacs_sentinel" in result.stdout
    assert "fail  horos_data" in result.stdout
    assert "fail  horos_database" in result.stdout
    assert not os.path.exists(tmp_path / "not-mounted")


def test_the_launchd_job_on_macos(tmp_path, monkeypatch):
    # Runs on any system: the plist branches need no launchctl; where launchctl does not
    # exist (not a Mac), asking it is a failed check, never a crash.
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path))
    check = hbe.launchd_check()
    assert check.status == "fail" and "launchctl bootstrap" in check.detail
    agents = tmp_path / "Library" / "LaunchAgents"
    agents.mkdir(parents=True)
    job = {"Label": "com.horos.backup",
           "ProgramArguments": ["/usr/bin/python3", str(tmp_path / "gone.py")]}
    with open(str(agents / "com.horos.backup.plist"), "wb") as handle:
        hbe.plistlib.dump(job, handle)
    check = hbe.launchd_check()
    assert check.status == "fail" and "gone.py, which does not exist" in check.detail
    job["ProgramArguments"][1] = hbe.__file__
    with open(str(agents / "com.horos.backup.plist"), "wb") as handle:
        hbe.plistlib.dump(job, handle)
    check = hbe.launchd_check()
    if shutil.which("launchctl") is None:
        assert check.status == "fail" and "cannot ask launchctl" in check.detail
    else:
        assert check.status in ("ok", "fail")
