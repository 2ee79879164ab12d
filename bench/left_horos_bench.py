"""What recording studies that left Horos costs a cycle, and what listing them costs.

    python bench/left_horos_bench.py [--studies 50000] [--work DIR]

A state of --studies exported studies (bench/find_bench.py's), and the UIDs Horos holds
as a cycle's candidate scan hands them over (the scan itself is measured by
run_bench.py: nothing here reads Database.sql). Each line times the cycle's own step,
note_departures (the comparison, the state's transaction, the batches alerts read),
with the state's view read before it, median of 5:

1. Horos holds every exported study (the usual cycle);
2. the cycle that finds 300 gone (weeks of auto-cleaning), then the cycles after;
3. the cycle that finds every study gone (an emptied library), then the cycles after;
4. `find --left-horos --json` on that backup, a new process, Python's start included.
"""

import argparse
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

import horos_backup_export as hbe  # noqa: E402
from find_bench import build_state  # noqa: E402

REPEATS = 5


def one_check(path, in_horos, now):
    """The state's view, then the cycle's note_departures: (seconds of the view, of
    the whole, departures)."""
    state = hbe.ExportState(path)
    studies = [hbe.HorosStudy(uid, (1,), None, None, None, ("CT",), "f") for uid in in_horos]
    try:
        cfg = hbe.Config(pacs_root=ROOT, sentinel="", horos_data=ROOT,
                         backup_root=os.path.dirname(path))
        cycle = hbe.Cycle(cfg=cfg, state=state, issues=hbe.IssueLog(os.devnull),
                          summary=hbe.CycleSummary(), progress=hbe.Progress(),
                          now=now, started=time.monotonic())
        started = time.perf_counter()
        view = state.view()
        viewed = time.perf_counter()
        departures = hbe.note_departures(cycle, studies, view)
        done = time.perf_counter()
    finally:
        state.close()
    return viewed - started, done - started, departures


def timed(path, in_horos, clock):
    """(view, first check, median of the next REPEATS) seconds for a library holding
    `in_horos`."""
    view, first, departures = one_check(path, in_horos, next(clock))
    after = [one_check(path, in_horos, next(clock))[1] for _ in range(REPEATS)]
    return view, first, statistics.median(after), departures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50000)
    parser.add_argument("--work", default=os.path.join(HERE, "out", "left_horos"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    backup = os.path.join(args.work, "Backup")
    os.makedirs(backup)
    path = os.path.join(backup, hbe.STATE_FILE)
    build_state(path, args.studies)
    state = hbe.ExportState(path)
    uids = sorted(state.exported_fingerprints())
    state.close()
    clock = iter(range(1_800_000_000, 1_900_000_000, 600))    # one cycle every 600 s
    print("note_departures on %d exported studies (the state's view included; the "
          "first check, then the median of %d cycles after it)" % (len(uids), REPEATS))
    print("%-32s %8s %8s %8s" % ("Horos holds", "view s", "first s", "after s"))
    rows = (("every exported study", uids), ("all but 300 (auto-cleaning)", uids[300:]),
            ("none (an emptied library)", []))
    for label, in_horos in rows:
        view, first, after, departures = timed(path, in_horos, clock)
        print("%-32s %8.3f %8.3f %8.3f   (%d left, %d batches read)" % (
            label, view, first, after, departures.left, len(departures.batches)))
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, SCRIPT, "find", "--left-horos", "--json",
                               "--backup-root", backup], capture_output=True, text=True)
        runs.append(time.perf_counter() - started)
    print("find --left-horos --json, %d studies listed: %.2f s (median of 3)"
          % (done.stdout.count('"study_uid"'), statistics.median(runs)))


if __name__ == "__main__":
    main()
