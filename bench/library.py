"""Database-only Horos libraries at scale: 5,000 to 150,000 studies, 5 series each,
20 images per series (50,000 studies = 250,000 series = 5,000,000 images), built with
the fake library's schema (tests/fake_horos.py) and Horos's rollback journal.

With annotated_fraction (e.g. 0.2), that share of the studies also holds the reader's
work as Horos keeps it (see tests/fake_horos.py): an "OsiriX Annotations SR" series
(ZID 5004, Basic Text SR, modality SR) with one ZIMAGE row (ZGENERATEDBYOSIRIX = 1)
and, with sr_files, its file in DATABASE.noindex (the only files of such a library);
a comment and a status (ZSTUDY.ZCOMMENT, ZSTATETEXT); one key image
(ZIMAGE.ZSTOREDISKEYIMAGE). The default (0) builds exactly the library it always did."""

import os
import random
import shutil
import sqlite3
import sys
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from fake_horos import (  # noqa: E402
    BASIC_TEXT_SR, DCMTK_SERIES_UID_ROOT, ENTITIES, FOLDER_SIZE, HOROS_SR_SERIES, SCHEMA,
    SR_SOP_CLASS_PREFIX, database_path_for_number, fake_sr_bytes, local_to_coredata)

SERIES_PER_STUDY = 5
IMAGES_PER_SERIES = 20
MODALITY_MIX = ("CT", "MR", "CT", "MR", "CT", "US", "CR", "MG", "PT\\CT", "RTSTRUCT")
ANNOTATIONS_ID, ANNOTATIONS_NAME = HOROS_SR_SERIES["annotations"]
SR_FILE_BYTES = 700        # about what Horos writes for a few comments and key images


def is_annotated(pk, fraction):
    """Whether study `pk` is one of the annotated `fraction`: a multiplicative hash of
    its key, so the choice is spread over the modality mix (which follows pk % 10) and
    does not depend on the random dates."""
    return fraction > 0 and (pk * 2654435761) % 2**32 < fraction * 2**32


def build_library(pacs_root, studies, seed=5, annotated_fraction=0.0, sr_files=True):
    """Create <pacs_root>/Database/Horos Data/Database.sql (no image files; with
    annotated_fraction > 0 and sr_files, the annotations SR files only). A library
    already there is reused; it must have been built with the same annotated_fraction
    being zero or not (ValueError otherwise: give each its own pacs_root)."""
    import datetime as dt
    horos = os.path.join(pacs_root, "Database", "Horos Data")
    os.makedirs(os.path.join(horos, "INCOMING.noindex"), exist_ok=True)
    open(os.path.join(pacs_root, ".pacs_sentinel"), "w").close()
    db = os.path.join(horos, "Database.sql")
    if os.path.exists(db):
        check_annotated(db, annotated_fraction)
        return db
    partial = db + ".building"
    if os.path.exists(partial):
        os.remove(partial)
    rng = random.Random(seed)
    conn = sqlite3.connect(partial)
    conn.execute("PRAGMA journal_mode = OFF")      # fast build; DELETE set at the end
    conn.execute("PRAGMA synchronous = OFF")
    conn.executescript(SCHEMA)
    base = dt.datetime(2008, 1, 1)
    added = local_to_coredata(dt.datetime(2024, 1, 1))
    edited = local_to_coredata(dt.datetime(2024, 2, 1))
    database_dir = os.path.join(horos, "DATABASE.noindex")
    series_pk = image_pk = 0
    study_rows, series_rows, image_rows = [], [], []
    sr_series_rows, sr_image_rows, sr_paths = [], [], []
    for pk in range(1, studies + 1):
        when = local_to_coredata(base + dt.timedelta(minutes=rng.randrange(16 * 365 * 1440)))
        modality = MODALITY_MIX[pk % len(MODALITY_MIX)]
        annotated = is_annotated(pk, annotated_fraction)
        study_rows.append((pk, 5, 1, "1.2.826.0.1.3680043.10.%d" % pk,
                           "PATIENT^%05d" % (pk % 40000), "ID%07d" % pk,
                           local_to_coredata(dt.date(1930 + pk % 80, 1 + pk % 12, 1)),
                           when, added, modality, "ACC%d" % pk, "STUDY %d" % pk,
                           SERIES_PER_STUDY * IMAGES_PER_SERIES,
                           "Reviewed %d" % pk if annotated else None,
                           1 + pk % 4 if annotated else None))
        for number in range(1, SERIES_PER_STUDY + 1):
            series_pk += 1
            series_rows.append((series_pk, 4, 1, pk, modality.split("\\")[0], number,
                                "1.2.826.0.1.3680043.10.%d.%d" % (pk, number),
                                "Series %d" % number, added, IMAGES_PER_SERIES))
            for instance in range(1, IMAGES_PER_SERIES + 1):
                image_pk += 1
                key = 1 if annotated and number == 1 and instance == 1 else None
                image_rows.append((image_pk, 2, 1, series_pk, image_pk, instance, 1, 0, 1,
                                   key))
        if annotated:
            series_pk += 1
            image_pk += 1
            sr_series_rows.append((series_pk, 4, 2, pk, "SR", ANNOTATIONS_ID,
                                   ANNOTATIONS_NAME, ANNOTATIONS_NAME,
                                   DCMTK_SERIES_UID_ROOT + "%d.%d" % (pk, image_pk),
                                   BASIC_TEXT_SR, edited, edited, 0))
            sr_image_rows.append((image_pk, 2, 1, series_pk, image_pk, 0, 1, 1, "SR", 1,
                                  edited))
            if sr_files:
                sr_paths.append((pk, database_path_for_number(database_dir, image_pk,
                                                              FOLDER_SIZE)))
        if len(image_rows) >= 200000:
            flush(conn, study_rows, series_rows, image_rows, sr_series_rows, sr_image_rows)
    flush(conn, study_rows, series_rows, image_rows, sr_series_rows, sr_image_rows)
    conn.executemany("INSERT INTO Z_PRIMARYKEY (Z_ENT, Z_NAME, Z_SUPER, Z_MAX) "
                     "VALUES (?, ?, 0, 0)", [(e, n) for n, e in ENTITIES.items()])
    conn.commit()
    conn.execute("PRAGMA journal_mode = DELETE")   # as Horos keeps it
    conn.close()
    write_sr_files(sr_paths)
    os.replace(partial, db)
    return db


def write_sr_files(sr_paths):
    """The annotations SR files: small, each with its own content."""
    made = set()
    for pk, path in sr_paths:
        folder = os.path.dirname(path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        with open(path, "wb") as handle:
            handle.write(fake_sr_bytes("annotations", {"comment": "Reviewed %d" % pk,
                                                       "stateText": 1 + pk % 4},
                                       SR_FILE_BYTES))


def check_annotated(db, annotated_fraction):
    """A library reused for another annotated_fraction would measure the wrong thing."""
    conn = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(db)),
                           uri=True)
    try:
        has = conn.execute("SELECT 1 FROM ZSERIES WHERE ZID = ? LIMIT 1",
                           (ANNOTATIONS_ID,)).fetchone() is not None
    finally:
        conn.close()
    if has != (annotated_fraction > 0):
        raise ValueError("%s was built %s annotated studies; use another folder for "
                         "annotated_fraction=%s" % (db, "with" if has else "without",
                                                    annotated_fraction))


def flush(conn, study_rows, series_rows, image_rows, sr_series_rows=(), sr_image_rows=()):
    # ZCOMMENT, ZSTATETEXT and ZSTOREDISKEYIMAGE are NULL but for annotated studies:
    # the same rows as before they were listed.
    conn.executemany(
        "INSERT INTO ZSTUDY (Z_PK, Z_ENT, Z_OPT, ZSTUDYINSTANCEUID, ZNAME, ZPATIENTID, "
        "ZDATEOFBIRTH, ZDATE, ZDATEADDED, ZMODALITY, ZACCESSIONNUMBER, ZSTUDYNAME, "
        "ZNUMBEROFIMAGES, ZCOMMENT, ZSTATETEXT) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        study_rows)
    conn.executemany(
        "INSERT INTO ZSERIES (Z_PK, Z_ENT, Z_OPT, ZSTUDY, ZMODALITY, ZID, ZSERIESINSTANCEUID, "
        "ZSERIESDESCRIPTION, ZDATEADDED, ZNUMBEROFIMAGES) VALUES (?,?,?,?,?,?,?,?,?,?)",
        series_rows)
    conn.executemany(
        "INSERT INTO ZIMAGE (Z_PK, Z_ENT, Z_OPT, ZSERIES, ZPATHNUMBER, ZINSTANCENUMBER, "
        "ZSTOREDINDATABASEFOLDER, ZFRAMEID, ZSTOREDNUMBEROFFRAMES, ZSTOREDISKEYIMAGE) "
        "VALUES (?,?,?,?,?,?,?,?,?,?)", image_rows)
    # Horos's own annotations SR: the series named and numbered as DicomStudy.m finds it
    # (ZSERIESINSTANCEUID is the name itself, DicomDatabase.mm), its file's row.
    conn.executemany(
        "INSERT INTO ZSERIES (Z_PK, Z_ENT, Z_OPT, ZSTUDY, ZMODALITY, ZID, ZNAME, "
        "ZSERIESINSTANCEUID, ZSERIESDICOMUID, ZSERIESSOPCLASSUID, ZDATE, ZDATEADDED, "
        "ZNUMBEROFIMAGES) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", sr_series_rows)
    conn.executemany(
        "INSERT INTO ZIMAGE (Z_PK, Z_ENT, Z_OPT, ZSERIES, ZPATHNUMBER, ZINSTANCENUMBER, "
        "ZSTOREDINDATABASEFOLDER, ZSTOREDNUMBEROFFRAMES, ZSTOREDMODALITY, "
        "ZGENERATEDBYOSIRIX, ZDATE) VALUES (?,?,?,?,?,?,?,?,?,?,?)", sr_image_rows)
    for rows in (study_rows, series_rows, image_rows, sr_series_rows, sr_image_rows):
        if isinstance(rows, list):
            rows.clear()


def exported_state(pacs_root):
    """A state in which every study of the library is exported and freshly verified:
    what an idle cycle and `status` see once the backlog is done. The SR files of Horos's
    own series in those studies are watched, with their size and mtime now, as a cycle
    records them at export: an idle cycle's edit check stats every one of them."""
    import horos_backup_export as hbe
    backup = os.path.join(pacs_root, "Backup")
    shutil.rmtree(backup, ignore_errors=True)
    os.makedirs(os.path.join(backup, ".tmp"))
    horos = os.path.join(pacs_root, "Database", "Horos Data")
    db = os.path.join(horos, "Database.sql")
    with hbe.open_horos_reader(db, 30) as reader:
        studies = hbe.read_candidates(reader)
        top = reader.image_high_water()
    state = hbe.ExportState(os.path.join(backup, "export_state.sqlite"))
    now = hbe.utc_iso(time.time())
    wanted = hbe.wanted_modalities(hbe.MODS)
    exported = [s for s in studies if hbe.is_eligible(s.modalities, wanted)]
    watched = sr_files_of(db, os.path.join(horos, "DATABASE.noindex"),
                          {s.uid for s in exported})
    with state.transaction() as db_conn:
        db_conn.executemany(hbe.UPSERT_EXPORTED_SQL, [{
            "study_uid": s.uid, "zip_path": "2020_01/%s.zip" % s.uid, "zip_bytes": 1,
            "file_count": 100, "missing_count": 0, "source_bytes": 1,
            "fingerprint": s.fingerprint, "base_fingerprint": s.base_fingerprint,
            "study_date": None, "month": "2020_01", "patient_name": "P", "modalities": "CT",
            "exported_at": now, "verified_at": now} for s in exported])
        # The find fields, as this version records them with each export: without them
        # the idle cycle would measure the one-time backfill of an upgraded backup.
        db_conn.executemany(hbe.SET_SEARCH_FIELDS_SQL, [{
            "study_uid": s.uid, "patient_id": "ID", "accession_number": "A",
            "birth_date": None} for s in exported])
        db_conn.executemany(hbe.WATCH_SR_FILE_SQL, watched)
        db_conn.execute(hbe.SET_META_SQL, (hbe.META_IMAGE_HIGH_WATER, str(top)))
    state.close()
    return len(exported), len(watched)


def sr_files_of(db, database_dir, uids):
    """(study_uid, path, size, mtime_ns) of the files of Horos's own SR series in those
    studies (found by ZID, name and SOP class, as the script does), as they are now."""
    conn = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(db)),
                           uri=True)
    try:
        rows = conn.execute(
            "SELECT st.ZSTUDYINSTANCEUID, im.ZPATHNUMBER FROM ZSERIES AS se"
            " JOIN ZSTUDY AS st ON st.Z_PK = se.ZSTUDY"
            " JOIN ZIMAGE AS im ON im.ZSERIES = se.Z_PK"
            " WHERE se.ZID IN (?, ?, ?) AND se.ZNAME IN (?, ?, ?)"
            " AND se.ZSERIESSOPCLASSUID LIKE ?",
            [number for number, _name in HOROS_SR_SERIES.values()]
            + [name for _number, name in HOROS_SR_SERIES.values()]
            + [SR_SOP_CLASS_PREFIX + "%"]).fetchall()
    finally:
        conn.close()
    watched = []
    for uid, number in rows:
        if uid not in uids:
            continue
        path = database_path_for_number(database_dir, number, FOLDER_SIZE)
        if os.path.exists(path):
            st = os.stat(path)
            watched.append((uid, path, st.st_size, st.st_mtime_ns))
    return watched
