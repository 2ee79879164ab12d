"""`mirror --to DIR`: a second backup root, kept identical and verified, that never copies
a loss; and the commands that work on a backup root alone (verify, status).

Every run is the script as a subprocess; disks are folders, or real tmpfs mounts where
"another disk" matters; kills and pauses are real signals.
"""

import datetime as dt
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import (ROOT, SCRIPT, TESTS, TEST_TZ, backup_root, file_digest, files_named,
                      issues_rows, manifest_of, mounted_tmpfs, run_cycle, run_script,
                      script_env, state_rows, zip_payload, zips_on_disk)
from fake_horos import FakeHorosLibrary, build_sample_library
from test_commands import flip_member_byte

import horos_backup_export as hbe

FAULTS = os.path.join(TESTS, "faults.py")
EXPORTED = 14                     # CT/MR studies of the sample library
PREVIOUS_VERSION = "b11dd8a"      # main before the mirror (state schema 5)


def mirror(source_root, target, *args, pacs=None, env=None, **kwargs):
    """`mirror --to target` from the backup at source_root; no PACS volume unless given."""
    pacs = pacs or os.path.join(os.path.dirname(str(target)), "no-pacs-here")
    return run_script("--backup-root", source_root, "--pacs-root", pacs, "mirror", "--to",
                      target, *args, env=env, **kwargs)


def alone(command, root, *args):
    """A command on a backup root alone: no PACS volume at all."""
    return run_script(command, *args, "--backup-root", root, "--pacs-root",
                      os.path.join(str(root), "..", "no-pacs-here"))


def run_fault(fault, *args, env=None):
    return subprocess.Popen([sys.executable, FAULTS, fault] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TZ=TEST_TZ, **(env or {})))


def wait_until_stopped(proc, timeout=60):
    """Until the process has stopped itself (SIGSTOP); False if it ended instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with open("/proc/%d/stat" % proc.pid) as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] == "T":
                return True
        time.sleep(0.01)
    raise AssertionError("the process neither stopped nor ended")


def sample_backup(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    result = run_cycle(lib, "--batch-size", "50")
    assert result.returncode == 0, result.stderr
    assert len(zips_on_disk(backup_root(lib))) == EXPORTED
    return lib


def mirror_disk(tmp_path, name="MIRRORDISK"):
    disk = tmp_path / name
    disk.mkdir()
    return disk / "Horos"


def digests(root):
    return {rel: file_digest(os.path.join(str(root), rel)) for rel in zips_on_disk(root)}


def inodes(root):
    return {rel: (os.stat(os.path.join(str(root), rel)).st_ino,
                  os.stat(os.path.join(str(root), rel)).st_mtime_ns)
            for rel in zips_on_disk(root)}


ROW_FIELDS = ("study_uid", "zip_path", "zip_bytes", "file_count", "missing_count",
              "source_bytes", "fingerprint", "study_date", "month", "patient_name",
              "modalities", "exported_at", "patient_id", "accession_number", "birth_date")


def rows_of(root):
    return [{k: row[k] for k in ROW_FIELDS} for row in state_rows(root)]


def assert_mirror_is_sound(target):
    """What must hold at every instant: no visible ZIP that fails verification, every state
    row's ZIP there and good."""
    for relpath in zips_on_disk(target):
        with zipfile.ZipFile(os.path.join(str(target), relpath)) as archive:
            assert archive.testzip() is None, relpath
    for row in state_rows(target):
        assert os.path.isfile(os.path.join(str(target), row["zip_path"])), row["zip_path"]


# -- Done when: the same ZIPs byte for byte; the mirror works alone; a second run copies
#    nothing --------------------------------------------------------------------------

def test_a_mirror_holds_the_same_zips_and_verify_find_restore_work_on_it_alone(tmp_path):
    lib = sample_backup(tmp_path)
    root = backup_root(lib)
    originals = {}
    for row in state_rows(root):
        for entry in manifest_of(os.path.join(root, row["zip_path"]))["files"]:
            with open(entry["source"], "rb") as handle:
                originals[(row["zip_path"], entry["name"])] = handle.read()
    target = mirror_disk(tmp_path)
    result = mirror(root, target)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "mirror done: 14 ZIPs copied" in result.stdout
    assert digests(target) == digests(root)                     # byte for byte
    assert rows_of(target) == rows_of(root)
    assert all(row["verified_at"] for row in state_rows(target))
    assert state_rows(target, "SELECT * FROM writes_in_progress") == []
    assert files_named(target, ".part") == []

    # A second run copies nothing: the ZIPs keep their inodes and mtimes.
    before = inodes(target)
    source_rows = rows_of(root)
    result = mirror(root, target)
    assert result.returncode == 0, result.stderr
    assert "mirror done: nothing to copy" in result.stdout
    assert inodes(target) == before
    assert digests(target) == digests(root)

    # The Horos side and BACKUP_ROOT are gone: the mirror is all there is.
    shutil.rmtree(lib.pacs_root)
    result = alone("verify", target, "--all")
    assert result.returncode == 0, result.stderr
    assert "verify: 14 ZIPs read" in result.stdout and "14 good, 0 bad" in result.stdout
    result = alone("find", target, "--json", "yamada")
    assert result.returncode == 0, result.stderr
    (found,) = json.loads(result.stdout)
    assert found["zip_file"] == os.path.join(str(target), found["zip_path"])
    out = tmp_path / "restored"
    result = alone("restore", target, "--all", "--to", out)
    assert result.returncode == 0, result.stderr
    restored = {}
    for folder in os.listdir(str(out)):
        for dirpath, _dirs, names in os.walk(str(out / folder)):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as handle:
                    restored[(folder, os.path.relpath(path, str(out / folder)))] = \
                        handle.read()
    assert restored == {(os.path.basename(rel)[:-len(".zip")], member): data
                        for (rel, member), data in originals.items()}
    result = alone("status", target)
    assert result.returncode == 0, result.stderr
    assert "mirror of        %s (complete at" % root in result.stdout
    assert "not read:" in result.stdout and "exported         14" in result.stdout
    result = alone("reindex", target)
    assert result.returncode == 0, result.stderr
    assert rows_of(target) == source_rows


def test_verify_and_status_need_no_pacs_volume_and_keep_their_exit_codes(tmp_path):
    lib = sample_backup(tmp_path)
    root = backup_root(lib)
    target = mirror_disk(tmp_path)
    assert mirror(root, target).returncode == 0
    bad = sorted(zips_on_disk(target))[0]
    flip_member_byte(os.path.join(str(target), bad))
    result = alone("verify", target, "--all")
    assert result.returncode == 1
    assert "BAD %s: CRC" % bad in result.stdout
    assert bad not in {r["zip_path"] for r in state_rows(target)}    # as on BACKUP_ROOT
    assert [(r["kind"], r["extra"]) for r in issues_rows(target)] == [("VERIFY_FAILED", bad)]
    # The mirror's next run puts a good copy back, from BACKUP_ROOT.
    result = mirror(root, target)
    assert result.returncode == 0, result.stderr
    assert "[1/1] mirrored %s" % bad in result.stdout
    assert alone("verify", target, "--all").returncode == 0
    assert digests(target) == digests(root)
    # status of BACKUP_ROOT without the PACS volume: the backup side, and its mirror
    os.remove(os.path.join(lib.pacs_root, ".pacs_sentinel"))
    result = alone("status", root, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["backup_only"] is True and status["eligible"] is None
    assert status["exported"] == EXPORTED and status["clinic"] is None
    assert status["mirrors"] == [{"target": str(target), "studies": EXPORTED, "behind": 0,
                                  "last_run_at": status["mirrors"][0]["last_run_at"],
                                  "last_complete_at": status["mirrors"][0]["last_run_at"]}]
    result = alone("status", root)
    assert result.returncode == 0, result.stderr
    assert "%s: 14 ZIPs, 0 studies behind, last complete" % target in result.stdout
    # A backup that is not there is still one line.
    result = alone("verify", tmp_path / "nothing" / "Horos")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "does not exist" in result.stderr
    assert not os.path.exists(str(tmp_path / "nothing"))


# -- Done when: the second disk unplugged ----------------------------------------------

def test_with_the_disk_unplugged_mirror_says_one_line_exits_0_and_creates_nothing(tmp_path):
    lib = sample_backup(tmp_path)
    root = backup_root(lib)
    state_before = rows_of(root)
    issues_before = issues_rows(root)
    target = tmp_path / "MIRRORDISK" / "Horos"           # /Volumes/MIRROR not mounted
    result = mirror(root, target)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1
    assert "%s does not exist: the mirror's disk is not connected; nothing was done" % (
        tmp_path / "MIRRORDISK") in result.stdout
    assert not os.path.exists(str(tmp_path / "MIRRORDISK"))
    assert state_rows(root, "SELECT * FROM mirrors") == []
    assert rows_of(root) == state_before and issues_rows(root) == issues_before
    # A disk that is mounted, other than the PACS volume, without its sentinel: the
    # folder an unmounted disk leaves behind, on the internal disk.
    with mounted_tmpfs(tmp_path / "USB", "2g") as usb:      # room for the spare 1 GB
        target = os.path.join(usb, "Horos")
        result = mirror(root, target, pacs=lib.pacs_root)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("\n") == 1 and result.stderr == ""
        assert ".backup_sentinel is missing: the mirror's disk is not connected" \
            in result.stdout
        assert os.listdir(usb) == []
        open(os.path.join(usb, ".backup_sentinel"), "w").close()
        result = mirror(root, target, pacs=lib.pacs_root)
        assert result.returncode == 0, result.stderr
        assert "same disk" not in result.stdout
        assert digests(target) == digests(root)


# -- Done when: a loss on BACKUP_ROOT is never copied -----------------------------------

def test_zips_deleted_or_damaged_on_backup_root_stay_good_on_the_mirror(tmp_path):
    lib = sample_backup(tmp_path)
    root = backup_root(lib)
    target = mirror_disk(tmp_path)
    assert mirror(root, target).returncode == 0
    good = digests(target)
    rows = {r["study_uid"]: r for r in state_rows(root)}
    # 1. Two ZIPs the mirror holds are lost on BACKUP_ROOT; `verify` there drops their
    #    rows, and Horos no longer has those studies, so no cycle writes them again.
    deleted, damaged = rows["1.2.3.4.5.6.7.8.10.0"], rows["1.2.3.4.5.6.7.8.10.1"]
    os.remove(os.path.join(root, deleted["zip_path"]))
    flip_member_byte(os.path.join(root, damaged["zip_path"]))
    for row in (deleted, damaged):
        lib.delete_study(lib.conn.execute("SELECT Z_PK FROM ZSTUDY WHERE ZSTUDYINSTANCEUID "
                                          "= ?", (row["study_uid"],)).fetchone()[0])
    lib.finish()
    result = mirror(root, target)
    assert result.returncode == 0 and "nothing to copy" in result.stdout
    assert alone("verify", root, "--all").returncode == 1
    assert {deleted["zip_path"], damaged["zip_path"]}.isdisjoint(
        r["zip_path"] for r in state_rows(root))
    result = mirror(root, target)
    assert result.returncode == 0, result.stderr
    assert digests(target) == good                              # nothing removed
    assert alone("verify", target, "--all").returncode == 0
    found = json.loads(alone("find", target, "--json", "smith^pat0").stdout)
    assert [f["zip_path"] for f in found] == [deleted["zip_path"]]

    # 2. Two studies are exported again (late images), and their new ZIPs are lost on
    #    BACKUP_ROOT before the mirror reads them: it keeps its older, good copies.
    for uid in ("1.2.3.4.5.6.7.8.10.2", "1.2.3.4.5.6.7.8.10.3"):
        pk = lib.conn.execute("SELECT Z_PK FROM ZSTUDY WHERE ZSTUDYINSTANCEUID = ?",
                              (uid,)).fetchone()[0]
        lib.add_image(lib.add_series(pk, "MR", "late", 9), size=3000)
    lib.finish()
    assert run_cycle(lib, "--settle-minutes", "0").returncode == 0
    rows = {r["study_uid"]: r for r in state_rows(root)}
    gone, broken = rows["1.2.3.4.5.6.7.8.10.2"], rows["1.2.3.4.5.6.7.8.10.3"]
    assert gone["exported_at"] != state_rows(target, "SELECT exported_at FROM "
                                             "exported_studies WHERE study_uid = "
                                             "'1.2.3.4.5.6.7.8.10.2'")[0]["exported_at"]
    os.remove(os.path.join(root, gone["zip_path"]))
    flip_member_byte(os.path.join(root, broken["zip_path"]))
    home = tmp_path / "home"
    home.mkdir()
    alert = tmp_path / "alert.txt"
    result = mirror(root, target, "--alert-command", 'cat > "%s"' % alert,
                    env={"HOME": str(home)})
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert digests(target) == good                    # the older copies, untouched
    assert alone("verify", target, "--all").returncode == 0
    mirrored = {r["study_uid"]: r for r in state_rows(target)}
    for row in (gone, broken):
        assert mirrored[row["study_uid"]]["exported_at"] != row["exported_at"]
    assert files_named(target, ".part") == []
    found = sorted((r["kind"], r["study_uid"], r["extra"]) for r in issues_rows(root)
                   if r["kind"] == "MIRROR_SOURCE_BAD")
    assert found == [("MIRROR_SOURCE_BAD", gone["study_uid"], gone["zip_path"]),
                     ("MIRROR_SOURCE_BAD", broken["study_uid"], broken["zip_path"])]
    assert issues_rows(target) == []
    body = alert.read_text()
    assert body.startswith("PROBLEM MIRROR_SOURCE_BAD, since ")
    assert "2 ZIPs listed in BACKUP_ROOT's state were missing or damaged" in " ".join(
        body.split())
    assert "Mirror:       %s" % target in body
    assert "SMITH" not in body and "1.2.3.4" not in body       # no patient data
    # status of BACKUP_ROOT: the mirror lacks those two as BACKUP_ROOT lists them
    status = json.loads(run_cycle(lib, "status", "--json").stdout)
    assert status["mirrors"][0]["behind"] == 2


RENAMED = "1.2.3.4.5.6.7.8.10.3"


def mirrored_then_renamed(tmp_path):
    """(library, BACKUP_ROOT, mirror, old ZIP, new ZIP): a backup mirrored once, then the
    patient of study RENAMED renamed in Horos and the study exported again under its new
    name (not mirrored yet)."""
    lib = sample_backup(tmp_path)
    root = backup_root(lib)
    target = mirror_disk(tmp_path)
    assert mirror(root, target).returncode == 0
    uid = RENAMED
    (old,) = [r["zip_path"] for r in state_rows(root) if r["study_uid"] == uid]
    lib.conn.execute("UPDATE ZSTUDY SET ZNAME = 'JONES^PAT3' WHERE ZSTUDYINSTANCEUID = ?",
                     (uid,))
    lib.finish()
    assert run_cycle(lib).returncode == 0
    (new,) = [r["zip_path"] for r in state_rows(root) if r["study_uid"] == uid]
    return lib, root, target, old, new


# -- Done when: a study re-exported under a new name ends with only its new ZIP ----------

def test_a_study_exported_again_under_a_new_name_ends_with_only_its_new_zip(tmp_path):
    lib, root, target, old, new = mirrored_then_renamed(tmp_path)
    uid = RENAMED
    assert "JONES_PAT3" in new and old not in zips_on_disk(root)
    result = mirror(root, target)
    assert result.returncode == 0, result.stderr
    assert "[1/1] mirrored %s (" % new in result.stdout
    assert "replacing %s" % old in result.stdout
    assert digests(target) == digests(root)
    assert old not in zips_on_disk(target)
    assert [r["zip_path"] for r in state_rows(target) if r["study_uid"] == uid] == [new]
    assert state_rows(target, "SELECT * FROM writes_in_progress") == []
    # Exported again under the same name (late images): the new ZIP replaces the copy.
    pk = lib.conn.execute("SELECT Z_PK FROM ZSTUDY WHERE ZSTUDYINSTANCEUID = ?",
                          (uid,)).fetchone()[0]
    lib.add_image(lib.add_series(pk, "MR", "late", 9), size=3000)
    lib.finish()
    assert run_cycle(lib, "--settle-minutes", "0").returncode == 0
    assert zips_on_disk(root)[new] != zips_on_disk(target)[new]
    result = mirror(root, target)
    assert result.returncode == 0, result.stderr
    assert "[1/1] mirrored %s (" % new in result.stdout
    assert "replacing the older copy" in result.stdout
    assert digests(target) == digests(root)
    assert len(zip_payload(os.path.join(str(target), new))) == 3


def test_a_rename_killed_before_the_record_keeps_the_old_copy_until_the_new_one_counts(
        tmp_path):
    _lib, root, target, old, new = mirrored_then_renamed(tmp_path)
    uid = RENAMED
    proc = run_fault("kill-after-rename", "--backup-root", root, "--pacs-root",
                     tmp_path / "none", "mirror", "--to", target)
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    assert {old, new} <= set(zips_on_disk(target))           # the new one not yet counted
    assert [r["zip_path"] for r in state_rows(target) if r["study_uid"] == uid] == [old]
    assert_mirror_is_sound(target)
    result = mirror(root, target)
    assert result.returncode == 0, result.stderr
    assert "adopted %s" % new in result.stdout               # verified, not copied again
    assert old not in zips_on_disk(target)
    assert digests(target) == digests(root)


# -- Done when: kill -9 in the middle of a large copy ----------------------------------

def big_backup(tmp_path, studies=3, size=8 * 1024 * 1024):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    for i in range(studies):
        pk = lib.add_study("1.2.190.%d" % i, "BIG^%d" % i, "B%d" % i,
                           study_date=dt.datetime(2018, 1 + i, 5, 10, 0))
        se = lib.add_series(pk, "CT", "Axial", 1)
        for _ in range(3):
            lib.add_image(se, content=os.urandom(size))
    lib.finish()
    result = run_cycle(lib, "--compression", "stored", "--batch-size", "10")
    assert result.returncode == 0, result.stderr
    return lib


def test_kill_9_in_the_middle_of_a_large_copy_then_a_second_run_completes(tmp_path):
    lib = big_backup(tmp_path)
    root = backup_root(lib)
    target = mirror_disk(tmp_path)
    args = [sys.executable, SCRIPT, "--backup-root", root, "--pacs-root", tmp_path / "none",
            "mirror", "--to", target, "--max-mbps", "40"]
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, TZ=TEST_TZ))
    sizes = zips_on_disk(root)
    deadline = time.monotonic() + 60
    caught = None
    while time.monotonic() < deadline and proc.poll() is None and caught is None:
        for relpath in files_named(target, ".part") + files_named(target, ".zip"):
            size = os.path.getsize(os.path.join(str(target), relpath))
            if 4 * 1024 * 1024 < size < sizes.get(relpath.replace(".part", ""), 0):
                caught = relpath                 # a copy half-way through
        time.sleep(0.005)
    assert caught is not None, "no copy was caught half-way"
    proc.kill()
    proc.wait()
    assert b"Traceback" not in proc.stderr.read()
    proc.stderr.close()
    assert_mirror_is_sound(target)                   # the half copy is no visible ZIP
    part = caught
    assert files_named(target, ".part") == [part]              # killed mid-copy
    assert part[:-len(".part")] not in {r["zip_path"] for r in state_rows(target)}
    result = mirror(root, target)
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout
    assert files_named(target, ".part") == []
    assert digests(target) == digests(root)
    assert len(state_rows(target)) == 3
    assert state_rows(target, "SELECT * FROM writes_in_progress") == []


def test_max_run_seconds_stops_between_zips_and_the_next_runs_go_on(tmp_path):
    lib = big_backup(tmp_path, studies=3, size=1024 * 1024)
    root = backup_root(lib)
    target = mirror_disk(tmp_path)
    behind = []
    for _ in range(3):
        result = mirror(root, target, "--max-run-seconds", "0.001")
        assert result.returncode == 0, result.stderr
        behind.append(json.loads(alone("status", root, "--json").stdout)["mirrors"][0])
    assert [m["behind"] for m in behind] == [2, 1, 0]
    assert [m["studies"] for m in behind] == [1, 2, 3]
    assert behind[0]["last_complete_at"] is None and behind[2]["last_complete_at"]
    assert "(--max-run-seconds 0.001): 2 ZIPs wait for the next run" in mirror(
        root, tmp_path / "MIRRORDISK" / "Other", "--max-run-seconds", "0.001").stdout
    assert digests(target) == digests(root)


def test_max_mbps_reaches_every_copy_and_its_read_back(tmp_path):
    lib = big_backup(tmp_path, studies=2, size=1024 * 1024)
    root = backup_root(lib)
    target = mirror_disk(tmp_path)
    proc = run_fault("report-throttle", "--backup-root", root, "--pacs-root",
                     tmp_path / "none", "mirror", "--to", target, "--max-mbps", "7")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if line.startswith("throttle ")]
    assert lines and {line.split(":")[0] for line in lines} == {"throttle 7 MB/s"}
    through = sum(int(line.split(": ")[1].split()[0]) for line in lines)
    zips = sum(zips_on_disk(root).values())
    assert 2 * zips <= through <= 2.2 * zips                 # each copied, then read back
    assert digests(target) == digests(root)


def test_max_mbps_caps_the_copy_and_its_read_back(tmp_path):
    """The copy goes through a Throttle: with an injected clock that never moves, the
    sleeps it asks for add up to the bytes read (copy + read-back) at the cap."""
    lib = big_backup(tmp_path, studies=1, size=1024 * 1024)
    root = backup_root(lib)
    (relpath,) = zips_on_disk(root)
    size = os.path.getsize(os.path.join(root, relpath))
    slept = []
    throttle = hbe.Throttle(2.0, clock=lambda: 0.0, sleep=slept.append)
    final = str(tmp_path / "M" / relpath)
    manifest = hbe.copy_verified_zip(os.path.join(root, relpath), final, "1.2.190.0",
                                     throttle, lambda count: None)
    assert manifest["study"]["study_uid"] == "1.2.190.0"
    assert file_digest(final) == file_digest(os.path.join(root, relpath))
    assert size / 2e6 < slept[-1] <= 2.2 * size / 2e6          # copied, then read back


# -- alerts: MIRROR_BEHIND, and two jobs that keep their own bookkeeping ----------------

def test_a_mirror_not_complete_for_its_alert_after_hours_raises_mirror_behind(tmp_path):
    lib = sample_backup(tmp_path)
    root = backup_root(lib)
    home = tmp_path / "home"
    home.mkdir()
    alert = tmp_path / "alert.txt"
    target = tmp_path / "WEEKLY" / "Horos"                 # plugged in once a week
    flags = ("--alert-command", 'cat > "%s"; printf "%%s" "$HOROS_BACKUP_ALERT_SUBJECT" '
             '> "%s.subject"' % (alert, alert), "--alert-after-hours", "192")
    env = {"HOME": str(home)}
    result = mirror(root, target, *flags, env=env)
    assert result.returncode == 0 and not alert.exists()
    books = [name for name in os.listdir(str(home / "Library" / "Application Support" /
                                             "horos_backup_export"))
             if not name.endswith(hbe.ALERT_BOOK_LOCK_SUFFIX)]
    (book_name,) = books
    assert book_name.startswith("alerts-mirror-") and book_name != "alerts.json"
    book_file = home / "Library" / "Application Support" / "horos_backup_export" / book_name
    for hours, alerted in ((191, False), (193, True)):
        book = json.loads(book_file.read_text())
        book["first_failure"] = hbe.utc_iso(time.time() - hours * 3600)
        book_file.write_text(json.dumps(book))
        result = mirror(root, target, *flags, env=env)
        assert result.returncode == 0, result.stderr
        assert alert.exists() == alerted, hours
    subject = open(str(alert) + ".subject").read()
    assert subject.startswith("[Horos backup] PROBLEM on ")
    assert subject.endswith(": mirror %s not up to date" % target)
    body = " ".join(alert.read_text().split())
    assert "The mirror %s has not been brought up to date since the first incomplete run" \
        % target in body
    assert "Last run: the mirror's disk was not connected." in body
    # The disk comes back: the run completes, and one message says it is resolved.
    (tmp_path / "WEEKLY").mkdir()
    result = mirror(root, target, *flags, env=env)
    assert result.returncode == 0, result.stderr
    assert open(str(alert) + ".subject").read().startswith(
        "[Horos backup] RESOLVED on ")
    assert "RESOLVED MIRROR_BEHIND" in alert.read_text()
    assert not (home / "Library" / "Application Support" / "horos_backup_export" /
                "alerts.json").exists()


def test_the_cycle_job_and_the_mirror_job_never_lose_each_others_bookkeeping(tmp_path):
    """Two real processes: the cycle stops right after it read its bookkeeping, the
    mirror job runs and saves its own meanwhile, then the cycle saves."""
    lib = build_sample_library(str(tmp_path / "PACS"))
    lib.close()
    root = backup_root(lib)
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)}
    alert = tmp_path / "alert.txt"
    flags = ["--alert-command", 'cat >> "%s"' % alert, "--alert-after-hours", "0"]
    assert run_cycle(lib, "--batch-size", "50", *flags, env=env).returncode == 0
    os.remove(os.path.join(lib.pacs_root, ".pacs_sentinel"))    # the cycle fails from now
    cycle = run_fault("stop-after-alert-book-load", "--pacs-root", lib.pacs_root,
                      "--backup-root", root, "--clinic-hours", "00-24", *flags, env=env)
    assert wait_until_stopped(cycle)
    result = mirror(root, tmp_path / "UNPLUGGED" / "Horos", *flags, env=env)
    assert result.returncode == 0, result.stderr
    cycle.send_signal(signal.SIGCONT)
    out, err = cycle.communicate(timeout=60)
    assert cycle.returncode == 1 and "sentinel" in err
    folder = home / "Library" / "Application Support" / "horos_backup_export"
    books = {name: json.loads((folder / name).read_text()) for name in os.listdir(str(folder))
             if name.endswith(".json")}
    (mirror_book,) = [b for name, b in books.items() if name.startswith("alerts-mirror-")]
    assert list(mirror_book["problems"]) == ["MIRROR_BEHIND"]
    assert mirror_book["last_alert"]["problems"] == ["MIRROR_BEHIND"]
    cycle_book = books["alerts.json"]
    assert list(cycle_book["problems"]) == ["NO_SUCCESSFUL_CYCLE"]
    assert cycle_book["last_success"]
    text = alert.read_text()
    assert text.count("PROBLEM MIRROR_BEHIND") == 1
    assert text.count("PROBLEM NO_SUCCESSFUL_CYCLE") == 1


# -- private modes, refusals, a read-only source, full disks, an older backup ----------

def open_to_others(root):
    found = {}
    for folder, dirs, files in os.walk(str(root)):
        for path in [folder] + [os.path.join(folder, n) for n in dirs + files]:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                found[os.path.relpath(path, str(root))] = oct(mode)
    return found


def test_everything_the_mirror_writes_is_private_whatever_the_umask(tmp_path):
    lib = sample_backup(tmp_path)
    root = backup_root(lib)
    assert issues_rows(root) == []
    bad = sorted(zips_on_disk(root))[0]
    flip_member_byte(os.path.join(root, bad))            # so it writes BACKUP_ROOT's issues
    target = mirror_disk(tmp_path)
    env = script_env()
    result = subprocess.run([sys.executable, SCRIPT, "--backup-root", root, "--pacs-root",
                             str(tmp_path / "none"), "mirror", "--to", str(target)],
                            capture_output=True, text=True, env=env,
                            preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 1, result.stderr          # the damaged one
    for made in ("export_state.sqlite", "logs/horos_backup.log", ".tmp/.run.lock"):
        assert os.path.exists(os.path.join(str(target), made)), made
    assert len(zips_on_disk(target)) == EXPORTED - 1
    assert open_to_others(target) == {}
    assert stat.S_IMODE(os.stat(str(target)).st_mode) == 0o700
    assert open_to_others(root) == {}                     # its issues.csv, its state
    assert [r["kind"] for r in issues_rows(root)] == ["MIRROR_SOURCE_BAD"]


@pytest.mark.parametrize("inside", ["same", "inside", "around"])
def test_a_mirror_onto_or_into_backup_root_is_refused(tmp_path, inside):
    lib = sample_backup(tmp_path)
    root = backup_root(lib)
    target = {"same": root, "inside": os.path.join(root, "Mirror"),
              "around": lib.pacs_root}[inside]
    before = {rel: os.stat(os.path.join(root, rel)).st_mtime_ns for rel in zips_on_disk(root)}
    result = mirror(root, target)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "overlap" in result.stderr
    assert not os.path.exists(os.path.join(root, "Mirror"))
    assert before == {rel: os.stat(os.path.join(root, rel)).st_mtime_ns
                      for rel in zips_on_disk(root)}


def test_mirror_without_a_backup_or_its_state_is_one_line(tmp_path):
    target = mirror_disk(tmp_path)
    result = mirror(tmp_path / "gone" / "Backup", target)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "no backup at" in result.stderr
    (tmp_path / "empty").mkdir()
    result = mirror(tmp_path / "empty", target)
    assert result.returncode == 1 and "has no export_state.sqlite" in result.stderr
    assert os.listdir(str(tmp_path / "MIRRORDISK")) == []
    result = run_script("mirror")
    assert result.returncode == 2 and "--to" in result.stderr


def test_a_backup_on_a_read_only_disk_is_mirrored_all_the_same(tmp_path):
    lib = sample_backup(tmp_path)
    with mounted_tmpfs(tmp_path / "ro", "32m") as disk:
        shutil.copytree(backup_root(lib), os.path.join(disk, "Backup"))
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        source = os.path.join(disk, "Backup")
        target = mirror_disk(tmp_path)
        result = mirror(source, target)
        assert result.returncode == 0, result.stderr
        assert "is read-only: its status will not list this mirror run" in result.stdout
        assert digests(target) == digests(source)
        assert alone("verify", target, "--all").returncode == 0


def test_a_full_mirror_disk_stops_the_run_with_one_line_and_no_part(tmp_path):
    lib = sample_backup(tmp_path)
    root = backup_root(lib)
    # A copy that hits ENOSPC half-way (the mirror's disk fills).
    target = mirror_disk(tmp_path)
    proc = run_fault("enospc=3000", "--backup-root", root, "--pacs-root", tmp_path / "none",
                     "mirror", "--to", target)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and "mirror disk full while copying" in err
    assert "Traceback" not in out + err
    assert files_named(target, ".part") == [] and zips_on_disk(target) == {}
    assert [r["kind"] for r in issues_rows(target)] == ["DISK_FULL"]
    assert mirror(root, target).returncode == 0
    assert digests(target) == digests(root)
    # A disk with less room than the next ZIP needs: nothing is copied.
    with mounted_tmpfs(tmp_path / "SMALL", "8m") as small:
        result = mirror(root, os.path.join(small, "Horos"))
        assert result.returncode == 1 and result.stderr.count("\n") == 1
        assert "mirror disk low" in result.stderr
        assert zips_on_disk(os.path.join(small, "Horos")) == {}


def test_a_backup_the_previous_version_made_is_mirrored_and_its_state_upgraded(tmp_path):
    shown = subprocess.run(["git", "-C", ROOT, "show", "%s:horos_backup_export.py"
                            % PREVIOUS_VERSION], capture_output=True)
    assert shown.returncode == 0, shown.stderr      # CI runs on a clone with the history
    old_script = tmp_path / "old_horos_backup_export.py"
    old_script.write_bytes(shown.stdout)
    lib = build_sample_library(str(tmp_path / "PACS"))
    lib.close()
    result = subprocess.run([sys.executable, str(old_script), "--pacs-root", lib.pacs_root,
                             "--clinic-hours", "00-24", "--batch-size", "50"],
                            capture_output=True, text=True, env=dict(os.environ, TZ=TEST_TZ))
    assert result.returncode == 0, result.stderr
    root = backup_root(lib)
    assert state_rows(root, "PRAGMA user_version")[0]["user_version"] == 5
    target = mirror_disk(tmp_path)
    result = mirror(root, target)
    assert result.returncode == 0, result.stderr
    assert digests(target) == digests(root)
    assert state_rows(root, "PRAGMA user_version")[0]["user_version"] == \
        hbe.STATE_SCHEMA_VERSION
    assert state_rows(root, "SELECT target FROM mirrors") == [{"target": str(target)}]
    assert zip_payload(os.path.join(str(target), sorted(zips_on_disk(target))[0]))
