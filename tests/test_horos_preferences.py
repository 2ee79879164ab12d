"""Horos's preferences: the folder size in the path rule, the library's location, and a
reserve that never lets Horos's auto-cleaning delete studies (real binary plists, a real
tmpfs shared by the library and the backup)."""

import datetime as dt
import json
import math
import os

import pytest

import horos_backup_export as hbe
from conftest import (backup_root, issues_rows, mounted_tmpfs, run_cycle, run_script,
                      state_rows, zip_payload, zips_on_disk)
from fake_horos import FakeHorosLibrary, build_sample_library, write_horos_preferences

MIB = 1024 * 1024
SAMPLE_CT_MR = 14            # CT/MR studies of the sample library


def home_env(home):
    return {"HOME": str(home)}


def log_text(root):
    with open(os.path.join(root, "logs", "horos_backup.log"), encoding="utf-8") as handle:
        return handle.read()


def expected_payloads(lib):
    """{study_uid: {file name: bytes}} of the files the library holds for each study."""
    out = {}
    for uid, paths in lib.study_files.items():
        files = {}
        for path in paths:
            with open(path, "rb") as handle:
                files[os.path.basename(path)] = handle.read()
        out[uid] = files
    return out


# -- reading the plist -------------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    ({}, (10000, 0, "", True, 1024)),
    ({"DefaultFolderSizeForDB": 1000, "DATABASELOCATION": 1,
      "DATABASELOCATIONURL": "/Volumes/PACS/Database", "AUTOCLEANINGSPACE": False,
      "AUTOCLEANINGSPACESIZE": -10},
     (1000, 1, "/Volumes/PACS/Database", False, -10)),
    ({"DefaultFolderSizeForDB": "1000", "DATABASELOCATION": "1",
      "AUTOCLEANINGSPACE": "YES", "AUTOCLEANINGSPACESIZE": "-10"},
     (1000, 1, "", True, -10)),
    ({"DefaultFolderSizeForDB": 0, "AUTOCLEANINGSPACE": 0,
      "AUTOCLEANINGSPACESIZE": " 40960 "}, (10000, 0, "", False, 40960)),
    ({"DefaultFolderSizeForDB": "0", "AUTOCLEANINGSPACE": "NO"}, (10000, 0, "", False, 1024)),
    ({"AUTOCLEANINGSPACE": "1", "AUTOCLEANINGSPACESIZE": 20.0}, (10000, 0, "", True, 20)),
    ({"AUTOCLEANINGSPACE": "false"}, (10000, 0, "", False, 1024)),
    ({"AUTOCLEANINGSPACE": True, "DefaultFolderSizeForDB": 5000.0},
     (5000, 0, "", True, 1024)),
])
def test_binary_plists_with_numbers_and_strings_are_read(tmp_path, values, expected):
    path = write_horos_preferences(values, home=str(tmp_path))
    with open(path, "rb") as handle:
        assert handle.read(8) == b"bplist00"         # what macOS writes
    prefs = hbe.read_horos_preferences(path)
    assert prefs.found
    assert (prefs.folder_size, prefs.database_location, prefs.database_location_url,
            prefs.auto_cleaning, prefs.auto_cleaning_size) == expected


@pytest.mark.parametrize("values, key", [
    ({"DefaultFolderSizeForDB": "lots"}, "DefaultFolderSizeForDB"),
    ({"DefaultFolderSizeForDB": -5}, "DefaultFolderSizeForDB"),
    ({"AUTOCLEANINGSPACESIZE": "ten percent"}, "AUTOCLEANINGSPACESIZE"),
    ({"AUTOCLEANINGSPACE": "maybe"}, "AUTOCLEANINGSPACE"),
    ({"DATABASELOCATIONURL": 7}, "DATABASELOCATIONURL"),
])
def test_a_value_that_cannot_be_used_is_named(tmp_path, values, key):
    path = write_horos_preferences(values, home=str(tmp_path))
    with pytest.raises(hbe.HorosPreferencesUnreadable) as raised:
        hbe.read_horos_preferences(path)
    assert key in str(raised.value) and path in str(raised.value)


@pytest.mark.parametrize("location, url, folder", [
    (0, "", "/Users/pacs/Documents/Horos Data"),
    (0, "/Volumes/PACS/Database", "/Users/pacs/Documents/Horos Data"),
    (1, "", "/Users/pacs/Documents/Horos Data"),
    (1, "/Volumes/PACS/Database", "/Volumes/PACS/Database/Horos Data"),
    (1, "/Volumes/PACS/Database/", "/Volumes/PACS/Database/Horos Data"),
    (1, "/Volumes/PACS/Database/Horos Data", "/Volumes/PACS/Database/Horos Data"),
    (1, "file:///Volumes/PACS/Database/", "/Volumes/PACS/Database/Horos Data"),
    (1, "file:///Volumes/My%20Disk/Horos%20Data/", "/Volumes/My Disk/Horos Data"),
    (1, "file://localhost/Volumes/RAID/", "/Volumes/RAID/Horos Data"),
])
def test_the_horos_data_folder_horos_uses(location, url, folder):
    prefs = hbe.HorosPreferences("p", True, database_location=location,
                                 database_location_url=url)
    assert hbe.horos_data_folder(prefs, "/Users/pacs") == folder


def test_the_effective_reserve():
    tb4 = 4 * 1000 ** 4
    percent = hbe.HorosPreferences("p", True, auto_cleaning_size=-10)
    reserve = hbe.effective_reserve(20, percent, tb4, same_disk=True)
    # 10 % of a 4 TB disk is 400 GB; Horos warns from 1.2 x that.
    assert reserve.horos_threshold == 400 * 1000 ** 3
    assert (reserve.bytes, reserve.source) == (480 * 1000 ** 3, "horos_auto_cleaning")
    assert "auto-cleaning" in reserve.detail and "400.0 GB" in reserve.detail
    megabytes = hbe.HorosPreferences("p", True, auto_cleaning_size=40960)
    reserve = hbe.effective_reserve(20, megabytes, tb4, same_disk=True)
    assert reserve.bytes == math.ceil(1.2 * 40960 * MIB)
    assert reserve.source == "horos_auto_cleaning"
    # Horos's default, 1024 MB, is below MIN_FREE_GB: MIN_FREE_GB applies.
    reserve = hbe.effective_reserve(20, hbe.HorosPreferences("p"), tb4, same_disk=True)
    assert (reserve.bytes, reserve.source) == (20 * 1000 ** 3, "min_free_gb")
    # Off, or the backup on another disk: only MIN_FREE_GB.
    off = hbe.HorosPreferences("p", True, auto_cleaning=False, auto_cleaning_size=-50)
    assert hbe.effective_reserve(20, off, tb4, True).bytes == 20 * 1000 ** 3
    assert "off" in hbe.effective_reserve(20, off, tb4, True).detail
    assert hbe.effective_reserve(20, percent, tb4, False).bytes == 20 * 1000 ** 3
    assert hbe.effective_reserve(0, percent, tb4, False).bytes == 0
    # --min-free-gb 0 does not turn Horos's threshold off.
    assert hbe.effective_reserve(0, percent, tb4, True).bytes == 480 * 1000 ** 3


# -- DefaultFolderSizeForDB in the path rule -------------------------------------------

@pytest.mark.parametrize("stored_as", [1000, "1000"])
def test_a_folder_size_1000_library_exports_every_study_under_its_usual_name(
        tmp_path, stored_as):
    usual = build_sample_library(str(tmp_path / "USUAL"))
    assert run_cycle(usual, "--min-free-gb", "0",
                     env=home_env(tmp_path / "nobody")).returncode == 0
    usual_names = set(zips_on_disk(backup_root(usual)))
    assert len(usual_names) == SAMPLE_CT_MR
    usual.close()

    lib = build_sample_library(str(tmp_path / "PACS"), folder_size=1000)
    # Laid out the way Horos lays out folder size 1000: 10000.dcm is in 11000/.
    assert os.path.isfile(os.path.join(lib.database_dir, "11000", "10000.dcm"))
    assert os.path.isfile(os.path.join(lib.database_dir, "21000", "20006.pdf"))
    home = tmp_path / "home"
    write_horos_preferences({"DefaultFolderSizeForDB": stored_as}, home=str(home))

    dry = run_cycle(lib, "--dry-run", env=home_env(home))
    assert dry.returncode == 0, dry.stderr
    actions = [line.split()[1] for line in dry.stdout.splitlines() if line[:1] in "[-"]
    assert actions == ["export"] * SAMPLE_CT_MR

    result = run_cycle(lib, "--min-free-gb", "0", env=home_env(home))
    assert result.returncode == 0, result.stderr
    root = backup_root(lib)
    assert set(zips_on_disk(root)) == usual_names
    assert issues_rows(root) == []
    expected = expected_payloads(lib)
    for row in state_rows(root):
        assert row["missing_count"] == 0
        payload = zip_payload(os.path.join(root, row["zip_path"]))
        assert {os.path.basename(m): data for m, data in payload.items()} == \
            expected[row["study_uid"]]
    lib.close()


def test_without_the_preference_a_folder_size_1000_library_is_not_found(tmp_path):
    # What the folder size preference is for: the default rule misses these files.
    lib = build_sample_library(str(tmp_path / "PACS"), folder_size=1000)
    result = run_cycle(lib, "--min-free-gb", "0", env=home_env(tmp_path / "home"))
    assert result.returncode == 0, result.stderr
    kinds = [row["kind"] for row in issues_rows(backup_root(lib))]
    assert "NO_FILES" in kinds or "MISSING_FILES" in kinds
    assert len(zips_on_disk(backup_root(lib))) < SAMPLE_CT_MR
    lib.close()


def test_absent_default_preferences_change_nothing_and_are_logged_once_per_cycle(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    home = tmp_path / "home"
    home.mkdir()
    root = backup_root(lib)
    result = run_cycle(lib, "--batch-size", "10", env=home_env(home))
    assert result.returncode == 0, result.stderr
    assert len(zips_on_disk(root)) == 10
    expected = expected_payloads(lib)
    for row in state_rows(root):
        payload = zip_payload(os.path.join(root, row["zip_path"]))
        assert {os.path.basename(m): data for m, data in payload.items()} == \
            expected[row["study_uid"]]
    line = "no Horos preferences at %s" % os.path.join(
        str(home), "Library", "Preferences", "org.horosproject.horos.plist")
    assert log_text(root).count(line) == 1
    assert run_cycle(lib, env=home_env(home)).returncode == 0
    assert log_text(root).count(line) == 2
    assert len(zips_on_disk(root)) == SAMPLE_CT_MR
    assert not os.path.exists(home / "Library")      # read, never written
    lib.close()


@pytest.mark.parametrize("content", [None, b"not a property list", b"bplist00\x00\x01"])
def test_explicit_preferences_that_are_missing_or_unreadable_stop_everything(
        tmp_path, library, content):
    prefs = tmp_path / "horos.plist"
    if content is not None:
        prefs.write_bytes(content)
    library.add_simple_study("1.2.3.1", study_date=dt.datetime(2020, 1, 1))
    library.finish()
    for command in ([], ["--dry-run"], ["status"], ["doctor"]):
        result = run_cycle(library, *command, "--horos-prefs", prefs,
                           env=home_env(tmp_path / "home"))
        assert result.returncode == 1, command
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(prefs) in lines[0], (command, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr
        assert not os.path.exists(backup_root(library))    # not even .tmp or the log


def test_unusable_preferences_at_the_default_path_stop_the_cycle(tmp_path, library):
    home = tmp_path / "home"
    path = write_horos_preferences({"DefaultFolderSizeForDB": "many"}, home=str(home))
    library.add_simple_study("1.2.3.1", study_date=dt.datetime(2020, 1, 1))
    library.finish()
    result = run_cycle(library, env=home_env(home))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "DefaultFolderSizeForDB" in result.stderr and path in result.stderr
    assert not os.path.exists(backup_root(library))


def test_an_explicit_path_is_read_and_the_home_one_ignored(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"), folder_size=1000)
    home = tmp_path / "home"
    write_horos_preferences({"DefaultFolderSizeForDB": 10000}, home=str(home))
    other = write_horos_preferences({"DefaultFolderSizeForDB": "1000"},
                                    path=str(tmp_path / "pacs-user.plist"))
    result = run_cycle(lib, "--min-free-gb", "0", "--horos-prefs", other, env=home_env(home))
    assert result.returncode == 0, result.stderr
    assert len(zips_on_disk(backup_root(lib))) == SAMPLE_CT_MR
    lib.close()


def test_without_flags_the_library_is_where_horos_keeps_it(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    home = tmp_path / "home"
    url = "file://" + os.path.join(lib.pacs_root, "Database").replace(" ", "%20") + "/"
    write_horos_preferences({"DATABASELOCATION": 1, "DATABASELOCATIONURL": url},
                            home=str(home))
    # No --pacs-root and no --horos-data: the sentinel is /Volumes/PACS's (absent here),
    # but the library doctor reads is the one Horos's preferences name.
    result = run_script("doctor", "--json", "--backup-root", str(tmp_path / "B" / "H"),
                        env=home_env(home))
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["horos_data"]["status"] == "ok"
    assert lib.horos_data in checks["horos_data"]["detail"]
    assert checks["horos_database"]["status"] == "ok"
    assert checks["path_rule"]["status"] == "ok"
    assert checks["pacs_sentinel"]["status"] == "fail"
    # With DATABASELOCATION 0 it is ~/Documents/Horos Data, which does not exist here.
    write_horos_preferences({"DATABASELOCATION": "0", "DATABASELOCATIONURL": url},
                            home=str(home))
    result = run_script("doctor", "--json", env=home_env(home))
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["horos_data"]["status"] == "fail"
    assert os.path.join(str(home), "Documents", "Horos Data") in checks["horos_data"]["detail"]
    lib.close()


# -- auto-cleaning on a real small volume ------------------------------------------------

@pytest.fixture
def shared_disk(tmp_path):
    """A real 48 MiB file system (tmpfs) holding the PACS root: library and backup."""
    with mounted_tmpfs(tmp_path / "PACS", "48m") as mount_point:
        yield mount_point


def one_mib_studies(pacs_root, count=16):
    """count CT studies of 1 MiB each (two 512 KiB files of random bytes)."""
    lib = FakeHorosLibrary(pacs_root)
    for i in range(count):
        pk = lib.add_study("1.2.70.%d" % i, "CLEAN^%d" % i, "C%d" % i,
                           study_date=dt.datetime(2018, 1 + i % 12, 1 + i, 9, 0))
        se = lib.add_series(pk, "CT", "Axial", 1)
        for _ in range(2):
            lib.add_image(se, content=os.urandom(MIB // 2))
    lib.finish()
    return lib


def free_bytes(path):
    usage = os.statvfs(path)
    return usage.f_bavail * usage.f_frsize


def total_bytes(path):
    usage = os.statvfs(path)
    return usage.f_blocks * usage.f_frsize


CYCLE = ("--min-free-gb", "0", "--settle-minutes", "0", "--batch-size", "50",
         "--compression", "stored")


@pytest.mark.slow
@pytest.mark.parametrize("size", ["16", -40])     # 16 MB (a string), 40 % (a number)
def test_auto_cleaning_stops_the_cycle_before_horos_would_delete(tmp_path, shared_disk,
                                                                 size):
    lib = one_mib_studies(shared_disk)
    home = tmp_path / "home"
    write_horos_preferences({"AUTOCLEANINGSPACE": True, "AUTOCLEANINGSPACESIZE": size},
                            home=str(home))
    threshold = int(size) * MIB if int(size) > 0 else total_bytes(shared_disk) * 40 // 100
    reserve = math.ceil(1.2 * threshold)
    assert free_bytes(shared_disk) > reserve + 4 * MIB     # room for a few studies
    root = backup_root(lib)

    status = json.loads(run_cycle(lib, *CYCLE, "status", "--json",
                                  env=home_env(home)).stdout)
    assert status["reserve"]["source"] == "horos_auto_cleaning"
    assert status["reserve"]["bytes"] == reserve
    assert status["reserve"]["horos_threshold_bytes"] == threshold
    text = run_cycle(lib, *CYCLE, "status", env=home_env(home)).stdout
    assert "auto-cleaning threshold" in text

    result = run_cycle(lib, *CYCLE, env=home_env(home))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "backup volume low" in result.stderr and "auto-cleaning" in result.stderr
    assert "Traceback" not in result.stderr
    exported = len(zips_on_disk(root))
    assert 0 < exported < 16
    assert free_bytes(shared_disk) >= reserve          # never below 1.2 x the threshold
    rows = issues_rows(root)
    assert [r["kind"] for r in rows] == ["DISK_LOW"]
    assert "auto-cleaning threshold" in rows[0]["detail"]
    assert hbe.format_bytes(threshold) in rows[0]["detail"]
    assert hbe.format_bytes(reserve) in rows[0]["detail"]
    # The next cycle stops again, writing nothing.
    assert run_cycle(lib, *CYCLE, env=home_env(home)).returncode == 1
    assert len(zips_on_disk(root)) == exported
    lib.close()


@pytest.mark.slow
@pytest.mark.parametrize("off", [False, "NO", 0])
def test_with_auto_cleaning_off_only_min_free_gb_applies(tmp_path, shared_disk, off):
    lib = one_mib_studies(shared_disk)
    home = tmp_path / "home"
    write_horos_preferences({"AUTOCLEANINGSPACE": off, "AUTOCLEANINGSPACESIZE": -40},
                            home=str(home))
    status = json.loads(run_cycle(lib, *CYCLE, "status", "--json",
                                  env=home_env(home)).stdout)
    assert status["reserve"]["source"] == "min_free_gb"
    assert status["reserve"]["bytes"] == 0
    result = run_cycle(lib, *CYCLE, env=home_env(home))
    assert result.returncode == 0, result.stderr
    assert len(zips_on_disk(backup_root(lib))) == 16
    lib.close()


@pytest.mark.slow
def test_a_backup_on_another_disk_ignores_the_threshold(tmp_path, shared_disk):
    # The library on the test's disk, the backup on the tmpfs: Horos cleans only the
    # library's volume, so its threshold does not limit what the backup disk holds.
    lib = one_mib_studies(str(tmp_path / "LIBRARY"), count=12)
    open(os.path.join(shared_disk, ".backup_sentinel"), "w").close()
    home = tmp_path / "home"
    write_horos_preferences({"AUTOCLEANINGSPACESIZE": "-90"}, home=str(home))
    target = os.path.join(shared_disk, "Horos")
    status = json.loads(run_cycle(lib, *CYCLE, "status", "--json", "--backup-root", target,
                                  env=home_env(home)).stdout)
    assert status["reserve"]["source"] == "min_free_gb"
    assert status["reserve"]["horos_threshold_bytes"] is None
    result = run_cycle(lib, "--backup-root", target, *CYCLE, env=home_env(home))
    assert result.returncode == 0, result.stderr
    assert len(zips_on_disk(target)) == 12
    lib.close()


@pytest.mark.slow
@pytest.mark.parametrize("backup_with", ["library", "pacs_root"])
def test_the_reserve_follows_the_disk_of_horos_data_not_of_pacs_root(tmp_path, backup_with):
    # Horos Data on a file system of its own, --pacs-root (its sentinel) on the test's
    # disk: Horos cleans the volume that holds its library, so that is the one the backup
    # must share for the threshold to apply, whichever disk --pacs-root is on.
    with mounted_tmpfs(tmp_path / "LIBRARY", "16m") as library_disk:
        lib = FakeHorosLibrary(library_disk, sentinel=False)
        for i in range(2):
            lib.add_simple_study("1.2.71.%d" % i, images=2, size=4096,
                                 study_date=dt.datetime(2018, 2, 1 + i, 9, 0))
        lib.finish()
        lib.close()
        pacs = tmp_path / "PACS"
        pacs.mkdir()
        (pacs / ".pacs_sentinel").touch()
        if backup_with == "library":
            target = os.path.join(library_disk, "Backup")
            open(os.path.join(library_disk, ".backup_sentinel"), "w").close()
        else:
            target = str(pacs / "Backup")
        home = tmp_path / "home"
        write_horos_preferences({"AUTOCLEANINGSPACESIZE": "-90"}, home=str(home))
        flags = ("--pacs-root", pacs, "--horos-data", lib.horos_data,
                 "--backup-root", target) + CYCLE
        assert not hbe.same_disk(lib.horos_data, str(pacs))
        result = run_script(*flags, "--clinic-hours", "00-24", env=home_env(home))
        status = json.loads(run_script(*flags, "status", "--json",
                                       env=home_env(home)).stdout)["reserve"]
        if backup_with == "library":
            # 1.2 x 90 % of the library's volume can never be free: stop before writing.
            assert result.returncode == 1, result.stdout + result.stderr
            assert "backup volume low" in result.stderr and "auto-cleaning" in result.stderr
            assert zips_on_disk(target) == {}
            assert [r["kind"] for r in issues_rows(target)] == ["DISK_LOW"]
            assert status["source"] == "horos_auto_cleaning"
            assert status["horos_threshold_bytes"] == total_bytes(library_disk) * 90 // 100
        else:
            # The backup shares --pacs-root's disk, not the library's: only
            # --min-free-gb (0 here) applies, however full the test's disk is.
            assert result.returncode == 0, result.stdout + result.stderr
            assert len(zips_on_disk(target)) == 2
            assert issues_rows(target) == []
            assert status["source"] == "min_free_gb"
            assert status["horos_threshold_bytes"] is None
