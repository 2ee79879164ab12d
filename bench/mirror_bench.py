"""What `mirror --to DIR` costs: the idle run launchd makes every 10 minutes on a large
backup, the status that lists a mirror, and copy throughput against `cp` + `sync`.

    python bench/mirror_bench.py [--studies 50000] [--zips 40] [--zip-mb 5] [--work DIR]

1. A state of --studies studies (no ZIP files: an idle run opens none) mirrored by a
   state holding the same rows: the first run records what the mirror holds in
   BACKUP_ROOT's state, the next ones (median of 3) find nothing to copy; then
   `status --json` on the backup alone, which counts how far behind the mirror is.
2. --zips real stored ZIPs of random data, --zip-mb each: a first mirror run (copy,
   fsync, read back every member, rename) against `cp -R` then `sync`, warm page cache
   for both; median of 3.
"""

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "horos_backup_export.py")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fake_horos import FakeHorosLibrary  # noqa: E402
from find_bench import build_state  # noqa: E402

import horos_backup_export as hbe  # noqa: E402


def timed(args):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, SCRIPT] + [str(a) for a in args],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit("failed: %s\n%s" % (args, result.stderr))
    return seconds


def idle_runs(work, studies):
    source = os.path.join(work, "idle", "Backup")
    os.makedirs(source)
    build_state(os.path.join(source, hbe.STATE_FILE), studies)
    target = os.path.join(work, "idle", "MIRROR", "Horos")
    os.makedirs(target)
    shutil.copyfile(os.path.join(source, hbe.STATE_FILE), os.path.join(target, hbe.STATE_FILE))
    mirror = ["--backup-root", source, "--pacs-root", os.path.join(work, "none"), "mirror",
              "--to", target]
    first = timed(mirror)
    idle = statistics.median(timed(mirror) for _ in range(3))
    status = statistics.median(timed(["status", "--json", "--backup-root", source,
                                      "--pacs-root", os.path.join(work, "none")])
                               for _ in range(3))
    print("| %d studies | first run (records 50,000 rows) %.2f s | idle run %.2f s | "
          "status --json, backup alone %.2f s |" % (studies, first, idle, status))


def copy_runs(work, zips, zip_mb):
    lib = FakeHorosLibrary(os.path.join(work, "copy", "PACS"))
    for i in range(zips):
        pk = lib.add_study("1.2.300.%d" % i, "BENCH^%d" % i, "B%d" % i,
                           study_date=dt.datetime(2020, 1 + i % 12, 1 + i % 28))
        series = lib.add_series(pk, "CT", "Axial", 1)
        for _ in range(zip_mb):
            lib.add_image(series, content=os.urandom(1024 * 1024))
    lib.finish()
    lib.close()
    source = os.path.join(lib.pacs_root, "Backup")
    timed(["--pacs-root", lib.pacs_root, "--compression", "stored", "--batch-size",
           str(zips), "--clinic-hours", "00-24"])
    total = sum(os.path.getsize(os.path.join(folder, name))
                for folder, _dirs, names in os.walk(source) for name in names
                if name.endswith(".zip"))
    mirrors, copies = [], []
    for round_ in range(3):
        target = os.path.join(work, "copy", "M%d" % round_, "Horos")
        os.makedirs(os.path.dirname(target))
        mirrors.append(timed(["--backup-root", source, "--pacs-root", lib.pacs_root,
                              "mirror", "--to", target, "--max-run-seconds", "0"]))
        plain = os.path.join(work, "copy", "C%d" % round_)
        started = time.perf_counter()
        subprocess.run(["cp", "-R", source, plain], check=True)
        subprocess.run(["sync"], check=True)
        copies.append(time.perf_counter() - started)
    mirror, copy = statistics.median(mirrors), statistics.median(copies)
    print("| %d ZIPs, %.0f MB | mirror %.2f s (%.0f MB/s) | cp -R + sync %.2f s (%.0f MB/s) "
          "| %.1fx |" % (zips, total / 1e6, mirror, total / 1e6 / mirror, copy,
                         total / 1e6 / copy, mirror / copy))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50000)
    parser.add_argument("--zips", type=int, default=40)
    parser.add_argument("--zip-mb", type=int, default=5)
    parser.add_argument("--work", default=os.path.join(HERE, "out", "mirror"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    idle_runs(args.work, args.studies)
    copy_runs(args.work, args.zips, args.zip_mb)
    print("load average after: %.2f %.2f %.2f" % os.getloadavg())
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
