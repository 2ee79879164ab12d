"""Operator commands, end to end: dry run, status, verify, restore, reindex, retry."""

import datetime as dt
import fcntl
import json
import os
import pty
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile

import pytest

from conftest import PINNED_SCHEDULE
from conftest import (SCRIPT, TEST_TZ, backup_root, file_digest, files_named, issues_rows,
                      manifest_of, run_cycle, run_script, state_rows, tree_snapshot,
                      zip_payload, zips_on_disk)
from fake_horos import FakeHorosLibrary, build_sample_library
from test_cycle import build_dated_library


@pytest.fixture
def sample(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    yield lib
    lib.close()


def flip_member_byte(zip_path, member_index=0):
    """Damage one byte of a member's data, as a failing disk sector would."""
    with zipfile.ZipFile(zip_path) as archive:
        info = archive.infolist()[member_index]
    with open(zip_path, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_len = int.from_bytes(handle.read(2), "little")
        extra_len = int.from_bytes(handle.read(2), "little")
        data_at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        handle.seek(data_at)
        byte = handle.read(1)
        handle.seek(data_at)
        handle.write(bytes([byte[0] ^ 0x55]))


def status_json(lib, *args):
    result = run_cycle(lib, "status", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- dry run ---------------------------------------------------------------------------

def test_dry_run_names_the_next_batch_and_writes_nothing(tmp_path):
    lib, order = build_dated_library(str(tmp_path / "PACS"))
    root = backup_root(lib)
    result = run_cycle(lib, "--dry-run", "--use-db-copy")
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(root)            # not even a log, a lock or a db copy
    listed = [line.split()[2] for line in result.stdout.splitlines()
              if line.startswith("[") and " export " in line]
    assert listed == order[:15]
    assert "1.2.826.9." not in result.stdout   # the ultrasound studies are not listed
    assert run_cycle(lib).returncode == 0
    assert {r["study_uid"] for r in state_rows(root)} == set(order[:15])
    before = tree_snapshot(root)
    result = run_cycle(lib, "--dry-run")
    assert result.returncode == 0
    assert [line.split()[2] for line in result.stdout.splitlines()
            if line.startswith("[")] == order[15:30]
    assert tree_snapshot(root) == before       # state, log, lock, ZIPs: all untouched
    lib.close()


def test_dry_run_shows_deferrals_and_failures(library):
    pk = library.add_study("1.2.100.1", study_date=dt.datetime(2015, 1, 1))
    se = library.add_series(pk, "CT", "x", 1)
    library.add_image(se, size=100)
    library.add_image(se, create_file=False)
    pk = library.add_study("1.2.100.2", study_date=dt.datetime(2015, 1, 2))
    library.add_image(library.add_series(pk, "CT", "x", 1), create_file=False)
    library.add_simple_study("1.2.100.3", study_date=dt.datetime(2015, 1, 3))
    library.finish()
    lines = run_cycle(library, "--dry-run").stdout.splitlines()
    rows = {next(w for w in line.split() if w.startswith("1.2.100.")): line
            for line in lines if " 1.2.100." in line}
    assert " defer " in rows["1.2.100.1"] and "1 of 2 files missing" in "\n".join(lines)
    assert " fail " in rows["1.2.100.2"]
    assert rows["1.2.100.3"].startswith("[1/") and " export " in rows["1.2.100.3"]
    assert not os.path.exists(backup_root(library))


# -- status ----------------------------------------------------------------------------

def test_status_numbers_match_the_library(tmp_path):
    lib, order = build_dated_library(str(tmp_path / "PACS"), count=30)
    for i in range(2):   # two studies whose files are gone
        pk = lib.add_study("1.2.101.%d" % i, study_date=dt.datetime(2001, 1, 1 + i))
        lib.add_image(lib.add_series(pk, "MR", "x", 1), create_file=False)
    lib.finish()
    root = backup_root(lib)
    assert run_cycle(lib, "--batch-size", "10").returncode == 0
    # One exported study is deleted in Horos: it stays in the backup.
    gone = state_rows(root, "SELECT study_uid FROM exported_studies LIMIT 1")[0]["study_uid"]
    lib.conn.execute("DELETE FROM ZSTUDY WHERE ZSTUDYINSTANCEUID = ?", (gone,))
    lib.finish()
    before = tree_snapshot(root)
    status = status_json(lib)
    assert tree_snapshot(root) == before                       # status writes nothing
    assert status["eligible"] == 31                            # 32 CT/MR minus the deleted
    assert status["exported"] == 10
    assert status["only_in_backup"] == 1
    assert status["failed"] == 2 and status["waiting"] == 2
    assert status["pending"] == 31 - 9 - 2
    assert status["bytes"] == sum(zips_on_disk(root).values())
    assert {f["study_uid"] for f in status["failures"]} == {"1.2.101.0", "1.2.101.1"}
    assert [r["studies"] for r in status["last_runs"]] == [10]
    assert status["eta_seconds"] == -(-status["pending"] // 10) * 600
    assert status["lock"] == {"held": False, "pid": None}
    assert status["sentinel"]["present"] is True
    assert status["backup_free_bytes"] > 0
    months = {m["month"]: m for m in status["months"]}
    exported_by_month = {}
    for row in state_rows(root):
        exported_by_month[row["month"]] = exported_by_month.get(row["month"], 0) + 1
    assert {m: v["exported"] for m, v in months.items() if v["exported"]} == exported_by_month
    assert sum(m["eligible"] for m in months.values()) == 31
    for month in months.values():
        assert month["done"] == os.path.exists(os.path.join(root, month["month"],
                                                            ".month_done"))
    text = run_cycle(lib, "status")
    assert text.returncode == 0
    assert "  exported         10 (" in text.stdout
    assert "  only in backup   1 (no longer in Horos)" in text.stdout
    assert "  failed           2 (2 waiting" in text.stdout
    lib.close()


def test_flags_go_before_or_after_the_command(sample):
    run_cycle(sample)
    after = run_script("status", "--json", "--pacs-root", sample.pacs_root)
    before = run_script("--pacs-root", sample.pacs_root, "status", "--json")
    assert after.returncode == before.returncode == 0
    a, b = json.loads(after.stdout), json.loads(before.stdout)
    for status in (a, b):
        status.pop("generated_at")
        status.pop("horos_read_seconds")
        status.pop("horos_longest_seconds")
        status.pop("backup_free_bytes")
    assert a == b and a["exported"] == 14
    moved = run_script("--modalities", "US", "status", "--json", "--pacs-root",
                       sample.pacs_root)
    assert json.loads(moved.stdout)["eligible"] == 1


def test_status_shows_a_held_lock(sample):
    run_cycle(sample)
    with open(os.path.join(backup_root(sample), ".tmp", ".run.lock"), "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write("4242\n")
        lock.flush()
        assert status_json(sample)["lock"] == {"held": True, "pid": 4242}


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["verify"],
                                     ["reindex"], ["retry"], ["--dry-run"],
                                     ["restore", "x.zip", "--into-horos"]])
def test_every_command_refuses_without_the_sentinel(sample, command):
    os.remove(os.path.join(sample.pacs_root, ".pacs_sentinel"))
    result = run_cycle(sample, *command)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "sentinel" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not os.path.exists(backup_root(sample))


# -- verify ----------------------------------------------------------------------------

def test_verify_catches_a_flipped_byte_and_the_next_cycle_rewrites_it(sample):
    assert run_cycle(sample).returncode == 0
    root = backup_root(sample)
    uid = "1.2.392.200036.9116.2.6.1.48.1215.1551385800.1"
    relpath = [r["zip_path"] for r in state_rows(root) if r["study_uid"] == uid][0]
    flip_member_byte(os.path.join(root, relpath), 2)
    result = run_cycle(sample, "verify", "--all")
    assert result.returncode == 1
    assert "BAD %s" % relpath in result.stdout
    assert [(r["kind"], r["study_uid"], r["extra"]) for r in issues_rows(root)] == [
        ("VERIFY_FAILED", uid, relpath)]
    assert uid not in {r["study_uid"] for r in state_rows(root)}
    assert len(state_rows(root)) == 13
    assert run_cycle(sample).returncode == 0          # exported again, same name
    assert zips_on_disk(root).keys() == {r["zip_path"] for r in state_rows(root)}
    payload = zip_payload(os.path.join(root, relpath))
    for entry in manifest_of(os.path.join(root, relpath))["files"]:
        with open(entry["source"], "rb") as handle:
            assert payload[entry["name"]] == handle.read()
    result = run_cycle(sample, "verify", "--all")
    assert result.returncode == 0, result.stdout
    assert "14 ZIPs read" in result.stdout and "0 bad" in result.stdout


def test_verify_names_a_missing_zip(sample):
    run_cycle(sample)
    root = backup_root(sample)
    relpath = state_rows(root)[0]["zip_path"]
    os.remove(os.path.join(root, relpath))
    result = run_cycle(sample, "verify", "--all")
    assert result.returncode == 1 and "BAD %s: the ZIP is missing" % relpath in result.stdout


def test_verify_goes_oldest_verified_first_within_its_budget(sample):
    run_cycle(sample, "--verify-per-run", "0")
    root = backup_root(sample)
    state = os.path.join(root, "export_state.sqlite")
    conn = sqlite3.connect(state)
    order = [r[0] for r in conn.execute("SELECT study_uid FROM exported_studies")]
    for age, uid in enumerate(order):      # the first is the longest unverified
        conn.execute("UPDATE exported_studies SET verified_at = ? WHERE study_uid = ?",
                     ("2001-01-%02dT00:00:00Z" % (age + 1), uid))
    conn.commit()
    conn.close()
    result = run_cycle(sample, "verify", "--limit", "3")
    assert result.returncode == 0 and "3 ZIPs read" in result.stdout
    fresh = {r["study_uid"] for r in state_rows(root) if not r["verified_at"].startswith("2001")}
    assert fresh == set(order[:3])
    result = run_cycle(sample, "verify", "--max-gb", "0.000001")
    assert "1 ZIPs read" in result.stdout      # stops once the budget is read


def test_each_cycle_rereads_old_zips_and_catches_damage(sample):
    run_cycle(sample)
    root = backup_root(sample)
    row = state_rows(root)[0]
    flip_member_byte(os.path.join(root, row["zip_path"]))
    conn = sqlite3.connect(os.path.join(root, "export_state.sqlite"))
    conn.execute("UPDATE exported_studies SET verified_at = '2001-01-01T00:00:00Z' "
                 "WHERE study_uid = ?", (row["study_uid"],))
    conn.commit()
    conn.close()
    result = run_cycle(sample, "--verify-per-run", "1")
    assert result.returncode == 0
    assert [r["kind"] for r in issues_rows(root)] == ["VERIFY_FAILED"]
    assert run_cycle(sample).returncode == 0            # and the next one rewrites it
    path = os.path.join(root, row["zip_path"])
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None


def test_verify_waits_for_a_running_cycle(sample):
    run_cycle(sample)
    lock_path = os.path.join(backup_root(sample), ".tmp", ".run.lock")
    lock = open(lock_path, "r+")
    fcntl.flock(lock, fcntl.LOCK_EX)
    threading.Timer(2.0, lock.close).start()             # the cycle ends in 2 s
    started = time.monotonic()
    result = run_cycle(sample, "verify", "--limit", "1")
    assert result.returncode == 0
    assert time.monotonic() - started >= 1.5
    assert "waiting for it to finish" in result.stdout


# -- restore ---------------------------------------------------------------------------

def test_restore_gives_the_files_back_byte_for_byte(sample, tmp_path):
    run_cycle(sample)
    root = backup_root(sample)
    target = tmp_path / "restored"
    target.mkdir()
    (target / "unrelated.txt").write_text("already here")
    uid = "1.3.12.2.1107.5.2.30.25245.30000019030112345678900000001"
    relpath = [r["zip_path"] for r in state_rows(root) if r["study_uid"] == uid][0]
    # Needs no library: the PACS volume is not even given.
    result = run_script("restore", os.path.join(root, relpath), "--to", str(target),
                        "--pacs-root", str(tmp_path / "not-mounted"))
    assert result.returncode == 0, result.stderr
    folder = target / os.path.basename(relpath)[:-4]
    restored = {}
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as handle:
                restored[os.path.relpath(os.path.join(dirpath, name), folder)] = handle.read()
    originals = {}
    for entry in manifest_of(os.path.join(root, relpath))["files"]:
        with open(entry["source"], "rb") as handle:
            originals[entry["name"]] = handle.read()
    assert restored == originals
    assert sorted(os.listdir(target)) == sorted([folder.name, "unrelated.txt"])
    # Never overwrites: a second restore refuses and changes nothing.
    stamp = tree_snapshot(str(target))
    again = run_script("restore", relpath, "--to", str(target), "--pacs-root",
                       sample.pacs_root)                  # relative to BACKUP_ROOT
    assert again.returncode == 1 and "already exists" in again.stderr
    assert tree_snapshot(str(target)) == stamp


def write_hostile_zip(path, member):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, b"owned")
        archive.writestr("horos-backup-manifest.json", json.dumps({
            "format": "horos-backup-manifest", "format_version": 1,
            "files": [{"name": member, "size": 5, "crc32": "0", "source": "/x"}]}))


@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/absolute-escape.txt",
                                    "a/../../escaped.txt", "a\\..\\escaped.txt"])
def test_restore_refuses_unsafe_member_names(tmp_path, member):
    hostile = str(tmp_path / "hostile.zip")
    write_hostile_zip(hostile, member)
    target = tmp_path / "out"
    result = run_script("restore", hostile, "--to", str(target))
    assert result.returncode == 1 and "unsafe member name" in result.stderr
    assert os.listdir(target) == []
    assert not (tmp_path / "escaped.txt").exists()
    assert not os.path.exists("/tmp/absolute-escape.txt")


def test_restore_of_a_damaged_zip_leaves_nothing(sample, tmp_path):
    run_cycle(sample)
    root = backup_root(sample)
    relpath = state_rows(root)[0]["zip_path"]
    flip_member_byte(os.path.join(root, relpath))
    target = tmp_path / "out"
    result = run_script("restore", os.path.join(root, relpath), "--to", str(target))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert os.listdir(target) == []


def test_restore_into_horos_goes_through_a_staging_folder(sample):
    run_cycle(sample)
    root = backup_root(sample)
    relpaths = [r["zip_path"] for r in state_rows(root)][:2]
    result = run_cycle(sample, "restore", *relpaths, "--into-horos")
    assert result.returncode == 0, result.stderr
    incoming = sorted(os.listdir(sample.incoming_dir))
    assert incoming == sorted(os.path.basename(p)[:-4] for p in relpaths)  # no staging here
    staging = os.path.join(sample.horos_data, ".horos-backup-restore")
    assert os.listdir(staging) == []
    for relpath in relpaths:
        folder = os.path.join(sample.incoming_dir, os.path.basename(relpath)[:-4])
        names = set()
        for dirpath, _dirs, files in os.walk(folder):
            names.update(os.path.relpath(os.path.join(dirpath, f), folder) for f in files)
        assert names == set(zip_payload(os.path.join(root, relpath)))


# -- reindex ---------------------------------------------------------------------------

def test_reindex_after_losing_the_state_rewrites_nothing(sample):
    assert run_cycle(sample).returncode == 0
    root = backup_root(sample)
    keep = ("study_uid", "zip_path", "zip_bytes", "file_count", "missing_count",
            "source_bytes", "fingerprint", "study_date", "month", "patient_name",
            "modalities", "exported_at")
    before = [{k: r[k] for k in keep} for r in state_rows(root)]
    zips = {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in zips_on_disk(root)}
    os.remove(os.path.join(root, "export_state.sqlite"))
    open(os.path.join(root, "2019_03", "leftover.zip.part"), "wb").close()
    result = run_cycle(sample, "reindex")
    assert result.returncode == 0, result.stderr
    assert "14 studies from their ZIPs" in result.stdout
    assert [{k: r[k] for k in keep} for r in state_rows(root)] == before
    assert all(r["verified_at"] is None for r in state_rows(root))
    assert files_named(root, ".part") == []
    result = run_cycle(sample)
    assert result.returncode == 0 and "cycle done: 0 studies" in result.stdout
    assert {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in zips_on_disk(root)} == zips


def test_reindex_keeps_the_old_state_and_reports_unreadable_zips(sample):
    run_cycle(sample)
    root = backup_root(sample)
    old = file_digest(os.path.join(root, "export_state.sqlite"))
    with open(os.path.join(root, "2020_01", "junk.zip"), "wb") as handle:
        handle.write(b"not a zip at all")
    result = run_cycle(sample, "reindex")
    assert result.returncode == 1
    assert "2020_01/junk.zip has no readable manifest" in result.stdout
    assert file_digest(os.path.join(root, "export_state.sqlite.before-reindex")) == old
    assert len(state_rows(root)) == 14
    assert [r["kind"] for r in issues_rows(root)] == ["UNREADABLE_ZIP"]


# -- retry -----------------------------------------------------------------------------

def test_retry_clears_the_back_off(library):
    for i in range(2):
        pk = library.add_study("1.2.102.%d" % i, study_date=dt.datetime(2015, 1, 1 + i))
        library.add_image(library.add_series(pk, "CT", "x", 1), create_file=False)
    library.finish()
    run_cycle(library)
    assert "cycle done: 0 studies" in run_cycle(library).stdout   # both wait
    result = run_cycle(library, "retry", "1.2.102.1")
    assert result.returncode == 0
    assert "will retry at the next cycle: 1.2.102.1 (NO_FILES, 1 attempt)" in result.stdout
    run_cycle(library)
    attempts = {r["study_uid"]: r["attempts"] for r in state_rows(
        backup_root(library), "SELECT study_uid, attempts FROM failures")}
    assert attempts == {"1.2.102.0": 1, "1.2.102.1": 2}
    result = run_cycle(library, "retry")
    assert result.returncode == 0 and result.stdout.count("will retry") == 2
    unknown = run_cycle(library, "retry", "9.9.9")
    assert unknown.returncode == 1 and "9.9.9 has no failure to retry" in unknown.stderr


# -- progress --------------------------------------------------------------------------

def run_on_a_terminal(args):
    """Run the script with stdout on a pseudo-terminal, as a person at Terminal.app."""
    master, slave = pty.openpty()
    env = dict(os.environ, TZ=TEST_TZ)
    proc = subprocess.Popen([sys.executable, SCRIPT] + args, stdout=slave,
                            stderr=subprocess.PIPE, env=env)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, output.decode("utf-8", "replace")


def test_progress_lines_on_a_terminal_and_plain_lines_under_launchd(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    for i in range(3):
        lib.add_simple_study("1.2.103.%d" % i, "CT", images=3, size=200000,
                             patient="PROGRESS^%d" % i, study_date=dt.datetime(2015, 1, 1 + i))
    lib.finish()
    code, output = run_on_a_terminal(["--pacs-root", lib.pacs_root, "--batch-size", "2",
                                      *PINNED_SCHEDULE])
    assert code == 0
    assert "\r\x1b[K[1/2] PROGRESS^0  3 files" in output
    assert "[2/2] PROGRESS^1" in output and "MB/s" in output
    assert "cycle done: 2 studies" in output
    piped = run_cycle(lib)                     # stdout is a file, as under launchd
    assert "\x1b[" not in piped.stdout and "\r" not in piped.stdout
    assert "[1/1] exported" in piped.stdout
    lib.close()


def test_a_manifest_from_a_newer_version_is_refused(tmp_path):
    newer = str(tmp_path / "newer.zip")
    with zipfile.ZipFile(newer, "w") as archive:
        archive.writestr("0001_CT_x/1.dcm", b"data")
        archive.writestr("horos-backup-manifest.json", json.dumps({
            "format": "horos-backup-manifest", "format_version": 2,
            "files": [{"name": "0001_CT_x/1.dcm", "size": 4, "crc32": "0", "source": "/x"}]}))
    result = run_script("restore", newer, "--to", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "manifest format version 2" in result.stderr and "update" in result.stderr
    assert os.listdir(tmp_path / "out") == []


def test_a_bad_flag_is_one_usage_error_not_a_traceback(sample):
    result = run_cycle(sample, "--batch-size", "0")
    assert result.returncode == 2
    assert "--batch-size: must be 1 or more" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(backup_root(sample))
