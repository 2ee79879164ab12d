"""A fake Horos library, shaped like the real one (see ../shared/horos-library.md).

Used by the tests, and on its own so a newcomer can try the tool:

    python3 tests/fake_horos.py /tmp/horos-demo

builds `/tmp/horos-demo/.pacs_sentinel` and `/tmp/horos-demo/Database/Horos Data/`
with a sample of studies that covers what a real library holds: files copied into
the database (ZPATHNUMBER, ZPATHSTRING NULL) on both sides of a 10000-file folder
boundary, files added in place (absolute ZPATHSTRING), relative ZPATHSTRING
(encapsulated PDFs), multi-frame rows, SR/PR/KO series, RT-only, ultrasound and
OCT studies that are not CT or MR, hostile and accented names, dates stored as
Core Data seconds in local time, and two ZSTUDY rows sharing one StudyInstanceUID.
"""

import argparse
import datetime as dt
import hashlib
import os
import plistlib
import sqlite3
import sys
import time

COREDATA_EPOCH_OFFSET = 978307200  # 2001-01-01 00:00:00 UTC in Unix time
FOLDER_SIZE = 10000  # Horos preference DefaultFolderSizeForDB
HOROS_PREFS_PATH = os.path.join("Library", "Preferences", "org.horosproject.horos.plist")

# Core Data entity numbers as Z_PRIMARYKEY lists them (alphabetical, as Core Data does).
ENTITIES = {"Album": 1, "Image": 2, "LogEntry": 3, "Series": 4, "Study": 5}

# Column lists follow Horos's OsiriXDB_DataModel: Core Data prefixes every attribute with
# Z, upper-cases it, and types dates as TIMESTAMP (REAL seconds since 2001).
SCHEMA = """
CREATE TABLE ZALBUM ( Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER,
  ZINDEX INTEGER, ZSMARTALBUM INTEGER, ZNAME VARCHAR, ZPREDICATESTRING VARCHAR );
CREATE TABLE Z_1STUDIES ( Z_1ALBUMS INTEGER, Z_5STUDIES INTEGER,
  PRIMARY KEY (Z_1ALBUMS, Z_5STUDIES) );
CREATE INDEX Z_1STUDIES_Z_5STUDIES_INDEX ON Z_1STUDIES (Z_5STUDIES, Z_1ALBUMS);
CREATE TABLE ZLOGENTRY ( Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER,
  ZCURRENTIMAGE INTEGER, ZNUMBEROFIMAGES INTEGER, ZENDTIME TIMESTAMP, ZSTARTTIME TIMESTAMP,
  ZMESSAGE VARCHAR, ZORIGINNAME VARCHAR, ZPATIENTNAME VARCHAR, ZSTUDYNAME VARCHAR, ZTYPE VARCHAR );
CREATE TABLE ZSTUDY ( Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER,
  ZEXPANDED INTEGER, ZHASDICOM INTEGER, ZLOCKEDSTUDY INTEGER, ZNUMBEROFIMAGES INTEGER,
  ZSTATETEXT INTEGER, ZDATE TIMESTAMP, ZDATEADDED TIMESTAMP, ZDATEOFBIRTH TIMESTAMP,
  ZDATEOPENED TIMESTAMP, ZACCESSIONNUMBER VARCHAR, ZCOMMENT VARCHAR, ZCOMMENT2 VARCHAR,
  ZCOMMENT3 VARCHAR, ZCOMMENT4 VARCHAR, ZDICTATEURL VARCHAR, ZID VARCHAR,
  ZINSTITUTIONNAME VARCHAR, ZMODALITY VARCHAR, ZNAME VARCHAR, ZPATIENTID VARCHAR,
  ZPATIENTSEX VARCHAR, ZPATIENTUID VARCHAR, ZPERFORMINGPHYSICIAN VARCHAR,
  ZREFERRINGPHYSICIAN VARCHAR, ZREPORTURL VARCHAR, ZSTUDYINSTANCEUID VARCHAR,
  ZSTUDYNAME VARCHAR, ZWINDOWSSTATE BLOB );
CREATE TABLE ZSERIES ( Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER,
  ZDISPLAYSTYLE INTEGER, ZID INTEGER, ZMOUNTEDVOLUME INTEGER, ZNUMBEROFIMAGES INTEGER,
  ZNUMBEROFKEYIMAGES INTEGER, ZROTATIONANGLE INTEGER, ZSCALE INTEGER, ZSTATETEXT INTEGER,
  ZSTUDY INTEGER, ZXFLIPPED INTEGER, ZXOFFSET INTEGER, ZYFLIPPED INTEGER, ZYOFFSET INTEGER,
  ZDATE TIMESTAMP, ZDATEADDED TIMESTAMP, ZDATEOPENED TIMESTAMP, ZWINDOWLEVEL FLOAT,
  ZWINDOWWIDTH FLOAT, ZCOMMENT VARCHAR, ZCOMMENT2 VARCHAR, ZCOMMENT3 VARCHAR,
  ZCOMMENT4 VARCHAR, ZMODALITY VARCHAR, ZNAME VARCHAR, ZSERIESDESCRIPTION VARCHAR,
  ZSERIESDICOMUID VARCHAR, ZSERIESINSTANCEUID VARCHAR, ZSERIESSOPCLASSUID VARCHAR,
  ZTHUMBNAIL BLOB );
CREATE INDEX ZSERIES_ZSTUDY_INDEX ON ZSERIES (ZSTUDY);
CREATE TABLE ZIMAGE ( Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER,
  ZFRAMEID INTEGER, ZINSTANCENUMBER INTEGER, ZPATHNUMBER INTEGER, ZSERIES INTEGER,
  ZSTOREDHEIGHT INTEGER, ZSTOREDINDATABASEFOLDER INTEGER, ZSTOREDISKEYIMAGE INTEGER,
  ZSTOREDNUMBEROFFRAMES INTEGER, ZSTOREDNUMBEROFSERIES INTEGER, ZSTOREDWIDTH INTEGER,
  ZDATE TIMESTAMP, ZSLICELOCATION FLOAT, ZCOMMENT VARCHAR, ZPATHSTRING VARCHAR,
  ZSTOREDEXTENSION VARCHAR, ZSTOREDMODALITY VARCHAR, ZCOMPRESSEDSOPINSTANCEUID BLOB );
CREATE INDEX ZIMAGE_ZSERIES_INDEX ON ZIMAGE (ZSERIES);
CREATE TABLE Z_PRIMARYKEY (Z_ENT INTEGER PRIMARY KEY, Z_NAME VARCHAR, Z_SUPER INTEGER,
  Z_MAX INTEGER);
CREATE TABLE Z_METADATA (Z_VERSION INTEGER PRIMARY KEY, Z_UUID VARCHAR(255), Z_PLIST BLOB);
CREATE TABLE Z_MODELCACHE (Z_CONTENT BLOB);
"""


def local_to_coredata(moment):
    """Core Data seconds for a naive local datetime or date, as Horos stores DICOM dates."""
    if moment is None:
        return None
    if isinstance(moment, dt.date) and not isinstance(moment, dt.datetime):
        moment = dt.datetime(moment.year, moment.month, moment.day)
    return time.mktime(moment.timetuple()) + moment.microsecond / 1e6 - COREDATA_EPOCH_OFFSET


def database_path_for_number(database_dir, number, folder_size=FOLDER_SIZE):
    """Where Horos keeps DATABASE.noindex file number N (DicomImage.m)."""
    folder = (number // folder_size + 1) * folder_size
    return os.path.join(database_dir, str(folder), "%d.dcm" % number)


def write_horos_preferences(values, home=None, path=None):
    """Horos's settings as macOS keeps them: a binary plist, at
    HOME/Library/Preferences/org.horosproject.horos.plist or at `path`. Values go in as
    given, so a test can store numbers, strings ("1024", "-10") or booleans, as Horos's
    settings window does. Returns the path."""
    if path is None:
        path = os.path.join(home, HOROS_PREFS_PATH)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        plistlib.dump(dict(values), handle, fmt=plistlib.FMT_BINARY)
    return path


def fake_dicom_bytes(seed, size):
    """A DICOM-looking file: preamble, DICM magic, then bytes unique to `seed`."""
    head = b"\0" * 128 + b"DICM" + ("fake:%s;" % seed).encode("utf-8", "surrogateescape")
    body = bytearray()
    block = hashlib.sha256(head).digest()
    while len(head) + len(body) < size:
        block = hashlib.sha256(block).digest()
        body += block
    return bytes((head + bytes(body))[:max(size, len(head))])


class FakeHorosLibrary:
    """Builds `<pacs_root>/Database/Horos Data` the way Horos lays it out."""

    def __init__(self, pacs_root, sentinel=True, folder_size=FOLDER_SIZE):
        self.pacs_root = os.path.abspath(pacs_root)
        self.horos_data = os.path.join(self.pacs_root, "Database", "Horos Data")
        self.db_path = os.path.join(self.horos_data, "Database.sql")
        self.database_dir = os.path.join(self.horos_data, "DATABASE.noindex")
        self.incoming_dir = os.path.join(self.horos_data, "INCOMING.noindex")
        self.in_place_dir = os.path.join(self.pacs_root, "InPlace")
        self.folder_size = folder_size
        for sub in ("DATABASE.noindex", "INCOMING.noindex", "REPORTS", "TEMP.noindex",
                    "DECOMPRESSION.noindex", "TOBEINDEXED.noindex"):
            os.makedirs(os.path.join(self.horos_data, sub), exist_ok=True)
        if sentinel:
            open(os.path.join(self.pacs_root, ".pacs_sentinel"), "w").close()
        fresh = not os.path.exists(self.db_path)
        self.conn = sqlite3.connect(self.db_path)
        if fresh:
            self.conn.execute("PRAGMA journal_mode = DELETE")
            self.conn.executescript(SCHEMA)
            self.conn.executemany(
                "INSERT INTO Z_PRIMARYKEY (Z_ENT, Z_NAME, Z_SUPER, Z_MAX) VALUES (?, ?, 0, 0)",
                [(ent, name) for name, ent in ENTITIES.items()])
            self.conn.execute(
                "INSERT INTO Z_METADATA (Z_VERSION, Z_UUID, Z_PLIST) VALUES (1, ?, ?)",
                ("FAKE-HOROS-0001", b"bplist00"))
            self.conn.commit()
        # The truth the tests check ZIPs against: StudyInstanceUID -> files created.
        self.study_files = {}
        self.next_path_number = 1 + (self.conn.execute(
            "SELECT COALESCE(MAX(ZPATHNUMBER), 0) FROM ZIMAGE").fetchone()[0])

    # -- rows ---------------------------------------------------------------------------
    def _insert(self, table, entity, values):
        values = dict(values, Z_ENT=ENTITIES[entity], Z_OPT=1)
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        cur = self.conn.execute(
            "INSERT INTO %s (%s) VALUES (%s)" % (table, columns, marks), list(values.values()))
        self.conn.execute("UPDATE Z_PRIMARYKEY SET Z_MAX = MAX(Z_MAX, ?) WHERE Z_ENT = ?",
                          (cur.lastrowid, ENTITIES[entity]))
        return cur.lastrowid

    def add_study(self, uid, patient="DOE^JOHN", patient_id="PID0001", birth=None,
                  study_date=None, date_added=None, modality=None, accession="ACC1",
                  description="", raw_date=False):
        """One ZSTUDY row. Dates are naive local datetimes/dates (as Horos reads DICOM);
        raw_date=True stores `study_date`/`birth` as given (to inject odd values)."""
        if date_added is None:
            date_added = dt.datetime.now() - dt.timedelta(days=2)
        convert = (lambda v: v) if raw_date else local_to_coredata
        return self._insert("ZSTUDY", "Study", {
            "ZSTUDYINSTANCEUID": uid, "ZNAME": patient, "ZPATIENTID": patient_id,
            "ZDATEOFBIRTH": convert(birth), "ZDATE": convert(study_date),
            "ZDATEADDED": local_to_coredata(date_added), "ZMODALITY": modality,
            "ZACCESSIONNUMBER": accession, "ZSTUDYNAME": description, "ZID": "1",
            "ZNUMBEROFIMAGES": 0, "ZHASDICOM": 1, "ZPATIENTSEX": "O",
            "ZPATIENTUID": (patient or "").upper() + (patient_id or ""),
            "ZINSTITUTIONNAME": "FAKE HOSPITAL", "ZWINDOWSSTATE": None})

    def add_series(self, study_pk, modality="CT", description="", number=1, uid=None,
                   date_added=None, sop_class="1.2.840.10008.5.1.4.1.1.2"):
        uid = uid or "1.2.826.0.1.3680043.2.1125.%d.%d" % (study_pk, number)
        if date_added is None:
            date_added = dt.datetime.now() - dt.timedelta(days=2)
        return self._insert("ZSERIES", "Series", {
            "ZSTUDY": study_pk, "ZMODALITY": modality, "ZSERIESDESCRIPTION": description,
            "ZNAME": description, "ZID": number, "ZSERIESDICOMUID": uid,
            # Horos's seriesInstanceUID is derived from the DICOM UID (it may carry more).
            "ZSERIESINSTANCEUID": uid, "ZSERIESSOPCLASSUID": sop_class,
            "ZDATEADDED": local_to_coredata(date_added), "ZNUMBEROFIMAGES": 0,
            "ZTHUMBNAIL": b"\x89PNG fake"})

    def add_image(self, series_pk, storage="database", path_number=None, path_string=None,
                  size=4096, frames=1, content=None, create_file=True, instance=None,
                  mtime=None):
        """Adds `frames` ZIMAGE rows naming one file, writes the file, returns its path.

        storage: "database" (ZPATHNUMBER, ZPATHSTRING NULL), "relative" (ZPATHSTRING like
        `20005.pdf`, in DATABASE.noindex) or "absolute" (in place, outside the database).
        """
        if storage == "database":
            if path_number is None:
                path_number = self.next_path_number
            self.next_path_number = max(self.next_path_number, path_number + 1)
            path = database_path_for_number(self.database_dir, path_number, self.folder_size)
            stored_in_db, path_string_value = 1, None
        elif storage == "relative":
            stem = path_string.split(".")[0]
            number = int(stem) if stem.isdigit() else 0
            folder = (number // self.folder_size + 1) * self.folder_size
            path = os.path.join(self.database_dir, str(folder), path_string)
            stored_in_db, path_string_value, path_number = 1, path_string, None
        elif storage == "absolute":
            path = path_string
            stored_in_db, path_string_value, path_number = 0, path_string, None
        else:
            raise ValueError(storage)
        uid = self.conn.execute(
            "SELECT st.ZSTUDYINSTANCEUID FROM ZSERIES se JOIN ZSTUDY st ON st.Z_PK = se.ZSTUDY"
            " WHERE se.Z_PK = ?", (series_pk,)).fetchone()[0]
        self.study_files.setdefault(uid, set()).add(path)
        if create_file:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data = content if content is not None else fake_dicom_bytes(path, size)
            with open(path, "wb") as f:
                f.write(data)
            if mtime is not None:
                os.utime(path, (mtime, mtime))
        for frame in range(frames):
            self._insert("ZIMAGE", "Image", {
                "ZSERIES": series_pk, "ZPATHNUMBER": path_number,
                "ZPATHSTRING": path_string_value, "ZSTOREDINDATABASEFOLDER": stored_in_db,
                "ZSTOREDEXTENSION": os.path.splitext(path)[1].lstrip(".") or "dcm",
                "ZINSTANCENUMBER": instance if instance is not None else frame + 1,
                "ZFRAMEID": frame, "ZSTOREDNUMBEROFFRAMES": frames,
                "ZSTOREDMODALITY": None, "ZCOMPRESSEDSOPINSTANCEUID": b"\x01\x02"})
        return path

    def mark_added(self, series_pk, when=None):
        """What Horos does for every file it imports (but its own SRs): the series and
        its study get dateAdded = now (DicomDatabase.mm)."""
        stamp = local_to_coredata(when or dt.datetime.now())
        self.conn.execute("UPDATE ZSERIES SET ZDATEADDED = ? WHERE Z_PK = ?", (stamp, series_pk))
        self.conn.execute("UPDATE ZSTUDY SET ZDATEADDED = ? WHERE Z_PK = "
                          "(SELECT ZSTUDY FROM ZSERIES WHERE Z_PK = ?)", (stamp, series_pk))

    def add_simple_study(self, uid, modality="CT", images=3, study_date=None, size=2048,
                         series=1, **study_fields):
        """A study with `series` series of `images` database files each; returns its pk."""
        pk = self.add_study(uid, study_date=study_date, **study_fields)
        for number in range(1, series + 1):
            se = self.add_series(pk, modality=modality, description="Series %d" % number,
                                 number=number)
            for _ in range(images):
                self.add_image(se, size=size)
        return pk

    def finish(self, summarize=True):
        """Fill the counts and study modality summary Horos maintains, and commit.

        As DicomSeries.m/DicomStudy.m do: an SR series stores no count (NULL); a study's
        count skips SR and PR series; a count is negative when a series holds
        multi-frame objects. Studies created with an explicit `modality` keep it (to
        inject a stale or odd summary).
        """
        study_sums = {}
        for series_pk, study_pk, modality in self.conn.execute(
                "SELECT Z_PK, ZSTUDY, ZMODALITY FROM ZSERIES").fetchall():
            rows, multi_frame = self.conn.execute(
                "SELECT COUNT(*), MAX(ZSTOREDNUMBEROFFRAMES) > 1 FROM ZIMAGE WHERE ZSERIES = ?",
                (series_pk,)).fetchone()
            kind = (modality or "").strip().upper()
            count = None if kind == "SR" else (-rows if multi_frame else rows)
            self.conn.execute("UPDATE ZSERIES SET ZNUMBEROFIMAGES = ? WHERE Z_PK = ?",
                              (count, series_pk))
            total, frames = study_sums.get(study_pk, (0, False))
            if kind not in ("SR", "PR"):
                total += rows
            study_sums[study_pk] = (total, frames or bool(multi_frame))
        for study_pk, (total, frames) in study_sums.items():
            self.conn.execute("UPDATE ZSTUDY SET ZNUMBEROFIMAGES = ? WHERE Z_PK = ?",
                              (-total if frames else total, study_pk))
        if summarize:
            for pk, current in self.conn.execute(
                    "SELECT Z_PK, ZMODALITY FROM ZSTUDY").fetchall():
                if current is not None:
                    continue
                mods = [m.strip().upper() for (m,) in self.conn.execute(
                    "SELECT ZMODALITY FROM ZSERIES WHERE ZSTUDY = ? ORDER BY Z_PK", (pk,))
                    if m and m.strip()]
                summary = []
                for m in mods:
                    if m not in summary:
                        summary.append(m)
                # DicomStudy.m drops SR/PR/KO from the summary when anything else is present.
                kept = [m for m in summary if m not in ("SR", "PR", "KO")] or summary
                self.conn.execute("UPDATE ZSTUDY SET ZMODALITY = ? WHERE Z_PK = ?",
                                  ("\\".join(kept) or None, pk))
        self.conn.commit()

    def close(self):
        if self.conn is not None:
            self.conn.commit()
            self.conn.close()
            self.conn = None


def build_sample_library(pacs_root, folder_size=FOLDER_SIZE):
    """The sample library of the README's first command; returns the FakeHorosLibrary.

    Expected result: 14 studies are CT or MR and get exported; 4 are not (RT-only,
    ultrasound, OCT, SR-only). folder_size: Horos's DefaultFolderSizeForDB, which
    decides the DATABASE.noindex subfolder of every file.
    """
    lib = FakeHorosLibrary(pacs_root, folder_size=folder_size)
    day = dt.timedelta(days=1)
    # Near a month boundary: 2019-03-01 05:30 in Tokyo is 2019-02-28 in UTC.
    ct = lib.add_study("1.2.392.200036.9116.2.6.1.48.1215.1551385800.1", "YAMADA^TARO",
                       "P-1001", birth=dt.date(1950, 1, 1),
                       study_date=dt.datetime(2019, 3, 1, 5, 30), accession="A1001",
                       description="CT CHEST/ABDOMEN")
    s1 = lib.add_series(ct, "CT", "Topogram", 1)
    s2 = lib.add_series(ct, "CT", "Abdomen 3mm", 2)
    for n in (9998, 9999):
        lib.add_image(s1, path_number=n, size=3000)
    for n in (10000, 10001, 10002):
        lib.add_image(s2, path_number=n, size=5000)
    sr = lib.add_series(ct, "SR", "Dose Report", 900, sop_class="1.2.840.10008.5.1.4.1.1.88.67")
    lib.add_image(sr, path_number=20005, size=900)
    # An encapsulated PDF report: relative ZPATHSTRING inside DATABASE.noindex.
    doc = lib.add_series(ct, "DOC", "Report PDF", 901)
    lib.add_image(doc, storage="relative", path_string="20006.pdf", size=1500)

    mr = lib.add_study("1.3.12.2.1107.5.2.30.25245.30000019030112345678900000001",
                       "JOÃO^SÃO BENTO", "P-1002", birth=dt.date(1988, 7, 14),
                       study_date=dt.datetime(2019, 3, 15, 23, 10), accession="A1002",
                       description="MR BRAIN")
    t1 = lib.add_series(mr, " mr ", "T1 SAG", 1)  # padding and case, as some scanners send
    for _ in range(4):
        lib.add_image(t1, size=2500)
    # Multi-frame enhanced MR: one file, one ZIMAGE row per frame.
    mf = lib.add_series(mr, "MR", "DWI enhanced", 2)
    lib.add_image(mf, frames=12, size=20000)
    ko = lib.add_series(mr, "KO", "Key images", 3)
    lib.add_image(ko, size=700)
    pr = lib.add_series(mr, "PR", "Horos ROIs", 4)
    lib.add_image(pr, size=800)

    petct = lib.add_study("1.2.840.113619.2.55.3.2831164355.10.1553000000.1", "MULLER^JURGEN",
                          "P-1003", birth=dt.date(1961, 2, 28),
                          study_date=dt.datetime(2019, 4, 2, 8, 0), accession="A1003",
                          description="PET-CT WB")
    pt = lib.add_series(petct, "PT", "PET WB", 1)
    lib.add_image(pt, size=3300)
    lib.add_image(lib.add_series(petct, "CT", "CT AC", 2), size=3300)

    # Added in place (absolute ZPATHSTRING) from another folder, before 2001.
    inplace = lib.add_study("1.2.840.113704.1.111.2000.1", "O'BRIEN^ANNE-MARIE", "P-1004",
                            birth=dt.date(1940, 12, 31),
                            study_date=dt.datetime(1999, 12, 31, 22, 0),
                            accession="A1004", description="CT HEAD")
    ih = lib.add_series(inplace, "CT", "Head", 1)
    for i in range(3):
        lib.add_image(ih, storage="absolute",
                      path_string=os.path.join(lib.in_place_dir, "CD-1999", "IM%04d" % i),
                      size=1800)

    hostile = lib.add_study("1.2.3.4.5.6.7.8.9.666", "../../etc/passwd^<script>/x\\y", "../P",
                            birth=None, study_date=dt.datetime(2020, 1, 10, 9, 0),
                            accession="../../A", description="CT;rm -rf /")
    hs = lib.add_series(hostile, "CT", "../../../evil", 1)
    lib.add_image(hs, size=1200)

    long_name = "WOLFESCHLEGELSTEINHAUSENBERGERDORFF^" + "HUBERT" * 50
    long = lib.add_study("1.2.3.4.5.6.7.8.9.777", long_name, "P-1006",
                         birth=dt.date(1975, 5, 5), study_date=dt.datetime(2020, 1, 11, 9, 0),
                         description="MR KNEE")
    lib.add_image(lib.add_series(long, "MR", "PD FS", 1), size=1200)

    cjk = lib.add_study("1.2.3.4.5.6.7.8.9.888", "山田^太郎", "P-1007",
                        birth=dt.date(1990, 1, 1), study_date=dt.datetime(2020, 2, 29, 12, 0),
                        description="CT 胸部")
    lib.add_image(lib.add_series(cjk, "CT", "胸部", 1), size=1200)

    undated = lib.add_study("1.2.3.4.5.6.7.8.9.999", "NODATE^PAT", "P-1008", birth=None,
                            study_date=None, description="MR (date lost)")
    lib.add_image(lib.add_series(undated, "MR", "Scout", 1), size=1000)

    # Horos left the summary empty, but a series is CT.
    nosum = lib.add_study("1.2.3.4.5.6.7.8.9.1010", "EMPTY^SUMMARY", "P-1009",
                          study_date=dt.datetime(2020, 3, 1, 0, 30), modality="",
                          description="CT no summary")
    lib.add_image(lib.add_series(nosum, "CT", "Axial", 1), size=1000)

    # The same study received under two patient IDs: two ZSTUDY rows, one UID.
    for pid, series_uid in (("P-1010", "1.2.3.4.5.6.7.8.9.1111.1"),
                            ("P-1010B", "1.2.3.4.5.6.7.8.9.1111.2")):
        twin = lib.add_study("1.2.3.4.5.6.7.8.9.1111", "TWIN^PAT", pid,
                             study_date=dt.datetime(2020, 4, 4, 4, 4), description="CT twin")
        lib.add_image(lib.add_series(twin, "CT", "Axial " + pid, 1, uid=series_uid), size=1100)

    for i in range(4):
        lib.add_simple_study("1.2.3.4.5.6.7.8.10.%d" % i, "MR" if i % 2 else "CT", images=2,
                             patient="SMITH^PAT%d" % i, patient_id="P-20%02d" % i,
                             birth=dt.date(1970 + i, 1, 1),
                             study_date=dt.datetime(2021, 1 + i, 1, 1, 0) - day)

    # Not CT/MR: never exported.
    rt = lib.add_study("1.2.3.4.5.6.7.8.11.1", "RT^ONLY", "P-3001",
                       study_date=dt.datetime(2019, 5, 5, 10, 0))
    lib.add_image(lib.add_series(rt, "RTSTRUCT", "Structures", 1), size=500)
    lib.add_image(lib.add_series(rt, "RTPLAN", "Plan", 2), size=500)
    us = lib.add_study("1.2.3.4.5.6.7.8.11.2", "ULTRA^SOUND", "P-3002",
                       study_date=dt.datetime(2019, 5, 6, 10, 0))
    lib.add_image(lib.add_series(us, "US", "Abdomen", 1), size=500)
    oct_ = lib.add_study("1.2.3.4.5.6.7.8.11.3", "OPTICAL^COHERENCE", "P-3003",
                         study_date=dt.datetime(2019, 5, 7, 10, 0))
    lib.add_image(lib.add_series(oct_, "OCT", "Retina", 1), size=500)
    sr_only = lib.add_study("1.2.3.4.5.6.7.8.11.4", "REPORT^ONLY", "P-3004",
                            study_date=dt.datetime(2019, 5, 8, 10, 0))
    lib.add_image(lib.add_series(sr_only, "SR", "Report", 1), size=500)
    lib.finish()
    return lib


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build a sample Horos library.")
    parser.add_argument("pacs_root", help="folder that plays /Volumes/PACS")
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.pacs_root, "Database", "Horos Data", "Database.sql")):
        print("fake_horos: %s already holds a library; pick an empty folder" % args.pacs_root,
              file=sys.stderr)
        return 1
    lib = build_sample_library(args.pacs_root)
    lib.close()
    print("Sample Horos library at %s (Horos Data: %s)" % (lib.pacs_root, lib.horos_data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
