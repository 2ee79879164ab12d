"""The offsite copy, with the real restic (README: "Offsite with restic").

- A snapshot after a cycle adds two studies costs about the new ZIPs' bytes only, and a
  snapshot restored into a new folder is a backup that verify --all, find and restore
  work on.
- Consistent snapshots: a snapshot taken while a cycle or a mirror run is writing (the
  process really paused half-way through a ZIP, or between its rename and its record)
  restores to a working backup after the README's first step, `reindex`, even when the
  state file was caught mid-write.

CI installs restic (.ci/run) and sets HOROS_TEST_REQUIRE_RESTIC, so there these tests
fail instead of skipping when it is missing.
"""

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest

from conftest import (TEST_TZ, TESTS, backup_root, file_digest, manifest_of, run_cycle,
                      run_script, state_rows, zips_on_disk)
from fake_horos import FakeHorosLibrary
from test_mirror import wait_until_stopped

FAULTS = os.path.join(TESTS, "faults.py")
MB = 1024 * 1024
# What the README's nightly job leaves out: the lock and the database copy, and files
# still being written (a `.part` is never a ZIP).
README_EXCLUDES = ("--exclude", ".tmp", "--exclude", "*.part")


def need_restic():
    restic = shutil.which("restic")
    if restic:
        return restic
    if os.environ.get("HOROS_TEST_REQUIRE_RESTIC"):
        pytest.fail("restic is not installed, and this run requires it (.ci/run installs "
                    "it with apt-get)")
    pytest.skip("restic is not installed (apt-get install restic)")


@pytest.fixture
def repo(tmp_path):
    """A restic repository in tmp_path, its password in a 0600 file apart from it."""
    restic = need_restic()
    password = tmp_path / "secrets" / "restic-password"
    password.parent.mkdir()
    password.write_text("correct horse battery staple\n")
    password.chmod(0o600)
    env = dict(os.environ, RESTIC_REPOSITORY=str(tmp_path / "offsite-repo"),
               RESTIC_PASSWORD_FILE=str(password), RESTIC_CACHE_DIR=str(tmp_path / "cache"))

    def run(*args):
        result = subprocess.run([restic] + [str(a) for a in args], capture_output=True,
                                text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    run("init")
    return types.SimpleNamespace(run=run)


def snapshot(repo, path):
    """`restic backup --json` as the README's job runs it: its summary."""
    lines = repo.run("backup", "--json", *README_EXCLUDES, path).stdout.splitlines()
    (summary,) = [json.loads(line) for line in lines
                  if json.loads(line).get("message_type") == "summary"]
    return summary


def restore_snapshot(repo, snapshot_id, into, path):
    repo.run("restore", snapshot_id, "--target", into)
    restored = os.path.join(str(into), os.path.relpath(str(path), "/"))
    assert os.path.isdir(restored), os.listdir(str(into))
    return restored


def add_study(lib, uid, files, size, month):
    pk = lib.add_study(uid, "OFFSITE^%s" % uid.rsplit(".", 1)[1], "OFF-%s" % uid[-1],
                       study_date=dt.datetime(2020, month, 3, 9, 0))
    se = lib.add_series(pk, "CT", "Axial", 1)
    for _ in range(files):
        lib.add_image(se, content=os.urandom(size))


def library_of(tmp_path, studies=6):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    for i in range(studies):
        add_study(lib, "1.2.200.%d" % i, 1, MB, 1 + i)
    lib.finish()
    result = run_cycle(lib, "--batch-size", "50")
    assert result.returncode == 0, result.stderr
    return lib


def alone(command, root, *args):
    return run_script(command, *args, "--backup-root", root, "--pacs-root",
                      os.path.join(str(root), "..", "no-pacs-here"))


def assert_a_working_backup(root, uids, tmp_path, name):
    """verify --all, find and restore --all on the backup alone, byte for byte."""
    result = alone("verify", root, "--all")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "%d good, 0 bad" % len(uids) in result.stdout
    result = alone("find", root, "--json", "offsite")
    assert result.returncode == 0, result.stderr
    assert {found["study_uid"] for found in json.loads(result.stdout)} == set(uids)
    out = tmp_path / name
    result = alone("restore", root, "--all", "--to", out)
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(str(out))) == len(uids)
    for rel in zips_on_disk(root):
        folder = out / os.path.basename(rel)[:-len(".zip")]
        for entry in manifest_of(os.path.join(root, rel))["files"]:
            assert os.path.getsize(str(folder / entry["name"])) == entry["size"]


def test_a_second_snapshot_adds_only_the_new_zips_and_restores_to_a_working_backup(
        tmp_path, repo):
    lib = library_of(tmp_path)
    root = backup_root(lib)
    first = snapshot(repo, root)
    before = zips_on_disk(root)
    assert first["data_added"] >= sum(before.values())
    add_study(lib, "1.2.200.6", 2, MB, 7)
    add_study(lib, "1.2.200.7", 2, MB, 8)
    lib.finish()
    result = run_cycle(lib)
    assert result.returncode == 0, result.stderr
    new = {rel: size for rel, size in zips_on_disk(root).items() if rel not in before}
    assert len(new) == 2
    second = snapshot(repo, root)
    new_bytes = sum(new.values())
    # The two new ZIPs, plus the state, the log and month markers that changed: never
    # the 6 MB of ZIPs the first snapshot holds.
    assert new_bytes <= second["data_added"] <= new_bytes + 512 * 1024, (second, new_bytes)
    assert second["files_new"] >= 2 and second["files_unmodified"] >= len(before)
    restored = restore_snapshot(repo, second["snapshot_id"], tmp_path / "restored", root)
    assert {rel: file_digest(os.path.join(restored, rel)) for rel in zips_on_disk(restored)} \
        == {rel: file_digest(os.path.join(root, rel)) for rel in zips_on_disk(root)}
    assert_a_working_backup(restored, ["1.2.200.%d" % i for i in range(8)], tmp_path,
                            "out")


def paused(fault, *args):
    """The script with a fault that pauses it once (SIGSTOP) at a chosen point."""
    proc = subprocess.Popen([sys.executable, FAULTS, fault] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TZ=TEST_TZ))
    assert wait_until_stopped(proc), proc.communicate()
    return proc


def resume(proc):
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err


def tear(state_file):
    """A state caught half-way through a commit: pages from two moments, and a journal
    from a third (restic reads one file at a time)."""
    with open(state_file, "r+b") as handle:
        handle.seek(4096)
        handle.write(os.urandom(8192))
    with open(state_file + "-journal", "wb") as handle:
        handle.write(os.urandom(4096))


def test_snapshots_taken_mid_write_restore_to_a_working_backup_after_reindex(
        tmp_path, repo):
    lib = library_of(tmp_path, studies=3)
    root = backup_root(lib)
    (tmp_path / "MIRRORDISK").mkdir()
    target = tmp_path / "MIRRORDISK" / "Horos"
    mirror_flags = ("--backup-root", root, "--pacs-root", tmp_path / "none", "mirror",
                    "--to")
    assert run_script(*mirror_flags, target).returncode == 0      # it holds 3 ZIPs
    for uid, month in (("1.2.200.3", 4), ("1.2.200.4", 5)):
        add_study(lib, uid, 3, MB, month)
    lib.conn.execute("UPDATE ZSTUDY SET ZNAME = 'OFFSITE^RENAMED' WHERE ZSTUDYINSTANCEUID "
                     "= '1.2.200.0'")        # its ZIP is replaced by one of a new name
    lib.finish()
    cycle_flags = ("--pacs-root", lib.pacs_root, "--clinic-hours", "00-24",
                   "--settle-minutes", "0")
    taken = {}
    # A cycle paused half-way through writing a ZIP, then one paused between a ZIP's
    # rename and its record in the state.
    proc = paused("stop-mid-part=%d" % MB, *cycle_flags, "--batch-size", "1")
    taken["cycle mid-part"] = (snapshot(repo, root), root)
    resume(proc)
    proc = paused("stop-after-rename", *cycle_flags, "--batch-size", "1")
    taken["cycle after rename"] = (snapshot(repo, root), root)
    resume(proc)
    assert run_cycle(lib, "--settle-minutes", "0").returncode == 0
    uids = ["1.2.200.%d" % i for i in range(5)]
    assert {r["study_uid"] for r in state_rows(root)} == set(uids)
    # The same for mirror runs: one bringing the mirror up to date, one filling a new
    # mirror disk.
    proc = paused("stop-mid-part=%d" % MB, *mirror_flags, target)
    taken["mirror mid-part"] = (snapshot(repo, target), target)
    resume(proc)
    fresh = tmp_path / "MIRRORDISK" / "Fresh"
    proc = paused("stop-after-rename", *mirror_flags, fresh)
    taken["mirror after rename"] = (snapshot(repo, fresh), fresh)
    resume(proc)
    for number, (name, (summary, path)) in enumerate(sorted(taken.items())):
        restored = restore_snapshot(repo, summary["snapshot_id"],
                                    tmp_path / ("restored-%d" % number), path)
        on_disk = {manifest_of(os.path.join(restored, rel))["study"]["study_uid"]
                   for rel in zips_on_disk(restored)}
        assert on_disk, name
        if name.endswith("after rename"):
            # A ZIP renamed into place, not yet in the snapshot's state: reindex finds it.
            listed = {r["study_uid"] for r in state_rows(restored)}
            assert on_disk - listed, name
        if name == "mirror after rename":
            tear(os.path.join(restored, "export_state.sqlite"))
        result = alone("reindex", restored)
        assert result.returncode == 0, (name, result.stdout, result.stderr)
        assert {r["study_uid"] for r in state_rows(restored)} == on_disk, name
        assert_a_working_backup(restored, sorted(on_disk), tmp_path, "out-%d" % number)
