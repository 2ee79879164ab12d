"""Studies that leave Horos (issue 18): the backup keeps them, tells the practice, and
puts them back.

Horos deletes studies itself (auto-cleaning, on by default), users delete them, and a
rebuilt or emptied Database.sql loses them all at once. The fake library does each as
Horos does (tests/fake_horos.py: autoclean, delete_study, empty_library,
reimport_study); the script runs as launchd runs it, with an --alert-command that
collects every message it is given. What to send (a notice at most once a day,
LIBRARY_SHRANK at once, its end) is a pure function, tested with an injected clock at
the end of this file.
"""

import datetime as dt
import json
import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

import horos_backup_export as hbe
from conftest import (PINNED_SCHEDULE, ROOT, TESTS, backup_root, file_digest, files_named,
                      manifest_of, run_script, script_env, state_rows, zips_on_disk)
from fake_horos import FakeHorosLibrary

FAULTS = os.path.join(TESTS, "faults.py")
SEPARATOR = "=====8<=====\n"
HOST = socket.gethostname()
UID = "1.2.392.180.%d"


def library(root, count=30):
    """`count` CT and MR studies of as many patients, one per month from 2017, added a
    day apart (auto-cleaning takes the oldest-added first: study 0 first)."""
    lib = FakeHorosLibrary(root)
    now = dt.datetime.now()
    for i in range(count):
        lib.add_simple_study(UID % i, "CT" if i % 2 else "MR", images=2, size=1500,
                             patient="NAKAMURA^KENJI%02d" % i, patient_id="PID-18%02d" % i,
                             birth=dt.date(1940 + i, 2, 3), accession="ACC-18%02d" % i,
                             study_date=dt.datetime(2017 + i // 12, 1 + i % 12, 9, 10),
                             date_added=now - dt.timedelta(days=60 - i))
    lib.finish()
    return lib


def study_pk(lib, uid):
    return lib.conn.execute("SELECT Z_PK FROM ZSTUDY WHERE ZSTUDYINSTANCEUID = ?",
                            (uid,)).fetchone()[0]


def vanish(lib, count):
    """The ZSTUDY, ZSERIES and ZIMAGE rows of the first `count` studies go, their files
    stay: what the backup sees when Database.sql is damaged or half rebuilt."""
    pks = [pk for (pk,) in lib.conn.execute(
        "SELECT Z_PK FROM ZSTUDY ORDER BY Z_PK LIMIT ?", (count,)).fetchall()]
    uids = [lib.conn.execute("SELECT ZSTUDYINSTANCEUID FROM ZSTUDY WHERE Z_PK = ?",
                             (pk,)).fetchone()[0] for pk in pks]
    for pk in pks:
        lib.conn.execute("DELETE FROM ZIMAGE WHERE ZSERIES IN"
                         " (SELECT Z_PK FROM ZSERIES WHERE ZSTUDY = ?)", (pk,))
        lib.conn.execute("DELETE FROM ZSERIES WHERE ZSTUDY = ?", (pk,))
        lib.conn.execute("DELETE FROM ZSTUDY WHERE Z_PK = ?", (pk,))
    lib.conn.commit()
    return uids


class Mailbox:
    """What --alert-command receives: one (subject, body) per alert."""

    def __init__(self, folder):
        self.path = folder / "alerts.txt"
        self.flags = ["--alert-command", '{ printf "%%s\\n" "$%s"; cat; printf "%s"; } >> "%s"'
                      % (hbe.ALERT_SUBJECT_ENV, SEPARATOR.replace("\n", "\\n"), self.path)]

    def messages(self):
        if not self.path.exists():
            return []
        return [tuple(chunk.split("\n", 1))
                for chunk in self.path.read_text().split(SEPARATOR)[:-1]]


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return str(path)


@pytest.fixture
def mailbox(tmp_path):
    return Mailbox(tmp_path)


def cycle(lib, home, mailbox, *args):
    result = run_script("--pacs-root", lib.pacs_root, *PINNED_SCHEDULE, *mailbox.flags,
                        *args, env={"HOME": home})
    assert result.returncode == 0, result.stderr
    return result


def command(home, *args):
    return run_script(*args, env={"HOME": home})


def flat(text):
    return " ".join(text.split())


def patient_data(root):
    """Every name (and its parts), patient ID, accession number, birth date, study UID
    and ZIP name the backup holds."""
    found = set()
    for row in state_rows(root):
        name = row["patient_name"]
        found.update({name, hbe.sanitize_part(name), row["patient_id"], row["study_uid"],
                      row["accession_number"], os.path.basename(row["zip_path"]),
                      os.path.basename(row["zip_path"])[:-len(".zip")]})
        found.update(part for part in name.replace("^", " ").split() if len(part) >= 4)
        if row["birth_date"]:
            found.update({row["birth_date"], row["birth_date"].replace("-", "")})
    return found


def assert_no_patient_data(root, texts):
    secrets = patient_data(root)
    assert len(secrets) > 100
    for secret in sorted(secrets):
        for text in texts:
            assert secret not in text, secret


def left_json(root, *args):
    result = run_script("find", "--left-horos", "--json", *args, "--backup-root", root)
    return result, json.loads(result.stdout)


def zip_digests(root):
    return {path: file_digest(os.path.join(root, path)) for path in zips_on_disk(root)}


def restored_files(folder):
    """{path inside the study folder: bytes} of every file restore wrote."""
    found = {}
    for parent, _dirs, names in os.walk(str(folder)):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, str(folder))] = handle.read()
    return found


# -- Done when: three studies auto-cleaned, one notice, listed, restored, re-imported --

def test_three_auto_cleaned_studies_make_one_notice_and_come_back_byte_for_byte(
        tmp_path, home, mailbox):
    lib = library(str(tmp_path / "PACS"))
    root = backup_root(lib)
    cycle(lib, home, mailbox, "--batch-size", "50")
    assert len(zips_on_disk(root)) == 30 and mailbox.messages() == []
    gone = lib.autoclean(count=3)
    assert gone == [UID % 0, UID % 1, UID % 2]                       # the oldest added
    for uid in gone:                                # rows and files, as Horos deletes them
        assert not any(os.path.exists(p) for p in lib.deleted_studies[uid][0]["files"])
    result = cycle(lib, home, mailbox)
    assert "3 exported studies are no longer in Horos (first seen gone now)" in result.stdout
    ((subject, body),) = mailbox.messages()
    assert subject == "[Horos backup] NOTICE on %s: 3 studies left Horos" % HOST
    assert "LIBRARY_SHRANK" not in body and body.startswith("NOTICE STUDIES_LEFT_HOROS\n")
    rows = {row["study_uid"]: row for row in state_rows(root)}
    text = flat(body)
    assert "3 studies left Horos's library (first seen gone at " in text
    assert "study months 2017_01 (1), 2017_02 (1), 2017_03 (1); %s of files." % (
        hbe.format_bytes(sum(rows[uid]["source_bytes"] for uid in gone))) in text
    assert ("Horos's auto-cleaning is on, the usual cause: it deletes studies while the "
            "library's volume has less than 1.1 GB free (1024 MB)") in text
    today = dt.date.today().isoformat()
    # The commands carry the plist's --pacs-root: without it they would look at
    # /Volumes/PACS. Run as the message gives it, "List them" lists exactly those three.
    prefix = "python3 %s --pacs-root %s " % (os.path.join(ROOT, "horos_backup_export.py"),
                                             lib.pacs_root)
    listed = re.search(r"^ *List them: +(.*)$", body, re.M).group(1)
    assert listed == prefix + "find --left-horos --since %s" % today
    assert "Put them back:  %srestore --left-horos --since %s --into-horos\n" % (
        prefix, today) in body
    assert "Status:       %sstatus\n" % prefix in body
    argv = shlex.split(listed)
    listing = subprocess.run([sys.executable] + argv[1:] + ["--json"], capture_output=True,
                             text=True, timeout=120, env=script_env({"HOME": home}))
    assert listing.returncode == 0, listing.stderr
    assert sorted(entry["study_uid"] for entry in json.loads(listing.stdout)) == gone
    assert_no_patient_data(root, [subject, body])
    for _ in range(2):
        cycle(lib, home, mailbox)
    assert len(mailbox.messages()) == 1                     # nothing new: nothing sent

    # Listed and restored from the backup alone: no PACS volume, no Database.sql.
    gone_pacs = str(tmp_path / "gone")
    result, found = left_json(root, "--pacs-root", gone_pacs)
    assert result.returncode == 0, result.stderr
    assert sorted(entry["study_uid"] for entry in found) == gone
    assert all(entry["left_horos_at"] for entry in found)
    out = tmp_path / "Restored"
    result = run_script("restore", "--left-horos", "--to", out, "--backup-root", root,
                        "--pacs-root", gone_pacs)
    assert result.returncode == 0, result.stderr
    folders = {uid: os.path.basename(rows[uid]["zip_path"])[:-len(".zip")] for uid in gone}
    assert sorted(os.listdir(str(out))) == sorted(folders.values())
    for uid in gone:
        original = lib.deleted_studies[uid][0]["files"]          # {path: bytes}
        manifest = manifest_of(os.path.join(root, rows[uid]["zip_path"]))
        assert restored_files(out / folders[uid]) == {
            entry["name"]: original[entry["source"]] for entry in manifest["files"]}
        assert len(manifest["files"]) == len(original) == 2

    # One comes back into Horos: it is no longer listed, and nothing is written again.
    zips = zip_digests(root)
    lib.reimport_study(gone[0], when=dt.datetime.now() - dt.timedelta(hours=3))
    result = cycle(lib, home, mailbox)
    assert "1 study back in Horos" in result.stdout
    assert "cycle done: 0 studies" in result.stdout
    assert zip_digests(root) == zips
    assert state_rows(root, "SELECT * FROM changed_studies") == []
    _result, found = left_json(root)
    assert sorted(entry["study_uid"] for entry in found) == gone[1:]
    assert len(mailbox.messages()) == 1


# -- Done when: 60 % of the rows vanish at once --------------------------------------

def test_sixty_percent_of_the_rows_vanish_library_shrank_at_once_and_nothing_goes(
        tmp_path, home, mailbox):
    lib = library(str(tmp_path / "PACS"))
    root = backup_root(lib)
    cycle(lib, home, mailbox, "--batch-size", "50")
    markers = files_named(root, ".month_done")
    assert len(markers) == 30
    zips, rows = zip_digests(root), state_rows(root)
    vanished = vanish(lib, 18)
    result = cycle(lib, home, mailbox)
    assert "18 exported studies are no longer in Horos" in result.stdout
    ((subject, body),) = mailbox.messages()
    assert subject == ("[Horos backup] PROBLEM on %s: LIBRARY_SHRANK (studies vanished from "
                       "Horos's library)" % HOST)
    assert "NOTICE" not in body and "STUDIES_LEFT_HOROS" not in body
    text = flat(body)
    assert "18 of the 30 studies in the backup are gone from Horos's library, lost at once" \
        in text
    for cause in ("rebuilt (\"Rebuild Database\"), emptied or damaged", "another library",
                  "a disk problem", "The backup still holds every study"):
        assert cause in text, cause
    assert "acknowledge-shrink\n" in body
    assert_no_patient_data(root, [subject, body])
    # Every ZIP, state row and month marker is where it was.
    assert zip_digests(root) == zips
    assert state_rows(root) == rows
    assert files_named(root, ".month_done") == markers

    cycle(lib, home, mailbox)
    assert len(mailbox.messages()) == 1                     # repeated once a day, not now
    status = json.loads(command(home, "status", "--json", "--pacs-root",
                                lib.pacs_root).stdout)
    assert status["left_horos"] == {"recent": 18, "total": 18, "library_shrank": True}
    assert status["only_in_backup"] == 18 and status["exported"] == 30
    text = command(home, "status", "--pacs-root", lib.pacs_root).stdout
    assert "  left Horos       18 in the last 7 days, 18 in all (find --left-horos lists" \
        in text
    assert "  LIBRARY_SHRANK   open since " in text

    # The library really shrank: the operator says so, once.
    result = command(home, "acknowledge-shrink", *mailbox.flags)
    assert result.returncode == 0, result.stderr
    assert "LIBRARY_SHRANK (open since " in result.stdout and "acknowledged" in result.stdout
    assert mailbox.messages()[-1][0] == "[Horos backup] RESOLVED on %s: LIBRARY_SHRANK" % HOST
    result = command(home, "acknowledge-shrink", *mailbox.flags)
    assert result.returncode == 1
    assert result.stderr.startswith("horos_backup_export: error: no LIBRARY_SHRANK is open")
    assert len(result.stderr.splitlines()) == 1
    cycle(lib, home, mailbox)
    assert len(mailbox.messages()) == 2                     # the same batch opens nothing
    status = json.loads(command(home, "status", "--json", "--pacs-root",
                                lib.pacs_root).stdout)
    assert status["left_horos"]["library_shrank"] is False
    _result, found = left_json(root)
    assert sorted(entry["study_uid"] for entry in found) == sorted(vanished)
    assert zip_digests(root) == zips and state_rows(root) == rows


def test_a_rebuilt_library_comes_back_without_a_single_export_and_edits_are_seen_again(
        tmp_path, home, mailbox):
    """"Rebuild Database": a new store, every Z_PK from 1 again. The studies Horos adds
    back have only new rows; none is exported again, and an edit Horos makes after is
    found by the image rows above the new high-water mark."""
    lib = library(str(tmp_path / "PACS"))
    root = backup_root(lib)
    edited = UID % 5
    lib.add_horos_sr(study_pk(lib, edited), "annotations", {"comment": "first read"})
    cycle(lib, home, mailbox, "--batch-size", "50")
    zips = zip_digests(root)
    uids = lib.empty_library(new_store=True)
    cycle(lib, home, mailbox)
    ((subject, body),) = mailbox.messages()
    assert "LIBRARY_SHRANK" in subject
    assert "30 of the 30 studies in the backup are gone" in flat(body)
    for uid in uids[:25]:
        lib.reimport_study(uid, when=dt.datetime.now() - dt.timedelta(hours=3))
    assert study_pk(lib, uids[0]) == 1                          # numbered anew
    result = cycle(lib, home, mailbox)
    assert "25 studies back in Horos" in result.stdout
    assert "cycle done: 0 studies" in result.stdout
    assert zip_digests(root) == zips
    assert state_rows(root, "SELECT * FROM changed_studies") == []
    # 5 still gone, fewer than 10: the shrink is over.
    assert mailbox.messages()[-1][0] == "[Horos backup] RESOLVED on %s: LIBRARY_SHRANK" % HOST
    lib.add_horos_sr(study_pk(lib, edited), "annotations", {"comment": "second read"})
    # An edit waits SETTLE_MINUTES since it was first seen (README: Edits in Horos).
    assert "cycle done: 0 studies" in cycle(lib, home, mailbox).stdout
    result = cycle(lib, home, mailbox, "--settle-minutes", "0")
    assert "cycle done: 1 study" in result.stdout
    changed = {path for path, digest in zip_digests(root).items() if zips[path] != digest}
    assert changed == {row["zip_path"] for row in state_rows(root)
                       if row["study_uid"] == edited}
    assert len(mailbox.messages()) == 2


def test_a_scan_cut_short_records_no_departure(tmp_path, home, mailbox):
    lib = library(str(tmp_path / "PACS"))
    root = backup_root(lib)
    cycle(lib, home, mailbox, "--batch-size", "50")
    # Horos holds Database.sql past the busy timeout after 10 of the 30 rows.
    result = subprocess.run(
        [sys.executable, FAULTS, "locked-after-chunks=2", "--pacs-root", lib.pacs_root,
         *PINNED_SCHEDULE, "--horos-chunk-rows", "5", *mailbox.flags],
        capture_output=True, text=True, timeout=180, env=dict(os.environ, HOME=home))
    assert result.returncode == 1 and "stayed locked" in result.stderr
    assert state_rows(root, "SELECT * FROM left_horos") == []
    assert mailbox.messages() == []
    result = cycle(lib, home, mailbox, "--horos-chunk-rows", "5")
    assert "no longer in Horos" not in result.stdout
    assert state_rows(root, "SELECT * FROM left_horos") == [] and mailbox.messages() == []


def test_a_cycle_killed_after_recording_departures_leaves_them_to_the_next_ones_alert(
        tmp_path, home, mailbox):
    lib = library(str(tmp_path / "PACS"))
    root = backup_root(lib)
    cycle(lib, home, mailbox, "--batch-size", "50")
    gone = lib.autoclean(count=3)
    lib.add_simple_study("1.2.392.181.1", "CT", images=2, study_date=dt.datetime(2020, 1, 2))
    lib.finish()
    # Killed while it exports the new study: after its check, before its alerts.
    result = subprocess.run([sys.executable, FAULTS, "kill-after-rename", "--pacs-root",
                             lib.pacs_root, *PINNED_SCHEDULE, *mailbox.flags],
                            capture_output=True, text=True, timeout=180,
                            env=dict(os.environ, HOME=home))
    assert result.returncode == -9
    assert sorted(r["study_uid"] for r in state_rows(root, "SELECT * FROM left_horos")) == gone
    assert mailbox.messages() == []
    with sqlite3.connect(os.path.join(root, "export_state.sqlite")) as conn:   # 10 min ago
        conn.execute("UPDATE left_horos SET left_at = ?", (hbe.utc_iso(time.time() - 600),))
    result = cycle(lib, home, mailbox)
    assert "no longer in Horos" not in result.stdout          # recorded already
    ((subject, _body),) = mailbox.messages()
    assert subject == "[Horos backup] NOTICE on %s: 3 studies left Horos" % HOST


def test_the_batches_alerts_read_are_last_weeks_and_every_large_one(tmp_path):
    state = hbe.ExportState(str(tmp_path / "export_state.sqlite"))
    now = T0
    try:
        rows = []
        for number in range(40):
            rows.append(dict(
                study_uid="1.2.%d" % number, zip_path="2019_0%d/%d.zip" % (1 + number % 2,
                                                                            number),
                zip_bytes=10, file_count=1, missing_count=0, source_bytes=1000,
                fingerprint="f", study_date=None, month="2019_0%d" % (1 + number % 2),
                patient_name="X", modalities="CT", exported_at="x", verified_at=None,
                patient_id="P", accession_number="A", birth_date=None,
                base_fingerprint=None))
        state.replace_exported(rows, [])
        uids = ["1.2.%d" % number for number in range(40)]
        assert state.record_departures(uids[:5], [], now - 30 * 86400)       # first check
        state.record_departures(uids[5:8], [], now - 8 * 86400)              # 3, old
        state.record_departures(uids[8:20], [], now - 8 * 86400 + 600)       # 12, old
        state.record_departures(uids[20:22], [], now - 3600)                 # 2, recent
        state.record_departures([], uids[20:21], now)                        # one is back
        batches = state.left_batches(now - hbe.LEFT_RECENT_DAYS * 86400,
                                     hbe.SHRINK_MIN_STUDIES)
        assert [(b.left_at, b.batch_size, b.studies, b.source_bytes, dict(b.months))
                for b in batches] == [
            (hbe.utc_iso(now - 8 * 86400 + 600), 12, 12, 12000, {"2019_01": 6, "2019_02": 6}),
            (hbe.utc_iso(now - 3600), 2, 1, 1000, {"2019_02": 1})]
        assert state.left_counts(now - hbe.LEFT_RECENT_DAYS * 86400) == (1, 21)
        assert state.left_horos_since() == hbe.utc_iso(now - 30 * 86400)
        # A batch in the same second as the last, or after the clock went back, is later.
        state.record_departures(uids[22:23], [], now)
        state.record_departures(uids[23:24], [], now)
        state.record_departures(uids[24:25], [], now - 3600)
        assert [b.left_at for b in state.left_batches(now, hbe.SHRINK_MIN_STUDIES)] == [
            hbe.utc_iso(now - 8 * 86400 + 600), hbe.utc_iso(now), hbe.utc_iso(now + 1),
            hbe.utc_iso(now + 2)]
    finally:
        state.close()


# -- --since is the local day a study was first seen gone -------------------------------

def test_since_selects_by_the_local_day_first_seen_gone(tmp_path, home, mailbox):
    lib = library(str(tmp_path / "PACS"), count=6)
    root = backup_root(lib)
    cycle(lib, home, mailbox, "--batch-size", "50")
    first, second = lib.autoclean(count=2)
    cycle(lib, home, mailbox)
    # 16:00 UTC is 01:00 the next day in Tokyo (the tests' time zone).
    with sqlite3.connect(os.path.join(root, "export_state.sqlite")) as conn:
        for uid, left_at in ((first, "2026-11-25T16:00:00Z"), (second, "2026-11-26T16:00:00Z")):
            conn.execute("UPDATE left_horos SET left_at = ? WHERE study_uid = ?",
                         (left_at, uid))
    for since, expected in (("2026-11-26", [first, second]), ("2026-11-27", [second])):
        result, found = left_json(root, "--since", since)
        assert result.returncode == 0, result.stderr
        assert sorted(entry["study_uid"] for entry in found) == expected, since
    result, found = left_json(root, "--since", "2026-11-28")
    assert result.returncode == 1 and found == []
    assert result.stderr == ("horos_backup_export: no study of the 6 in %s left Horos on "
                             "2026-11-28 or later\n" % root)
    text = run_script("find", "--left-horos", "--backup-root", root).stdout
    assert "  left Horos 2026-11-26  " in text and "  left Horos 2026-11-27  " in text
    assert text.endswith("2 studies\n")
    out = tmp_path / "out"
    result = run_script("restore", "--left-horos", "--since", "2026-11-27", "--to", out,
                        "--backup-root", root)
    assert result.returncode == 0, result.stderr
    assert os.listdir(str(out)) == [os.path.basename(r["zip_path"])[:-len(".zip")]
                                    for r in state_rows(root) if r["study_uid"] == second]
    for args in (("find", "--since", "2026-11-26"),
                 ("restore", "--all", "--since", "2026-11-26", "--to", out)):
        result = run_script(*args, "--backup-root", root)
        assert result.returncode == 2
        assert result.stderr == ("horos_backup_export.py: error: --since selects by the day "
                                 "a study left Horos: it goes with --left-horos\n")
    result = run_script("find", "--left-horos", "--since", "2026-13-01", "--backup-root", root)
    assert result.returncode == 2 and "is not a day: use YYYY-MM-DD" in result.stderr
    # A state rebuilt from the ZIPs keeps when each study left.
    _result, before = left_json(root)
    assert run_script("reindex", "--backup-root", root).returncode == 0
    _result, after = left_json(root)
    assert after == before and len(after) == 2


# -- restore --left-horos --into-horos: Horos's pace, once, and again if they leave again -

def import_incoming(lib):
    """What Horos does with INCOMING.noindex: imports each study folder and empties it."""
    imported = []
    for folder in sorted(os.listdir(lib.incoming_dir)):
        uid = next(uid for uid in lib.deleted_studies if folder.endswith("_" + uid))
        lib.reimport_study(uid, when=dt.datetime.now() - dt.timedelta(hours=3))
        subprocess.run(["rm", "-rf", os.path.join(lib.incoming_dir, folder)], check=True)
        imported.append(uid)
    return imported


def test_restore_into_horos_feeds_them_at_its_pace_once_and_again_if_they_leave_again(
        tmp_path, home, mailbox):
    lib = library(str(tmp_path / "PACS"), count=8)
    root = backup_root(lib)
    cycle(lib, home, mailbox, "--batch-size", "50")
    gone = lib.autoclean(count=3)
    cycle(lib, home, mailbox)

    def feed():
        return command(home, "restore", "--left-horos", "--into-horos",
                       "--incoming-max-files", "3", "--pacs-root", lib.pacs_root)
    result = feed()                              # two studies of 2 files reach the limit
    assert result.returncode == 0, result.stderr
    assert "restored 2 studies (4 files" in result.stdout and "; 1 study left" in result.stdout
    assert feed().stdout.startswith("restored 0 studies")       # Horos has not imported
    first = import_incoming(lib)
    result = feed()
    assert "restored 1 study" in result.stdout and "nothing left" in result.stdout
    assert sorted(first + import_incoming(lib)) == gone
    result = cycle(lib, home, mailbox)
    assert "3 studies back in Horos" in result.stdout
    result = feed()
    assert result.returncode == 1
    assert result.stderr == ("horos_backup_export: error: no study of the 8 in %s is "
                             "selected by --left-horos\n" % root)
    # Weeks later Horos deletes one of them again: fed again, once.
    with sqlite3.connect(os.path.join(root, "export_state.sqlite")) as conn:
        conn.execute("UPDATE restores SET restored_at = ?",
                     (hbe.utc_iso(time.time() - 14 * 86400),))
    lib.delete_study(study_pk(lib, gone[1]))
    cycle(lib, home, mailbox)
    result = feed()
    assert result.returncode == 0, result.stderr
    assert "restored 1 study" in result.stdout
    assert [f for f in os.listdir(lib.incoming_dir) if f.endswith("_" + gone[1])]
    result = feed()
    assert result.stdout.startswith("restored 0 studies")
    assert "1 study was restored there before; nothing left" in result.stdout
    assert [r["study_uid"] for r in state_rows(
        root, "SELECT study_uid FROM restores ORDER BY study_uid")] == sorted(gone)


# -- an upgraded backup: what left before it is listed, and told about by nobody ---------

def previous_script(tmp_path):
    """The script as released before departures were recorded (main at b11dd8a)."""
    try:
        text = subprocess.run(["git", "-C", ROOT, "show", "b11dd8a:horos_backup_export.py"],
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip("the previous version is not in this clone's history: %s" % error)
    path = tmp_path / "previous" / "horos_backup_export.py"
    path.parent.mkdir()
    path.write_text(text)
    return str(path)


def test_an_upgraded_backup_lists_what_left_before_and_tells_only_what_leaves_after(
        tmp_path, home, mailbox):
    lib = library(str(tmp_path / "PACS"), count=12)
    root = backup_root(lib)
    previous = previous_script(tmp_path)

    def previous_cycle():
        return subprocess.run([sys.executable, previous, "--pacs-root", lib.pacs_root,
                               *PINNED_SCHEDULE, "--batch-size", "50"], capture_output=True,
                              text=True, timeout=180, env=dict(os.environ, HOME=home))
    assert previous_cycle().returncode == 0
    lib.delete_study(study_pk(lib, UID % 11))          # deleted while the old one ran
    assert previous_cycle().returncode == 0
    state = os.path.join(root, "export_state.sqlite")
    with sqlite3.connect(state) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
    result = cycle(lib, home, mailbox)
    assert ("1 exported study is no longer in Horos (already gone when departures began "
            "to be recorded)") in result.stdout
    assert mailbox.messages() == []
    with sqlite3.connect(state) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == hbe.STATE_SCHEMA_VERSION
    assert [(r["study_uid"], r["batch_size"]) for r in state_rows(
        root, "SELECT * FROM left_horos")] == [(UID % 11, 0)]
    _result, found = left_json(root)
    assert [entry["study_uid"] for entry in found] == [UID % 11]
    assert lib.autoclean(count=1) == [UID % 0]
    cycle(lib, home, mailbox)
    ((subject, _body),) = mailbox.messages()
    assert subject == "[Horos backup] NOTICE on %s: 1 study left Horos" % HOST


# -- the decision, pure, with an injected clock -----------------------------------------

HOUR = 3600.0
T0 = 1_800_000_000.0


def batch(at, size, studies=None, month="2019_03"):
    studies = size if studies is None else studies
    return hbe.LeftBatch(left_at=hbe.utc_iso(at), batch_size=size, studies=studies,
                         source_bytes=studies * 1_000_000, months={month: studies})


def departed(exported, *batches):
    """A good cycle's report: the batches the state holds still (partly) gone."""
    return hbe.RunReport(status=hbe.RUN_OK, zip_bad_waiting=0, failing_week={},
                         horos_cleaning="Horos's auto-cleaning is off.",
                         departures=hbe.Departures(exported=exported, left=0, returned=0,
                                                   batches=tuple(batches)))


def decide_each(steps, book=None, delivered=True):
    """[(now, report)] in order -> [(due, resolved, notice studies or None)], the book."""
    book = book or hbe.AlertBook()
    seen = []
    for now, report in steps:
        plan = hbe.decide_alerts(book, report, now, 24 * HOUR)
        seen.append((plan.due, plan.resolved, plan.notice and plan.notice.studies))
        book = plan.book
        if (plan.due or plan.resolved or plan.notice) and delivered:
            book = hbe.record_delivery(plan, now, "s", ["command"])
    return seen, book


def test_the_shrink_threshold_is_a_tenth_of_the_backup_from_10_to_500():
    assert [hbe.shrink_threshold(n) for n in (0, 30, 100, 101, 150, 4_999, 5_000, 90_000)] \
        == [10, 10, 10, 11, 15, 500, 500, 500]


def test_a_notice_goes_at_most_once_a_day_and_only_with_something_new():
    a, b = batch(T0, 3), batch(T0 + HOUR, 2)
    seen, book = decide_each([(T0, departed(100, a)), (T0 + HOUR, departed(100, a, b)),
                              (T0 + 2 * HOUR, departed(100, a, b)),
                              (T0 + 24 * HOUR, departed(100, a, b)),
                              (T0 + 48 * HOUR, departed(100, a, b))])
    assert seen == [([], [], 3), ([], [], None), ([], [], None), ([], [], 2), ([], [], None)]
    assert book.left_announced == b.left_at and book.problems == {}


def test_the_batch_of_a_killed_cycle_and_an_undelivered_notice_are_taken_up_later():
    a, late = batch(T0, 3), batch(T0 + HOUR, 4)
    seen, book = decide_each([(T0, departed(100, a))])
    # The cycle that recorded `late` died before alerting; a later one reports it.
    seen, book = decide_each([(T0 + 25 * HOUR, departed(100, a, late)),
                              (T0 + 26 * HOUR, departed(100, a, late))], book,
                             delivered=False)
    assert seen == [([], [], 4), ([], [], 4)]
    assert book.left_announced == a.left_at


def test_a_library_shrank_at_once_a_new_batch_joins_it_and_it_ends_below_the_threshold():
    shrink, small, more = batch(T0, 20), batch(T0 + HOUR, 3), batch(T0 + 2 * HOUR, 15)
    seen, book = decide_each([
        (T0, departed(100, shrink)),                                   # 20 >= 10: at once
        (T0 + HOUR, departed(100, shrink, small)),                     # a notice of 3 only
        (T0 + 2 * HOUR, departed(100, shrink, small, more)),           # the same incident
        (T0 + 3 * HOUR, departed(100, batch(T0, 20, 5), small, batch(T0 + 2 * HOUR, 15, 4))),
        (T0 + 4 * HOUR, departed(100, batch(T0, 20, 5), small, batch(T0 + 2 * HOUR, 15, 4))),
        (T0 + 30 * HOUR, departed(100, batch(T0, 20, 5), small, batch(T0 + 2 * HOUR, 15, 4)))])
    assert seen == [([hbe.LIBRARY_SHRANK], [], None), ([], [], 3), ([], [], None),
                    ([], [hbe.LIBRARY_SHRANK], None), ([], [], None), ([], [], None)]
    assert book.shrink_batches == [] and book.problems == {}


def test_library_shrank_repeats_daily_with_what_is_still_gone():
    shrink = batch(T0, 30)
    seen, book = decide_each([(T0 + n * HOUR, departed(30, batch(T0, 30, 30 - n // 2)))
                              for n in range(0, 26)])
    assert [n for n, (due, _r, _n) in enumerate(seen) if due] == [0, 24]
    assert book.problems[hbe.LIBRARY_SHRANK].count == 18
    assert "18 of the 30 studies in the backup are gone" in book.problems[
        hbe.LIBRARY_SHRANK].text
    assert book.shrink_batches == [shrink.left_at]


def test_acknowledging_ends_library_shrank_and_its_batch_never_opens_it_again():
    shrink = batch(T0, 30)
    acknowledged = hbe.RunReport(status=hbe.RUN_COMMAND, acknowledged=(hbe.LIBRARY_SHRANK,))
    seen, book = decide_each([(T0, departed(30, shrink)), (T0 + HOUR, acknowledged),
                              (T0 + 2 * HOUR, departed(30, shrink)),
                              (T0 + 3 * HOUR, departed(30, shrink, batch(T0 + 3 * HOUR, 12)))])
    assert seen == [([hbe.LIBRARY_SHRANK], [], None), ([], [hbe.LIBRARY_SHRANK], None),
                    ([], [], None), ([hbe.LIBRARY_SHRANK], [], None)]   # a new shrink is new
    assert book.problems[hbe.LIBRARY_SHRANK].count == 12


def test_the_first_check_and_last_weeks_departures_are_told_to_nobody():
    old = T0 - 8 * 24 * HOUR
    seen, _book = decide_each([(T0, departed(100, batch(old, 0, 40), batch(old, 3),
                                             batch(old, 50)))])
    assert seen == [([], [], None)]


def test_the_notice_names_counts_months_sizes_and_commands_only():
    cfg = hbe.Config(pacs_root="/Volumes/PACS", sentinel="/Volumes/PACS/.pacs_sentinel",
                     horos_data="/Volumes/PACS/Database/Horos Data",
                     backup_root="/Volumes/PACS/Backup")
    months = {"%d_%02d" % (2010 + i // 12, 1 + i % 12): 1 for i in range(14)}
    report = departed(500, hbe.LeftBatch(hbe.utc_iso(T0), 14, 14, 2_500_000, months))
    report = hbe.dataclasses.replace(report, kinds={"DISK_LOW": 1}, free_bytes=10 ** 9)
    plan = hbe.decide_alerts(hbe.AlertBook(), report, T0 + 60, 24 * HOUR)
    subject, body = hbe.compose_alert(cfg, plan, "mini.local")
    assert subject == ("[Horos backup] PROBLEM on mini.local: DISK_LOW (backup volume low "
                       "on space) (notice: 14 studies left Horos)")
    assert "\nNOTICE STUDIES_LEFT_HOROS\n  14 studies left Horos's library" in body
    assert ("14 studies left Horos's library (first seen gone at %s): study months 2010_01 "
            "(1), 2010_02 (1)" % hbe.local_time_text(hbe.utc_iso(T0))) in flat(body)
    assert "2010_12 (1) and 2 more months; 2.5 MB of files." in flat(body)
    assert "Horos's auto-cleaning is off." in flat(body)
    book = hbe.record_delivery(plan, T0 + 60, subject, ["email"])
    assert book.last_alert.notices == [hbe.STUDIES_LEFT_HOROS]
    again = hbe.AlertBook.from_json(json.loads(json.dumps(book.to_json())))
    assert again == book
    old = book.to_json()
    for key in ("left_seen", "left_announced", "left_announced_at", "shrink_batches"):
        del old[key]
    del old["last_alert"]["notices"]
    assert hbe.AlertBook.from_json(old).left_announced is None      # a book of before


def test_acknowledge_shrink_takes_the_flags_that_send_its_resolved_message_only():
    result = run_script("acknowledge-shrink", "--help")
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", result.stdout))
    assert flags == {"--help", "--pacs-root", "--backup-root", "--verbose", "--alert-email",
                     "--smtp-host", "--smtp-port", "--smtp-user", "--smtp-password-file",
                     "--alert-command"}
