"""kill -9 at any instant, and a real file system that fills up."""

import datetime as dt
import os
import random
import sqlite3
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import PINNED_SCHEDULE
from conftest import (SCRIPT, TEST_TZ, backup_root, files_named, issues_rows, manifest_of,
                      mounted_tmpfs, run_cycle, state_rows, zip_payload, zips_on_disk)
from fake_horos import FakeHorosLibrary

CHUNK = 1024 * 1024


def big_library(root, studies=8, files=4, size=3 * CHUNK):
    lib = FakeHorosLibrary(root)
    for i in range(studies):
        pk = lib.add_study("1.2.90.%d" % i, "PATIENT^%d" % i, "ID%d" % i,
                           study_date=dt.datetime(2016, 1 + i, 10, 12, 0))
        se = lib.add_series(pk, "CT", "Axial", 1)
        for _ in range(files):
            lib.add_image(se, content=os.urandom(size))
    lib.finish()
    return lib


def zip_is_good(path):
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                return False
            names = set(archive.namelist())
            manifest = manifest_of(path)
            return names == {e["name"] for e in manifest["files"]} | {
                "horos-backup-manifest.json"}
    except (zipfile.BadZipFile, OSError, KeyError, ValueError):
        return False


def assert_consistent(root):
    """What must hold at every instant: visible ZIPs verify, state rows point at them."""
    for relpath in zips_on_disk(root):
        assert zip_is_good(os.path.join(root, relpath)), relpath
    state = os.path.join(root, "export_state.sqlite")
    if os.path.exists(state):
        conn = sqlite3.connect(state)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        in_progress = {r["zip_path"] for r in state_rows(
            root, "SELECT zip_path FROM writes_in_progress")}
        for row in state_rows(root):
            path = os.path.join(root, row["zip_path"])
            assert os.path.exists(path), row["zip_path"]
            assert zip_is_good(path), row["zip_path"]
            # Killed between the rename of a re-export and its commit: the row still
            # describes the ZIP replaced under the same name, and the write record that
            # lets the next cycle adopt the new one is there.
            if os.path.getsize(path) != row["zip_bytes"]:
                assert row["zip_path"] in in_progress, row["zip_path"]


def wait_for_part(root, proc, deadline):
    while time.monotonic() < deadline and proc.poll() is None:
        if files_named(root, ".part"):
            return True
        time.sleep(0.002)
    return False


def test_repeated_kill_9_never_corrupts_and_ends_with_one_zip_per_study(tmp_path):
    # More studies than rounds can finish, so that most rounds find a write to kill.
    lib = big_library(str(tmp_path / "PACS"), studies=12)
    root = backup_root(lib)
    rng = random.Random(20261124)
    env = dict(os.environ, TZ=TEST_TZ)
    args = [sys.executable, SCRIPT, "--pacs-root", lib.pacs_root, "--batch-size", "2",
            "--settle-minutes", "0", "--min-free-gb", "0", *PINNED_SCHEDULE]
    killed_mid_write = 0
    for round_ in range(16):
        if round_ == 6:   # a patient is renamed: the next export replaces a ZIP by name
            lib.conn.execute("UPDATE ZSTUDY SET ZNAME = 'RENAMED^0' WHERE ZSTUDYINSTANCEUID "
                             "= '1.2.90.0'")
            lib.finish()
        if round_ == 9:   # a late series: a re-export in place
            pk = lib.conn.execute("SELECT Z_PK FROM ZSTUDY WHERE ZSTUDYINSTANCEUID = "
                                  "'1.2.90.1'").fetchone()[0]
            se = lib.add_series(pk, "CT", "Late", 2)
            lib.add_image(se, content=os.urandom(2 * CHUNK))
            lib.finish()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env)
        if round_ % 4 != 3 and wait_for_part(root, proc, time.monotonic() + 30):
            time.sleep(rng.uniform(0, 0.03))        # somewhere inside a write or verify
        else:
            time.sleep(rng.uniform(0.0, 0.6))        # anywhere at all
        if proc.poll() is None:
            proc.kill()
            killed_mid_write += bool(files_named(root, ".part") or state_rows(
                root, "SELECT * FROM writes_in_progress"))
        proc.wait()
        assert b"Traceback" not in proc.stderr.read()
        proc.stderr.close()
        assert_consistent(root)
    assert killed_mid_write >= 5   # the kills really landed inside writes
    for _ in range(10):
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        if "cycle done: 0 studies" in result.stdout:
            break
    assert_consistent(root)
    rows = {r["study_uid"]: r for r in state_rows(root)}
    assert set(rows) == {"1.2.90.%d" % i for i in range(12)}
    assert set(zips_on_disk(root)) == {r["zip_path"] for r in rows.values()}  # one each
    assert "RENAMED_0" in rows["1.2.90.0"]["zip_path"]
    for uid, row in rows.items():
        payload = zip_payload(os.path.join(root, row["zip_path"]))
        expected = {}
        for path in lib.study_files[uid]:
            with open(path, "rb") as handle:
                expected[os.path.basename(path)] = handle.read()
        assert {os.path.basename(m): data for m, data in payload.items()} == expected
    assert files_named(root, ".part") == []
    assert sorted(os.listdir(os.path.join(root, ".tmp"))) == [".run.lock"]
    assert state_rows(root, "SELECT * FROM writes_in_progress") == []
    lib.close()


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MB file system (tmpfs), mounted for the test when running as root (the
    injected ENOSPC test runs anyway)."""
    with mounted_tmpfs(tmp_path / "BACKUPDISK", "6m") as mount_point:
        # the backup disk is another file system
        open(os.path.join(mount_point, ".backup_sentinel"), "w").close()
        yield mount_point


def test_a_full_small_disk_ends_cleanly_and_the_next_cycle_continues(tmp_path, small_disk):
    lib = big_library(str(tmp_path / "PACS"), studies=5, files=3, size=CHUNK // 2)
    target = os.path.join(small_disk, "Horos")
    args = ("--backup-root", target, "--min-free-gb", "0", "--settle-minutes", "0")
    result = run_cycle(lib, *args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert "full" in result.stderr
    assert_consistent(target)
    assert files_named(target, ".part") == []
    exported_first = {r["study_uid"] for r in state_rows(target)}
    assert 0 < len(exported_first) < 5
    assert "DISK_FULL" in [r["kind"] for r in issues_rows(target)]
    # Room again: the next cycle picks up where this one stopped.
    subprocess.run(["mount", "-o", "remount,size=40m", small_disk], check=True)
    result = run_cycle(lib, *args)
    assert result.returncode == 0, result.stderr
    assert_consistent(target)
    assert {r["study_uid"] for r in state_rows(target)} == {"1.2.90.%d" % i for i in range(5)}
    assert len(zips_on_disk(target)) == 5
    lib.close()


def test_the_reserve_stops_the_cycle_before_the_disk_is_full(tmp_path, small_disk):
    lib = big_library(str(tmp_path / "PACS"), studies=4, files=2, size=CHUNK // 2)
    target = os.path.join(small_disk, "Horos")
    reserve = 3 * 1000 ** 2                       # --min-free-gb 0.003
    result = run_cycle(lib, "--backup-root", target, "--min-free-gb", "0.003",
                       "--settle-minutes", "0")
    assert result.returncode == 1
    assert "backup volume low" in result.stderr and "Traceback" not in result.stderr
    usage = os.statvfs(small_disk)
    assert usage.f_bavail * usage.f_frsize >= reserve    # the reserve was left alone
    assert 0 < len(zips_on_disk(target)) < 4
    assert_consistent(target)
    assert [r["kind"] for r in issues_rows(target)] == ["DISK_LOW"]
    lib.close()
