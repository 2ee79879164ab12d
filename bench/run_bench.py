"""horos_backup_export benchmark: one command, its own data, one table per question.

    python bench/run_bench.py [--quick] [--work DIR]

1. Export + verify throughput on CT-like files, stored and deflate 1/6/9, side by side
   in this run with Info-ZIP (`zip` then `unzip -t`, same level) and `cp`.
2. A 50,000-study / 5,000,000-image library (database only): dry run, status and an
   idle cycle (wall time, peak memory), how long a cycle holds Database.sql, and the
   bare sqlite3 query that selects the same 15 studies.
3. The same at 5,000, 50,000 and 150,000 studies: how fixed costs grow.
4. A Horos-like writer (a commit every 10 ms, busy timeout 100 ms and 1 s) next to a
   cycle, `status` and a dry run at 50,000 and 150,000 studies: lost commits, the
   worst commit wait, the longest read transaction (bench/horos_waits.py).
5. The time to a first full backup of 50,000 studies / 2 TB with the default clinic
   hours, from measured export and disk rates.

    python bench/run_bench.py --only horos-waits [--baseline-script OLD.py]

runs 4 and 5 alone (about 10 minutes; OLD.py: an earlier horos_backup_export.py to
compare with, e.g. `git show dc81063:horos_backup_export.py > /tmp/old.py`).

Results are printed and written between the result markers of BENCHMARKS.md (the
analysis around them is kept). --quick: smaller data, for trying the benchmark out.
"""

import argparse
import datetime as dt
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "horos_backup_export.py")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import horos_backup_export as hbe  # noqa: E402
from ctlike import write_series  # noqa: E402
from library import build_library, exported_state  # noqa: E402
from measure import run_measured  # noqa: E402

import horos_waits  # noqa: E402

MB = 1e6
REPEATS = 3
START_MARK = "<!-- results: written by bench/run_bench.py -->"
END_MARK = "<!-- end of results -->"
WAITS_START_MARK = "<!-- horos-waits results: written by bench/run_bench.py -->"
WAITS_END_MARK = "<!-- end of horos-waits results -->"


# -- measuring -------------------------------------------------------------------------

def cpu_seconds(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def median_run(action, repeats=REPEATS):
    """(wall, cpu, extra) medians of `repeats` runs of action() -> (wall, cpu, extra)."""
    runs = [action() for _ in range(repeats)]
    return tuple(statistics.median(r[i] for r in runs) for i in range(3))


def drop_from_cache(path):
    """Evict a file's pages, so that the next read comes from the disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def warm(paths):
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass


# -- 1. throughput ---------------------------------------------------------------------

def study_plan(paths):
    files = tuple(hbe.SourceFile(member="0001_CT_Axial/" + os.path.basename(p), path=p,
                                 series_uid="1.2.3.1", size=os.path.getsize(p))
                  for p in paths)
    info = hbe.StudyInfo(uid="1.2.3", pks=(1,), patient_name="BENCH^CT", patient_id="B1",
                         birth_date=None, study_datetime=None, accession_number="",
                         description="bench", modalities=("CT",))
    series = (hbe.SeriesInfo(pk=1, uid="1.2.3.1", number=1, modality="CT",
                             description="Axial"),)
    return hbe.StudyPlan(info=info, series=series, files=files, zip_relpath="x/bench.zip",
                         fingerprint="bench")


def ours(plan, out, compression, level):
    def run():
        if os.path.exists(out):
            os.remove(out)
        cpu, wall = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
        hbe.write_verified_zip(out, plan, plan.files, [], compression, level,
                               lambda count: None, "2026-01-01T00:00:00Z")
        return (time.perf_counter() - wall, cpu_seconds(resource.RUSAGE_SELF) - cpu,
                os.path.getsize(out))
    return run


def infozip(source_dir, out, level, durable):
    """zip then unzip -t; durable: also fsync the ZIP and test it from the disk, which
    is what horos_backup_export does."""
    def run():
        if os.path.exists(out):
            os.remove(out)
        cpu, wall = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(["zip", "-q", "-X", "-%d" % level, "-r", out, "."], cwd=source_dir,
                       check=True)
        if durable:
            drop_from_cache(out)
        subprocess.run(["unzip", "-tq", out], check=True, stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - wall
        return elapsed, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu, os.path.getsize(out)
    return run


def copy(source_dir, target, durable):
    def run():
        shutil.rmtree(target, ignore_errors=True)
        cpu, wall = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(["cp", "-r", source_dir, target], check=True)
        if durable:
            subprocess.run(["sync", "-f", target], check=True)
        return time.perf_counter() - wall, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu, 0
    return run


def stored_profile(plan, out):
    """Where stored export + verify spends its time: write (read + CRC + write), fsync,
    verify from the disk."""
    real_sync = hbe.durable_sync
    writes, syncs, verifies = [], [], []
    for _ in range(REPEATS):
        started = time.perf_counter()
        hbe.durable_sync = lambda fd: None
        try:
            hbe.write_zip(out, plan, plan.files, [], "stored", 0, lambda c: None, "x")
        finally:
            hbe.durable_sync = real_sync
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        with open(out, "rb+") as handle:
            real_sync(handle.fileno())
        syncs.append(time.perf_counter() - started)
        started = time.perf_counter()
        problem, _ = hbe.verify_zip(out)
        assert problem is None, problem
        verifies.append(time.perf_counter() - started)
    return statistics.median(writes), statistics.median(syncs), statistics.median(verifies)


def throughput(work, files):
    source_dir = os.path.join(work, "ct", "series")
    paths = write_series(source_dir, files)
    size = sum(os.path.getsize(p) for p in paths)
    plan = study_plan(paths)
    out_dir = os.path.join(work, "ct", "out")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    copy_plain = copy_durable = None
    for label, level in (("stored", 0), ("deflate 1", 1), ("deflate 6", 6), ("deflate 9", 9)):
        compression = "stored" if level == 0 else "deflate"
        warm(paths)
        results = {
            "horos_backup_export": median_run(ours(plan, os.path.join(out_dir, "ours.zip"),
                                                   compression, level)),
            "Info-ZIP": median_run(infozip(source_dir, os.path.join(out_dir, "iz.zip"),
                                           level, durable=False)),
            "Info-ZIP, fsync + test from disk": median_run(infozip(
                source_dir, os.path.join(out_dir, "izd.zip"), level, durable=True)),
        }
        if copy_plain is None:
            copy_plain = median_run(copy(source_dir, os.path.join(out_dir, "cp"), False))
            copy_durable = median_run(copy(source_dir, os.path.join(out_dir, "cpd"), True))
        for method, (wall, cpu, zipped) in results.items():
            rows.append({"level": label, "method": method, "wall": wall, "cpu": cpu,
                         "mb_s": size / MB / wall, "zip_mb": zipped / MB,
                         "vs_infozip": wall / results["Info-ZIP"][0],
                         "vs_cp": wall / copy_plain[0], "vs_cp_fsync": wall / copy_durable[0]})
    for method, (wall, cpu, _) in (("cp", copy_plain), ("cp + sync", copy_durable)):
        rows.append({"level": "-", "method": method, "wall": wall, "cpu": cpu,
                     "mb_s": size / MB / wall, "zip_mb": size / MB, "vs_infozip": None,
                     "vs_cp": wall / copy_plain[0], "vs_cp_fsync": wall / copy_durable[0]})
    profile = stored_profile(plan, os.path.join(out_dir, "profile.zip"))
    shutil.rmtree(out_dir)
    return {"files": len(paths), "mb": size / MB, "rows": rows, "stored_profile": profile}


# -- 2 and 3. the library ---------------------------------------------------------------

def peak_of(args):
    """(wall s, peak RSS MB, stdout) of the script run as its own process."""
    wall, _cpu, peak_mb, stdout, _stderr = run_measured(SCRIPT, args)
    return wall, peak_mb, stdout


def bare_query_seconds(db, uids_expected):
    """The bare sqlite3 query that selects the same 15 studies (eligible, oldest first)."""
    query = r"""
.timer on
SELECT st.ZSTUDYINSTANCEUID FROM ZSTUDY AS st
WHERE instr('\' || upper(replace(st.ZMODALITY, ' ', '')) || '\', '\CT\')
   OR instr('\' || upper(replace(st.ZMODALITY, ' ', '')) || '\', '\MR\')
   OR EXISTS (SELECT 1 FROM ZSERIES AS se WHERE se.ZSTUDY = st.Z_PK
              AND upper(trim(se.ZMODALITY)) IN ('CT', 'MR'))
ORDER BY st.ZDATE IS NULL, st.ZDATE, st.ZSTUDYINSTANCEUID
LIMIT 15;
"""
    best = None
    for _ in range(REPEATS):
        out = subprocess.run(["sqlite3", "-readonly", db], input=query, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        uids = [line for line in out if line and not line.startswith("Run Time")]
        seconds = float([line for line in out if line.startswith("Run Time")][0]
                        .split("real")[1].split()[0])
        best = seconds if best is None else min(best, seconds)
    assert uids == uids_expected, "the bare query and the dry run disagree"
    return best


def library_figures(work, studies):
    pacs_root = os.path.join(work, "library-%d" % studies)
    started = time.perf_counter()
    db = build_library(pacs_root, studies)
    built = time.perf_counter() - started
    # The cap at all hours: the cycle Horos sees by day (BATCH_SIZE and as many spares),
    # whatever the hour of the run; an uncapped cycle here would plan the whole queue.
    common = ["--pacs-root", pacs_root, "--min-free-gb", "0", "--clinic-hours", "00-24"]
    shutil.rmtree(os.path.join(pacs_root, "Backup"), ignore_errors=True)
    dry_wall, dry_mb, dry_out = peak_of(["--dry-run"] + common)
    # The queue in order (database only: every study would be "fail", having no files).
    listed = [line.split()[2] for line in dry_out.splitlines()
              if len(line.split()) > 2 and line.split()[1] in ("export", "fail")][:15]
    bare = bare_query_seconds(db, listed)
    # A cycle with the whole backlog ahead: it plans a batch (the files are absent here,
    # so nothing is written, but Database.sql is held exactly as for a real batch).
    peak_of(common)
    held_busy = last_run(pacs_root)["horos_seconds"]
    exported_state(pacs_root)
    status_wall, status_mb, _ = peak_of(["status", "--json"] + common)
    idle_wall, idle_mb, idle_out = peak_of(common)
    assert "cycle done: 0 studies" in idle_out, idle_out
    held_idle = last_run(pacs_root)["horos_seconds"]
    series = studies * 5
    return {"studies": studies, "series": series, "images": series * 20,
            "db_mb": os.path.getsize(db) / MB, "build_s": built,
            "dry_run_s": dry_wall, "dry_run_mb": dry_mb, "status_s": status_wall,
            "status_mb": status_mb, "idle_s": idle_wall, "idle_mb": idle_mb,
            "held_busy_s": held_busy, "held_idle_s": held_idle, "bare_query_s": bare}


def last_run(pacs_root):
    conn = sqlite3.connect(os.path.join(pacs_root, "Backup", "export_state.sqlite"))
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone())
    conn.close()
    return row


# -- report ----------------------------------------------------------------------------

def machine():
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle
                     if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = ""
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as handle:
            memory = "%.0f GB RAM" % (int(handle.readline().split()[1]) / 1e6)
    zip_version = subprocess.run(["zip", "-v"], capture_output=True,
                                 text=True).stdout.splitlines()[1].strip()
    return ("%s, %d cores, %s; %s; Python %s, SQLite %s, zlib %s; %s; %s" % (
        cpu, os.cpu_count(), memory, platform.platform(), platform.python_version(),
        sqlite3.sqlite_version, zlib.ZLIB_RUNTIME_VERSION, zip_version,
        dt.datetime.now().strftime("%Y-%m-%d %H:%M")))


def ratio(value):
    return "-" if value is None else "%.2fx" % value


def report(results):
    lines = [START_MARK, "", "Machine: " + results["machine"], ""]
    tp = results["throughput"]
    lines += ["### 1. Export + verify, %d CT-like files, %.0f MB" % (tp["files"], tp["mb"]),
              "",
              "Median of %d runs, source files in the page cache. Ratios are wall-time "
              "ratios: below 1.00x is faster." % REPEATS, "",
              "| level | method | wall s | MB/s | CPU s | ZIP MB | vs Info-ZIP | vs cp "
              "| vs cp + sync |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in tp["rows"]:
        lines.append("| %s | %s | %.2f | %.0f | %.2f | %.1f | %s | %s | %s |" % (
            row["level"], row["method"], row["wall"], row["mb_s"], row["cpu"], row["zip_mb"],
            ratio(row["vs_infozip"]), ratio(row["vs_cp"]), ratio(row["vs_cp_fsync"])))
    write, sync, verify = tp["stored_profile"]
    total = write + sync + verify
    lines += ["", "Stored, where the time goes: read + CRC + write %.2f s (%.0f%%), fsync "
              "%.2f s (%.0f%%), verify from the disk %.2f s (%.0f%%)." % (
                  write, 100 * write / total, sync, 100 * sync / total, verify,
                  100 * verify / total), ""]
    lines += ["### 2 and 3. The library, database only (5 series x 20 images per study)", "",
              "| studies | series | images | Database.sql MB | dry run s | dry run MB "
              "| status s | status MB | idle cycle s | idle cycle MB | held, busy cycle s "
              "| held, idle cycle s | bare sqlite3 query s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["library"]:
        lines.append("| {studies:,} | {series:,} | {images:,} | {db_mb:.0f} | {dry_run_s:.2f} "
                     "| {dry_run_mb:.0f} | {status_s:.2f} | {status_mb:.0f} | {idle_s:.2f} "
                     "| {idle_mb:.0f} | {held_busy_s:.3f} | {held_idle_s:.3f} "
                     "| {bare_query_s:.3f} |".format(**row))
    if len(results["library"]) > 1:
        first = results["library"][0]
        lines += ["", "Growth against %s studies (1.00 = grows exactly as the number of "
                  "studies):" % "{:,}".format(first["studies"]), "",
                  "| studies | x studies | dry run | status | idle cycle | held, busy cycle |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for row in results["library"][1:]:
            factor = row["studies"] / first["studies"]
            lines.append("| {:,} | {:.0f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} |".format(
                row["studies"], factor, row["dry_run_s"] / first["dry_run_s"] / factor,
                row["status_s"] / first["status_s"] / factor,
                row["idle_s"] / first["idle_s"] / factor,
                row["held_busy_s"] / first["held_busy_s"] / factor))
    lines += ["", END_MARK]
    return "\n".join(lines)


def write_benchmarks_md(text, start_mark=START_MARK, end_mark=END_MARK):
    path = os.path.join(ROOT, "BENCHMARKS.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            old = handle.read()
        if start_mark in old and end_mark in old:
            head, rest = old.split(start_mark, 1)
            text = head + text + rest.split(end_mark, 1)[1]
        else:
            text = old.rstrip("\n") + "\n\n" + text + "\n"
    else:
        text = "# Benchmarks\n\n" + text + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, to try it out")
    parser.add_argument("--work", default=os.path.join(HERE, "out"),
                        help="where data is built and kept between runs (default bench/out)")
    parser.add_argument("--only", choices=("all", "horos-waits"), default="all",
                        help="horos-waits: only parts 4 and 5 (the writer, the first backup)")
    parser.add_argument("--baseline-script", metavar="OLD.py",
                        help="an earlier horos_backup_export.py to compare with in part 4")
    args = parser.parse_args()
    for tool in ("zip", "unzip", "sqlite3", "cp"):
        if shutil.which(tool) is None:
            raise SystemExit("run_bench: %s is needed and not installed" % tool)
    os.makedirs(args.work, exist_ok=True)
    os.environ.setdefault("TZ", "UTC")
    sizes = (500, 5000) if args.quick else (5000, 50000, 150000)
    results = {"machine": machine()}
    print("4/5. Horos-like writer, first full backup ...", flush=True)
    waits = horos_waits.run(args.work, args.quick, args.baseline_script)
    text = "\n".join([WAITS_START_MARK, "", "Machine: " + results["machine"], "",
                      horos_waits.report(waits), "", WAITS_END_MARK])
    print(text)
    if not args.quick:
        print("written to", write_benchmarks_md(text, WAITS_START_MARK, WAITS_END_MARK))
    if args.only == "horos-waits":
        return
    print("1. throughput ...", flush=True)
    results["throughput"] = throughput(args.work, 60 if args.quick else 400)
    results["library"] = []
    for studies in sizes:
        print("2/3. library of %d studies ..." % studies, flush=True)
        results["library"].append(library_figures(args.work, studies))
    text = report(results)
    print(text)
    if not args.quick:
        print("written to", write_benchmarks_md(text))


if __name__ == "__main__":
    main()
