"""Does Horos wait for us? A Horos-like writer next to a cycle, `status`, a dry run and
an idle cycle, and the time to a first full backup with the default clinic hours.

    python bench/run_bench.py --only horos-waits [--baseline-script OLD.py]

The libraries have 20 % of their studies annotated as Horos keeps the reader's work (an
annotations SR series and file, a comment, a status, a key image: bench/library.py).
The writer commits every 10 ms (an UPDATE and an INSERT, as an import does) with a busy
timeout of 100 ms or 1 s; a commit that times out is lost (Horos retries or reports it).
For each action it counts lost commits and the worst wait of one commit. The longest
read transaction comes from the script itself: the `runs` row of the cycle, the
`status --json` keys, the dry run's debug line. The idle cycle runs on a backup in which
every study is exported and every SR file of Horos's own series watched: its edit check
(files stat'ed, milliseconds) comes from its --verbose log line.
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
from library import build_library, exported_state  # noqa: E402
from measure import run_measured  # noqa: E402

MB = 1e6
TIMEOUTS = (0.1, 1.0)
REPEATS = 3
ACTIONS = ("cycle", "status", "dry run", "idle cycle")
ANNOTATED_FRACTION = 0.2
EDIT_CHECK_LINE = re.compile(r"edit check: (\d+) SR files of exported studies stat'ed in "
                             r"([\d.]+) ms")


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


def has_clinic_hours(script):
    """Whether a script takes --clinic-hours (the versions since issue 13 do)."""
    return "--clinic-hours" in run_script(script, ["--help"])[2]


def measure_action(script, new, pacs_root, action):
    """(wall s, CPU s, longest read transaction s, total read s, edit check) of one
    action; the edit check (files stat'ed, seconds) of an idle cycle, else None. new:
    the script takes --clinic-hours (without it, a cycle after 19:00 plans the whole
    queue)."""
    common = ["--pacs-root", pacs_root, "--min-free-gb", "0"]
    if new:
        common += ["--clinic-hours", "00-24"]     # the cycle daytime Horos sees
    if action == "idle cycle":
        # The backup exported_state made (no ZIP on disk: none is re-read).
        wall, cpu, out, err = run_script(script, common + ["--verbose", "--verify-per-run",
                                                           "0"])
        assert "cycle done: 0 studies" in out, out + err
        found = EDIT_CHECK_LINE.search(out)
        run = last_run(pacs_root)
        return wall, cpu, run["horos_longest_seconds"], run["horos_seconds"], \
            (int(found.group(1)), float(found.group(2)) / 1000)
    if action == "cycle":
        # The whole backlog ahead: it reads the batch and its spares (the files are
        # absent, so nothing is written, but Database.sql is read as for a real batch).
        shutil.rmtree(os.path.join(pacs_root, "Backup"), ignore_errors=True)
        wall, cpu, _out, _err = run_script(script, common)
        run = last_run(pacs_root)
        return wall, cpu, run.get("horos_longest_seconds") or run["horos_seconds"], \
            run["horos_seconds"], None
    if action == "status":
        wall, cpu, out, _err = run_script(script, ["status", "--json"] + common)
        status = json.loads(out)
        return wall, cpu, status.get("horos_longest_seconds", status["horos_read_seconds"]), \
            status["horos_read_seconds"], None
    wall, cpu, out, err = run_script(script, ["--dry-run", "--verbose"] + common)
    found = re.search(r"(\d+) read transactions, ([\d.]+) s in all, the longest ([\d.]+) ms",
                      out + err)
    if found:
        return wall, cpu, float(found.group(3)) / 1000, float(found.group(2)), None
    found = re.search(r"read \d+ studies from .* in ([\d.]+) s", out + err)
    held = float(found.group(1)) if found else None
    return wall, cpu, held, held, None


def sql_literal(value):
    return str(value) if isinstance(value, int) else "'%s'" % value.replace("'", "''")


def bare_candidate_query(db):
    """The bare sqlite3 query behind the candidate scan, all of it in one statement."""
    with hbe.open_horos_reader(db, 30) as reader:
        sql = reader.candidates_sql
    for name, value in sorted(dict(hbe.HOROS_SR_PARAMETERS, after=0, limit=-1).items(),
                              key=lambda item: -len(item[0])):   # :roi_name before :roi
        sql = sql.replace(":" + name, sql_literal(value))
    query = ".timer on\n" + sql.strip().replace(
        "SELECT st.Z_PK", "SELECT COUNT(*) FROM (SELECT st.Z_PK", 1) + ");\n"
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
        scripts.append(("before", baseline, has_clinic_hours(baseline)))
    for studies in sizes:
        pacs_root = annotated_library(work, studies)
        db = build_library(pacs_root, studies, annotated_fraction=ANNOTATED_FRACTION)
        bare = bare_candidate_query(db)
        for label, script, new in scripts:
            for action in ACTIONS:
                if action == "idle cycle":
                    if script != SCRIPT:
                        continue     # its state is this version's: the old one refuses it
                    exported_state(pacs_root)
                measure_action(script, new, pacs_root, action)       # warm the cache
                for timeout in TIMEOUTS:
                    lost = commits = 0
                    worst = longest = total = wall = cpu = 0.0
                    checks = []
                    for _ in range(REPEATS):
                        (w, c, held, read, check), n, lo, wo = with_writer(
                            db, timeout, measure_action, script, new, pacs_root, action)
                        lost, commits = lost + lo, commits + n
                        worst, longest = max(worst, wo), max(longest, held)
                        total, wall, cpu = total + read, wall + w, cpu + c
                        checks += [check] if check else []
                    rows.append({"studies": studies, "script": label, "action": action,
                                 "timeout": timeout, "commits": commits, "lost": lost,
                                 "worst": worst, "longest": longest,
                                 "read": total / REPEATS, "wall": wall / REPEATS,
                                 "cpu": cpu / REPEATS, "bare": bare, "load": load(),
                                 "edit_check": checks})
                    print("  %s" % rows[-1], flush=True)
    return rows


def annotated_library(work, studies):
    """The folder of the library part 4 uses: 20 % annotated (its own folder: the plain
    libraries of parts 2 and 3 are kept apart)."""
    return os.path.join(work, "library-%d-annotated" % studies)


def edit_check_cost(work, studies):
    """The idle cycle's edit check alone, without the writer: (studies exported, SR files
    watched, [(files stat'ed, seconds)] of 5 idle cycles, [CPU s of those cycles],
    [CPU s of 5 idle cycles with no SR file watched])."""
    pacs_root = annotated_library(work, studies)
    build_library(pacs_root, studies, annotated_fraction=ANNOTATED_FRACTION)
    args = ["--pacs-root", pacs_root, "--min-free-gb", "0", "--clinic-hours", "00-24",
            "--verbose", "--verify-per-run", "0"]

    def idle_cycles():
        checks, cpus = [], []
        for _ in range(5):
            _wall, cpu, out, _err = run_script(SCRIPT, args)
            found = EDIT_CHECK_LINE.search(out)
            checks.append((int(found.group(1)), float(found.group(2)) / 1000))
            cpus.append(cpu)
        return checks, cpus

    exported, watched = exported_state(pacs_root)
    run_script(SCRIPT, args)                                        # warm the cache
    checks, cpus = idle_cycles()
    conn = sqlite3.connect(os.path.join(pacs_root, "Backup", "export_state.sqlite"))
    conn.execute("DELETE FROM horos_sr_files")
    conn.commit()
    conn.close()
    _none, cpus_unwatched = idle_cycles()
    return {"studies": studies, "exported": exported, "watched": watched,
            "checks": checks, "cpu": cpus, "cpu_unwatched": cpus_unwatched, "load": load()}


def cpu_per_cycle(work, studies, baseline, rounds=9):
    """Median CPU seconds of a busy cycle (no writer), this version and the baseline.

    The two alternate, round by round: run one after the other, a drift in the
    machine's load over a minute shows up as a difference between the versions.
    """
    pacs_root = annotated_library(work, studies)
    build_library(pacs_root, studies, annotated_fraction=ANNOTATED_FRACTION)
    scripts = [(label, script) for label, script in (("this version", SCRIPT),
                                                      ("before", baseline)) if script]
    cpus = {label: [] for label, _script in scripts}
    for _ in range(rounds):
        for label, script in scripts:
            new = has_clinic_hours(script)
            cpus[label].append(measure_action(script, new, pacs_root, "cycle")[1])
    return {label: sorted(values)[len(values) // 2] for label, values in cpus.items()}


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
    # The upgrade over a backup of version 1.0: the annotated studies (20 %) are
    # exported again once, after the new ones, at the same pace.
    upgraded = int(studies * ANNOTATED_FRACTION)
    upgrade = []
    for label, disk in (("a USB 3 hard disk (100 MB/s)", 100.0),
                        ("a USB 2 disk (30 MB/s)", 30.0)):
        days, _per_study, _inside, _fits = days_to_first_backup(
            upgraded, total * ANNOTATED_FRACTION, cpu_rate, disk, ratio, default)
        upgrade.append({"disk": label, "days": days})
    return {"cpu_rate": cpu_rate, "ratio": ratio, "disk_write": write, "disk_read": read,
            "studies": studies, "bytes": total, "scenarios": scenarios, "load": load(),
            "upgraded": upgraded, "upgrade": upgrade}


def report(results):
    lines = []
    rows = results["writer"]
    lines += ["### 4. Horos never waits: a Horos-like writer next to the script", "",
              "Libraries with %.0f%% of their studies annotated (an annotations SR series "
              "and file, a comment, a status, a key image). The writer commits every 10 ms; "
              "a commit that waits longer than its busy timeout is lost. %d runs of each "
              "action per cell: lost commits summed, the slowest commit (its wait for the "
              "lock and its own fsync, which on a disk shared with other jobs can take long "
              "by itself), the longest read transaction (from the script: from the moment "
              "it holds the lock to its ROLLBACK), all reads together. The cycle plans a "
              "batch with the whole backlog ahead; the idle cycle runs on a backup of every "
              "study, every SR file of Horos's own series watched. The bare scan: the "
              "candidate query in one statement in the sqlite3 shell."
              % (100 * ANNOTATED_FRACTION, REPEATS), "",
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
        lines += ["", "CPU of a busy cycle at %s studies (median of 9, the versions "
                  "alternating, no writer): %s." % (
            "{:,}".format(results["cpu_studies"]), "; ".join(
                "%s %.2f s" % (label, seconds) for label, seconds in cpu.items()))]
    edit = results.get("edit_check")
    if edit:
        seconds = sorted(check[1] for check in edit["checks"])
        lines += ["", "The edit check of an idle cycle at {:,} studies ({:,} exported, {:,} "
                  "SR files watched; 5 cycles, no writer): {} files stat'ed per cycle in "
                  "{:.0f} ms (median; {:.0f}-{:.0f} ms), {:.1f} us per file. The idle "
                  "cycle's CPU: {:.2f}-{:.2f} s with them watched, {:.2f}-{:.2f} s with "
                  "none (min-max of 5 each). Load {}.".format(
                      edit["studies"], edit["exported"], edit["watched"],
                      "/".join(sorted({"{:,}".format(c[0]) for c in edit["checks"]})),
                      seconds[2] * 1000, seconds[0] * 1000, seconds[-1] * 1000,
                      seconds[2] * 1e6 / max(edit["checks"][0][0], 1),
                      min(edit["cpu"]), max(edit["cpu"]), min(edit["cpu_unwatched"]),
                      max(edit["cpu_unwatched"]), edit["load"])]
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
    if fb.get("upgrade"):
        lines += ["", "The upgrade over a backup of version 1.0, the same model: the %s "
                  "annotated studies (%.0f%%, %.0f GB) exported again once, with the "
                  "default clinic hours, starting a Monday at 07:00: %s." % (
                      "{:,}".format(fb["upgraded"]), 100 * ANNOTATED_FRACTION,
                      fb["bytes"] * ANNOTATED_FRACTION / 1e9, "; ".join(
                          "%.1f days on %s" % (row["days"], row["disk"])
                          for row in fb["upgrade"]))]
    return "\n".join(lines)


def run(work, quick, baseline):
    sizes = (5000,) if quick else (50000, 150000)
    results = {"writer": writer_table(work, sizes, baseline)}
    results["cpu_studies"] = sizes[-1]
    results["cpu"] = cpu_per_cycle(work, sizes[-1], baseline)
    results["edit_check"] = edit_check_cost(work, sizes[-1])
    results["first_backup"] = first_backup(work)
    return results
