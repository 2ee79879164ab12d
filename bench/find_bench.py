"""How fast `find` searches a large backup, and how fast manifests are read back.

    python bench/find_bench.py [--studies 50000] [--zips 2000] [--work DIR]

1. `find` as a user runs it (a new process each time, Python's start included) on a
   state of --studies studies, for a few kinds of search; median of 3 runs.
2. The backfill that makes an older version's backup searchable: manifests read per
   second from --zips real study ZIPs (warm page cache: a USB disk is slower; the
   cycle spends at most BACKFILL_SECONDS on it, and goes on at the next one).
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "horos_backup_export.py")
sys.path.insert(0, ROOT)

import horos_backup_export as hbe  # noqa: E402

NAMES = ("YAMADA^TARO", "JOÃO^SÃO BENTO", "MÜLLER^JÜRGEN", "SMITH^JOHN", "DUPONT^RENÉ",
         "山田^太郎", "O'BRIEN^ANNE-MARIE", "NGUYỄN^VĂN AN")
MODALITIES = ("CT", "MR", "CT\\SR", "MR\\KO\\PR", "CT\\PT")
SEARCHES = (("a name, accents left out", ["joao"]),
            ("a name and a month", ["yamada", "2019-03"]),
            ("a patient ID", ["P-0004242"]),
            ("a date prefix and a modality", ["2019", "mr"]),
            ("no match", ["nobody"]))


def build_state(path, studies, seed=12):
    """A state of `studies` rows, written the way the script writes them."""
    rng = random.Random(seed)
    state = hbe.ExportState(path)
    rows = []
    for i in range(studies):
        day = "%04d-%02d-%02d" % (rng.randint(2000, 2025), rng.randint(1, 12),
                                  rng.randint(1, 28))
        name = "%s%d" % (rng.choice(NAMES), i)
        uid = "1.2.840.%d.%d.%d" % (rng.randint(10 ** 6, 10 ** 9), i, rng.randint(1, 99))
        rows.append({
            "study_uid": uid, "zip_path": "%s_%s/%s_%s.zip" % (day[:4], day[5:7], i, uid),
            "zip_bytes": rng.randint(10 ** 6, 10 ** 9), "file_count": rng.randint(1, 3000),
            "missing_count": 0, "source_bytes": rng.randint(10 ** 6, 2 * 10 ** 9),
            "fingerprint": "f" * 20, "base_fingerprint": "f" * 20, "study_date": day,
            "month": day[:4] + "_" + day[5:7],
            "patient_name": name, "modalities": rng.choice(MODALITIES),
            "exported_at": "2024-01-01T00:00:00Z", "verified_at": None,
            "patient_id": "P-%07d" % i, "accession_number": "A%08d" % i,
            "birth_date": "19%02d-01-01" % rng.randint(20, 99)})
    with state.transaction() as conn:
        conn.executemany(hbe.UPSERT_EXPORTED_SQL, rows)
        conn.executemany(hbe.SET_SEARCH_FIELDS_SQL, rows)
    state.close()


def time_find(backup, terms):
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, SCRIPT, "find", "--json", *terms,
                               "--backup-root", backup], capture_output=True, text=True)
        runs.append(time.perf_counter() - started)
        found = len(json.loads(done.stdout)) if done.stdout.strip() else 0
    return statistics.median(runs), found


def python_start():
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, SCRIPT, "--version"], capture_output=True)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def backfill_rate(work, count):
    """Manifests per second, from `count` small study ZIPs of 20 members each."""
    backup = os.path.join(work, "zips")
    os.makedirs(os.path.join(backup, "2019_03"))
    state = hbe.ExportState(os.path.join(backup, hbe.STATE_FILE))
    rows = []
    for i in range(count):
        relpath = "2019_03/STUDY_%05d.zip" % i
        files = [{"name": "0001_CT_x/%d.dcm" % n, "size": 512, "crc32": "0", "source": "/x"}
                 for n in range(20)]
        manifest = {"format": hbe.MANIFEST_FORMAT, "format_version": 1,
                    "exported_at": "2024-01-01T00:00:00Z", "fingerprint": "f",
                    "study": {"study_uid": "1.2.%d" % i, "patient_id": "P-%d" % i,
                              "accession_number": "A%d" % i, "birth_date": None,
                              "patient_name": "X^%d" % i, "study_date": "2019-03-01",
                              "modalities": ["CT"]},
                    "files": files, "missing": []}
        with zipfile.ZipFile(os.path.join(backup, relpath), "w") as archive:
            for entry in files:
                archive.writestr(entry["name"], os.urandom(512))
            archive.writestr(hbe.MANIFEST_NAME, json.dumps(manifest))
        record = hbe.export_record(manifest, relpath, 1, None)
        rows.append(dict(record, patient_id=None, accession_number=None))
    with state.transaction() as conn:
        conn.executemany(hbe.UPSERT_EXPORTED_SQL, rows)
        conn.executemany(hbe.SET_SEARCH_FIELDS_SQL, rows)
    cfg = hbe.Config(pacs_root=work, sentinel="", horos_data=work, backup_root=backup)
    started = time.perf_counter()
    filled = hbe.backfill_search_fields(cfg, state, hbe.IssueLog(cfg.issues_path),
                                        float("inf"))
    seconds = time.perf_counter() - started
    state.close()
    return filled / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50000)
    parser.add_argument("--zips", type=int, default=2000)
    parser.add_argument("--work", default=os.path.join(HERE, "out", "find"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    backup = os.path.join(args.work, "Backup")
    os.makedirs(backup)
    build_state(os.path.join(backup, hbe.STATE_FILE), args.studies)
    print("find on %d studies (median of 3 runs, a new process each; Python's start "
          "alone: %.2f s)" % (args.studies, python_start()))
    print("%-32s %8s %8s" % ("search", "seconds", "found"))
    for label, terms in SEARCHES:
        seconds, found = time_find(backup, terms)
        print("%-32s %8.2f %8d" % (label, seconds, found))
    print("backfill: %.0f manifests per second (%d ZIPs of 20 members, warm cache)"
          % (backfill_rate(args.work, args.zips), args.zips))


if __name__ == "__main__":
    main()
