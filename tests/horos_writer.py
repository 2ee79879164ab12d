"""A Horos-like writer: its own process committing to Database.sql every few ms, as Horos
does while it imports, counting the commits it loses to our read transactions.

Horos keeps Database.sql in rollback-journal mode: a commit has to wait until every
reader has ended its read transaction, and gives up after its busy timeout ("database is
locked"). Each lost commit is an import or edit Horos has to retry or report.

    python tests/horos_writer.py DB STOP_FILE READY_FILE TIMEOUT [INTERVAL]

writes READY_FILE once connected, commits until STOP_FILE exists, then prints
`commits=N locked=N worst=SECONDS`. start_writer and stop_writer run it for the tests and
for bench/horos_waits.py.
"""

import os
import sqlite3
import subprocess
import sys
import time

COREDATA_EPOCH_OFFSET = 978307200
STUDY_ROWS_TOUCHED = 1000   # the writer updates ZSTUDY rows 1..1000 in turn


def write_until_stopped(db_path, stop_file, ready_file, timeout, interval):
    conn = sqlite3.connect(db_path, timeout=timeout, isolation_level=None)
    commits = locked = 0
    worst = 0.0
    open(ready_file, "w").close()
    while not os.path.exists(stop_file):
        started = time.perf_counter()
        try:
            # An import touches a study and adds a log entry, in one transaction.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE ZSTUDY SET ZDATEOPENED = ? WHERE Z_PK = ?",
                         (time.time() - COREDATA_EPOCH_OFFSET,
                          1 + commits % STUDY_ROWS_TOUCHED))
            conn.execute("INSERT INTO ZLOGENTRY (Z_ENT, Z_OPT, ZMESSAGE, ZSTARTTIME) "
                         "VALUES (3, 1, 'import', ?)", (time.time() - COREDATA_EPOCH_OFFSET,))
            conn.execute("COMMIT")
            commits += 1
        except sqlite3.OperationalError as error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "locked" not in str(error) and "busy" not in str(error):
                raise
            locked += 1
            print("LOCKED: %s" % error, flush=True)
        worst = max(worst, time.perf_counter() - started)
        time.sleep(interval)
    # The log entries it added go again, so repeated runs see the same library.
    conn.execute("DELETE FROM ZLOGENTRY")
    conn.close()
    print("commits=%d locked=%d worst=%.4f" % (commits, locked, worst), flush=True)


def start_writer(db_path, folder, timeout, interval=0.01):
    """The writer as its own process, connected and committing; returns (process, stop
    file)."""
    stop = os.path.join(str(folder), "stop-writer")
    ready = os.path.join(str(folder), "writer-ready")
    for path in (stop, ready):
        if os.path.exists(path):
            os.remove(path)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), db_path, stop, ready,
                             str(timeout), str(interval)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("the Horos-like writer did not start: %s" % proc.stderr.read())
        time.sleep(0.01)
    return proc, stop


def stop_writer(proc, stop):
    """Stop it; returns (commits, locked, worst commit wait in seconds, its output)."""
    open(stop, "w").close()
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError("the Horos-like writer failed: %s" % err)
    fields = dict(part.split("=") for part in out.strip().splitlines()[-1].split())
    return int(fields["commits"]), int(fields["locked"]), float(fields["worst"]), out


if __name__ == "__main__":
    write_until_stopped(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]),
                        float(sys.argv[5]) if len(sys.argv) > 5 else 0.01)
