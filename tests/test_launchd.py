"""The launchd job: what it runs, how often, and how gently."""

import os
import plistlib

from conftest import ROOT


def test_plist_runs_the_script_every_ten_minutes_gently():
    with open(os.path.join(ROOT, "com.horos.backup.plist"), "rb") as handle:
        job = plistlib.load(handle)
    assert job["Label"] == "com.horos.backup"
    assert job["ProgramArguments"] == ["/usr/bin/python3",
                                       "/Volumes/PACS/Backup/horos_backup_export.py"]
    assert job["StartInterval"] == 600
    assert job["RunAtLoad"] is True
    assert job["StandardOutPath"] == "/tmp/horos_backup_export.out"
    assert job["StandardErrorPath"] == "/tmp/horos_backup_export.err"
    assert job["LowPriorityIO"] is True
    assert job["ProcessType"] == "Background"
    assert isinstance(job["Nice"], int) and job["Nice"] > 0
