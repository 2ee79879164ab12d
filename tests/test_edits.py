"""What the radiologist changes after the export reaches the backup (issue 17).

The library is made as Horos makes it (tests/fake_horos.py, from Horos's source): its own
SR series found by ZID, name and SR SOP class, files rewritten in place with new bytes and
mtime, new annotations SR files for comments, status and key images, the columns of
Database.sql. Every test runs the script as launchd does and looks at what a user would:
the bytes inside the ZIPs, their manifests, the ZIPs on disk (inode, mtime), the state,
`status`. Tests that want an edit exported at once pass --settle-minutes 0; those about
settling keep the default hour, with mtimes hours away from it, and never wait.
"""

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import zipfile

import pytest

from conftest import (ROOT, backup_root, issues_rows, manifest_of, run_cycle, run_script,
                      state_rows, zips_on_disk)
from fake_horos import FakeHorosLibrary, build_sample_library
from test_resilience import make_failures_due, run_with_fault

import horos_backup_export as hbe

SETTLED = ("--settle-minutes", "0")
# The version before this one (main when this work began): what users upgrade from.
PREVIOUS_VERSION = "b11dd8a"


def cycle(lib, *args):
    result = run_cycle(lib, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def exported(result):
    """How many studies a cycle's last line says it exported."""
    line = [line for line in result.stdout.splitlines() if "cycle done:" in line][-1]
    return int(line.split("cycle done: ")[1].split()[0])


def zip_path(lib, uid):
    root = backup_root(lib)
    (row,) = [r for r in state_rows(root) if r["study_uid"] == uid]
    return os.path.join(root, row["zip_path"])


def identity(path):
    """What a rewrite of a ZIP changes, even one that writes the same bytes."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def identities(lib):
    root = backup_root(lib)
    return {name: identity(os.path.join(root, name)) for name in zips_on_disk(root)}


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


def member_of(zip_file, source):
    """The bytes the ZIP holds for the file that was at `source` in Horos's library."""
    manifest = manifest_of(zip_file)
    (name,) = [f["name"] for f in manifest["files"] if f["source"] == source]
    with zipfile.ZipFile(zip_file) as archive:
        return archive.read(name)


def image_rows(lib):
    return lib.conn.execute("SELECT COUNT(*) FROM ZIMAGE").fetchone()[0]


def first_image(lib, study_pk):
    return lib.conn.execute(
        "SELECT MIN(im.Z_PK) FROM ZIMAGE im JOIN ZSERIES se ON se.Z_PK = im.ZSERIES"
        " WHERE se.ZSTUDY = ? AND se.ZID < 5000", (study_pk,)).fetchone()[0]


def status_json(lib, *args):
    result = run_script("--pacs-root", lib.pacs_root, "status", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- Horos rewrites its own SR files in place -------------------------------------------

def test_an_annotations_sr_rewritten_in_place_with_a_new_comment_and_status_is_backed_up(
        library):
    pk = library.add_simple_study("1.2.170.1", "CT", images=3,
                                  study_date=dt.datetime(2024, 5, 2))
    library.add_simple_study("1.2.170.2", "MR", images=2, study_date=dt.datetime(2024, 5, 3))
    library.finish()
    sr = library.set_study_annotations(pk, comment="first look", status=1)
    cycle(library)
    other = zip_path(library, "1.2.170.2")
    kept = identity(other)
    mine = zip_path(library, "1.2.170.1")
    assert manifest_of(mine)["study"]["comment"] == "first look"
    rows = image_rows(library)
    # Older OsiriX (and any tool) rewrites the annotations SR in place: same row, same
    # path, new bytes and mtime; Horos changes the columns with it.
    again = library.set_study_annotations(pk, comment="no lesion; reported", status=3,
                                          sr="in-place")
    assert (again.image_pk, again.path) == (sr.image_pk, sr.path)
    assert image_rows(library) == rows
    assert member_of(mine, sr.path) != read(sr.path)
    # Being edited: not exported until it has had no edit for an hour.
    result = cycle(library)
    assert exported(result) == 0
    assert "the reader's work changed in Horos since its export" in result.stdout
    assert status_json(library)["unsettled"] == 1
    result = cycle(library, *SETTLED)
    assert exported(result) == 1 and "re-exported" in result.stdout
    assert zip_path(library, "1.2.170.1") == mine
    assert member_of(mine, sr.path) == read(sr.path)              # the new SR, byte for byte
    study = manifest_of(mine)["study"]
    assert (study["comment"], study["status"]) == ("no lesion; reported", 3)
    # Horos also wrote the comment into every file of the study: those bytes too.
    for path in library.study_paths(pk):
        assert member_of(mine, path) == read(path)
    assert identity(other) == kept
    assert exported(cycle(library, *SETTLED)) == 0
    assert identity(other) == kept


def test_one_of_two_roi_srs_rewritten_with_the_same_size_is_caught(library):
    pk = library.add_simple_study("1.2.171.1", "CT", images=2,
                                  study_date=dt.datetime(2024, 5, 4))
    library.finish()
    first = library.add_roi_sr(pk)
    second = library.add_roi_sr(pk)
    cycle(library)
    mine = zip_path(library, "1.2.171.1")
    before_second = member_of(mine, second.path)
    size = os.path.getsize(first.path)
    old = read(first.path)
    library.rewrite_horos_sr(first.image_pk, same_size=True)    # an ROI moved
    assert os.path.getsize(first.path) == size and read(first.path) != old
    result = cycle(library, *SETTLED)
    assert exported(result) == 1
    assert member_of(mine, first.path) == read(first.path)
    assert member_of(mine, second.path) == before_second == read(second.path)
    assert exported(cycle(library, *SETTLED)) == 0


def test_an_edited_report_is_caught_and_its_url_recorded(library):
    pk = library.add_simple_study("1.2.172.1", "MR", images=2,
                                  study_date=dt.datetime(2024, 5, 5))
    library.finish()
    report = library.set_report(pk, "Draft: pending comparison.")
    cycle(library)
    mine = zip_path(library, "1.2.172.1")
    assert manifest_of(mine)["study"]["report_url"] == "REPORTS/1.2.172.1.rtf"
    rows = image_rows(library)
    again = library.set_report(pk, "Final: no change since 2023.")
    assert again.path == report.path and image_rows(library) == rows
    assert exported(cycle(library, *SETTLED)) == 1
    assert member_of(mine, report.path) == read(report.path)
    # The report moved to the RIS: only its URL changes in Horos's database.
    library.set_report(pk, url="https://ris.example.org/report/77", sr=False)
    assert exported(cycle(library, *SETTLED)) == 1
    assert manifest_of(mine)["study"]["report_url"] == "https://ris.example.org/report/77"


def test_a_file_rewritten_in_place_while_it_is_zipped_is_not_kept(library):
    """Same size, other bytes: the ZIP would hold a mix of two versions, and the size
    and mtime recorded for the edit check would be those of the older one."""
    pk = library.add_simple_study("1.2.184.1", "CT", images=1,
                                  study_date=dt.datetime(2024, 5, 15))
    library.finish()
    roi = library.add_roi_sr(pk)
    result = run_with_fault(library, "rewrite=%s" % os.path.basename(roi.path),
                            "--clinic-hours", "00-24")
    assert result.returncode == 0, result.stderr
    root = backup_root(library)
    assert zips_on_disk(root) == {}
    (row,) = [r for r in issues_rows(root) if r["kind"] == "FILE_CHANGED"]
    assert "rewritten while being read" in row["detail"]
    make_failures_due(library)
    assert exported(cycle(library)) == 1
    assert member_of(zip_path(library, "1.2.184.1"), roi.path) == read(roi.path)


# -- what Horos keeps only in Database.sql ----------------------------------------------

def test_comments_changed_only_in_the_database_reach_the_manifest(library):
    pk = library.add_simple_study("1.2.173.1", "CT", images=2, series=2,
                                  study_date=dt.datetime(2024, 5, 6))
    library.finish()
    cycle(library)
    mine = zip_path(library, "1.2.173.1")
    files = {p: read(p) for p in library.study_paths(pk)}
    series = [pk_ for (pk_,) in library.conn.execute(
        "SELECT Z_PK FROM ZSERIES WHERE ZSTUDY = ? ORDER BY ZID", (pk,))]
    # With Horos's preferences that write neither DICOM files nor SRs, the columns are
    # the only copy.
    library.set_study_annotations(pk, comment="only in the database", comment4="4th",
                                  dicom_files=False, sr=None)
    library.set_series_annotations(series[1], comment="series note", status=2,
                                   dicom_files=False, sr=None)
    assert {p: read(p) for p in library.study_paths(pk)} == files      # no file touched
    assert exported(cycle(library, *SETTLED)) == 1
    manifest = manifest_of(mine)
    assert (manifest["study"]["comment"], manifest["study"]["comment4"]) == (
        "only in the database", "4th")
    assert [(s["comment"], s["status"]) for s in manifest["series"]] == [
        (None, None), ("series note", 2)]
    # A series comment alone.
    library.set_series_annotations(series[0], comment3="third", dicom_files=False, sr=None)
    assert exported(cycle(library, *SETTLED)) == 1
    assert manifest_of(mine)["series"][0]["comment3"] == "third"


def test_a_key_image_is_backed_up_with_its_member_name(library):
    pk = library.add_simple_study("1.2.174.1", "CT", images=3,
                                  study_date=dt.datetime(2024, 5, 7))
    library.finish()
    cycle(library)
    mine = zip_path(library, "1.2.174.1")
    assert manifest_of(mine)["study"]["key_images"] == []
    image = first_image(library, pk)
    path = library.image_path(image)
    # Horos keeps key images in ZIMAGE alone (no count it maintains) and writes a new
    # annotations SR for the change: that new row is what the cycle sees.
    sr = library.set_key_image(image)
    assert exported(cycle(library)) == 0                     # an edit: it settles first
    assert status_json(library, *SETTLED)["edited"] == 1
    assert exported(cycle(library, *SETTLED)) == 1
    manifest = manifest_of(mine)
    (member,) = [f["name"] for f in manifest["files"] if f["source"] == path]
    assert manifest["study"]["key_images"] == [member]
    assert member_of(mine, path) == read(path)        # the file Horos rewrote, tag and all
    assert member_of(mine, sr.path) == read(sr.path)
    library.set_key_image(image, key=False)
    assert exported(cycle(library)) == 0
    assert exported(cycle(library, *SETTLED)) == 1
    assert manifest_of(mine)["study"]["key_images"] == []


def test_the_manifest_names_horos_own_sr_series_by_id_name_and_sop_class(library):
    pk = library.add_simple_study("1.2.175.1", "CT", images=1,
                                  study_date=dt.datetime(2024, 5, 8))
    dose = library.add_series(pk, "SR", "Dose Report", 900,
                              sop_class="1.2.840.10008.5.1.4.1.1.88.67")
    library.add_image(dose, size=300)
    # Named like Horos's, but not an SR: not Horos's (DicomStudy.m checks the SOP class).
    fake = library.add_series(pk, "OT", "OsiriX ROI SR", 5002)
    library.add_image(fake, size=300)
    library.finish()
    roi = library.add_roi_sr(pk)
    cycle(library)
    manifest = manifest_of(zip_path(library, "1.2.175.1"))
    assert sorted((s["number"], s["horos_sr"] or "-") for s in manifest["series"]) == [
        (1, "-"), (900, "-"), (5002, "-"), (5002, "roi")]
    watched = state_rows(backup_root(library), "SELECT * FROM horos_sr_files")
    assert [(w["path"], w["size"]) for w in watched] == [(roi.path, os.path.getsize(roi.path))]
    # A study Horos deleted and imported again: ZGENERATEDBYOSIRIX is NULL on every row,
    # and its SR series is still Horos's.
    library.delete_study(pk)
    new_pk = library.reimport_study("1.2.175.1")
    assert library.conn.execute("SELECT COUNT(*) FROM ZIMAGE WHERE ZGENERATEDBYOSIRIX = 1"
                                ).fetchone()[0] == 0
    cycle(library, *SETTLED)
    (moved,) = library.horos_srs(new_pk, "roi")
    watched = state_rows(backup_root(library), "SELECT * FROM horos_sr_files")
    assert [w["path"] for w in watched] == [moved.path]


# -- edits settle -----------------------------------------------------------------------

def test_an_edit_settles_from_the_files_mtime(library):
    pk = library.add_simple_study("1.2.176.1", "CT", images=1,
                                  study_date=dt.datetime(2024, 5, 9))
    library.finish()
    roi = library.add_roi_sr(pk)
    cycle(library)
    hours_ago = dt.datetime.now().timestamp() - 3 * 3600
    library.rewrite_horos_sr(roi.image_pk, mtime=hours_ago)
    # Rewritten three hours ago: settled under the default hour, exported now.
    assert exported(cycle(library)) == 1
    assert member_of(zip_path(library, "1.2.176.1"), roi.path) == read(roi.path)
    library.rewrite_horos_sr(roi.image_pk)                     # rewritten just now
    assert exported(cycle(library)) == 0
    (mark,) = state_rows(backup_root(library), "SELECT * FROM changed_studies")
    recorded = hbe.parse_utc_iso(mark["edited_at"])
    assert int(os.stat(roi.path).st_mtime) == recorded         # the clock is the mtime
    assert exported(cycle(library, *SETTLED)) == 1


def test_an_edit_seen_only_in_the_database_settles_from_when_a_cycle_first_saw_it(library):
    pk = library.add_simple_study("1.2.177.1", "MR", images=1,
                                  study_date=dt.datetime(2024, 5, 10))
    library.finish()
    cycle(library)
    root = backup_root(library)
    library.set_study_annotations(pk, status=2, dicom_files=False, sr=None)
    before = dt.datetime.now().timestamp()
    assert exported(cycle(library)) == 0
    (mark,) = state_rows(root, "SELECT * FROM changed_studies")
    seen = hbe.parse_utc_iso(mark["edited_at"])
    assert before - 1 <= seen <= dt.datetime.now().timestamp()
    # Nothing new: the mark stays as it is (and the cycle writes no change).
    assert exported(cycle(library)) == 0
    assert state_rows(root, "SELECT * FROM changed_studies") == [mark]
    # Another edit: a new fingerprint, and the clock starts again from this cycle.
    library.set_study_annotations(pk, status=3, dicom_files=False, sr=None)
    assert exported(cycle(library)) == 0
    (again,) = state_rows(root, "SELECT * FROM changed_studies")
    assert again["fingerprint"] != mark["fingerprint"]
    assert hbe.parse_utc_iso(again["edited_at"]) >= seen
    # The test plays the clock: that edit was seen two hours ago.
    conn = sqlite3.connect(os.path.join(root, "export_state.sqlite"))
    with conn:
        conn.execute("UPDATE changed_studies SET edited_at = ?",
                     (hbe.utc_iso(dt.datetime.now().timestamp() - 2 * 3600),))
    conn.close()
    assert exported(cycle(library)) == 1
    assert manifest_of(zip_path(library, "1.2.177.1"))["study"]["status"] == 3


# -- status ------------------------------------------------------------------------------

def test_status_counts_edited_studies_apart(library):
    pks = [library.add_simple_study("1.2.178.%d" % i, "CT", images=1,
                                    study_date=dt.datetime(2024, 6, i)) for i in (1, 2, 3)]
    library.finish()
    cycle(library)
    library.set_study_annotations(pks[0], comment="read", dicom_files=False, sr=None)
    series = library.add_series(pks[1], "CT", "late reconstruction", 2)
    library.add_image(series, size=500)             # images that came late: a change
    library.finish()
    text = run_script("--pacs-root", library.pacs_root, "status", *SETTLED)
    assert text.returncode == 0, text.stderr
    assert "pending          2 ready to export (2 of them changed since their export, " \
           "1 of them edited in Horos)" in text.stdout
    status = status_json(library, *SETTLED)
    assert (status["pending"], status["changed"], status["edited"]) == (2, 2, 1)
    assert status_json(library)["edited"] == 0          # not settled yet: not pending
    dry = run_script("--pacs-root", library.pacs_root, "--dry-run", *SETTLED)
    assert dry.stdout.count("reexport") == 2


# -- the ZIPs of studies nobody edited ---------------------------------------------------

def test_studies_without_edits_are_never_rewritten(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    yamada, joao = ("1.2.392.200036.9116.2.6.1.48.1215.1551385800.1",
                    "1.3.12.2.1107.5.2.30.25245.30000019030112345678900000001")
    pks = {uid: lib.conn.execute("SELECT Z_PK FROM ZSTUDY WHERE ZSTUDYINSTANCEUID = ?",
                                 (uid,)).fetchone()[0] for uid in (yamada, joao)}
    roi = lib.add_roi_sr(pks[yamada])
    cycle(lib, "--batch-size", "50")
    before = identities(lib)
    edited = {os.path.relpath(zip_path(lib, uid), backup_root(lib)) for uid in (yamada, joao)}
    lib.rewrite_horos_sr(roi.image_pk, same_size=True)
    lib.set_study_annotations(pks[joao], comment="compare with 2018", status=2)
    for args in ((), SETTLED, SETTLED, (), SETTLED):
        cycle(lib, "--batch-size", "50", *args)
        now = identities(lib)
        assert set(now) == set(before)
        assert {name for name in now if now[name] != before[name]} <= edited
    assert {name for name in now if now[name] != before[name]} == edited
    lib.close()


# -- no DICOM file is read on an unchanged library ---------------------------------------

def test_a_cycle_on_an_unchanged_library_reads_no_dicom_file(library):
    """With the access times of every file of the library a year old, a file system
    that records reads (relatime: when the access time is over a day old) dates any
    read of one: an idle cycle must leave them all as they are."""
    pk = library.add_simple_study("1.2.179.1", "CT", images=2,
                                  study_date=dt.datetime(2024, 5, 11))
    library.finish()
    library.set_study_annotations(pk, comment="read")
    library.add_roi_sr(pk)
    library.set_report(pk, "Normal.")
    cycle(library)
    files = [os.path.join(folder, name)
             for folder, _dirs, names in os.walk(library.database_dir) for name in names]
    year_ago = int((dt.datetime.now().timestamp() - 365 * 86400) * 1e9)

    def age_all():
        for path in files:
            os.utime(path, ns=(year_ago, os.stat(path).st_mtime_ns))

    age_all()
    read(files[0])
    if os.stat(files[0]).st_atime_ns == year_ago:
        pytest.skip("this file system does not record reads (noatime)")
    age_all()
    cycle(library)
    assert [p for p in files if os.stat(p).st_atime_ns != year_ago] == []


# -- big studies --------------------------------------------------------------------------

def test_a_study_of_20000_images_is_read_in_short_transactions(library):
    library.add_large_study("1.2.180.1", images=20000, series=2,
                            study_date=dt.datetime(2024, 5, 12))
    cycle(library)
    (run,) = state_rows(backup_root(library), "SELECT * FROM runs")
    assert run["studies"] == 1 and run["files"] == 20000
    assert run["horos_longest_seconds"] <= 0.05
    # Columns, the high-water mark, the scan and its end, then the plan in chunks of
    # 3,750 image rows: no transaction holds the study whole.
    assert run["horos_transactions"] >= 4 + 20000 // 3750
    manifest = manifest_of(zip_path(library, "1.2.180.1"))
    assert len(manifest["files"]) == 20000


def test_a_plan_read_in_chunks_holds_what_the_scan_saw_and_the_next_cycle_sees_the_rest(
        library):
    """Horos commits between two chunks of a plan: the commit gets through (no lock is
    held between them), the plan holds every row the scan counted, and the fingerprint
    recorded with it is the scan's, so the next cycle sees the study changed."""
    pk = library.add_study("1.2.181.1", study_date=dt.datetime(2024, 5, 13))
    first = library.add_series(pk, "CT", "one", 1)
    second = library.add_series(pk, "CT", "two", 2)
    for _ in range(7):
        library.add_image(first, size=100)
        library.add_image(second, size=100)
    library.finish()
    times = hbe.ReadTimes()
    with hbe.open_horos_reader(library.db_path, 5.0, chunk_rows=1, times=times) as reader:
        (study,) = hbe.read_candidates(reader)
        real = reader.transaction
        opened = []

        def transaction():
            if len(opened) == 1:      # after the first: the fields, the series, 5 rows
                library.conn.execute("PRAGMA busy_timeout = 0")
                late = library.add_series(pk, "CT", "three", 3)    # after the series list
                library.add_image(late, size=100)
                library.add_image(first, size=100)      # into a series being read
                library.finish()
            opened.append(1)
            return real()

        reader.transaction = transaction
        start = times.transactions
        rows = reader.read_study(study)
        reader.transaction = real
        fresh = {s.uid: s for s in hbe.read_candidates(reader)}
    assert times.transactions - start >= 3             # 14 rows, 5 per transaction
    paths = {library.image_path(pk_) for (pk_,) in library.conn.execute(
        "SELECT im.Z_PK FROM ZIMAGE im WHERE im.ZSERIES IN (?, ?)", (first, second))}
    planned = hbe.plan_study_files(rows.series, rows.images, library.database_dir)[1]
    assert paths <= {f.path for f in planned}           # every row that was there
    assert len(rows.series) == 2                        # not the series added after
    selection = hbe.plan_selection(list(fresh.values()), {study.uid: study.fingerprint},
                                   {}, {}, ("CT",), "study_date", 2e9, 0)
    assert [(c.study.uid, c.reason) for c in selection.queue] == [("1.2.181.1", "changed")]


# -- reindex ------------------------------------------------------------------------------

def test_reindex_rebuilds_the_watched_sr_files_from_the_manifests(library):
    pk = library.add_simple_study("1.2.182.1", "CT", images=1,
                                  study_date=dt.datetime(2024, 5, 14))
    library.finish()
    roi = library.add_roi_sr(pk)
    library.set_study_annotations(pk, comment="read", dicom_files=False)
    cycle(library)
    root = backup_root(library)
    watched = state_rows(root, "SELECT * FROM horos_sr_files ORDER BY path")
    bases = state_rows(root, "SELECT study_uid, base_fingerprint FROM exported_studies")
    assert len(watched) == 2
    result = run_script("--pacs-root", library.pacs_root, "reindex")
    assert result.returncode == 0, result.stderr
    assert state_rows(root, "SELECT * FROM horos_sr_files ORDER BY path") == watched
    assert state_rows(root, "SELECT study_uid, base_fingerprint FROM exported_studies") == \
        bases
    library.rewrite_horos_sr(roi.image_pk, same_size=True)
    assert status_json(library, *SETTLED)["edited"] == 1
    assert exported(cycle(library, *SETTLED)) == 1
    assert member_of(zip_path(library, "1.2.182.1"), roi.path) == read(roi.path)


# -- the upgrade --------------------------------------------------------------------------

def previous_version(tmp_path):
    """The previous version of the script, from the repository's history."""
    found = subprocess.run(["git", "-C", ROOT, "show",
                            "%s:horos_backup_export.py" % PREVIOUS_VERSION],
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip("the previous version %s is not in this clone's history: %s"
                    % (PREVIOUS_VERSION, found.stderr.strip()))
    path = tmp_path / "previous_horos_backup_export.py"
    path.write_text(found.stdout, encoding="utf-8")
    return str(path)


def test_an_upgrade_re_exports_only_the_annotated_studies_and_only_once(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    day = dt.datetime(2024, 3, 1)
    pks = {}
    for i, name in enumerate(("plain1", "plain2", "plain3", "commented", "roi", "report",
                              "status-only", "key-image")):
        pks[name] = lib.add_simple_study("1.2.183.%d" % i, "CT" if i % 2 else "MR",
                                         images=2, study_date=day + dt.timedelta(days=i))
    lib.finish()
    lib.set_study_annotations(pks["commented"], comment="read", status=2)
    lib.add_roi_sr(pks["roi"])
    lib.set_report(pks["report"], "Normal.")
    lib.set_study_annotations(pks["status-only"], status=1, dicom_files=False, sr=None)
    lib.set_key_image(first_image(lib, pks["key-image"]))
    annotated = {"1.2.183.%d" % i for i in range(3, 8)}
    old = previous_version(tmp_path)
    result = subprocess.run([sys.executable, old, "--pacs-root", lib.pacs_root,
                             "--clinic-hours", "00-24", "--batch-size", "50"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    root = backup_root(lib)
    before = identities(lib)
    assert len(before) == 8
    names = {r["study_uid"]: r["zip_path"] for r in state_rows(root)}
    # A study that arrives after the old version's last cycle goes before the upgrade.
    lib.add_simple_study("1.2.183.9", "CT", images=1, study_date=day)
    lib.finish()
    status = status_json(lib)
    assert (status["pending"], status["changed"], status["edited"]) == (6, 5, 0)
    result = cycle(lib, "--batch-size", "1")
    assert exported(result) == 1 and "re-exported" not in result.stdout
    assert identities(lib).items() >= before.items()         # every old ZIP as it was
    result = cycle(lib, "--batch-size", "50")
    assert exported(result) == 5 and result.stdout.count("re-exported") == 5
    after = identities(lib)
    changed = {name for name in before if after[name] != before[name]}
    assert changed == {names[uid] for uid in annotated}
    for uid in annotated:
        manifest = manifest_of(os.path.join(root, names[uid]))
        assert "status" in manifest["study"] and "base_fingerprint" in manifest
    # Once: the next cycles leave every ZIP alone.
    for _ in range(2):
        assert exported(cycle(lib, "--batch-size", "50")) == 0
    assert identities(lib) == after
    # From now on the reader's first comment on a study the old version exported is an
    # edit, and the ROI SR it exported is watched.
    lib.set_study_annotations(pks["plain1"], comment="seen", dicom_files=False, sr=None)
    (roi,) = lib.horos_srs(pks["roi"], "roi")
    lib.rewrite_horos_sr(roi.image_pk, same_size=True)
    status = status_json(lib, *SETTLED)
    assert (status["changed"], status["edited"]) == (2, 2)
    assert exported(cycle(lib, "--batch-size", "50", *SETTLED)) == 2
    assert member_of(os.path.join(root, names["1.2.183.4"]), roi.path) == read(roi.path)
    lib.close()


# -- the planner: why a study is exported again ------------------------------------------

def study(uid, fingerprint, base, date=1.0):
    return hbe.HorosStudy(uid=uid, pks=(1,), study_date=date, date_added=None,
                          last_added=None, modalities=("CT",), fingerprint=fingerprint,
                          base_fingerprint=base)


NOW = 1_800_000_000.0


def test_the_queue_tells_changes_edits_and_upgrades_apart():
    studies = [study("edited", "e2", "b", 5.0), study("changed", "c2", "c2", 6.0),
               study("upgrade", "u2", "u1", 1.0), study("new", "n", "n", 9.0),
               study("same", "s", "s", 0.5)]
    exported = {"edited": "e1", "changed": "c1", "upgrade": "u1", "same": "s"}
    bases = {"edited": "b", "upgrade": None}          # recorded bases (None: version 1.0)
    selection = hbe.plan_selection(studies, exported, {}, {}, ("CT",), "study_date", NOW,
                                   0, bases=bases)
    assert [(c.study.uid, c.reason) for c in selection.queue] == [
        ("edited", "edited"), ("changed", "changed"), ("new", "new"),
        ("upgrade", "upgrade")]
    assert (selection.pending, selection.changed, selection.edited) == (4, 3, 1)
    # An edit waits for SETTLE_MINUTES from the time of its last edit.
    waiting = hbe.plan_selection(studies, exported, {"edited": NOW - 600}, {}, ("CT",),
                                 "study_date", NOW, 3600, bases=bases)
    assert "edited" not in [c.study.uid for c in waiting.queue]
    assert waiting.unsettled == 1
    settled = hbe.plan_selection(studies, exported, {"edited": NOW - 3700}, {}, ("CT",),
                                 "study_date", NOW, 3600, bases=bases)
    assert settled.queue[0].study.uid == "edited"
    # An edit dated far in the future (a clock that was wrong) does not wait for ever.
    future = hbe.plan_selection(studies, exported, {"edited": NOW + 86400}, {}, ("CT",),
                                "study_date", NOW, 3600, bases=bases)
    assert future.queue[0].study.uid == "edited"
    # Capped, the upgrade comes last too.
    head = hbe.plan_selection(studies, exported, {}, {}, ("CT",), "study_date", NOW, 0,
                              limit=3, bases=bases)
    assert [c.study.uid for c in head.queue] == ["edited", "changed", "new"]
