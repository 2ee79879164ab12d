"""Patient data private on disk, issues.csv safe to open in a spreadsheet, and bounded.

The script runs as a subprocess under the macOS default umask (022), which would make
every file it creates readable by every local account.
"""

import csv
import datetime as dt
import os
import shutil
import sqlite3
import stat
import subprocess
import sys

import pytest

from conftest import (SCRIPT, backup_root, file_digest, issues_rows, script_env,
                      state_rows, zips_on_disk)
from fake_horos import build_sample_library

import horos_backup_export as hbe

ISSUES_LIMIT = 10 * 1024 * 1024          # README: issues.csv rotates at 10 MB


def run_umask_022(*args, timeout=180):
    """The script as a person's shell or launchd would start it: umask 022."""
    env = script_env()
    return subprocess.run([sys.executable, SCRIPT] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=lambda: os.umask(0o022))


def open_to_others(root):
    """Everything at or below root (never through a symlink) that group or others can
    use, as {relative path: octal mode}."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for path in [folder] + [os.path.join(folder, n) for n in dirs + files]:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                found[os.path.relpath(path, root)] = oct(mode)
    return found


def add_study_without_files(lib, uid, day=1):
    pk = lib.add_study(uid, "NO^FILES", study_date=dt.datetime(2014, 3, day))
    lib.add_image(lib.add_series(pk, "CT", "gone", 1), create_file=False)


def make_failures_due(root):
    conn = sqlite3.connect(os.path.join(root, "export_state.sqlite"))
    conn.execute("UPDATE failures SET next_attempt_at = '2000-01-01T00:00:00Z'")
    conn.commit()
    conn.close()


@pytest.fixture
def sample(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    add_study_without_files(lib, "1.2.110.1")
    lib.finish()
    yield lib
    lib.close()


# -- file modes ------------------------------------------------------------------------

def test_nothing_is_open_to_others_after_a_cycle_verify_reindex_or_retry(sample):
    root = backup_root(sample)
    pacs = ("--pacs-root", sample.pacs_root)
    result = run_umask_022(*pacs, "--use-db-copy")
    assert result.returncode == 0, result.stderr
    assert len(zips_on_disk(root)) == 14
    for made in (".tmp/.run.lock", ".tmp/dbcopy/Database_copy.sql", "issues.csv",
                 "logs/horos_backup.log", "export_state.sqlite", "2019_03/.month_done"):
        assert os.path.exists(os.path.join(root, made)), made
    assert open_to_others(root) == {}
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    for relpath in zips_on_disk(root):
        assert stat.S_IMODE(os.stat(os.path.join(root, relpath)).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(os.path.join(root, relpath))).st_mode) \
            == 0o700
    for command in (["verify", "--all"], ["reindex"], ["retry"]):
        result = run_umask_022(*command, *pacs)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        assert open_to_others(root) == {}, command
    assert os.path.exists(os.path.join(root, "export_state.sqlite.before-reindex"))
    make_failures_due(root)
    result = run_umask_022(*pacs)          # the retried study fails again: a new row
    assert result.returncode == 0, result.stderr
    assert [r["kind"] for r in issues_rows(root)] == ["NO_FILES", "NO_FILES"]
    assert open_to_others(root) == {}


def test_the_state_journal_is_as_private_as_the_state(sample):
    """SQLite creates the journal with the database file's mode, not the umask's."""
    assert run_umask_022("--pacs-root", sample.pacs_root).returncode == 0
    state = os.path.join(backup_root(sample), "export_state.sqlite")
    old_umask = os.umask(0o022)           # a person's sqlite3 at a terminal
    try:
        conn = sqlite3.connect(state, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', '1')")
        journal = os.stat(state + "-journal")
        conn.execute("ROLLBACK")
        conn.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(journal.st_mode) == 0o600


def loosen_like_the_old_version(root):
    """What the previous version left under umask 022: folders 0755, files 0644."""
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def test_an_old_open_backup_is_tightened_by_the_next_cycle_and_logged_once(sample):
    root = backup_root(sample)
    pacs = ("--pacs-root", sample.pacs_root)
    assert run_umask_022(*pacs).returncode == 0
    loosen_like_the_old_version(root)
    assert len(open_to_others(root)) > 20
    result = run_umask_022(*pacs)
    assert result.returncode == 0, result.stderr
    assert open_to_others(root) == {}
    told = [line for line in result.stdout.splitlines() if "private to this account" in line]
    assert len(told) == 1 and root in told[0]
    with open(os.path.join(root, "logs", "horos_backup.log"), encoding="utf-8") as handle:
        assert sum("private to this account" in line for line in handle) == 1
    # Once BACKUP_ROOT is private the walk is skipped (README: File modes): a file put
    # there by hand keeps its mode, and nothing is logged again.
    handmade = os.path.join(root, "note.txt")
    with open(handmade, "w") as handle:
        handle.write("copied in by hand")
    os.chmod(handmade, 0o644)
    again = run_umask_022(*pacs)
    assert again.returncode == 0
    assert "private to this account" not in again.stdout
    assert open_to_others(root) == {"note.txt": "0o644"}



def test_verify_alone_creates_nothing_open_and_tightens_an_old_backup(sample):
    """No cycle between: `verify` must do both itself (a person runs it by hand, on a
    backup the old version left, or with the launchd job unloaded)."""
    root = backup_root(sample)
    pacs = ("--pacs-root", sample.pacs_root)
    assert run_umask_022(*pacs).returncode == 0
    # What verify creates itself: .tmp with its lock, the log (gone here, as in a backup
    # copied without them); BACKUP_ROOT stays private, so nothing is walked.
    shutil.rmtree(os.path.join(root, ".tmp"))
    shutil.rmtree(os.path.join(root, "logs"))
    result = run_umask_022("verify", "--limit", "2", *pacs)
    assert result.returncode == 0, result.stdout + result.stderr
    for made in (".tmp/.run.lock", "logs/horos_backup.log"):
        assert os.path.exists(os.path.join(root, made)), made
    assert open_to_others(root) == {}
    assert "private to this account" not in result.stdout
    # The old version's open backup, and verify the first to run on it.
    loosen_like_the_old_version(root)
    assert len(open_to_others(root)) > 20
    result = run_umask_022("verify", "--limit", "2", *pacs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert open_to_others(root) == {}
    told = [line for line in result.stdout.splitlines() if "private to this account" in line]
    assert len(told) == 1 and root in told[0]

def test_an_executable_in_the_backup_root_stays_runnable_by_its_owner(sample):
    """The README installs the script in BACKUP_ROOT: tightening keeps owner bits."""
    root = backup_root(sample)
    os.makedirs(root)
    os.chmod(root, 0o755)
    script_copy = os.path.join(root, "horos_backup_export.py")
    with open(SCRIPT, "rb") as src, open(script_copy, "wb") as dst:
        dst.write(src.read())
    os.chmod(script_copy, 0o755)
    assert run_umask_022("--pacs-root", sample.pacs_root).returncode == 0
    assert stat.S_IMODE(os.stat(script_copy).st_mode) == 0o700
    assert open_to_others(root) == {}


def test_restore_to_a_folder_is_private_and_into_horos_follows_the_users_umask(sample,
                                                                              tmp_path):
    root = backup_root(sample)
    assert run_umask_022("--pacs-root", sample.pacs_root).returncode == 0
    relpath = sorted(zips_on_disk(root))[0]
    target = tmp_path / "Restored" / "new"
    result = run_umask_022("restore", relpath, "--to", target, "--pacs-root",
                           sample.pacs_root)
    assert result.returncode == 0, result.stderr
    (folder,) = os.listdir(target)
    assert os.listdir(os.path.join(target, folder))
    assert open_to_others(str(target)) == {}
    result = run_umask_022("restore", relpath, "--into-horos", "--pacs-root",
                           sample.pacs_root)
    assert result.returncode == 0, result.stderr
    imported = os.path.join(sample.incoming_dir, folder)
    modes = {stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode)
             for d, _dirs, names in os.walk(imported) for n in names}
    assert modes == {0o644}                   # what Horos's own files get from 022
    assert stat.S_IMODE(os.stat(imported).st_mode) == 0o755


# -- issues.csv: safe in a spreadsheet -------------------------------------------------

HOSTILE_UIDS = ['=HYPERLINK("http://x","y")', "+1.2.3", "-1.2.3", "@SUM(A1:A9)",
                "=1+1;cmd|' /C calc'!A0"]


def test_hostile_uids_land_in_issues_csv_neutralised_but_present(library):
    for day, uid in enumerate(HOSTILE_UIDS, 1):
        add_study_without_files(library, uid, day)
    library.finish()
    result = run_umask_022("--pacs-root", library.pacs_root)
    assert result.returncode == 0, result.stderr
    rows = issues_rows(backup_root(library))
    assert [r["kind"] for r in rows] == ["NO_FILES"] * len(HOSTILE_UIDS)
    assert sorted(r["study_uid"] for r in rows) == sorted("'" + uid for uid in HOSTILE_UIDS)
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), row


def test_every_formula_start_gets_a_quote_and_nothing_else_changes(tmp_path):
    for text in ("=1", "+1", "-1", "@x", "\tx", "\rx"):
        assert hbe.csv_safe_cell(text) == "'" + text
    for text in ("", "1.2.3", "/Volumes/PACS/x.dcm", "a=b", "'=already", "NO_FILES"):
        assert hbe.csv_safe_cell(text) == text
    hbe.IssueLog(str(tmp_path / "issues.csv")).add("NO_FILES", "\r=cmd", "\t=1+1", "-2+3")
    rows = issues_rows(str(tmp_path))
    assert [(r["kind"], r["study_uid"], r["detail"], r["extra"]) for r in rows] == [
        ("NO_FILES", "'\r=cmd", "'\t=1+1", "'-2+3")]


# -- issues.csv: rotation --------------------------------------------------------------

def fill_issues_csv(path, size):
    """A real issues.csv of exactly `size` bytes: the header, then old rows."""
    header = "timestamp,kind,study_uid,detail,extra\r\n"
    row = "2020-01-01T00:00:00Z,INCOMING_OVER_LIMIT,,more than 25000 files in x,\r\n"
    last = "2020-01-01T00:00:00Z,OLD,,%s,\r\n"
    count, rest = divmod(size - len(header), len(row))
    count, rest = count - 1, rest + len(row)      # the last row takes up the rest
    with open(path, "w", newline="", encoding="utf-8") as handle:
        handle.write(header + row * count + last % ("x" * (rest - len(last % ""))))
    assert os.path.getsize(path) == size


def test_issues_csv_rotates_at_10_mb_like_the_log(library):
    add_study_without_files(library, "1.2.111.1")
    library.finish()
    root = backup_root(library)
    os.makedirs(root)
    issues = os.path.join(root, "issues.csv")
    fill_issues_csv(issues, ISSUES_LIMIT - 1)
    for number in range(1, 6):
        with open("%s.%d" % (issues, number), "w") as handle:
            handle.write("generation %d\n" % number)
    older = {n: file_digest("%s.%d" % (issues, n)) for n in range(1, 5)}
    assert run_umask_022("--pacs-root", library.pacs_root).returncode == 0
    # Under the limit: the row is added to the same file.
    assert os.path.getsize(issues) > ISSUES_LIMIT
    assert issues_rows(root)[-1]["study_uid"] == "1.2.111.1"
    assert file_digest(issues + ".1") == older[1]
    fill_issues_csv(issues, ISSUES_LIMIT)          # exactly 10 MB: the next row rotates
    full = file_digest(issues)
    make_failures_due(root)
    assert run_umask_022("--pacs-root", library.pacs_root).returncode == 0
    # At the limit: renamed to .1, .1 to .2 ... .4 to .5, the old .5 dropped, and a new
    # file under the same name, with its header.
    assert file_digest(issues + ".1") == full
    for number in range(1, 5):
        assert file_digest("%s.%d" % (issues, number + 1)) == older[number]
    assert not os.path.exists(issues + ".6")
    with open(issues, newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == ["timestamp", "kind", "study_uid", "detail", "extra"]
    assert [(line[1], line[2]) for line in lines[1:]] == [("NO_FILES", "1.2.111.1")]
    assert open_to_others(root) == {}
    assert state_rows(root, "SELECT attempts FROM failures") == [{"attempts": 2}]


def test_a_group_umask_keeps_the_groups_read_access(tmp_path, monkeypatch):
    """README "Giving a second account access": BACKUP_UMASK = 0o027 is left alone."""
    monkeypatch.setattr(hbe, "BACKUP_UMASK", 0o027)
    root = tmp_path / "Backup"
    (root / "2019_03").mkdir(parents=True)
    zip_path = root / "2019_03" / "X.zip"
    zip_path.write_bytes(b"zip")
    os.chmod(zip_path, 0o666)
    for folder in (root, root / "2019_03"):
        os.chmod(folder, 0o777)
    hbe.make_backup_root_private(str(root))
    assert {p: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in (root, root / "2019_03",
                                                               zip_path)} == {
        root: "0o750", root / "2019_03": "0o750", zip_path: "0o640"}
    os.chmod(zip_path, 0o644)            # readable by others, but the root is closed:
    hbe.make_backup_root_private(str(root))   # no walk
    assert oct(stat.S_IMODE(os.stat(zip_path).st_mode)) == "0o644"
