"""The fake Horos library itself: what it does to Database.sql and the files must be what
Horos does (tests/fake_horos.py cites the Horos source for each)."""

import datetime as dt
import os
import sqlite3
import time
import zipfile

from conftest import backup_root, run_cycle, zips_on_disk
from fake_horos import (BASIC_TEXT_SR, DCMODIFY_MARK, FakeHorosLibrary, HOROS_SR_SERIES,
                        build_sample_library, database_path_for_number, read_fake_sr)

CT_UID = "1.2.392.200036.9116.2.6.1.48.1215.1551385800.1"   # study 1 of the sample


def columns(lib, table):
    return [row[1] for row in lib.conn.execute("PRAGMA table_info(%s)" % table)]


def row(lib, table, pk):
    cur = lib.conn.execute("SELECT * FROM %s WHERE Z_PK = ?" % table, (pk,))
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def count(lib, sql, *args):
    return lib.conn.execute(sql, args).fetchone()[0]


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


def study_with_images(lib, uid, images=3, **fields):
    pk = lib.add_simple_study(uid, "CT", images=images, study_date=dt.datetime(2020, 5, 1),
                              **fields)
    lib.finish()
    return pk


def test_schema_has_the_model_columns_and_indexes(library):
    image = columns(library, "ZIMAGE")
    for column in ("ZGENERATEDBYOSIRIX", "ZSTOREDISKEYIMAGE", "ZCOMMENT", "ZCOMMENT4",
                   "ZSCALE", "ZSTOREDMODALITY", "ZSTOREDFILETYPE", "ZSTATETEXT"):
        assert column in image
    series = columns(library, "ZSERIES")
    for column in ("ZCOMMENT", "ZCOMMENT4", "ZSTATETEXT", "ZNUMBEROFKEYIMAGES", "ZKEYSERIES",
                   "ZSERIESSOPCLASSUID", "ZSERIESDICOMUID"):
        assert column in series
    assert "ZMOUNTEDVOLUME" not in series                  # transient in the model
    assert "ZGENERATEDBYOSIRIX" not in series + columns(library, "ZSTUDY")
    study = columns(library, "ZSTUDY")
    for column in ("ZCOMMENT", "ZCOMMENT2", "ZCOMMENT3", "ZCOMMENT4", "ZSTATETEXT",
                   "ZLOCKEDSTUDY", "ZREPORTURL"):
        assert column in study
    indexes = {r[0] for r in library.conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"ZSERIES_ZID_INDEX", "ZSERIES_ZSTUDY_INDEX", "ZIMAGE_ZSERIES_INDEX",
            "ZSTUDY_ZSTUDYINSTANCEUID_INDEX"} <= indexes


def test_annotations_sr_rows_are_as_horos_makes_them(library):
    pk = study_with_images(library, "1.2.77.1")
    added = row(library, "ZSTUDY", pk)["ZDATEADDED"]
    opt = row(library, "ZSTUDY", pk)["Z_OPT"]
    sr = library.set_study_annotations(pk, comment="Nodule RUL", status=2)
    series = row(library, "ZSERIES", sr.series_pk)
    assert (series["ZID"], series["ZNAME"]) == HOROS_SR_SERIES["annotations"] \
        == (5004, "OsiriX Annotations SR")
    assert series["ZSERIESINSTANCEUID"] == "OsiriX Annotations SR"
    assert series["ZSERIESSOPCLASSUID"] == BASIC_TEXT_SR
    assert series["ZSERIESSOPCLASSUID"].startswith("1.2.840.10008.5.1.4.1.1.88.")
    assert series["ZMODALITY"] == "SR" and series["ZSTUDY"] == pk
    image = row(library, "ZIMAGE", sr.image_pk)
    assert image["ZGENERATEDBYOSIRIX"] == 1 and image["ZSTOREDMODALITY"] == "SR"
    assert image["ZPATHSTRING"] is None and image["ZSTOREDINDATABASEFOLDER"] == 1
    assert sr.path == database_path_for_number(library.database_dir, image["ZPATHNUMBER"])
    assert read(sr.path)[128:132] == b"DICM"
    assert read_fake_sr(sr.path)[1]["comment"] == "Nodule RUL"
    study = row(library, "ZSTUDY", pk)
    assert (study["ZCOMMENT"], study["ZSTATETEXT"]) == ("Nodule RUL", 2)
    assert study["ZDATEADDED"] == added            # Horos's own SRs leave dateAdded alone
    assert study["Z_OPT"] > opt
    assert library.horos_sr_series(pk, "annotations") == sr.series_pk
    assert sr.path in library.study_files["1.2.77.1"]


def test_each_annotations_change_is_a_new_file_and_an_unchanged_one_none(library):
    pk = study_with_images(library, "1.2.77.2")
    first = library.set_study_annotations(pk, comment="a", dicom_files=False)
    assert library.set_study_annotations(pk, comment="a") is None      # no change
    second = library.set_study_annotations(pk, comment2="b", dicom_files=False)
    assert second.series_pk == first.series_pk and second.path != first.path
    assert os.path.isfile(first.path)                # the old file and row stay
    assert [s.image_pk for s in library.horos_srs(pk, "annotations")] == \
        [first.image_pk, second.image_pk]
    in_place = library.set_study_annotations(pk, status=3, sr="in-place")
    assert (in_place.image_pk, in_place.path) == (second.image_pk, second.path)
    assert read_fake_sr(second.path)[1]["stateText"] == 3
    assert count(library, "SELECT COUNT(*) FROM ZIMAGE WHERE ZSERIES = ?",
                 first.series_pk) == 2


def test_comment_and_status_rewrite_the_studys_files_in_place_by_default(library):
    pk = study_with_images(library, "1.2.77.3")
    paths = library.study_paths(pk)
    before = {p: (read(p), os.stat(p).st_ino) for p in paths}
    library.set_study_annotations(pk, comment3="only a column", sr=None)
    assert {p: (read(p), os.stat(p).st_ino) for p in paths} == before
    library.set_study_annotations(pk, comment="seen", sr=None)
    for path in paths:
        data = read(path)
        assert data != before[path][0] and DCMODIFY_MARK in data
        assert os.stat(path).st_ino == before[path][1]           # same file, new bytes
    untouched = study_with_images(library, "1.2.77.4")
    kept = {p: read(p) for p in library.study_paths(untouched)}
    library.set_study_annotations(untouched, status=4, dicom_files=False, sr=None)
    assert {p: read(p) for p in library.study_paths(untouched)} == kept


def test_same_size_rewrite_keeps_path_row_and_size_and_changes_bytes_and_mtime(library):
    pk = study_with_images(library, "1.2.77.5")
    one = library.add_roi_sr(pk, rois=2)
    two = library.add_roi_sr(pk)
    assert one.series_pk == two.series_pk and one.path != two.path
    series = row(library, "ZSERIES", one.series_pk)
    assert (series["ZID"], series["ZNAME"]) == (5002, "OsiriX ROI SR")
    first = row(library, "ZIMAGE", one.image_pk)
    assert first["ZCOMMENT"].endswith("-0") and first["ZSCALE"] == 2.0
    rows = count(library, "SELECT COUNT(*) FROM ZIMAGE")
    old, st = read(one.path), os.stat(one.path)
    opt = row(library, "ZIMAGE", one.image_pk)["Z_OPT"]
    again = library.rewrite_horos_sr(one.image_pk, same_size=True)
    assert again == one
    new, st2 = read(one.path), os.stat(one.path)
    assert len(new) == len(old) and new != old
    assert st2.st_mtime_ns != st.st_mtime_ns and st2.st_ino == st.st_ino
    assert count(library, "SELECT COUNT(*) FROM ZIMAGE") == rows
    assert row(library, "ZIMAGE", one.image_pk)["Z_OPT"] == opt + 1
    stamp = time.time() - 3600
    library.rewrite_horos_sr(two.image_pk, same_size=True, mtime=stamp)
    assert abs(os.stat(two.path).st_mtime - stamp) < 1e-3


def test_report_sr_is_made_once_then_rewritten_in_place(library):
    pk = study_with_images(library, "1.2.77.6")
    first = library.set_report(pk, "Normal study.")
    assert row(library, "ZSTUDY", pk)["ZREPORTURL"] == "REPORTS/1.2.77.6.rtf"
    assert os.path.isfile(os.path.join(library.horos_data, "REPORTS", "1.2.77.6.rtf"))
    series = row(library, "ZSERIES", first.series_pk)
    assert (series["ZID"], series["ZNAME"]) == (5003, "OsiriX Report SR")
    old = read(first.path)
    second = library.set_report(pk, "Normal study. Addendum: none.")
    assert second == first and read(first.path) != old
    assert len(library.horos_srs(pk, "report")) == 1


def test_key_images_live_in_zimage_only(library):
    pk = study_with_images(library, "1.2.77.7")
    image_pk = library.conn.execute(
        "SELECT MIN(im.Z_PK) FROM ZIMAGE im JOIN ZSERIES se ON se.Z_PK = im.ZSERIES"
        " WHERE se.ZSTUDY = ?", (pk,)).fetchone()[0]
    sr = library.set_key_image(image_pk)
    assert row(library, "ZIMAGE", image_pk)["ZSTOREDISKEYIMAGE"] == 1
    assert DCMODIFY_MARK in read(library.image_path(image_pk))
    assert read_fake_sr(sr.path)[1]["series"][0]["images"][0]["isKeyImage"] == 1
    library.set_key_image(image_pk, key=False)
    assert row(library, "ZIMAGE", image_pk)["ZSTOREDISKEYIMAGE"] is None
    assert count(library, "SELECT COUNT(*) FROM ZSERIES WHERE ZNUMBEROFKEYIMAGES IS NOT NULL"
                 ) == 0


def test_autoclean_deletes_oldest_added_and_spares_locked_album_commented_recent(library):
    now = dt.datetime.now()
    pks = {}
    for i, name in enumerate(("locked", "album", "commented", "old", "older", "recent",
                              "newer")):
        added = now - dt.timedelta(days=30 - i) if name != "recent" \
            else now - dt.timedelta(minutes=30)
        if name == "older":
            added = now - dt.timedelta(days=40)
        pks[name] = study_with_images(library, "1.2.78.%d" % i, date_added=added)
    library.lock_study(pks["locked"])
    library.add_to_album(pks["album"], "Teaching")
    library.set_study_annotations(pks["commented"], comment4="keep", dicom_files=False)
    in_place = library.add_study("1.2.78.9", date_added=now - dt.timedelta(days=50))
    outside = library.add_image(library.add_series(in_place), storage="absolute",
                                path_string=os.path.join(library.in_place_dir, "IM1"))
    library.finish()
    assert library.autoclean_candidates() == [in_place, pks["older"], pks["old"],
                                              pks["newer"]]
    doomed = library.study_paths(pks["older"])
    max_pk = count(library, "SELECT Z_MAX FROM Z_PRIMARYKEY WHERE Z_NAME = 'Study'")
    gone = library.autoclean(count=3)
    assert gone == ["1.2.78.9", "1.2.78.4", "1.2.78.3"]
    assert os.path.isfile(outside)                      # in place: not Horos's to delete
    assert not any(os.path.exists(p) for p in doomed)
    assert count(library, "SELECT COUNT(*) FROM ZSTUDY WHERE ZSTUDYINSTANCEUID IN (?,?,?)",
                 *gone) == 0
    assert count(library, "SELECT COUNT(*) FROM ZSERIES WHERE ZSTUDY NOT IN"
                 " (SELECT Z_PK FROM ZSTUDY)") == 0
    assert count(library, "SELECT COUNT(*) FROM ZIMAGE WHERE ZSERIES NOT IN"
                 " (SELECT Z_PK FROM ZSERIES)") == 0
    assert library.autoclean(dont_delete_commented=False) == ["1.2.78.2", "1.2.78.6"]
    assert count(library, "SELECT COUNT(*) FROM ZSTUDY") == 3   # locked, album, recent
    # Back again: new keys (Core Data never reuses one), same UID, files copied anew.
    snapshot_files = library.deleted_studies["1.2.78.4"][0]["files"]
    new_pk = library.reimport_study("1.2.78.4")
    assert new_pk > max_pk and new_pk != pks["older"]
    assert row(library, "ZSTUDY", new_pk)["ZSTUDYINSTANCEUID"] == "1.2.78.4"
    assert sorted(read(p) for p in library.study_paths(new_pk)) == \
        sorted(snapshot_files.values())
    assert set(library.study_paths(new_pk)).isdisjoint(doomed)


def test_user_delete_refuses_locked_and_reimport_clears_generated_by_osirix(library):
    pk = study_with_images(library, "1.2.79.1")
    library.lock_study(pk)
    try:
        library.delete_study(pk)
        raise AssertionError("a locked study was deleted")
    except ValueError:
        pass
    library.lock_study(pk, locked=False)
    library.set_study_annotations(pk, comment="read", status=2, dicom_files=False)
    library.delete_study(pk)
    new_pk = library.reimport_study("1.2.79.1")
    study = row(library, "ZSTUDY", new_pk)
    assert (study["ZCOMMENT"], study["ZSTATETEXT"]) == ("read", 2)   # from the SR
    assert library.horos_sr_series(new_pk, "annotations") is not None
    assert count(library, "SELECT COUNT(*) FROM ZIMAGE WHERE ZGENERATEDBYOSIRIX = 1") == 0


def test_empty_library_leaves_the_files_and_a_new_store_restarts_keys(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    files = [p for paths in lib.study_files.values() for p in paths]
    left = lib.empty_library()
    assert len(left) == 19 and len(set(left)) == 18      # the twin rows share a UID
    assert count(lib, "SELECT COUNT(*) FROM ZSTUDY") == 0
    assert count(lib, "SELECT COUNT(*) FROM ZIMAGE") == 0
    assert all(os.path.isfile(p) for p in files)
    lib.reimport_study(CT_UID)
    assert count(lib, "SELECT MIN(Z_PK) FROM ZSTUDY") > 19
    lib.empty_library(new_store=True)
    assert os.path.isfile(lib.db_path + " - old")
    assert lib.reimport_study(CT_UID) == 1
    lib.close()


def test_a_large_study_is_quick_to_build_and_has_a_file_per_row(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    started = time.perf_counter()
    pk = lib.add_large_study("1.2.80.1", images=20000, series=2,
                             study_date=dt.datetime(2021, 1, 1))
    assert time.perf_counter() - started < 15
    paths = lib.study_paths(pk)
    assert len(paths) == 20000 == count(lib, "SELECT COUNT(*) FROM ZIMAGE")
    assert all(os.path.isfile(p) for p in paths[::997])
    assert read(paths[0]) != read(paths[1])
    assert count(lib, "SELECT ZNUMBEROFIMAGES FROM ZSTUDY WHERE Z_PK = ?", pk) == 20000
    lib.close()


def test_the_script_exports_horos_sr_files_with_the_study(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    pk = study_with_images(lib, "1.2.81.1")
    sr = lib.set_study_annotations(pk, comment="read", dicom_files=False)
    roi = lib.add_roi_sr(pk)
    lib.close()
    result = run_cycle(lib, "--settle-minutes", "0")
    assert result.returncode == 0, result.stderr
    [exported] = zips_on_disk(backup_root(lib))
    with zipfile.ZipFile(os.path.join(backup_root(lib), exported)) as archive:
        payload = sorted(archive.read(n) for n in archive.namelist()
                         if not n.endswith(".json"))
    assert read(sr.path) in payload and read(roi.path) in payload
    conn = sqlite3.connect(lib.db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        conn.close()
