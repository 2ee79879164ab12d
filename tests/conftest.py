"""Shared test setup: a time zone far from UTC, the script as a subprocess, a library."""

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import zipfile

import pytest

# Horos stores dates in the Mac's local time. Every test (and every subprocess it
# starts) runs in Tokyo, UTC+9, so code that converts with UTC puts studies in the
# wrong day and month and fails.
TEST_TZ = "Asia/Tokyo"
os.environ["TZ"] = TEST_TZ
time.tzset()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
SCRIPT = os.path.join(ROOT, "horos_backup_export.py")
for path in (ROOT, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

from fake_horos import FakeHorosLibrary  # noqa: E402


def script_env(env=None):
    """The environment of a run of the script: TZ far from UTC, and bytecode allowed,
    so that the 8,000-line file is compiled once per interpreter rather than on each of
    the suite's 750 runs (0.11 s each: a third of the suite's time)."""
    full_env = dict(os.environ, TZ=TEST_TZ, PYTHONPATH=ROOT)
    full_env.pop("PYTHONDONTWRITEBYTECODE", None)
    full_env.update(env or {})
    return full_env


def run_script(*args, timeout=180, env=None, cwd=None):
    """The script as launchd runs it: a separate process, the same file (its __file__
    and sys.argv[0] are the script's path); returns CompletedProcess. `-m` is how Python
    uses the compiled file it cached: a script named on the command line is compiled
    anew each time."""
    return subprocess.run([sys.executable, "-m", "horos_backup_export"]
                          + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=script_env(env), cwd=cwd)


# A cycle exports BATCH_SIZE studies in clinic hours and keeps going outside them. Tests
# that count studies per cycle must not depend on the hour they run at: every run_cycle
# keeps the cap at all hours unless the test gives its own --clinic-hours (the last one
# given wins). Tests of the schedule build theirs around the current time.
PINNED_SCHEDULE = ("--clinic-hours", "00-24")


def run_cycle(lib, *args, **kwargs):
    return run_script("--pacs-root", lib.pacs_root, *PINNED_SCHEDULE, *args, **kwargs)


def backup_root(lib):
    return os.path.join(lib.pacs_root, "Backup")


def zips_on_disk(root):
    """{relative path: size} of every finished ZIP below the backup root."""
    found = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".zip"):
                full = os.path.join(folder, name)
                found[os.path.relpath(full, root)] = os.path.getsize(full)
    return found


def files_named(root, suffix):
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, _dirs, files in os.walk(root)
                  for name in files if name.endswith(suffix))


def state_rows(root, sql="SELECT * FROM exported_studies ORDER BY study_uid"):
    path = os.path.join(root, "export_state.sqlite")
    if not os.path.exists(path):
        return []
    conn = sqlite3.connect(path)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def manifest_of(zip_path):
    with zipfile.ZipFile(zip_path) as archive:
        return json.loads(archive.read("horos-backup-manifest.json").decode("utf-8"))


def zip_payload(zip_path):
    """{member: bytes} of the study files in a ZIP (the manifest left out)."""
    with zipfile.ZipFile(zip_path) as archive:
        return {name: archive.read(name) for name in archive.namelist()
                if name != "horos-backup-manifest.json"}


def file_digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def tree_snapshot(root):
    """Every file below root with its size, mtime and content digest."""
    snap = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(folder, name)
            st = os.stat(full)
            snap[os.path.relpath(full, root)] = (st.st_size, st.st_mtime_ns, file_digest(full))
    return snap


def issues_rows(root):
    import csv
    path = os.path.join(root, "issues.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@contextlib.contextmanager
def mounted_tmpfs(mount_point, size):
    """A real file system of `size` (`6m`, `48m`) at mount_point for the with block, for
    disk-full and read-only tests; skipped where it cannot be mounted (not root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(str(mount_point), exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % result.stderr.strip())
    try:
        yield str(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def library(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    yield lib
    lib.close()
