"""Clinic hours: BATCH_SIZE per cycle while Horos is in use, the backlog drains outside.

Nothing here depends on the hour the tests run at: the pure functions get fixed
datetimes, and the cycles get a schedule built around the current local time.
"""

import datetime as dt
import json
import os
import subprocess
import sys
import time

import pytest

import horos_backup_export as hbe
from conftest import SCRIPT, TEST_TZ, backup_root, run_cycle, run_script, state_rows, zips_on_disk
from fake_horos import FakeHorosLibrary

MON_FRI = (0, 1, 2, 3, 4)


def at(day, hour, minute=0):
    """A local datetime in the week of Monday 2026-11-23 (day 0 = Monday)."""
    return dt.datetime(2026, 11, 23 + day, hour, minute)


def test_clinic_hours_are_parsed():
    assert hbe.parse_clinic_hours("07-19") == (7, 19)
    assert hbe.parse_clinic_hours("19-07") == (19, 7)
    assert hbe.parse_clinic_hours("00-24") == (0, 24)
    assert hbe.parse_clinic_hours("7-9") == (7, 9)
    assert hbe.parse_clinic_hours(" None ") is None
    assert hbe.parse_clinic_days("mon-fri") == MON_FRI
    assert hbe.parse_clinic_days("mon-sat") == (0, 1, 2, 3, 4, 5)
    assert hbe.parse_clinic_days("mon,wed,fri") == (0, 2, 4)
    assert hbe.parse_clinic_days("Sat-Sun") == (5, 6)
    assert hbe.parse_clinic_days("fri-mon") == (0, 4, 5, 6)
    assert hbe.parse_clinic_days("mon-tue,thu") == (0, 1, 3)
    assert hbe.parse_clinic_days("monday-friday") == MON_FRI


@pytest.mark.parametrize("text", ["", "7", "07:00-19:00", "07-07", "00-00", "24-07", "07-25",
                                  "-1-07", "07-19-21", "seven-nineteen", "all"])
def test_bad_clinic_hours_are_refused(text):
    with pytest.raises(ValueError, match="--clinic-hours"):
        hbe.parse_clinic_hours(text)


@pytest.mark.parametrize("text", ["", "mon-", "monxyz", "mon-tue-wed", "funday", "mon;fri",
                                  "1-5"])
def test_bad_clinic_days_are_refused(text):
    with pytest.raises(ValueError, match="--clinic-days"):
        hbe.parse_clinic_days(text)


@pytest.mark.parametrize("hours, days, moment, inside", [
    ((7, 19), MON_FRI, at(0, 7), True),             # the start is inside
    ((7, 19), MON_FRI, at(0, 6, 59), False),
    ((7, 19), MON_FRI, at(4, 18, 59), True),
    ((7, 19), MON_FRI, at(4, 19), False),           # the end is not
    ((7, 19), MON_FRI, at(5, 12), False),           # Saturday
    ((7, 19), MON_FRI, at(6, 12), False),           # Sunday
    ((19, 7), MON_FRI, at(0, 19), True),
    ((19, 7), MON_FRI, at(1, 3), True),             # Monday's night, on Tuesday
    ((19, 7), MON_FRI, at(0, 3), False),            # Sunday's night, on Monday
    ((19, 7), MON_FRI, at(5, 3), True),             # Friday's night, on Saturday
    ((19, 7), MON_FRI, at(5, 19), False),
    ((19, 7), MON_FRI, at(2, 7), False),
    ((19, 7), MON_FRI, at(2, 12), False),
    ((0, 24), MON_FRI, at(6, 3), True),             # 00-24: every hour of every day
    ((0, 24), (2,), at(5, 23, 59), True),
    ((7, 24), MON_FRI, at(0, 23, 59), True),
    (None, MON_FRI, at(2, 12), False),              # none: never capped
])
def test_in_clinic_hours(hours, days, moment, inside):
    assert hbe.in_clinic_hours(hbe.ClinicSchedule(hours, days), moment) is inside


def test_the_eta_follows_the_schedule():
    office = hbe.ClinicSchedule((7, 19), MON_FRI)
    # Friday 18:00: 6 cycles in clinic hours at 15, then the weekend at 100 a cycle.
    assert hbe.cycles_to_drain(90, office, at(4, 18), 15, 100, 600) == 6
    assert hbe.cycles_to_drain(90 + 100, office, at(4, 18), 15, 100, 600) == 7
    # Monday 07:00: 72 cycles of clinic hours (12 h) before the night starts.
    assert hbe.cycles_to_drain(72 * 15 + 1, office, at(0, 7), 15, 100, 600) == 73
    assert hbe.cycles_to_drain(0, office, at(0, 7), 15, 100, 600) == 0
    always = hbe.ClinicSchedule((0, 24), MON_FRI)
    assert hbe.cycles_to_drain(1000, always, at(5, 3), 10, 500, 600) == 100
    never = hbe.ClinicSchedule(None, MON_FRI)
    assert hbe.cycles_to_drain(1000, never, at(0, 12), 10, 500, 600) == 2


def schedule_around_now(inside):
    """--clinic-hours/--clinic-days that hold the current local time (inside) or not,
    with a margin of an hour either way; the days always include today."""
    now = dt.datetime.now()
    if inside:
        start, end = (now.hour - 1) % 24, (now.hour + 2) % 24
    else:
        start, end = (now.hour + 2) % 24, (now.hour + 4) % 24
    today = hbe.WEEKDAYS[now.weekday()]
    yesterday = hbe.WEEKDAYS[(now.weekday() - 1) % 7]
    return ["--clinic-hours", "%02d-%02d" % (start, end),
            "--clinic-days", "%s,%s" % (yesterday, today)]


def backlog_library(root, count):
    lib = FakeHorosLibrary(root)
    for i in range(count):
        lib.add_simple_study("1.2.55.%d" % i, "CT" if i % 2 else "MR", images=2, size=3000,
                             study_date=dt.datetime(2012, 1, 1) + dt.timedelta(days=i))
    lib.finish()
    return lib


def test_inside_clinic_hours_a_cycle_exports_fifteen(tmp_path):
    lib = backlog_library(str(tmp_path / "PACS"), 28)
    result = run_cycle(lib, *schedule_around_now(inside=True))
    assert result.returncode == 0, result.stderr
    root = backup_root(lib)
    assert len(state_rows(root)) == 15 and len(zips_on_disk(root)) == 15
    assert "cycle done: 15 studies" in result.stdout
    assert "outside clinic hours" not in result.stdout
    lib.close()


def test_outside_clinic_hours_one_cycle_drains_the_backlog(tmp_path):
    lib = backlog_library(str(tmp_path / "PACS"), 28)
    root = backup_root(lib)
    dry = run_cycle(lib, "--dry-run", *schedule_around_now(inside=False))
    assert dry.returncode == 0 and "outside clinic hours" in dry.stdout
    assert len([line for line in dry.stdout.splitlines() if line.startswith("[")]) == 28
    result = run_cycle(lib, *schedule_around_now(inside=False))
    assert result.returncode == 0, result.stderr
    assert "outside clinic hours" in result.stdout
    assert "cycle done: 28 studies" in result.stdout
    assert len(state_rows(root)) == 28 and len(zips_on_disk(root)) == 28
    run = state_rows(root, "SELECT * FROM runs")[0]
    assert run["studies"] == 28
    # Its plans were read a group at a time, each study in its own transaction.
    assert run["horos_transactions"] >= 2 + 28
    lib.close()


def test_outside_clinic_hours_max_run_seconds_still_ends_the_cycle(tmp_path):
    lib = backlog_library(str(tmp_path / "PACS"), 28)
    result = run_cycle(lib, "--clinic-hours", "none", "--max-run-seconds", "0.0001")
    assert result.returncode == 0
    assert "cycle done: 1 study" in result.stdout            # always at least one
    assert len(state_rows(backup_root(lib))) == 1
    lib.close()


def test_outside_clinic_hours_horos_importing_stops_the_drain(tmp_path):
    """Past BATCH_SIZE an uncapped cycle looks at INCOMING.noindex before each study:
    Horos starting a big import at night gets the disk back."""
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    for i in range(12):
        lib.add_simple_study("1.2.56.%d" % i, "CT", images=2, size=500000,
                             study_date=dt.datetime(2012, 1, 1 + i))
    lib.finish()
    root = backup_root(lib)
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--pacs-root", lib.pacs_root, "--clinic-hours", "none",
         "--batch-size", "2", "--incoming-max-files", "5", "--max-mbps", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TZ=TEST_TZ))
    deadline = time.time() + 60
    while len(zips_on_disk(root)) < 1 and time.time() < deadline:
        time.sleep(0.02)
    for i in range(6):                       # Horos starts importing
        with open(os.path.join(lib.incoming_dir, "f%d.dcm" % i), "w") as handle:
            handle.write("x")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Horos is busy importing; the next study waits" in out
    exported = len(state_rows(root))
    assert 2 <= exported < 12                # the batch, then it stopped
    lib.close()


def test_status_eta_follows_the_schedule(tmp_path):
    lib = backlog_library(str(tmp_path / "PACS"), 40)
    assert run_cycle(lib, "--batch-size", "5").returncode == 0      # pinned: 5 exported

    def status(*schedule):
        result = run_cycle(lib, "status", "--json", *schedule)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    capped = status("--batch-size", "5")
    assert capped["pending"] == 35 and capped["clinic"]["now"] is True
    assert capped["eta_seconds"] == 7 * 600
    drained = status("--batch-size", "5", "--clinic-hours", "none")
    assert drained["clinic"]["now"] is False
    assert drained["eta_seconds"] == 600          # one uncapped cycle holds 35 small studies
    assert drained["clinic"]["studies_per_cycle_outside"] >= 35
    text = run_cycle(lib, "status", "--batch-size", "5").stdout
    assert "clinic hours     00-24, mon-fri (now inside: up to 5 studies per cycle)" in text
    assert "Horos reads" in text and "the longest" in text
    lib.close()


@pytest.mark.parametrize("flags, message", [
    (["--clinic-hours", "25-07"], "--clinic-hours '25-07'"),
    (["--clinic-hours", "07-07"], "the same hour"),
    (["--clinic-days", "mon-funday"], "--clinic-days 'mon-funday'"),
    (["status", "--clinic-hours", "x"], "--clinic-hours 'x'"),
])
def test_bad_schedule_flags_are_one_line_and_exit_2(tmp_path, flags, message):
    lib = backlog_library(str(tmp_path / "PACS"), 1)
    result = run_script("--pacs-root", lib.pacs_root, *flags)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not os.path.exists(backup_root(lib))
    lib.close()


def test_an_uncapped_cycle_of_missing_files_still_ends_on_time(tmp_path):
    """Studies deferred before writing take no slot; outside clinic hours they must not
    keep a cycle going past MAX_RUN_SECONDS either."""
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    for i in range(30):
        pk = lib.add_study("1.2.57.%d" % i, study_date=dt.datetime(2013, 1, 1 + i))
        lib.add_image(lib.add_series(pk, "CT", "x", 1), create_file=False)
    lib.finish()
    result = run_cycle(lib, "--clinic-hours", "none", "--batch-size", "5",
                       "--max-run-seconds", "0.0001")
    assert result.returncode == 0, result.stderr
    assert "cycle done: 0 studies" in result.stdout and "10 deferred" in result.stdout
    failed = state_rows(backup_root(lib), "SELECT study_uid, kind FROM failures")
    assert len(failed) == 10 and {r["kind"] for r in failed} == {"NO_FILES"}
    lib.close()
