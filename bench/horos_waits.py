"""Does Horos wait for us? A Horos-like writer next to a cycle, `status` and a dry run,
and the time to a first full backup with the default clinic hours.

    python bench/run_bench.py --only horos-waits [--baseline-script OLD.py]

The writer commits every 10 ms (an UPDATE and an INSERT, as an import does) with a busy
timeout of 100 ms or 1 s; a commit that times out is lost (Horos retries or reports it).
For each action it counts lost commits and the worst wait of one commit. The longest
read transaction comes from the script itself: the `runs` row of the cycle, the
`status --json` keys, the dry run's debug line.
"""

import datetime as dt
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "horos_backup_export.py")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import horos_backup_export as hbe  # noqa: E402
from ctlike import write_series  # noqa: E402
from horos_writer import start_writer, stop_writer  # noqa: E402
from library import build_library  # noqa: E402
from measure import run_measured  # noqa: E402

MB = 1e6
TIMEOUTS = (0.1, 1.0)
REPEATS = 3
ACTIONS = ("cycle", "status", "dry run")


def load():
    """`uptime`'s load averages: the machine is shared; results sit next to them."""
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def run_script(script, args):
    """(wall s, CPU s, stdout, stderr) of the script as its own process."""
    wall, cpu, _peak_mb, stdout, stderr = run_measured(script, args)
    return wall, cpu, stdout, stderr


def with_writer(db, timeout, action, *args):
    """Run action(*args) while the writer commits; (action's result, commits, lost, worst)."""
    proc, stop = start_writer(db, os.path.dirname(db), timeout)
    time.sleep(0.2)
    try:
        result = action(*args)
    finally:
        time.sleep(0.2)
        commits, lost, worst, _out = stop_writer(proc, stop)
    return result, commits, lost, worst


def last_run(pacs_root):
    conn = sqlite3.connect(os.path.join(pacs_root, "Backup", "export_state.sqlite"))
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone())
    conn.close()
    return row


def measure_action(script, new, pacs_root, action):
    """(wall s, CPU s, longest read transaction s, total read s) of one action."""
    common = ["--pacs-root", pacs_root, "--min-free-gb", "0"]
    if new:
        common += ["--clinic-hours", "00-24"]     # the cycle daytime Horos sees
    if action == "cycle":
        # The whole backlog ahead: it reads the batch and its spares (the files are
        # absent, so nothing is written, but Database.sql is read as for a real batch).
        shutil.rmtree(os.path.join(pacs_root, "Backup"), ignore_errors=True)
        wall, cpu, _out, _err = run_script(script, common)
        run = last_run(pacs_root)
        return wall, cpu, run.get("horos_longest_seconds") or run["horos_seconds"], \
            run["horos_seconds"]
    if action == "status":
        wall, cpu, out, _err = run_script(script, ["status", "--json"] + common)
        status = json.loads(out)
        return wall, cpu, status.get("horos_longest_seconds", status["horos_read_seconds"]), \
            status["horos_read_seconds"]
    wall, cpu, out, err = run_script(script, ["--dry-run", "--verbose"] + common)
    found = re.search(r"(\d+) read transactions, ([\d.]+) s in all, the longest ([\d.]+) ms",
                      out + err)
    if found:
        return wall, cpu, float(found.group(3)) / 1000, float(found.group(2))
    found = re.search(r"read \d+ studies from .* in ([\d.]+) s", out + err)
    held = float(found.group(1)) if found else None
    return wall, cpu, held, held


def bare_candidate_query(db):
    """The bare sqlite3 query behind the candidate scan, all of it in one statement."""
    query = ".timer on\n" + hbe.CANDIDATES_SQL.replace(":after", "0").replace(
        ":limit", "-1").strip().replace("SELECT st.Z_PK", "SELECT COUNT(*) FROM (SELECT "
                                        "st.Z_PK", 1) + ");\n"
    best = None
    for _ in range(REPEATS):
        out = subprocess.run(["sqlite3", "-readonly", db], input=query, capture_output=True,
                             text=True, check=True).stdout
        seconds = float(out.split("real")[1].split()[0])
        best = seconds if best is None else min(best, seconds)
    return best


def writer_table(work, sizes, baseline):
    """Rows: one per (size, script, action, timeout)."""
    rows = []
    scripts = [("this version", SCRIPT, True)]
    if baseline:
        scripts.append(("before (one transaction)", baseline, False))
    for studies in sizes:
        pacs_root = os.path.join(work, "library-%d" % studies)
        db = build_library(pacs_root, studies)
        bare = bare_candidate_query(db)
        for label, script, new in scripts:
            for action in ACTIONS:
                measure_action(script, new, pacs_root, action)       # warm the cache
                for timeout in TIMEOUTS:
                    lost = commits = 0
                    worst = longest = total = wall = cpu = 0.0
                    for _ in range(REPEATS):
                        (w, c, held, read), n, lo, wo = with_writer(
                            db, timeout, measure_action, script, new, pacs_root, action)
                        lost, commits = lost + lo, commits + n
                        worst, longest = max(worst, wo), max(longest, held)
                        total, wall, cpu = total + read, wall + w, cpu + c
                    rows.append({"studies": studies, "script": label, "action": action,
                                 "timeout": timeout, "commits": commits, "lost": lost,
                                 "worst": worst, "longest": longest,
                                 "read": total / REPEATS, "wall": wall / REPEATS,
                                 "cpu": cpu / REPEATS, "bare": bare, "load": load()})
                    print("  %s" % rows[-1], flush=True)
    return rows


def cpu_per_cycle(work, studies, baseline):
    """Median CPU seconds of a busy cycle (no writer), this version and the baseline."""
    pacs_root = os.path.join(work, "library-%d" % studies)
    build_library(pacs_root, studies)
    result = {}
    for label, script, new in (("this version", SCRIPT, True),
                               ("before (one transaction)", baseline, False)):
        if not script:
            continue
        cpus = sorted(measure_action(script, new, pacs_root, "cycle")[1]
                      for _ in range(5))
        result[label] = cpus[2]
    return result


# -- time to a first full backup -----------------------------------------------------

def disk_rates(work, size_mb=512):
    """Sequential MB/s of this machine's disk: write + fsync, then read from the disk."""
    path = os.path.join(work, "disk-rate.bin")
    block = os.urandom(1 << 20)
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size_mb):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    write = size_mb * (1 << 20) / MB / (time.perf_counter() - started)
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    started = time.perf_counter()
    with open(path, "rb") as handle:
        while handle.read(1 << 20):
            pass
    read = size_mb * (1 << 20) / MB / (time.perf_counter() - started)
    os.remove(path)
    return write, read


def export_rate(work):
    """(source MB/s of export + verify at the default deflate 1, ZIP/source ratio) on
    CT-like files, the source in the page cache: the CPU's share of the work."""
    source = os.path.join(work, "ct-rate", "series")
    paths = write_series(source, 100)
    size = sum(os.path.getsize(p) for p in paths)
    files = tuple(hbe.SourceFile(member="s/" + os.path.basename(p), path=p, series_uid="1",
                                 size=os.path.getsize(p)) for p in paths)
    info = hbe.StudyInfo(uid="1.2.3", pks=(1,), patient_name="B", patient_id="B",
                         birth_date=None, study_datetime=None, accession_number="",
                         description="", modalities=("CT",))
    plan = hbe.StudyPlan(info=info, series=(), files=files, zip_relpath="x/b.zip",
                         fingerprint="b")
    out = os.path.join(work, "ct-rate", "b.zip")
    best = None
    for _ in range(REPEATS):
        if os.path.exists(out):
            os.remove(out)
        started = time.perf_counter()
        hbe.write_verified_zip(out, plan, files, [], hbe.COMPRESSION, hbe.COMPRESS_LEVEL,
                               lambda count: None, "2026-01-01T00:00:00Z")
        seconds = time.perf_counter() - started
        best = seconds if best is None else min(best, seconds)
    ratio = os.path.getsize(out) / size
    shutil.rmtree(os.path.join(work, "ct-rate"))
    return size / MB / best, ratio


def days_to_first_backup(studies, total_bytes, cpu_rate, disk_rate, ratio, schedule):
    """Days until `studies` studies of `total_bytes` are exported, from a Monday 07:00.

    I/O model, one study at a time (the export does not overlap CPU and disk): each
    source byte costs 1/cpu_rate of CPU (read, CRC, deflate, verify) plus its disk
    traffic at disk_rate: the source read once, the ZIP (ratio x the source) written
    once and read back once from the disk: (1 + 2 x ratio) bytes when the backup is on
    the same disk as the library (the default BACKUP_ROOT), as a USB disk on a Mac mini
    serves one stream at a time.
    """
    per_study = total_bytes / studies
    seconds_per_study = per_study / (cpu_rate * MB) + per_study * (1 + 2 * ratio) / (
        disk_rate * MB)
    fits = max(1.0, hbe.MAX_RUN_SECONDS // seconds_per_study + 1)
    inside = min(float(hbe.BATCH_SIZE), fits)
    start = dt.datetime(2026, 11, 23, 7, 0)
    cycles = hbe.cycles_to_drain(studies, schedule, start, inside, fits,
                                 hbe.LAUNCHD_INTERVAL_SECONDS)
    return cycles * hbe.LAUNCHD_INTERVAL_SECONDS / 86400, seconds_per_study, inside, fits


def first_backup(work):
    cpu_rate, ratio = export_rate(work)
    write, read = disk_rates(work)
    studies, total = 50000, 2e12
    default = hbe.clinic_schedule(hbe.CLINIC_HOURS, hbe.CLINIC_DAYS)
    capped = hbe.ClinicSchedule((0, 24), ())
    scenarios = []
    for label, disk in (("this machine's disk (measured, slower of read/write)",
                         min(write, read)),
                        ("a USB 3 hard disk on a Mac mini (assumed 100 MB/s)", 100.0),
                        ("a USB 2 disk (assumed 30 MB/s)", 30.0)):
        for name, schedule in (("default clinic hours", default),
                               ("15 per cycle at all hours (before)", capped)):
            days, per_study, inside, fits = days_to_first_backup(
                studies, total, cpu_rate, disk, ratio, schedule)
            scenarios.append({"disk": label, "disk_mb_s": disk, "schedule": name,
                              "days": days, "seconds_per_study": per_study,
                              "inside": inside, "outside": fits})
    return {"cpu_rate": cpu_rate, "ratio": ratio, "disk_write": write, "disk_read": read,
            "studies": studies, "bytes": total, "scenarios": scenarios, "load": load()}


def report(results):
    lines = []
    rows = results["writer"]
    lines += ["### 4. Horos never waits: a Horos-like writer next to the script", "",
              "The writer commits every 10 ms; a commit that waits longer than its busy "
              "timeout is lost. %d runs of each action per cell: lost commits summed, the "
              "slowest commit (its wait for the lock and its own fsync, which on a disk "
              "shared with other jobs can take long by itself), the longest read "
              "transaction (from the script: from the moment it holds the lock to its "
              "ROLLBACK; before: the one transaction), all reads together. The cycle plans "
              "a batch with the whole backlog ahead. The bare scan: the candidate query "
              "in one statement in the sqlite3 shell." % REPEATS, "",
              "| studies | script | action | busy timeout | commits | lost | slowest commit "
              "ms | longest read transaction ms | all reads s | wall s | bare sqlite3 "
              "scan s | load |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append("| {:,} | {} | {} | {:g} s | {} | {} | {:.0f} | {:.1f} | {:.3f} | {:.2f} "
                     "| {:.3f} | {} |".format(
                         row["studies"], row["script"], row["action"], row["timeout"],
                         row["commits"], row["lost"], row["worst"] * 1000,
                         row["longest"] * 1000, row["read"], row["wall"], row["bare"],
                         row["load"]))
    cpu = results.get("cpu")
    if cpu:
        lines += ["", "CPU of a busy cycle at %s studies (median of 5, no writer): %s." % (
            "{:,}".format(results["cpu_studies"]), "; ".join(
                "%s %.2f s" % (label, seconds) for label, seconds in cpu.items()))]
    fb = results["first_backup"]
    lines += ["", "### 5. Time to a first full backup: %s studies, %.0f TB" % (
        "{:,}".format(fb["studies"]), fb["bytes"] / 1e12), "",
        "Measured here: export + verify at deflate 1 runs at %.0f MB/s of source on one "
        "core with the files in the cache (the CPU's share), the ZIP is %.0f%% of the "
        "source; this machine's disk writes %.0f MB/s (with fsync) and reads %.0f MB/s "
        "(from the disk). Model: one study at a time, CPU then disk, each source byte "
        "costing its CPU time plus (1 + 2 x %.2f) bytes of disk traffic (read the source, "
        "write the ZIP, read it back), backup on the library's disk. A cycle every 10 "
        "minutes, %g s of exporting each; BATCH_SIZE %d per cycle in clinic hours. Load "
        "%s." % (fb["cpu_rate"], 100 * fb["ratio"], fb["disk_write"], fb["disk_read"],
                 fb["ratio"], hbe.MAX_RUN_SECONDS, hbe.BATCH_SIZE, fb["load"]), "",
        "| disk | schedule | s per study | studies per cycle in / out of clinic hours "
        "| days to a first full backup |", "|---|---|---:|---:|---:|"]
    for row in fb["scenarios"]:
        lines.append("| %s | %s | %.1f | %.0f / %.0f | %.1f |" % (
            row["disk"], row["schedule"], row["seconds_per_study"], row["inside"],
            row["outside"], row["days"]))
    return "\n".join(lines)


def run(work, quick, baseline):
    sizes = (5000,) if quick else (50000, 150000)
    results = {"writer": writer_table(work, sizes, baseline)}
    results["cpu_studies"] = sizes[-1]
    results["cpu"] = cpu_per_cycle(work, sizes[-1], baseline)
    results["first_backup"] = first_backup(work)
    return results
