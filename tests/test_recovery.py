"""Disaster recovery, end to end: `find` in a backup alone, `restore` by selection, and
feeding a whole backup into a new, empty Horos library at its pace.

The backup is made from the sample library, moved to another folder (the recovery
disk), and the PACS folder is deleted: no sentinel, no Database.sql, no source files.
"""

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import types
import zipfile

import pytest

from conftest import (backup_root, issues_rows, manifest_of, mounted_tmpfs, run_cycle,
                      run_script, script_env, state_rows, tree_snapshot, zip_payload)
from fake_horos import FakeHorosLibrary, build_sample_library
from test_commands import run_on_a_terminal

import horos_backup_export as hbe

YAMADA = "1.2.392.200036.9116.2.6.1.48.1215.1551385800.1"          # CT 2019-03-01
JOAO = "1.3.12.2.1107.5.2.30.25245.30000019030112345678900000001"   # MR 2019-03-15
MULLER = "1.2.840.113619.2.55.3.2831164355.10.1553000000.1"         # PT/CT 2019-04-02
OBRIEN = "1.2.840.113704.1.111.2000.1"                              # CT 1999-12-31
SMITH3 = "1.2.3.4.5.6.7.8.10.3"                                     # MR 2021-03-31
EXPORTED = 14                     # CT/MR studies of the sample library


def make_backup(tmp_path):
    """A backup of the sample library, as the recovery disk holds it once Horos's disk
    is gone; also what Horos held: {uid: {member: original bytes}}."""
    lib = build_sample_library(str(tmp_path / "PACS"))
    lib.close()
    result = run_cycle(lib, "--batch-size", "50")
    assert result.returncode == 0, result.stderr
    rows = state_rows(backup_root(lib))
    assert len(rows) == EXPORTED
    originals = {}
    for row in rows:
        files = manifest_of(os.path.join(backup_root(lib), row["zip_path"]))["files"]
        originals[row["study_uid"]] = {}
        for entry in files:
            with open(entry["source"], "rb") as handle:
                originals[row["study_uid"]][entry["name"]] = handle.read()
    recovery_disk = tmp_path / "RECOVERY"
    recovery_disk.mkdir()
    backup = str(recovery_disk / "Backup")
    shutil.move(backup_root(lib), backup)
    shutil.rmtree(lib.pacs_root)                 # sentinel, Database.sql, every file
    return types.SimpleNamespace(
        backup=backup, gone_pacs=lib.pacs_root, originals=originals,
        zips={r["study_uid"]: r["zip_path"] for r in rows}, tmp=tmp_path)


@pytest.fixture
def recovered(tmp_path):
    return make_backup(tmp_path)


def find(rec, *args):
    return run_script("find", *args, "--backup-root", rec.backup, "--pacs-root", rec.gone_pacs)


def found_uids(rec, *terms):
    result = find(rec, "--json", *terms)
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr
    return {entry["study_uid"] for entry in json.loads(result.stdout)}


def restore(rec, *args):
    return run_script("restore", *args, "--backup-root", rec.backup, "--pacs-root",
                      rec.gone_pacs)


def folder_files(folder):
    """{relative path: bytes} of every file below folder."""
    found = {}
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


def study_folder(rec, uid):
    return os.path.basename(rec.zips[uid])[:-len(".zip")]


# -- find ------------------------------------------------------------------------------

def test_find_a_patient_in_a_moved_backup_without_horos(recovered):
    rec = recovered
    assert not os.path.exists(rec.gone_pacs)
    result = find(rec, "pat3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[1] == "1 study"
    zip_file = os.path.join(rec.backup, rec.zips[SMITH3])
    assert lines[0].split() == ["2021-03-31", "SMITH^PAT3", "(P-2003)", "born", "1973-01-01",
                                "MR", "2", "files", lines[0].split()[8], "KB", zip_file]
    assert os.path.isfile(zip_file)
    listed = json.loads(find(rec, "--json", "SMITH^PAT3").stdout)
    assert len(listed) == 1
    entry = listed[0]
    assert entry["study_uid"] == SMITH3 and entry["zip_path"] == rec.zips[SMITH3]
    assert entry["zip_file"] == zip_file
    assert (entry["patient_name"], entry["patient_id"], entry["study_date"],
            entry["birth_date"], entry["modalities"]) == ("SMITH^PAT3", "P-2003",
                                                          "2021-03-31", "1973-01-01", ["MR"])
    assert entry["file_count"] == 2
    assert entry["zip_bytes"] == os.path.getsize(zip_file)


def test_find_ignores_accents_and_case(recovered):
    rec = recovered
    assert found_uids(recovered, "joao") == {JOAO}
    assert found_uids(recovered, "SAO", "bento") == {JOAO}
    assert found_uids(recovered, "sao bento") == {JOAO}        # one argument, two words
    assert found_uids(recovered, "João") == {JOAO}
    assert found_uids(recovered, "Müller") == {MULLER}          # stored without accents
    text = find(rec, "joao").stdout
    assert "JOÃO^SÃO BENTO (P-1002)" in text                   # printed as stored


def test_find_by_patient_id_accession_date_prefix_uid_start_and_modality(recovered):
    rec = recovered
    assert found_uids(rec, "P-1004") == {OBRIEN}
    assert found_uids(rec, "p-1004") == {OBRIEN}
    assert found_uids(rec, "A1003") == {MULLER}                 # accession number
    assert found_uids(rec, "2019") == {YAMADA, JOAO, MULLER}
    assert found_uids(rec, "2019-03") == {YAMADA, JOAO}
    assert found_uids(rec, "2019_03") == {YAMADA, JOAO}         # as the month folder
    assert found_uids(rec, "201903") == {YAMADA, JOAO}
    assert found_uids(rec, "2019-03-01") == {YAMADA}            # local date, not UTC's
    assert found_uids(rec, "2019", "mr") == {JOAO}              # every term must match
    assert found_uids(rec, "ko") == {JOAO}                      # a whole modality token
    assert found_uids(rec, "1.2.392") == {YAMADA}               # the start of a UID
    assert found_uids(rec, "1.2.840.113704") == {OBRIEN}


@pytest.mark.parametrize("term", [
    "9116",          # inside YAMADA's UID only
    "2.392.2000",    # inside a UID, not its start
    "1551385800",    # the UID's timestamp part
    "03-01",         # inside YAMADA's study date
    "3-15",          # inside JOAO's study date
    "1950",          # YAMADA's birth year: a birth date is not the study date
    "sag",           # a series description (T1 SAG): not searched
    "nobody",
])
def test_find_never_matches_inside_a_uid_or_a_date(recovered, term):
    result = find(recovered, term)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no study of the 14 in %s matches %s" % (recovered.backup, term) in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert json.loads(find(recovered, "--json", term).stdout) == []


def test_find_without_a_state_says_to_reindex_and_reindex_works_without_horos(recovered):
    rec = recovered
    os.remove(os.path.join(rec.backup, "export_state.sqlite"))
    result = find(rec, "P-1004")
    assert result.returncode == 1
    assert "reindex" in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(rec.backup, "export_state.sqlite"))
    # The backup disk alone: no PACS sentinel, and reindex still rebuilds the state.
    result = run_script("reindex", "--backup-root", rec.backup, "--pacs-root", rec.gone_pacs)
    assert result.returncode == 0, result.stderr
    assert found_uids(rec, "P-1004") == {OBRIEN}
    assert "note" not in find(rec, "P-1004").stderr


def test_reindex_without_sentinel_or_backup_creates_nothing(tmp_path):
    result = run_script("reindex", "--pacs-root", str(tmp_path / "gone"), "--backup-root",
                        str(tmp_path / "gone" / "Backup"))
    assert result.returncode == 1 and "is the PACS volume or the backup disk mounted" \
        in result.stderr
    assert os.listdir(tmp_path) == []


def old_version_state(path):
    """Turn a state into what the previous version (schema 3) wrote: the same rows,
    built by the released migration steps 1-3 only."""
    new = sqlite3.connect(path)
    rows = new.execute("SELECT * FROM exported_studies").fetchall()
    names = [d[0] for d in new.execute("SELECT * FROM exported_studies").description]
    new.close()
    os.remove(path)
    old = sqlite3.connect(path)
    for step in (1, 2, 3):
        for statement in hbe.STATE_MIGRATIONS[step]:
            old.execute(statement)
    old.execute("PRAGMA user_version = 3")
    known = {row[1] for row in old.execute("PRAGMA table_info(exported_studies)")}
    kept = [n for n in names if n in known]       # what schema 3 had
    old.executemany("INSERT INTO exported_studies (%s) VALUES (%s)"
                    % (", ".join(kept), ", ".join("?" for _ in kept)),
                    [[row[names.index(n)] for n in kept] for row in rows])
    old.commit()
    old.close()


def test_a_backup_of_the_previous_version_is_searchable_by_id_after_one_cycle(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    lib.close()
    assert run_cycle(lib, "--batch-size", "50").returncode == 0
    root = backup_root(lib)
    state = os.path.join(root, "export_state.sqlite")
    old_version_state(state)
    rec = types.SimpleNamespace(backup=root, gone_pacs=lib.pacs_root)
    # Before: find reads the old file without changing it, searches what is there,
    # and says what reindex adds.
    before = tree_snapshot(root)
    result = find(rec, "P-1004")
    assert result.returncode == 1
    assert "14 of 14 studies were backed up by an older version" in result.stderr
    assert "`reindex`" in result.stderr
    by_name = find(rec, "--json", "o'brien")
    assert by_name.returncode == 0
    assert [e["study_uid"] for e in json.loads(by_name.stdout)] == [OBRIEN]
    assert json.loads(by_name.stdout)[0]["patient_id"] is None
    assert tree_snapshot(root) == before
    with sqlite3.connect(state) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    # One cycle of the new version upgrades the state and reads every manifest.
    result = run_cycle(lib)
    assert result.returncode == 0, result.stderr
    assert "read patient IDs from 14 manifests written by an older version (all done)" \
        in result.stdout
    assert "cycle done: 0 studies" in result.stdout          # nothing exported again
    assert found_uids(rec, "P-1004") == {OBRIEN}
    assert found_uids(rec, "A1003") == {MULLER}
    assert "note" not in find(rec, "P-1004").stderr
    rows = {r["study_uid"]: r for r in state_rows(root)}
    assert (rows[YAMADA]["patient_id"], rows[YAMADA]["accession_number"],
            rows[YAMADA]["birth_date"]) == ("P-1001", "A1001", "1950-01-01")
    assert rows["1.2.3.4.5.6.7.8.9.999"]["birth_date"] is None     # unknown stays NULL
    # The next cycle reads no manifest again.
    assert "manifest" not in run_cycle(lib).stdout


def test_the_backfill_stops_at_its_deadline_and_the_next_one_goes_on(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    lib.close()
    assert run_cycle(lib, "--batch-size", "50").returncode == 0
    root = backup_root(lib)
    old_version_state(os.path.join(root, "export_state.sqlite"))
    cfg = hbe.Config(pacs_root=lib.pacs_root, sentinel="", horos_data=lib.horos_data,
                     backup_root=root)
    state = hbe.ExportState(cfg.state_path)
    issues = hbe.IssueLog(cfg.issues_path)
    try:
        ticks = iter(range(1000))       # the clock moves one second per manifest read
        assert hbe.backfill_search_fields(cfg, state, issues, 4,
                                          clock=lambda: next(ticks)) == 4
        assert len(state_rows(root, "SELECT * FROM exported_studies "
                                    "WHERE patient_id IS NOT NULL")) == 4   # committed
        assert hbe.backfill_search_fields(cfg, state, issues, float("inf")) == EXPORTED - 4
        assert hbe.backfill_search_fields(cfg, state, issues, float("inf")) == 0
    finally:
        state.close()
    assert all(r["patient_id"] for r in state_rows(root))



def damage_member(zip_path, name):
    """Invert every byte of one member's stored data, in place (a bad sector)."""
    with zipfile.ZipFile(zip_path) as archive:
        info = archive.getinfo(name)
    with open(zip_path, "r+b") as handle:
        handle.seek(info.header_offset + 26)          # the local header's name/extra sizes
        name_size, extra_size = struct.unpack("<HH", handle.read(4))
        start = info.header_offset + 30 + name_size + extra_size
        handle.seek(start)
        data = handle.read(info.compress_size)
        handle.seek(start)
        handle.write(bytes(b ^ 0xFF for b in data))


def test_a_zip_whose_manifest_cannot_be_read_is_backfilled_once(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    for i in range(3):
        lib.add_simple_study("1.2.90.%d" % i, images=1, size=600, patient_id="P-90%d" % i,
                             study_date=dt.datetime(2019, 5, 1 + i, 9, 0))
    lib.finish()
    lib.close()
    assert run_cycle(lib).returncode == 0
    root = backup_root(lib)
    old_version_state(os.path.join(root, "export_state.sqlite"))
    zips = {r["study_uid"]: r["zip_path"] for r in state_rows(root)}
    damage_member(os.path.join(root, zips["1.2.90.1"]), "horos-backup-manifest.json")
    # Read once by the first cycle, never again (with NULL fields it would be read
    # again and again, for the whole 60 s backfill of every cycle).
    for number in range(3):
        result = run_cycle(lib)
        assert result.returncode == 0, result.stderr
        unreadable = [(r["study_uid"], r["extra"]) for r in issues_rows(root)
                      if r["kind"] == "UNREADABLE_ZIP"]
        assert unreadable == [("1.2.90.1", zips["1.2.90.1"])], number
        assert ("cannot read the manifest" in result.stdout) == (number == 0), number
    rows = {r["study_uid"]: r for r in state_rows(root)}
    assert rows["1.2.90.1"]["patient_id"] == ""                 # read once, left unknown
    assert (rows["1.2.90.0"]["patient_id"], rows["1.2.90.2"]["patient_id"]) == ("P-900",
                                                                                 "P-902")

@contextlib.contextmanager
def read_only_copy(rec):
    """The backup copied onto a file system then remounted read-only: a recovery disk
    nobody can write to."""
    mount = rec.tmp / "readonly"
    with mounted_tmpfs(mount, "64m"):
        shutil.copytree(rec.backup, str(mount / "Backup"))
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield types.SimpleNamespace(backup=str(mount / "Backup"), gone_pacs=rec.gone_pacs)


def test_find_and_restore_to_a_folder_work_on_a_read_only_disk(recovered):
    rec = recovered
    old_version_state(os.path.join(rec.backup, "export_state.sqlite"))
    with read_only_copy(rec) as ro:
        result = find(ro, "joao")
        assert result.returncode == 0, result.stderr
        assert "older version" in result.stderr
        assert found_uids(ro, "2019-03") == {YAMADA, JOAO}
        out = rec.tmp / "out"
        result = restore(ro, "--month", "2019_03", "--to", str(out))
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(out)) == sorted(study_folder(rec, u) for u in (YAMADA, JOAO))
        new = rec.tmp / "NewHoros"
        (new / "INCOMING.noindex").mkdir(parents=True)
        result = restore(ro, "--all", "--into-horos", "--horos-data", str(new))
        assert result.returncode == 1
        assert "is read-only" in result.stderr and "restore --to DIR" in result.stderr
        assert result.stderr.count("\n") == 1
        assert os.listdir(new / "INCOMING.noindex") == []


# -- restore by selection --------------------------------------------------------------

def test_restore_a_month_and_a_search_to_a_folder(recovered):
    rec = recovered
    out = rec.tmp / "out"
    result = restore(rec, "--month", "2019_03", "--to", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == sorted(study_folder(rec, u) for u in (YAMADA, JOAO))
    for uid in (YAMADA, JOAO):
        assert folder_files(out / study_folder(rec, uid)) == rec.originals[uid]
    result = restore(rec, "--find", "smith", "pat3", "--to", str(rec.tmp / "smith"))
    assert result.returncode == 0, result.stderr
    assert os.listdir(rec.tmp / "smith") == [study_folder(rec, SMITH3)]
    assert folder_files(rec.tmp / "smith" / study_folder(rec, SMITH3)) == \
        rec.originals[SMITH3]
    # --to is not tracked: the folders already there are refused, nothing is rewritten.
    assert state_rows(rec.backup, "SELECT * FROM restores") == []
    before = tree_snapshot(str(out))
    again = restore(rec, "--month", "2019_03", "--month", "1999_12", "--to", str(out))
    assert again.returncode == 1 and again.stderr.count("already exists") == 2
    assert set(os.listdir(out)) == {study_folder(rec, u) for u in (YAMADA, JOAO, OBRIEN)}
    assert {k: v for k, v in tree_snapshot(str(out)).items()
            if not k.startswith(study_folder(rec, OBRIEN))} == before


@pytest.mark.parametrize("args, message", [
    (["--find", "nobody", "--to", "OUT"], "no study of the 14"),
    (["--month", "1990_01", "--to", "OUT"], "no study of the 14"),
    (["--to", "OUT"], "restore needs ZIPs, or a selection"),
])
def test_restore_of_nothing_is_one_line(recovered, args, message):
    out = str(recovered.tmp / "out")
    result = restore(recovered, *[out if a == "OUT" else a for a in args])
    assert result.returncode == 1
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not os.path.exists(out)


def test_a_bad_month_is_a_usage_error(recovered):
    result = restore(recovered, "--month", "March", "--to", str(recovered.tmp / "out"))
    assert result.returncode == 2 and "use YYYY_MM" in result.stderr


# -- feeding a new Horos ---------------------------------------------------------------

def count_files(folder):
    return sum(len(names) for _dirpath, _dirs, names in os.walk(folder))


def feed_until_done(rec, horos_data, limit, imported, max_runs=30):
    """Run restore --all --into-horos until nothing is left, emptying INCOMING between
    runs as Horos does (the study folders are moved to `imported`/<run>/). Returns the
    studies each run added, as {folder: files}."""
    incoming = os.path.join(horos_data, "INCOMING.noindex")
    runs = []
    stopped_before_a_big_study = False
    for run in range(max_runs):
        result = restore(rec, "--all", "--into-horos", "--horos-data", horos_data,
                         "--incoming-max-files", str(limit))
        assert result.returncode == 0, result.stderr
        added = {name: count_files(os.path.join(incoming, name))
                 for name in os.listdir(incoming)}
        runs.append(added)
        done = "nothing left" in result.stdout
        total = sum(added.values())
        assert added, (run, result.stdout)           # INCOMING was empty: it adds
        if stopped_before_a_big_study:
            assert len(added) == 1 and total > limit, (run, added)
        # A study is added only while INCOMING holds fewer than `limit` files (so the
        # last one added may take it past the limit); a bigger study goes alone.
        biggest = max(added.values())
        assert total - biggest < limit or len(added) == 1, (run, added)
        if biggest > limit:
            assert len(added) == 1, (run, added)
        # Each run stops while INCOMING is full, or just before a study bigger than
        # the limit, which waits for an empty INCOMING (the next run).
        stopped_before_a_big_study = not done and total < limit
        if not done:
            assert "left" in result.stdout
        shutil.move(incoming, os.path.join(imported, str(run)))
        os.mkdir(incoming)
        if done:
            return runs, result
    raise AssertionError("restore did not finish in %d runs" % max_runs)


@pytest.mark.parametrize("limit", [10, 3])
def test_restore_all_feeds_a_new_empty_horos_at_its_pace(recovered, limit):
    rec = recovered
    new = rec.tmp / "New Mac" / "Horos Data"
    (new / "INCOMING.noindex").mkdir(parents=True)     # all a new library needs
    imported = rec.tmp / "imported"
    imported.mkdir()
    runs, _last = feed_until_done(rec, str(new), limit, str(imported))
    assert len(runs) >= 3
    # Every study reached INCOMING exactly once, byte for byte.
    seen = {}
    for run in sorted(os.listdir(imported), key=int):
        for name in os.listdir(imported / run):
            assert name not in seen, "%s restored twice" % name
            seen[name] = folder_files(imported / run / name)
    assert set(seen) == {study_folder(rec, uid) for uid in rec.originals}
    for uid, originals in rec.originals.items():
        assert seen[study_folder(rec, uid)] == originals
        assert seen[study_folder(rec, uid)] == zip_payload(os.path.join(rec.backup,
                                                                        rec.zips[uid]))
    # A run after the end restores nothing.
    after = restore(rec, "--all", "--into-horos", "--horos-data", str(new),
                    "--incoming-max-files", str(limit))
    assert after.returncode == 0
    assert "restored 0 studies" in after.stdout and "nothing left" in after.stdout
    assert "14 studies were restored there before" in after.stdout
    assert os.listdir(new / "INCOMING.noindex") == []
    # One row per study, for the real path of the INCOMING folder.
    rows = state_rows(rec.backup, "SELECT * FROM restores")
    assert len(rows) == EXPORTED
    assert {r["study_uid"] for r in rows} == set(rec.originals)
    assert {r["target"] for r in rows} == {os.path.realpath(new / "INCOMING.noindex")}
    assert {r["study_uid"]: r["zip_path"] for r in rows} == rec.zips
    assert sorted(os.listdir(new)) == [".horos-backup-restore", "INCOMING.noindex"]
    assert os.listdir(new / ".horos-backup-restore") == []


def test_feeding_waits_while_horos_has_not_imported(recovered):
    rec = recovered
    new = rec.tmp / "Horos Data"
    incoming = new / "INCOMING.noindex"
    incoming.mkdir(parents=True)
    first = restore(rec, "--all", "--into-horos", "--horos-data", str(new),
                    "--incoming-max-files", "10")
    assert first.returncode == 0, first.stderr
    before = tree_snapshot(str(incoming))
    assert count_files(incoming) >= 10
    again = restore(rec, "--all", "--into-horos", "--horos-data", str(new),
                    "--incoming-max-files", "10")
    assert again.returncode == 0
    assert "restored 0 studies" in again.stdout and "left" in again.stdout
    assert tree_snapshot(str(incoming)) == before


def test_a_second_path_to_the_same_incoming_is_the_same_target(recovered):
    rec = recovered
    new = rec.tmp / "Horos Data"
    (new / "INCOMING.noindex").mkdir(parents=True)
    link = rec.tmp / "link-to-horos"
    os.symlink(str(new), str(link))
    assert restore(rec, "--month", "2019_03", "--into-horos", "--horos-data",
                   str(new)).returncode == 0
    again = restore(rec, "--month", "2019_03", "--into-horos", "--horos-data", str(link))
    assert again.returncode == 0 and "restored 0 studies" in again.stdout
    assert len(os.listdir(new / "INCOMING.noindex")) == 2


def test_a_restore_killed_before_its_rename_is_finished_not_repeated(recovered):
    rec = recovered
    new = rec.tmp / "Horos Data"
    incoming = new / "INCOMING.noindex"
    incoming.mkdir(parents=True)
    staging = new / ".horos-backup-restore"
    staging.mkdir()
    # A run was killed after recording YAMADA (staged in full) but before the rename,
    # and another while writing JOAO (staged in part, not recorded). PID 99999999 does
    # not exist (above Linux's pid_max).
    done = staging / (".restoring-99999999-" + study_folder(rec, YAMADA))
    with zipfile.ZipFile(os.path.join(rec.backup, rec.zips[YAMADA])) as archive:
        for name in zip_payload(os.path.join(rec.backup, rec.zips[YAMADA])):
            archive.extract(name, str(done))
    half = staging / (".restoring-99999999-" + study_folder(rec, JOAO))
    half.mkdir()
    (half / "partial.dcm").write_bytes(b"half")
    conn = sqlite3.connect(os.path.join(rec.backup, "export_state.sqlite"))
    conn.execute("INSERT INTO restores VALUES (?, ?, ?, ?)",
                 (os.path.realpath(incoming), YAMADA, rec.zips[YAMADA],
                  "2026-01-01T00:00:00Z"))
    conn.commit()
    conn.close()
    result = restore(rec, "--month", "2019_03", "--into-horos", "--horos-data", str(new))
    assert result.returncode == 0, result.stderr
    assert "restored 1 study" in result.stdout
    assert sorted(os.listdir(incoming)) == sorted(study_folder(rec, u) for u in (YAMADA, JOAO))
    for uid in (YAMADA, JOAO):
        assert folder_files(incoming / study_folder(rec, uid)) == rec.originals[uid]
    assert os.listdir(staging) == []
    assert len(state_rows(rec.backup, "SELECT * FROM restores")) == 2



FAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults.py")


def restore_with_fault(rec, fault, *args):
    """restore, with one of tests/faults.py's faults injected."""
    return subprocess.run([sys.executable, FAULTS, fault, "restore", *args, "--backup-root",
                           rec.backup, "--pacs-root", rec.gone_pacs],
                          capture_output=True, text=True, timeout=180,
                          env=script_env())


def new_library_for_march(rec):
    """(INCOMING.noindex, the staging folder, the flags) of a new, empty Horos library
    that restore feeds the backup's March 2019 studies."""
    new = rec.tmp / "Horos Data"
    incoming = new / "INCOMING.noindex"
    incoming.mkdir(parents=True)
    staging = new / ".horos-backup-restore"
    return incoming, staging, ("--month", "2019_03", "--into-horos", "--horos-data", str(new))


@pytest.mark.slow
def test_a_restore_killed_between_the_record_and_the_rename_is_finished_once(recovered):
    rec = recovered
    incoming, staging, march = new_library_for_march(rec)
    # Killed once the first study is staged in full and recorded, before its rename.
    killed = restore_with_fault(rec, "kill-after-restore-record", *march)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    rows = state_rows(rec.backup, "SELECT * FROM restores")
    assert len(rows) == 1
    first = rows[0]["study_uid"]
    assert first in (YAMADA, JOAO)
    assert rows[0]["target"] == os.path.realpath(str(incoming))
    assert os.listdir(incoming) == []                   # Horos has seen nothing yet
    (staged,) = os.listdir(staging)
    assert staged.endswith("-" + study_folder(rec, first))
    assert folder_files(staging / staged) == rec.originals[first]
    # The next run moves it in, then feeds the other study.
    result = restore(rec, *march)
    assert result.returncode == 0, result.stderr
    assert "restored 1 study" in result.stdout and "1 study was restored there before" \
        in result.stdout
    assert sorted(os.listdir(incoming)) == sorted(study_folder(rec, u) for u in (YAMADA, JOAO))
    for uid in (YAMADA, JOAO):
        assert folder_files(incoming / study_folder(rec, uid)) == rec.originals[uid]
    assert os.listdir(staging) == []
    # Never a second time: not while it waits in INCOMING, nor once Horos imported it.
    again = restore(rec, *march)
    assert again.returncode == 0 and "restored 0 studies" in again.stdout
    assert len(os.listdir(incoming)) == 2
    shutil.rmtree(str(incoming))
    incoming.mkdir()
    again = restore(rec, *march)
    assert again.returncode == 0 and "restored 0 studies" in again.stdout
    assert os.listdir(incoming) == [] and os.listdir(staging) == []
    assert len(state_rows(rec.backup, "SELECT * FROM restores")) == 2


@pytest.mark.slow
def test_a_restore_killed_before_the_record_feeds_the_study_next_time(recovered):
    rec = recovered
    incoming, staging, march = new_library_for_march(rec)
    killed = restore_with_fault(rec, "kill-before-restore-record", *march)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert state_rows(rec.backup, "SELECT * FROM restores") == []
    assert os.listdir(incoming) == []
    assert len(os.listdir(staging)) == 1                # staged, but not recorded
    result = restore(rec, *march)
    assert result.returncode == 0, result.stderr
    assert "restored 2 studies" in result.stdout
    assert sorted(os.listdir(incoming)) == sorted(study_folder(rec, u) for u in (YAMADA, JOAO))
    for uid in (YAMADA, JOAO):
        assert folder_files(incoming / study_folder(rec, uid)) == rec.originals[uid]
    assert os.listdir(staging) == []
    assert {r["study_uid"] for r in state_rows(rec.backup, "SELECT * FROM restores")} \
        == {YAMADA, JOAO}

def test_restore_into_horos_needs_an_incoming_folder_and_creates_nothing(recovered):
    rec = recovered
    new = rec.tmp / "Empty"
    new.mkdir()
    result = restore(rec, "--all", "--into-horos", "--horos-data", str(new))
    assert result.returncode == 1
    assert "no INCOMING.noindex in %s" % new in result.stderr
    assert result.stderr.count("\n") == 1
    assert os.listdir(new) == []
    missing = restore(rec, "--all", "--into-horos", "--horos-data", str(rec.tmp / "nope"))
    assert missing.returncode == 1 and "no Horos Data folder" in missing.stderr


def test_reindex_keeps_the_restore_progress(recovered):
    rec = recovered
    new = rec.tmp / "Horos Data"
    (new / "INCOMING.noindex").mkdir(parents=True)
    first = restore(rec, "--all", "--into-horos", "--horos-data", str(new),
                    "--incoming-max-files", "5")
    assert first.returncode == 0
    restored = {r["study_uid"] for r in state_rows(rec.backup, "SELECT * FROM restores")}
    assert 0 < len(restored) < EXPORTED
    result = run_script("reindex", "--backup-root", rec.backup, "--pacs-root", rec.gone_pacs)
    assert result.returncode == 0, result.stderr
    assert {r["study_uid"] for r in state_rows(rec.backup, "SELECT * FROM restores")} \
        == restored
    shutil.rmtree(new / "INCOMING.noindex")
    os.mkdir(new / "INCOMING.noindex")
    second = restore(rec, "--all", "--into-horos", "--horos-data", str(new),
                     "--incoming-max-files", "5")
    assert second.returncode == 0
    again = {study_folder(rec, uid) for uid in restored}
    assert again.isdisjoint(os.listdir(new / "INCOMING.noindex"))


def test_status_shows_a_restore_in_progress(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    lib.close()
    assert run_cycle(lib, "--batch-size", "50").returncode == 0
    new = tmp_path / "NewHoros"
    (new / "INCOMING.noindex").mkdir(parents=True)
    result = run_cycle(lib, "restore", "--all", "--into-horos", "--horos-data", str(new),
                       "--incoming-max-files", "10")
    assert result.returncode == 0, result.stderr
    restored = len(os.listdir(new / "INCOMING.noindex"))
    status = json.loads(run_cycle(lib, "status", "--json").stdout)
    assert status["restores"] == [{
        "target": os.path.realpath(new / "INCOMING.noindex"), "selection": "--all",
        "restored": restored, "left": EXPORTED - restored, "in_progress": True,
        "last_run_at": status["restores"][0]["last_run_at"]}]
    text = run_cycle(lib, "status").stdout
    assert "Restores into Horos" in text
    assert "%d studies restored, %d left (--all)" % (restored, EXPORTED - restored) in text


def test_restore_shows_progress_on_a_terminal_only(recovered):
    rec = recovered
    code, output = run_on_a_terminal(["restore", "--all", "--to", str(rec.tmp / "tty"),
                                      "--backup-root", rec.backup])
    assert code == 0
    assert "\r\x1b[Krestore 14/14 studies  34/34 files" in output
    assert "MB/s" in output
    piped = restore(rec, "--all", "--to", str(rec.tmp / "piped"))
    assert piped.returncode == 0
    assert "\x1b[" not in piped.stdout and "\r" not in piped.stdout
    assert piped.stdout.count("restored ") == EXPORTED


# -- the pure parts --------------------------------------------------------------------

def item(name, files):
    return hbe.RestoreItem(study_uid=name, zip_file=name, zip_path=name, files=files,
                           source_bytes=files)


def names(items):
    return [i.study_uid for i in items]


def test_plan_feeding():
    queue = [item("a", 4), item("b", 4), item("c", 4), item("d", 4)]
    assert names(hbe.plan_feeding(queue, 0, 10)) == ["a", "b", "c"]     # 12: one over
    assert names(hbe.plan_feeding(queue, 8, 10)) == ["a"]
    assert names(hbe.plan_feeding(queue, 10, 10)) == []                 # INCOMING full
    assert names(hbe.plan_feeding(queue, 9, 10)) == ["a"]
    big = [item("big", 25), item("a", 1)]
    assert names(hbe.plan_feeding(big, 0, 10)) == ["big"]               # alone, empty
    assert names(hbe.plan_feeding(big, 1, 10)) == []                    # waits for empty
    assert names(hbe.plan_feeding([item("a", 1)] + big, 0, 10)) == ["a"]
    assert hbe.plan_feeding([], 0, 10) == []


def study(uid, date, name="X", pid="P", acc="A", mods=("CT",), left_at=None):
    return hbe.BackupStudy(uid, "M/%s.zip" % uid, 1, 1, 1, date, name, pid, acc, None, mods,
                           left_at)


def test_matching_rules():
    s = study("1.2.840.2019.5", "2020-01-02", name="DUPONT^RENÉ", pid="ID-77",
              acc="ACC9", mods=("CT", "SR"))
    match = hbe.study_matches
    for term in ("rene", "RENÉ", "dupont^r", "id-7", "acc9", "1.2.840", "2020",
                 "2020-01-02", "20200102", "ct", "sr"):
        assert match(hbe.search_terms([term]), s), term
    for term in ("2019", "840", "01-02", "0102", "s", "rt", "2020-02", "x"):
        assert not match(hbe.search_terms([term]), s), term
    assert match(hbe.search_terms(["rene 2020 ct"]), s)
    assert not match(hbe.search_terms(["rene 2021"]), s)
    undated = study("9.9", None)
    assert not match(hbe.search_terms(["2020"]), undated)


def test_selection_order_is_newest_first_unknown_dates_last():
    studies = [study("a", "2019-01-01"), study("b", None), study("c", "2021-05-05"),
               study("d", "2020-01-01")]
    assert [s.uid for s in hbe.select_studies(studies, True, (), ())] == ["c", "d", "a", "b"]
    assert [s.uid for s in hbe.select_studies(studies, False, ["M"], ())] == \
        ["c", "d", "a", "b"]
    assert hbe.select_studies(studies, False, ["2019_01"], ()) == []


def test_a_named_zip_goes_to_a_library_once_without_the_pacs_sentinel(recovered):
    rec = recovered
    new = rec.tmp / "Horos Data"
    incoming = new / "INCOMING.noindex"
    incoming.mkdir(parents=True)
    first = restore(rec, rec.zips[YAMADA], "--into-horos", "--horos-data", str(new))
    assert first.returncode == 0, first.stderr
    assert "restored 1 study (7 files" in first.stdout
    assert folder_files(incoming / study_folder(rec, YAMADA)) == rec.originals[YAMADA]
    shutil.rmtree(incoming / study_folder(rec, YAMADA))          # Horos imported it
    again = restore(rec, rec.zips[YAMADA], "--into-horos", "--horos-data", str(new))
    assert again.returncode == 0
    assert "skipped %s: its study went to %s" % (rec.zips[YAMADA], os.path.realpath(incoming)) \
        in again.stdout
    assert "restored 0 studies" in again.stdout
    assert os.listdir(incoming) == []


TORN_WRITER = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode = DELETE")
conn.execute("PRAGMA cache_size = 1")       # spill changed pages into the file itself
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE exported_studies SET patient_name = 'TORN^WRITE'")
conn.execute("CREATE TABLE filler (x)")
conn.executemany("INSERT INTO filler VALUES (?)", [(b"x" * 1000,) for _ in range(2000)])
os._exit(0)                                  # killed mid-transaction: a hot journal
"""


def test_find_on_a_read_only_disk_left_mid_write_reads_the_last_commit(recovered):
    rec = recovered
    state = os.path.join(rec.backup, "export_state.sqlite")
    subprocess.run([sys.executable, "-c", TORN_WRITER, state], check=True)
    assert os.path.getsize(state + "-journal") > 0
    with read_only_copy(rec) as ro:
        before = tree_snapshot(ro.backup)
        assert found_uids(ro, "joao") == {JOAO}
        assert found_uids(ro, "torn") == set()       # the cut-off write is not seen
        assert len(json.loads(find(ro, "--json", "1").stdout)) == EXPORTED
        assert tree_snapshot(ro.backup) == before
