"""Three bugs a mutation test of the suite planted and no test caught (issue 11).

- the `.part` file not fsynced before it is verified and renamed;
- recovery adopting a leftover ZIP after reading only its manifest;
- `status --json` losing a key the README documents.
"""

import datetime as dt
import fcntl
import json
import os
import re
import zipfile

import pytest

from conftest import (ROOT, backup_root, issues_rows, manifest_of, run_cycle, run_script,
                      state_rows, zip_payload, zips_on_disk)
from fake_horos import build_sample_library
from test_commands import flip_member_byte
from test_resilience import run_with_fault

import horos_backup_export as hbe


# -- the .part is on the disk before it is verified and renamed ------------------------

def fd_path(fd):
    """The path an open descriptor names, asked of the kernel."""
    if os.path.isdir("/proc/self/fd"):
        return os.readlink("/proc/self/fd/%d" % fd)
    get_path = getattr(fcntl, "F_GETPATH", None)         # macOS
    if get_path is None:
        pytest.skip("no way to name a file descriptor here")
    return fcntl.fcntl(fd, get_path, b"\0" * 1024).rstrip(b"\0").decode()


def small_plan(tmp_path):
    sources = []
    for number in range(3):
        path = tmp_path / "src" / ("%d.dcm" % number)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(200_000))
        sources.append(hbe.SourceFile(member="0001_CT_x/%d.dcm" % number, path=str(path),
                                      series_uid="1.2.120.1.1", size=200_000))
    info = hbe.StudyInfo(uid="1.2.120.1", pks=(1,), patient_name="SYNC^TEST",
                         patient_id="ID", birth_date=None, study_datetime=None,
                         accession_number="", description="", modalities=("CT",))
    series = (hbe.SeriesInfo(pk=1, uid="1.2.120.1.1", number=1, modality="CT",
                             description="x"),)
    return hbe.StudyPlan(info=info, series=series, files=tuple(sources),
                         zip_relpath="UNKNOWN_DATE/SYNC_TEST.zip", fingerprint="f")


def test_the_part_is_fsynced_whole_before_it_is_verified_and_renamed(tmp_path, monkeypatch):
    """Real calls, in the order they happen: each sync records the path and size of the
    file its descriptor names; the verification and the rename pass through."""
    plan = small_plan(tmp_path)
    final = str(tmp_path / "Backup" / plan.zip_relpath)
    part = final + hbe.PART_SUFFIX
    events = []
    real_fsync, real_fcntl = os.fsync, fcntl.fcntl
    real_verify, real_replace = hbe.verify_zip, os.replace

    def fsync(fd):
        events.append(("sync", fd_path(fd), os.fstat(fd).st_size))
        return real_fsync(fd)

    def full_fsync(fd, command, *args):
        if command == getattr(fcntl, "F_FULLFSYNC", object()):
            events.append(("sync", fd_path(fd), os.fstat(fd).st_size))
        return real_fcntl(fd, command, *args)

    def verify_zip(path, throttle=None):
        events.append(("verify", path, os.path.getsize(path)))
        return real_verify(path, throttle)

    def replace(source, target):
        events.append(("rename", str(source), str(target)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(fcntl, "fcntl", full_fsync)
    monkeypatch.setattr(hbe, "verify_zip", verify_zip)
    monkeypatch.setattr(os, "replace", replace)
    hbe.write_verified_zip(final, plan, plan.files, [], "deflate", 1, lambda n: None,
                           "2026-01-01T00:00:00Z")
    monkeypatch.undo()
    size = os.path.getsize(final)
    assert zip_payload(final) == {s.member: open(s.path, "rb").read() for s in plan.files}
    verified = events.index(("verify", part, size))
    renamed = events.index(("rename", part, final))
    synced = [i for i, event in enumerate(events) if event == ("sync", part, size)]
    assert synced, events                    # the .part, whole, reached the disk...
    assert synced[0] < verified < renamed, events   # ...before it was read back
    # and the folder after the rename, so the new name survives a power cut
    assert any(event[:2] == ("sync", os.path.dirname(final)) for event in events[renamed:])


# -- a damaged leftover ZIP is written again, not adopted ------------------------------

def test_a_leftover_zip_with_one_flipped_byte_is_written_again(library):
    library.add_simple_study("1.2.121.1", "CT", images=3, size=20_000,
                             study_date=dt.datetime(2019, 8, 1))
    library.finish()
    root = backup_root(library)
    assert run_with_fault(library, "kill-after-rename").returncode == -9
    (relpath,) = zips_on_disk(root)
    assert state_rows(root) == []                 # renamed, not recorded
    assert [r["zip_path"] for r in state_rows(
        root, "SELECT zip_path FROM writes_in_progress")] == [relpath]
    path = os.path.join(root, relpath)
    flip_member_byte(path, 1)                     # the disk loses a bit meanwhile
    manifest_of(path)                             # the manifest still reads
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is not None
    result = run_cycle(library)
    assert result.returncode == 0, result.stderr
    assert "removed %s: left by an interrupted run and not verifiable" % relpath \
        in result.stdout
    assert "adopted" not in result.stdout
    assert "[1/1] exported %s" % relpath in result.stdout
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    payload = zip_payload(path)
    for entry in manifest_of(path)["files"]:
        with open(entry["source"], "rb") as handle:
            assert payload[entry["name"]] == handle.read()
    assert len(payload) == 3
    assert [r["zip_path"] for r in state_rows(root)] == [relpath]
    assert state_rows(root, "SELECT * FROM writes_in_progress") == []
    assert [(r["kind"], r["study_uid"], r["extra"]) for r in issues_rows(root)] == [
        ("VERIFY_FAILED", "1.2.121.1", relpath)]
    assert "CRC" in issues_rows(root)[0]["detail"]


# -- status --json keys are the README's -----------------------------------------------

STATUS_KEYS_HEADING = "#### `status --json` keys"


def readme_status_keys():
    """The first column of the table under STATUS_KEYS_HEADING in README.md."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    assert STATUS_KEYS_HEADING in text
    section = text.split(STATUS_KEYS_HEADING, 1)[1].split("\n#", 1)[0]
    keys = set()
    for line in section.splitlines():
        match = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if match:
            keys.add(match.group(1))
    return keys


def key_paths(status):
    """Every key of the JSON, nested ones as `lock.held` and `failures[].kind`.

    The rows of `last_runs` are the `runs` table's, documented with the state."""
    paths = set()
    for key, value in status.items():
        paths.add(key)
        if isinstance(value, dict):
            paths.update("%s.%s" % (key, sub) for sub in value)
        elif isinstance(value, list) and key != "last_runs":
            assert value, "%s is empty: the test cannot see its keys" % key
            for item in value:
                paths.update("%s[].%s" % (key, sub) for sub in item)
    return paths


def test_status_json_keys_are_the_readme_list(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    pk = lib.add_study("1.2.122.1", study_date=dt.datetime(2014, 1, 1))
    lib.add_image(lib.add_series(pk, "CT", "gone", 1), create_file=False)   # a failure
    lib.finish()
    assert run_cycle(lib).returncode == 0
    new_library = tmp_path / "NewMac" / "Horos Data"       # a restore in progress
    os.makedirs(str(new_library / "INCOMING.noindex"))
    fed = run_cycle(lib, "restore", "--all", "--into-horos", "--horos-data", new_library,
                    "--incoming-max-files", "3")
    assert fed.returncode == 0, fed.stderr
    os.makedirs(str(tmp_path / "MIRROR"))                  # a mirror it feeds
    mirrored = run_cycle(lib, "mirror", "--to", tmp_path / "MIRROR" / "Horos")
    assert mirrored.returncode == 0, mirrored.stderr
    result = run_cycle(lib, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["failures"] and status["months"] and status["last_runs"]
    assert status["restores"][0]["in_progress"]
    assert status["mirrors"][0]["behind"] == 0
    documented = readme_status_keys()
    assert len(documented) > 20
    assert key_paths(status) == documented
    # The status of a backup alone (here the mirror, no PACS volume) has the same keys,
    # those that need Horos null.
    result = run_script("status", "--json", "--backup-root", tmp_path / "MIRROR" / "Horos",
                        "--pacs-root", tmp_path / "nowhere")
    assert result.returncode == 0, result.stderr
    alone = json.loads(result.stdout)
    assert alone["backup_only"] is True and alone["eligible"] is None
    assert alone["mirror_of"] == backup_root(lib) and alone["exported"] == status["exported"]
    assert set(alone) == set(status)
    lib.close()
