"""Database-only Horos libraries at scale: 5,000 to 150,000 studies, 5 series each,
20 images per series (50,000 studies = 250,000 series = 5,000,000 images), built with
the fake library's schema (tests/fake_horos.py) and Horos's rollback journal."""

import os
import random
import sqlite3
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from fake_horos import ENTITIES, SCHEMA, local_to_coredata  # noqa: E402

SERIES_PER_STUDY = 5
IMAGES_PER_SERIES = 20
MODALITY_MIX = ("CT", "MR", "CT", "MR", "CT", "US", "CR", "MG", "PT\\CT", "RTSTRUCT")


def build_library(pacs_root, studies, seed=5):
    """Create <pacs_root>/Database/Horos Data/Database.sql (no image files)."""
    import datetime as dt
    horos = os.path.join(pacs_root, "Database", "Horos Data")
    os.makedirs(os.path.join(horos, "INCOMING.noindex"), exist_ok=True)
    open(os.path.join(pacs_root, ".pacs_sentinel"), "w").close()
    db = os.path.join(horos, "Database.sql")
    if os.path.exists(db):
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
    series_pk = image_pk = 0
    study_rows, series_rows, image_rows = [], [], []
    for pk in range(1, studies + 1):
        when = local_to_coredata(base + dt.timedelta(minutes=rng.randrange(16 * 365 * 1440)))
        modality = MODALITY_MIX[pk % len(MODALITY_MIX)]
        study_rows.append((pk, 5, 1, "1.2.826.0.1.3680043.10.%d" % pk,
                           "PATIENT^%05d" % (pk % 40000), "ID%07d" % pk,
                           local_to_coredata(dt.date(1930 + pk % 80, 1 + pk % 12, 1)),
                           when, added, modality, "ACC%d" % pk, "STUDY %d" % pk,
                           SERIES_PER_STUDY * IMAGES_PER_SERIES))
        for number in range(1, SERIES_PER_STUDY + 1):
            series_pk += 1
            series_rows.append((series_pk, 4, 1, pk, modality.split("\\")[0], number,
                                "1.2.826.0.1.3680043.10.%d.%d" % (pk, number),
                                "Series %d" % number, added, IMAGES_PER_SERIES))
            for instance in range(1, IMAGES_PER_SERIES + 1):
                image_pk += 1
                image_rows.append((image_pk, 2, 1, series_pk, image_pk, instance, 1, 0, 1))
        if len(image_rows) >= 200000:
            flush(conn, study_rows, series_rows, image_rows)
    flush(conn, study_rows, series_rows, image_rows)
    conn.executemany("INSERT INTO Z_PRIMARYKEY (Z_ENT, Z_NAME, Z_SUPER, Z_MAX) "
                     "VALUES (?, ?, 0, 0)", [(e, n) for n, e in ENTITIES.items()])
    conn.commit()
    conn.execute("PRAGMA journal_mode = DELETE")   # as Horos keeps it
    conn.close()
    os.replace(partial, db)
    return db


def flush(conn, study_rows, series_rows, image_rows):
    conn.executemany(
        "INSERT INTO ZSTUDY (Z_PK, Z_ENT, Z_OPT, ZSTUDYINSTANCEUID, ZNAME, ZPATIENTID, "
        "ZDATEOFBIRTH, ZDATE, ZDATEADDED, ZMODALITY, ZACCESSIONNUMBER, ZSTUDYNAME, "
        "ZNUMBEROFIMAGES) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", study_rows)
    conn.executemany(
        "INSERT INTO ZSERIES (Z_PK, Z_ENT, Z_OPT, ZSTUDY, ZMODALITY, ZID, ZSERIESINSTANCEUID, "
        "ZSERIESDESCRIPTION, ZDATEADDED, ZNUMBEROFIMAGES) VALUES (?,?,?,?,?,?,?,?,?,?)",
        series_rows)
    conn.executemany(
        "INSERT INTO ZIMAGE (Z_PK, Z_ENT, Z_OPT, ZSERIES, ZPATHNUMBER, ZINSTANCENUMBER, "
        "ZSTOREDINDATABASEFOLDER, ZFRAMEID, ZSTOREDNUMBEROFFRAMES) VALUES (?,?,?,?,?,?,?,?,?)",
        image_rows)
    study_rows.clear()
    series_rows.clear()
    image_rows.clear()
