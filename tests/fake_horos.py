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

FakeHorosLibrary also does what Horos does to a library after the import, for the
tests of edits and departures: the reader's work (Horos's own SR series, comments,
status, key images, reports; `add_horos_sr`, `set_study_annotations` …), studies
leaving (`autoclean`, `delete_study`, `empty_library`) and coming back
(`reimport_study`), and a study of tens of thousands of images (`add_large_study`).
Each of them cites the Horos source it follows (github.com/horosproject/horos,
`Horos/Sources/...`).
"""

import argparse
import collections
import datetime as dt
import hashlib
import json
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
TABLES = {"Album": "ZALBUM", "Image": "ZIMAGE", "LogEntry": "ZLOGENTRY", "Series": "ZSERIES",
          "Study": "ZSTUDY"}

# Column lists follow Horos's Core Data model (Horos/Models/OsiriXDB_DataModel.xcdatamodeld/
# OsiriXDB_DataModel.xcdatamodel/elements, one version): Core Data prefixes every stored
# attribute with Z and upper-cases it, and types it by the attribute's type: Integer and
# Boolean as INTEGER, Float as FLOAT, String as VARCHAR, Date as TIMESTAMP (REAL seconds
# since 2001), Binary as BLOB. Transient attributes get no column (Series.mountedVolume,
# Image.importedFile). Every attribute marked indexed gets `Z<TABLE>_Z<COLUMN>_INDEX`, and
# every to-one relation its `Z<TABLE>_Z<RELATION>_INDEX`. Worth knowing for the features
# built on these tables:
# - ZIMAGE.ZGENERATEDBYOSIRIX (Image.generatedByOsiriX, Boolean) is an IMAGE column: 1 on
#   the rows of the SR files Horos writes itself, NULL on imported files
#   (DicomDatabase.mm sets it to nil unless the add was generatedByOsiriX).
# - ZSERIES.ZNUMBEROFKEYIMAGES exists in the model but no Horos source ever writes it
#   (DicomSeries.m only declares it): key images live in ZIMAGE.ZSTOREDISKEYIMAGE (1 or
#   NULL, DicomImage.m setIsKeyImage) alone.
# - ZSTUDY.ZSTATETEXT and ZSERIES.ZSTATETEXT are integers (0 empty, 1 unread, 2 reviewed,
#   3 dictated, 4 validated: BrowserController.m); a new study gets the model default 0.
#   ZIMAGE.ZSTATETEXT is a string and unused.
SCHEMA = """
CREATE TABLE ZALBUM ( Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER,
  ZINDEX INTEGER, ZSMARTALBUM INTEGER, ZNAME VARCHAR, ZPREDICATESTRING VARCHAR );
CREATE TABLE Z_1STUDIES ( Z_1ALBUMS INTEGER, Z_5STUDIES INTEGER,
  PRIMARY KEY (Z_1ALBUMS, Z_5STUDIES) );
CREATE INDEX Z_1STUDIES_Z_5STUDIES_INDEX ON Z_1STUDIES (Z_5STUDIES, Z_1ALBUMS);
CREATE TABLE ZLOGENTRY ( Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER,
  ZNUMBERERROR INTEGER, ZNUMBERIMAGES INTEGER, ZNUMBERPENDING INTEGER, ZNUMBERSENT INTEGER,
  ZENDTIME TIMESTAMP, ZSTARTTIME TIMESTAMP, ZDESTINATIONHOSTNAME VARCHAR,
  ZDESTINATIONNAME VARCHAR, ZDESTINATIONPORT VARCHAR, ZMESSAGE VARCHAR,
  ZORIGINHOSTNAME VARCHAR, ZORIGINNAME VARCHAR, ZORIGINPORT VARCHAR, ZPATIENTNAME VARCHAR,
  ZSTATUS VARCHAR, ZSTUDYNAME VARCHAR, ZTYPE VARCHAR );
CREATE TABLE ZSTUDY ( Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER,
  ZEXPANDED INTEGER, ZHASDICOM INTEGER, ZLOCKEDSTUDY INTEGER, ZNUMBEROFIMAGES INTEGER,
  ZSTATETEXT INTEGER, ZDATE TIMESTAMP, ZDATEADDED TIMESTAMP, ZDATEOFBIRTH TIMESTAMP,
  ZDATEOPENED TIMESTAMP, ZACCESSIONNUMBER VARCHAR, ZCOMMENT VARCHAR, ZCOMMENT2 VARCHAR,
  ZCOMMENT3 VARCHAR, ZCOMMENT4 VARCHAR, ZDICTATEURL VARCHAR, ZID VARCHAR,
  ZINSTITUTIONNAME VARCHAR, ZMODALITY VARCHAR, ZNAME VARCHAR, ZPATIENTID VARCHAR,
  ZPATIENTSEX VARCHAR, ZPATIENTUID VARCHAR, ZPERFORMINGPHYSICIAN VARCHAR,
  ZREFERRINGPHYSICIAN VARCHAR, ZREPORTURL VARCHAR, ZSTUDYINSTANCEUID VARCHAR,
  ZSTUDYNAME VARCHAR, ZWINDOWSSTATE BLOB );
CREATE INDEX ZSTUDY_ZACCESSIONNUMBER_INDEX ON ZSTUDY (ZACCESSIONNUMBER);
CREATE INDEX ZSTUDY_ZCOMMENT_INDEX ON ZSTUDY (ZCOMMENT);
CREATE INDEX ZSTUDY_ZDATE_INDEX ON ZSTUDY (ZDATE);
CREATE INDEX ZSTUDY_ZID_INDEX ON ZSTUDY (ZID);
CREATE INDEX ZSTUDY_ZMODALITY_INDEX ON ZSTUDY (ZMODALITY);
CREATE INDEX ZSTUDY_ZNAME_INDEX ON ZSTUDY (ZNAME);
CREATE INDEX ZSTUDY_ZPATIENTID_INDEX ON ZSTUDY (ZPATIENTID);
CREATE INDEX ZSTUDY_ZPATIENTUID_INDEX ON ZSTUDY (ZPATIENTUID);
CREATE INDEX ZSTUDY_ZSTUDYINSTANCEUID_INDEX ON ZSTUDY (ZSTUDYINSTANCEUID);
CREATE INDEX ZSTUDY_ZSTUDYNAME_INDEX ON ZSTUDY (ZSTUDYNAME);
CREATE TABLE ZSERIES ( Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER,
  ZDISPLAYSTYLE INTEGER, ZID INTEGER, ZKEYSERIES INTEGER, ZNUMBEROFIMAGES INTEGER,
  ZNUMBEROFKEYIMAGES INTEGER, ZSTATETEXT INTEGER, ZSTUDY INTEGER, ZXFLIPPED INTEGER,
  ZYFLIPPED INTEGER, ZDATE TIMESTAMP, ZDATEADDED TIMESTAMP, ZDATEOPENED TIMESTAMP,
  ZROTATIONANGLE FLOAT, ZSCALE FLOAT, ZWINDOWLEVEL FLOAT, ZWINDOWWIDTH FLOAT,
  ZXOFFSET FLOAT, ZYOFFSET FLOAT, ZCOMMENT VARCHAR, ZCOMMENT2 VARCHAR, ZCOMMENT3 VARCHAR,
  ZCOMMENT4 VARCHAR, ZMODALITY VARCHAR, ZNAME VARCHAR, ZSERIESDESCRIPTION VARCHAR,
  ZSERIESDICOMUID VARCHAR, ZSERIESINSTANCEUID VARCHAR, ZSERIESSOPCLASSUID VARCHAR,
  ZTHUMBNAIL BLOB );
CREATE INDEX ZSERIES_ZID_INDEX ON ZSERIES (ZID);
CREATE INDEX ZSERIES_ZMODALITY_INDEX ON ZSERIES (ZMODALITY);
CREATE INDEX ZSERIES_ZSERIESDICOMUID_INDEX ON ZSERIES (ZSERIESDICOMUID);
CREATE INDEX ZSERIES_ZSERIESINSTANCEUID_INDEX ON ZSERIES (ZSERIESINSTANCEUID);
CREATE INDEX ZSERIES_ZSTUDY_INDEX ON ZSERIES (ZSTUDY);
CREATE TABLE ZIMAGE ( Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER,
  ZFRAMEID INTEGER, ZGENERATEDBYOSIRIX INTEGER, ZINSTANCENUMBER INTEGER, ZPATHNUMBER INTEGER,
  ZSERIES INTEGER, ZSTOREDHEIGHT INTEGER, ZSTOREDINDATABASEFOLDER INTEGER,
  ZSTOREDISKEYIMAGE INTEGER, ZSTOREDMOUNTEDVOLUME INTEGER, ZSTOREDNUMBEROFFRAMES INTEGER,
  ZSTOREDNUMBEROFSERIES INTEGER, ZSTOREDWIDTH INTEGER, ZXFLIPPED INTEGER, ZYFLIPPED INTEGER,
  ZDATE TIMESTAMP, ZROTATIONANGLE FLOAT, ZSCALE FLOAT, ZSLICELOCATION FLOAT,
  ZWINDOWLEVEL FLOAT, ZWINDOWWIDTH FLOAT, ZXOFFSET FLOAT, ZYOFFSET FLOAT, ZZOOM FLOAT,
  ZCOMMENT VARCHAR, ZCOMMENT2 VARCHAR, ZCOMMENT3 VARCHAR, ZCOMMENT4 VARCHAR,
  ZPATHSTRING VARCHAR, ZSTATETEXT VARCHAR, ZSTOREDEXTENSION VARCHAR, ZSTOREDFILETYPE VARCHAR,
  ZSTOREDMODALITY VARCHAR, ZCOMPRESSEDSOPINSTANCEUID BLOB );
CREATE INDEX ZIMAGE_ZSERIES_INDEX ON ZIMAGE (ZSERIES);
CREATE TABLE Z_PRIMARYKEY (Z_ENT INTEGER PRIMARY KEY, Z_NAME VARCHAR, Z_SUPER INTEGER,
  Z_MAX INTEGER);
CREATE TABLE Z_METADATA (Z_VERSION INTEGER PRIMARY KEY, Z_UUID VARCHAR(255), Z_PLIST BLOB);
CREATE TABLE Z_MODELCACHE (Z_CONTENT BLOB);
"""

# Horos's own SR series (DicomStudy.m roiSRSeries / reportSRSeries / annotationsSRImage find
# each by ZID, ZNAME and an SR ZSERIESSOPCLASSUID; SRAnnotation.mm writes the number and
# the description). kind -> (ZSERIES.ZID, ZSERIES.ZNAME).
HOROS_SR_SERIES = collections.OrderedDict([
    ("roi", (5002, "OsiriX ROI SR")),
    ("report", (5003, "OsiriX Report SR")),
    ("annotations", (5004, "OsiriX Annotations SR")),
])
# SRAnnotation.mm creates every one of them as DT_BasicTextSR: Basic Text SR storage.
# DCMAbstractSyntaxUID isStructuredReport: accepts any 1.2.840.10008.5.1.4.1.1.88.x.
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
# DCMTK (which SRAnnotation.mm uses) makes its UIDs under the OFFIS root.
DCMTK_SERIES_UID_ROOT = "1.2.276.0.7230010.3.1.3."
# DicomDatabase+Clean.mm: no study added less than 2 hours ago is deleted for space, and
# one pass deletes at most MAXSTUDYDELETE (50) + 1 studies; a pass runs every 15 min.
AUTOCLEAN_RECENT_SECONDS = 2 * 3600
AUTOCLEAN_MAX_PER_PASS = 51
KEEP = object()  # "leave this value as it is" for the set_* methods

# One of Horos's own SR files: its series, its ZIMAGE row, its path.
HorosSR = collections.namedtuple("HorosSR", "kind series_pk image_pk path")


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


def fake_sop_uid(seed):
    """A SOP Instance UID that depends on `seed` only (the fake stores it, uncompressed,
    in ZCOMPRESSEDSOPINSTANCEUID; Horos packs it, DicomImage.m)."""
    return "2.25.%d" % int(hashlib.sha1(str(seed).encode("utf-8", "surrogateescape"))
                           .hexdigest()[:24], 16)


def fake_dicom_bytes(seed, size):
    """A DICOM-looking file: preamble, DICM magic, then bytes unique to `seed`."""
    head = b"\0" * 128 + b"DICM" + ("fake:%s;" % seed).encode("utf-8", "surrogateescape")
    body = bytearray()
    block = hashlib.sha256(head).digest()
    while len(head) + len(body) < size:
        block = hashlib.sha256(block).digest()
        body += block
    return bytes((head + bytes(body))[:max(size, len(head))])


# The fake's SR files carry their content as one JSON line after the DICM magic, so that
# the fixture can read back what it wrote (Horos compares the annotations it would write
# with those of the latest file, DicomStudy.m archiveAnnotationsAsDICOMSR).
SR_MARK = b"fake-sr:"
# A fake "dcmodify": the tags Horos wrote into a file in place, as a JSON trailer.
DCMODIFY_MARK = b"\n#fake-dcmodify#"


def filler_bytes(seed, count):
    """`count` bytes that depend on `seed` only (a hash chain)."""
    out = bytearray()
    block = hashlib.sha256(seed).digest()
    while len(out) < count:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:count])


def fake_sr_bytes(kind, payload, size=0):
    """One of Horos's own SR files as the fake writes it: preamble, DICM, the kind and its
    content (what Horos encapsulates: the annotations dictionary, the zipped report, the
    archived ROIs) as one JSON line, padded with filler up to `size` bytes."""
    head = (b"\0" * 128 + b"DICM" + SR_MARK + kind.encode("ascii") + b";"
            + json.dumps(payload, sort_keys=True).encode("ascii") + b"\n")
    return head + filler_bytes(head, max(0, size - len(head)))


def read_fake_sr(path):
    """(kind, payload) of an SR file fake_sr_bytes wrote, or None (missing, other file)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    start = data.find(SR_MARK, 132, 160)
    if start < 0:
        return None
    kind, _, rest = data[start + len(SR_MARK):].partition(b";")
    line = rest.split(b"\n", 1)[0]
    try:
        return kind.decode("ascii"), json.loads(line.decode("ascii"))
    except ValueError:
        return None


def write_in_place(path, data, mtime=None):
    """Rewrite an existing file IN PLACE, as Horos does (same path, same inode: opened for
    writing and truncated, like DCMTK's saveFile and gdcm's Writer). The new mtime is
    `mtime` (Unix seconds) if given, else the clock's, but never the old one: a coarse
    file-system clock could give two writes a few ms apart the same mtime, and a test
    of "rewritten" must not depend on that. Returns the new (size, mtime_ns)."""
    old = os.stat(path)
    with open(path, "r+b") as handle:
        handle.truncate(0)
        handle.write(data)
    new = os.stat(path)
    if mtime is not None:
        os.utime(path, ns=(new.st_atime_ns, int(round(mtime * 1e9))))
    elif new.st_mtime_ns == old.st_mtime_ns:
        os.utime(path, ns=(new.st_atime_ns, old.st_mtime_ns + 1000000))
    new = os.stat(path)
    return new.st_size, new.st_mtime_ns


def rewrite_file_in_place(path, same_size=False, mtime=None, content=None, grow=64):
    """New bytes for an existing file, written in place (write_in_place). Without
    `content`: DICOM-looking bytes that differ from the old ones, of the SAME length with
    same_size=True (what a rewrite that moves an ROI or fixes a typo can give), else
    `grow` bytes longer. Returns the new bytes."""
    with open(path, "rb") as handle:
        old = handle.read()
    if content is None:
        size = len(old) if same_size else len(old) + grow
        seed = b"rewrite:" + hashlib.sha256(old).digest()
        content = (fake_dicom_bytes(path + ":" + seed.hex(), size) + filler_bytes(seed, size))
        content = content[:size]
        if content == old:
            raise ValueError("cannot give %s (%d bytes) new bytes of the same size"
                             % (path, len(old)))
    elif same_size and len(content) != len(old):
        raise ValueError("content is %d bytes, the file %d" % (len(content), len(old)))
    write_in_place(path, content, mtime)
    return content


def dcmodify_in_place(path, tag, value, mtime=None):
    """What Horos does to an imported DICOM file when the reader sets a study comment
    (0032,4000), a status (4008,0212), a series comment (0020,4000) or a key image
    (0028,6022) with `savedCommentsAndStatusInDICOMFiles` on (its default, DefaultsOsiriX.m):
    the element is replaced and the file rewritten IN PLACE
    (XMLControllerDCMTKCategory.mm modifyDicom: gdcm Writer onto the same file name).
    The fake keeps the original bytes and a JSON trailer of the tags written. Returns the
    new bytes; a missing file is left missing (Horos logs it), returning None."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    base, _, trailer = data.partition(DCMODIFY_MARK)
    tags = json.loads(trailer.decode("utf-8")) if trailer else {}
    tags[tag] = value
    new = base + DCMODIFY_MARK + json.dumps(tags, sort_keys=True).encode("utf-8")
    write_in_place(path, new, mtime)
    return new


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
        self.reports_dir = os.path.join(self.horos_data, "REPORTS")
        self.conn = None
        self._open_store()
        # The truth the tests check ZIPs against: StudyInstanceUID -> files created. A
        # study that leaves Horos keeps its entry (its ZIP keeps the files).
        self.study_files = {}
        # StudyInstanceUID -> snapshots of the ZSTUDY rows that left the library (rows,
        # file bytes), oldest first: what reimport_study brings back, and what a restore
        # must give back byte for byte.
        self.deleted_studies = {}
        self.next_path_number = 1 + (self.conn.execute(
            "SELECT COALESCE(MAX(ZPATHNUMBER), 0) FROM ZIMAGE").fetchone()[0])

    def _open_store(self):
        """Open Database.sql, creating an empty store (schema, Z_PRIMARYKEY at 0) if absent."""
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

    # -- rows ---------------------------------------------------------------------------
    def _next_pks(self, entity, count=1):
        """The first of `count` new Z_PKs, as Core Data hands them out: Z_MAX of the
        entity in Z_PRIMARYKEY plus one, Z_MAX moved past them. Deleting rows never lowers
        Z_MAX, so a key is never reused (a new store, as "Rebuild Database" makes, starts
        again at 1). Rows some test inserted by hand are stepped over."""
        table, ent = TABLES[entity], ENTITIES[entity]
        known = self.conn.execute("SELECT Z_MAX FROM Z_PRIMARYKEY WHERE Z_ENT = ?",
                                  (ent,)).fetchone()
        top = max((known[0] or 0) if known else 0, self.conn.execute(
            "SELECT COALESCE(MAX(Z_PK), 0) FROM %s" % table).fetchone()[0])
        self.conn.execute("INSERT OR REPLACE INTO Z_PRIMARYKEY (Z_ENT, Z_NAME, Z_SUPER, Z_MAX)"
                          " VALUES (?, ?, 0, ?)", (ent, entity, top + count))
        return top + 1

    def _insert(self, table, entity, values):
        values = dict(values, Z_PK=self._next_pks(entity), Z_ENT=ENTITIES[entity], Z_OPT=1)
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self.conn.execute(
            "INSERT INTO %s (%s) VALUES (%s)" % (table, columns, marks), list(values.values()))
        return values["Z_PK"]

    def _update(self, table, pk, values):
        """Change columns of one row as a Core Data save does: Z_OPT (the optimistic-lock
        version) goes up by one with every save that changed the object."""
        sets = "".join("%s = ?, " % column for column in values)
        self.conn.execute("UPDATE %s SET %sZ_OPT = Z_OPT + 1 WHERE Z_PK = ?" % (table, sets),
                          list(values.values()) + [pk])

    def _row(self, table, pk):
        cur = self.conn.execute("SELECT * FROM %s WHERE Z_PK = ?" % table, (pk,))
        row = cur.fetchone()
        if row is None:
            raise KeyError("%s has no row %s" % (table, pk))
        return dict(zip([d[0] for d in cur.description], row))

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
            # The model's defaults for a new Study: status 0 ("empty"), not expanded.
            "ZSTATETEXT": 0, "ZEXPANDED": 0,
            "ZPATIENTUID": (patient or "").upper() + (patient_id or ""),
            "ZINSTITUTIONNAME": "FAKE HOSPITAL", "ZWINDOWSSTATE": None})

    def add_series(self, study_pk, modality="CT", description="", number=1, uid=None,
                   date_added=None, sop_class="1.2.840.10008.5.1.4.1.1.2", protocol=None):
        """A series as DicomDatabase.mm stores it: the DICOM SeriesDescription in ZNAME
        (what Horos shows), the ProtocolName in ZSERIESDESCRIPTION (NULL without one)."""
        uid = uid or "1.2.826.0.1.3680043.2.1125.%d.%d" % (study_pk, number)
        if date_added is None:
            date_added = dt.datetime.now() - dt.timedelta(days=2)
        return self._insert("ZSERIES", "Series", {
            "ZSTUDY": study_pk, "ZMODALITY": modality, "ZSERIESDESCRIPTION": protocol,
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
        uid, modality = self.conn.execute(
            "SELECT st.ZSTUDYINSTANCEUID, se.ZMODALITY FROM ZSERIES se"
            " JOIN ZSTUDY st ON st.Z_PK = se.ZSTUDY WHERE se.Z_PK = ?", (series_pk,)).fetchone()
        self.study_files.setdefault(uid, set()).add(path)
        if create_file:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data = content if content is not None else fake_dicom_bytes(path, size)
            with open(path, "wb") as f:
                f.write(data)
            if mtime is not None:
                os.utime(path, (mtime, mtime))
        extension = os.path.splitext(path)[1].lstrip(".").lower()
        for frame in range(frames):
            self._insert("ZIMAGE", "Image", {
                "ZSERIES": series_pk, "ZPATHNUMBER": path_number,
                "ZPATHSTRING": path_string_value, "ZSTOREDINDATABASEFOLDER": stored_in_db,
                # DicomImage.m stores no extension for "dcm" and no modality for "CT".
                "ZSTOREDEXTENSION": None if extension == "dcm" else extension,
                "ZINSTANCENUMBER": instance if instance is not None else frame + 1,
                "ZFRAMEID": frame, "ZSTOREDNUMBEROFFRAMES": frames,
                "ZSTOREDMODALITY": None if (modality or "").strip().upper() == "CT"
                else modality,
                # The frames of one file are one DICOM object: one SOP Instance UID.
                "ZCOMPRESSEDSOPINSTANCEUID": fake_sop_uid(path).encode("ascii")})
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

    # -- paths --------------------------------------------------------------------------
    def image_path(self, image_pk):
        """Where the file of a ZIMAGE row is (the path rule of DicomImage.m)."""
        number, string = self.conn.execute(
            "SELECT ZPATHNUMBER, ZPATHSTRING FROM ZIMAGE WHERE Z_PK = ?", (image_pk,)).fetchone()
        return self._path_of(number, string)

    def _path_of(self, number, string):
        if number is not None:
            return database_path_for_number(self.database_dir, number, self.folder_size)
        if string.startswith("/"):
            return string
        stem = os.path.splitext(string)[0]
        digits = ""
        for char in stem:
            if not char.isdigit():
                break
            digits += char
        folder = (int(digits or 0) // self.folder_size + 1) * self.folder_size
        return os.path.join(self.database_dir, str(folder), string)

    def study_paths(self, study_pk):
        """Every file of a study (all series, Horos's SRs included), each once."""
        paths = []
        for number, string in self.conn.execute(
                "SELECT im.ZPATHNUMBER, im.ZPATHSTRING FROM ZIMAGE im JOIN ZSERIES se"
                " ON se.Z_PK = im.ZSERIES WHERE se.ZSTUDY = ? ORDER BY im.Z_PK", (study_pk,)):
            path = self._path_of(number, string)
            if path not in paths:
                paths.append(path)
        return paths

    def _series_paths(self, series_pk):
        paths = []
        for (image_pk,) in self.conn.execute(
                "SELECT Z_PK FROM ZIMAGE WHERE ZSERIES = ? ORDER BY Z_PK", (series_pk,)):
            path = self.image_path(image_pk)
            if path not in paths:
                paths.append(path)
        return paths

    def _study_uid(self, study_pk):
        return self._row("ZSTUDY", study_pk)["ZSTUDYINSTANCEUID"]

    def _new_database_path(self, extension="dcm"):
        """DicomDatabase.mm uniquePathForNewDataFileWithExtension: the next number, in its
        DATABASE.noindex subfolder. Returns (number, path)."""
        number = self.next_path_number
        self.next_path_number += 1
        path = database_path_for_number(self.database_dir, number, self.folder_size)
        if extension != "dcm":
            path = os.path.splitext(path)[0] + "." + extension
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return number, path

    # -- Horos's own SR series ----------------------------------------------------------
    def horos_sr_series(self, study_pk, kind):
        """Z_PK of the study's "roi", "report" or "annotations" SR series, found the way
        DicomStudy.m finds it (ZID, ZNAME and an SR ZSERIESSOPCLASSUID), or None."""
        number, name = HOROS_SR_SERIES[kind]
        rows = self.conn.execute(
            "SELECT Z_PK FROM ZSERIES WHERE ZSTUDY = ? AND ZID = ? AND ZNAME = ?"
            " AND ZSERIESSOPCLASSUID LIKE ? ORDER BY Z_PK",
            (study_pk, number, name, SR_SOP_CLASS_PREFIX + "%")).fetchall()
        return rows[-1][0] if rows else None

    def horos_srs(self, study_pk, kind):
        """The study's SR files of one kind as HorosSR tuples, oldest content date first:
        the last is the one Horos uses (DicomStudy.m annotationsSRImage, reportImage)."""
        series_pk = self.horos_sr_series(study_pk, kind)
        if series_pk is None:
            return []
        rows = self.conn.execute("SELECT Z_PK FROM ZIMAGE WHERE ZSERIES = ?"
                                 " ORDER BY ZDATE, Z_PK", (series_pk,)).fetchall()
        return [HorosSR(kind, series_pk, pk, self.image_path(pk)) for (pk,) in rows]

    def sop_uid(self, image_pk):
        """The SOP Instance UID of a ZIMAGE row (as the fake stores it)."""
        blob = self._row("ZIMAGE", image_pk)["ZCOMPRESSEDSOPINSTANCEUID"]
        text = bytes(blob or b"").decode("ascii", "replace")
        return text if text[:1].isdigit() else fake_sop_uid("image:%d" % image_pk)

    def add_horos_sr(self, study_pk, kind, payload=None, size=600, when=None, mtime=None,
                     image_values=None):
        """A NEW file of Horos's own SR series "roi" (5002), "report" (5003) or
        "annotations" (5004), as Horos adds one (SRAnnotation.mm writes it at
        DicomDatabase.mm uniquePathForNewDataFileWithExtension, then DicomDatabase.mm
        addFilesAtPaths with generatedByOsiriX): the file in DATABASE.noindex (ZPATHNUMBER
        N, ZPATHSTRING NULL), and a new ZIMAGE row with ZGENERATEDBYOSIRIX = 1,
        ZSTOREDMODALITY "SR" and ZDATE = the SR's content date (`when`, default now).

        The series is created on the first file: ZID and ZNAME as above, ZMODALITY "SR",
        ZSERIESSOPCLASSUID Basic Text SR, ZSERIESINSTANCEUID = the literal name
        (DicomDatabase.mm replaces the series ID of these SRs by their description, so
        every file of the kind lands in one row) and ZSERIESDICOMUID the DICOM one,
        ZDATEADDED now. The study's ZDATEADDED does NOT move (DicomDatabase.mm skips it
        for these SRs). Commits. Returns a HorosSR.
        """
        number, name = HOROS_SR_SERIES[kind]
        when = when or dt.datetime.now()
        content_date = local_to_coredata(when)
        series_pk = self.horos_sr_series(study_pk, kind)
        dicom_series_uid = DCMTK_SERIES_UID_ROOT + "%d.%d" % (study_pk, self.next_path_number)
        if series_pk is None:
            series_pk = self._insert("ZSERIES", "Series", {
                "ZSTUDY": study_pk, "ZID": number, "ZNAME": name, "ZMODALITY": "SR",
                "ZSERIESINSTANCEUID": name, "ZSERIESDICOMUID": dicom_series_uid,
                "ZSERIESSOPCLASSUID": BASIC_TEXT_SR, "ZSERIESDESCRIPTION": None,
                "ZDATE": content_date, "ZDATEADDED": local_to_coredata(dt.datetime.now()),
                "ZNUMBEROFIMAGES": 0, "ZTHUMBNAIL": None})
        else:
            values = {"ZDATE": content_date, "ZTHUMBNAIL": None}
            if kind == "annotations":
                # Each new annotations file is a new DICOM series (SRAnnotation.mm
                # createNewSeriesInStudy); the row takes the latest file's UID.
                values["ZSERIESDICOMUID"] = dicom_series_uid
            self._update("ZSERIES", series_pk, values)
        path_number, path = self._new_database_path()
        data = fake_sr_bytes(kind, payload if payload is not None else {}, size)
        with open(path, "wb") as handle:
            handle.write(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        values = {"ZSERIES": series_pk, "ZPATHNUMBER": path_number, "ZPATHSTRING": None,
                  "ZSTOREDINDATABASEFOLDER": 1, "ZSTOREDEXTENSION": None,
                  "ZSTOREDMODALITY": "SR", "ZGENERATEDBYOSIRIX": 1,
                  # SRAnnotation.mm: instance number = frame of the referenced image.
                  "ZINSTANCENUMBER": 0, "ZFRAMEID": None, "ZSTOREDNUMBEROFFRAMES": 1,
                  "ZSTOREDNUMBEROFSERIES": 1, "ZDATE": content_date,
                  "ZCOMPRESSEDSOPINSTANCEUID": fake_sop_uid(path).encode("ascii")}
        values.update(image_values or {})
        image_pk = self._insert("ZIMAGE", "Image", values)
        # addFilesAtPaths re-sets the study's fields from the SR (same values): a save.
        self._update("ZSTUDY", study_pk, {})
        self.study_files.setdefault(self._study_uid(study_pk), set()).add(path)
        self.conn.commit()
        return HorosSR(kind, series_pk, image_pk, path)

    def rewrite_horos_sr(self, image_pk, payload=None, same_size=False, mtime=None, when=None,
                         content=None, image_values=None):
        """A later edit of a ROI or report SR, as Horos makes it: the SAME file rewritten
        IN PLACE (ViewerController.m saveROI -> SRAnnotation.mm archiveROIsAsDICOM onto the
        path it has; DicomStudy.m archiveReportAsDICOMSR onto reportImage's path; the old
        UIDs are kept), then re-read into the SAME ZIMAGE row (Z_OPT + 1, ZDATE = the new
        content date `when`). Nothing is added to ZIMAGE.

        New bytes: fake SR bytes of `payload` (default: the old payload plus a revision
        number), padded to the old size with same_size=True (raises if they do not fit), or
        `content`. The file's mtime is `mtime` if given, else now (never the old one).

        Horos does NOT do this to an annotations SR: each change goes to a new file
        (set_study_annotations). Calling it on one models a rewrite in place anyway (older
        OsiriX did that, before 2014). Commits. Returns the HorosSR.
        """
        row = self._row("ZIMAGE", image_pk)
        series = self._row("ZSERIES", row["ZSERIES"])
        kind = [k for k, (number, name) in HOROS_SR_SERIES.items()
                if (series["ZID"], series["ZNAME"]) == (number, name)]
        if not kind:
            raise ValueError("image %d is not in one of Horos's own SR series" % image_pk)
        kind = kind[0]
        path = self.image_path(image_pk)
        old_size = os.path.getsize(path)
        if content is None:
            if payload is None:
                previous = read_fake_sr(path)
                payload = dict(previous[1]) if previous else {}
                payload["revision"] = payload.get("revision", 0) + 1
            content = fake_sr_bytes(kind, payload, old_size if same_size else 0)
            if same_size and len(content) != old_size:
                raise ValueError("the new SR content needs %d bytes; the file has %d"
                                 % (len(content), old_size))
        elif same_size and len(content) != old_size:
            raise ValueError("content is %d bytes, the file %d" % (len(content), old_size))
        write_in_place(path, content, mtime)
        values = {"ZDATE": local_to_coredata(when or dt.datetime.now())}
        values.update(image_values or {})
        self._update("ZIMAGE", image_pk, values)
        self._update("ZSERIES", series["Z_PK"], {"ZDATE": values["ZDATE"]})
        self.conn.commit()
        return HorosSR(kind, series["Z_PK"], image_pk, path)

    def add_roi_sr(self, study_pk, image_pk=None, rois=1, size=600, when=None):
        """The ROI SR of one image (one file per image, per frame, with ROIs), as
        ViewerController.m saveROI makes the first: a new file in the "OsiriX ROI SR"
        series whose ZIMAGE row has ZCOMMENT = "<referenced SOP Instance UID>-<frame>"
        (how DicomStudy.m roiForImage finds it) and ZSCALE = the number of ROIs
        (DicomDatabase.mm). image_pk: the image drawn on; default the study's first image
        that has no ROI SR yet. Later ROI edits: rewrite_horos_sr. Returns the HorosSR."""
        if image_pk is None:
            taken = set(r[0] for r in self.conn.execute(
                "SELECT im.ZCOMMENT FROM ZIMAGE im WHERE im.ZSERIES = ?",
                (self.horos_sr_series(study_pk, "roi"),)))
            for pk, frame in self.conn.execute(
                    "SELECT im.Z_PK, im.ZFRAMEID FROM ZIMAGE im JOIN ZSERIES se"
                    " ON se.Z_PK = im.ZSERIES WHERE se.ZSTUDY = ?"
                    " AND COALESCE(se.ZSERIESSOPCLASSUID, '') NOT LIKE ? ORDER BY im.Z_PK",
                    (study_pk, SR_SOP_CLASS_PREFIX + "%")).fetchall():
                if "%s-%d" % (self.sop_uid(pk), frame or 0) not in taken:
                    image_pk = pk
                    break
            if image_pk is None:
                raise ValueError("study %d has no image without an ROI SR" % study_pk)
        frame = self._row("ZIMAGE", image_pk)["ZFRAMEID"] or 0
        reference = "%s-%d" % (self.sop_uid(image_pk), frame)
        return self.add_horos_sr(
            study_pk, "roi", {"referencedSOPInstanceUID": reference,
                              "rois": ["ROI %d" % i for i in range(1, rois + 1)]},
            size=size, when=when,
            image_values={"ZCOMMENT": reference, "ZSCALE": float(rois),
                          "ZINSTANCENUMBER": frame})

    def annotations_of(self, study_pk):
        """What Horos puts in the study's annotations SR (DicomStudy.m
        annotationsAsDictionary): the study's comments and status, its (non-smart) albums,
        and per series its comments, status and key images; a value appears when it is
        not NULL."""
        study = self._row("ZSTUDY", study_pk)
        root = {"studyInstanceUID": study["ZSTUDYINSTANCEUID"]}
        for column, key in (("ZCOMMENT", "comment"), ("ZCOMMENT2", "comment2"),
                            ("ZCOMMENT3", "comment3"), ("ZCOMMENT4", "comment4"),
                            ("ZSTATETEXT", "stateText")):
            if study[column] is not None:
                root[key] = study[column]
        root["albums"] = [name for (name,) in self.conn.execute(
            "SELECT al.ZNAME FROM ZALBUM al JOIN Z_1STUDIES j ON j.Z_1ALBUMS = al.Z_PK"
            " WHERE j.Z_5STUDIES = ? AND COALESCE(al.ZSMARTALBUM, 0) = 0 ORDER BY al.ZNAME",
            (study_pk,))]
        series_list = []
        for (series_pk,) in self.conn.execute(
                "SELECT Z_PK FROM ZSERIES WHERE ZSTUDY = ? ORDER BY ZDATE, Z_PK", (study_pk,)
        ).fetchall():
            series = self._row("ZSERIES", series_pk)
            if not (series["ZSERIESINSTANCEUID"] and series["ZSERIESDICOMUID"]):
                continue
            entry = {}
            for column, key in (("ZCOMMENT", "comment"), ("ZCOMMENT2", "comment2"),
                                ("ZCOMMENT3", "comment3"), ("ZCOMMENT4", "comment4"),
                                ("ZSTATETEXT", "stateText")):
                if series[column] is not None:
                    entry[key] = series[column]
            keys = [{"sopInstanceUID": self.sop_uid(pk), "isKeyImage": flag}
                    for pk, flag in self.conn.execute(
                        "SELECT Z_PK, ZSTOREDISKEYIMAGE FROM ZIMAGE WHERE ZSERIES = ?"
                        " AND ZSTOREDISKEYIMAGE IS NOT NULL ORDER BY Z_PK", (series_pk,))]
            if keys:
                entry["images"] = keys
            if entry:
                entry["seriesInstanceUID"] = series["ZSERIESINSTANCEUID"]
                entry["seriesDICOMUID"] = series["ZSERIESDICOMUID"]
                series_list.append(entry)
        if series_list:
            root["series"] = series_list
        return root

    def archive_annotations(self, study_pk, sr="new", when=None):
        """DicomStudy.m archiveAnnotationsAsDICOMSR, run by every comment, status,
        key-image and album-removal change (whatever archiveReportsAndAnnotationsAsDICOMSR
        says: only the report honours that preference). When the annotations differ from
        those of the latest annotations SR (or there is none), Horos writes them to a NEW
        file, a new ZIMAGE row in the "OsiriX Annotations SR" series: the older files and
        rows stay, and the latest (by ZDATE) is the one Horos reads.

        sr: "new" (what Horos does), "in-place" (rewrite the latest file in its place,
        same row: older OsiriX, or a test that wants that) or None (write no SR).
        Returns the HorosSR written, or None when nothing was written.
        """
        if sr is None or not self._row("ZSTUDY", study_pk)["ZHASDICOM"]:
            return None                      # Horos archives DICOM studies only
        payload = self.annotations_of(study_pk)
        existing = self.horos_srs(study_pk, "annotations")
        if existing:
            current = read_fake_sr(existing[-1].path)
            if current is not None and current[1] == payload:
                return None                  # isEqualToDictionary: nothing to write
        if sr == "in-place" and existing:
            return self.rewrite_horos_sr(existing[-1].image_pk, payload=payload, when=when)
        if sr not in ("new", "in-place"):
            raise ValueError(sr)
        return self.add_horos_sr(study_pk, "annotations", payload=payload, when=when)

    def add_annotations_sr(self, study_pk, when=None):
        """The study's annotations SR as Horos writes it (archive_annotations, "new")."""
        return self.archive_annotations(study_pk, "new", when)

    def _set_columns(self, table, pk, wanted):
        """Apply {column: value or KEEP}; returns {column: (old, new)} of real changes."""
        row = self._row(table, pk)
        changed = {c: (row[c], v) for c, v in wanted.items() if v is not KEEP and row[c] != v}
        if changed:
            self._update(table, pk, {c: new for c, (_old, new) in changed.items()})
        return changed

    @staticmethod
    def _archives(changed):
        """DicomStudy.m/DicomSeries.m setters archive only a real change: for comments,
        when old or new is non-empty and they differ; for a status, when the integers
        differ (nil counts as 0)."""
        for column, (old, new) in changed.items():
            if column == "ZSTATETEXT":
                if int(old or 0) != int(new or 0):
                    return True
            elif (old or new) and old != new:
                return True
        return False

    def set_study_annotations(self, study_pk, comment=KEEP, comment2=KEEP, comment3=KEEP,
                              comment4=KEEP, status=KEEP, dicom_files=True, sr="new",
                              when=None):
        """The reader sets study comments (ZSTUDY.ZCOMMENT…ZCOMMENT4) or the status
        (ZSTUDY.ZSTATETEXT, 0-4), as DicomStudy.m's setters do:

        - the columns change (one save: Z_OPT + 1);
        - dicom_files=True (Horos's default, `savedCommentsAndStatusInDICOMFiles`): a new
          comment 1 or status is also written INTO EVERY FILE OF THE STUDY, in place
          (tags 0032,4000 and 4008,0212; dcmodify_in_place), the scanner's images
          included; comments 2-4 are not;
        - the annotations SR (archive_annotations; sr="new" as Horos does, "in-place",
          or None).

        Values equal to the current ones change nothing. Commits. Returns the HorosSR
        written, or None.
        """
        changed = self._set_columns("ZSTUDY", study_pk, {
            "ZCOMMENT": comment, "ZCOMMENT2": comment2, "ZCOMMENT3": comment3,
            "ZCOMMENT4": comment4, "ZSTATETEXT": status})
        if dicom_files and self._row("ZSTUDY", study_pk)["ZHASDICOM"]:
            for column, tag in (("ZCOMMENT", "(0032,4000)"), ("ZSTATETEXT", "(4008,0212)")):
                if column in changed and self._archives({column: changed[column]}):
                    value = changed[column][1]
                    text = "" if value is None else str(value)
                    for path in self.study_paths(study_pk):
                        dcmodify_in_place(path, tag, text)
        written = self.archive_annotations(study_pk, sr, when) if self._archives(changed) \
            else None
        self.conn.commit()
        return written

    def set_series_annotations(self, series_pk, comment=KEEP, comment2=KEEP, comment3=KEEP,
                               comment4=KEEP, status=KEEP, dicom_files=True, sr="new",
                               when=None):
        """Series comments (ZSERIES.ZCOMMENT…ZCOMMENT4) and status (ZSERIES.ZSTATETEXT), as
        DicomSeries.m's setters do: the columns; with dicom_files (Horos's default) a new
        comment 1 is written into every file of the series in place (tag 0020,4000);
        then the study's annotations SR. Commits. Returns the HorosSR written, or None."""
        changed = self._set_columns("ZSERIES", series_pk, {
            "ZCOMMENT": comment, "ZCOMMENT2": comment2, "ZCOMMENT3": comment3,
            "ZCOMMENT4": comment4, "ZSTATETEXT": status})
        study_pk = self._row("ZSERIES", series_pk)["ZSTUDY"]
        if (dicom_files and "ZCOMMENT" in changed and self._archives(
                {"ZCOMMENT": changed["ZCOMMENT"]})
                and self._row("ZSTUDY", study_pk)["ZHASDICOM"]):
            for path in self._series_paths(series_pk):
                dcmodify_in_place(path, "(0020,4000)", changed["ZCOMMENT"][1] or "")
        written = self.archive_annotations(study_pk, sr, when) if self._archives(changed) \
            else None
        self.conn.commit()
        return written

    def set_key_image(self, image_pk, key=True, dicom_files=True, sr="new", when=None):
        """Mark or unmark a key image, as DicomImage.m setIsKeyImage does:
        ZIMAGE.ZSTOREDISKEYIMAGE = 1, or NULL (never 0) when unmarked; with dicom_files
        (Horos's default) the image's own file is rewritten in place (tag 0028,6022);
        then the study's annotations SR. ZSERIES.ZNUMBEROFKEYIMAGES is NOT touched: no
        Horos source writes it. Commits. Returns the HorosSR written, or None."""
        changed = self._set_columns("ZIMAGE", image_pk,
                                    {"ZSTOREDISKEYIMAGE": 1 if key else None})
        study_pk = self._row("ZSERIES", self._row("ZIMAGE", image_pk)["ZSERIES"])["ZSTUDY"]
        written = None
        if changed:
            if dicom_files and self._row("ZSTUDY", study_pk)["ZHASDICOM"]:
                frame = self._row("ZIMAGE", image_pk)["ZFRAMEID"] or 0
                dcmodify_in_place(self.image_path(image_pk), "(0028,6022)",
                                  str(frame) if key else "")
            written = self.archive_annotations(study_pk, sr, when)
        self.conn.commit()
        return written

    def set_report(self, study_pk, text="Report", name=None, url=None, sr=True, when=None,
                   same_size=False):
        """The reader writes or edits the study's report, as DicomStudy.m setReportURL and
        archiveReportAsDICOMSR do: the report file in REPORTS/ (or an http(s) `url`),
        ZSTUDY.ZREPORTURL = "REPORTS/<name>" (kept relative to the library folder) or the
        url; then, with sr=True (`archiveReportsAndAnnotationsAsDICOMSR`, on by default),
        the report SR: created on the first report, REWRITTEN IN PLACE afterwards (same
        path and ZIMAGE row), its ZDATE the report file's mtime (DicomDatabase.mm compares
        them). Commits. Returns the report SR's HorosSR, or None."""
        study = self._row("ZSTUDY", study_pk)
        if url is None:
            name = name or "%s.rtf" % study["ZSTUDYINSTANCEUID"]
            report_path = os.path.join(self.reports_dir, name)
            with open(report_path, "w", encoding="utf-8") as handle:
                handle.write(text)
            url_value = "REPORTS/" + name
            content_date = dt.datetime.fromtimestamp(os.path.getmtime(report_path))
            payload = {"report": name, "sha256": hashlib.sha256(text.encode("utf-8"))
                       .hexdigest()}
        else:
            url_value = url
            content_date = when or dt.datetime.now()
            payload = {"reportURL": url}
        if study["ZREPORTURL"] != url_value:
            self._update("ZSTUDY", study_pk, {"ZREPORTURL": url_value})
        written = None
        if sr and study["ZHASDICOM"]:
            existing = self.horos_srs(study_pk, "report")
            if existing:
                written = self.rewrite_horos_sr(existing[-1].image_pk, payload=payload,
                                                same_size=same_size, when=content_date)
            else:
                written = self.add_horos_sr(study_pk, "report", payload, when=content_date)
        self.conn.commit()
        return written

    def lock_study(self, study_pk, locked=True):
        """The browser's lock column (ZSTUDY.ZLOCKEDSTUDY, a Boolean): locked studies are
        never auto-cleaned, nor deleted by a user. Commits."""
        self._set_columns("ZSTUDY", study_pk, {"ZLOCKEDSTUDY": 1 if locked else 0})
        self.conn.commit()

    def add_to_album(self, study_pk, name, smart=False):
        """Put a study in a (new or existing) album: a ZALBUM row and a Z_1STUDIES row
        (DicomDatabase.mm addStudies:toAlbum:; no SR is written for it). Studies in albums
        are never auto-cleaned. Commits. Returns the album's Z_PK."""
        row = self.conn.execute("SELECT Z_PK FROM ZALBUM WHERE ZNAME = ?", (name,)).fetchone()
        if row:
            album = row[0]
        else:
            index = self.conn.execute("SELECT COUNT(*) FROM ZALBUM").fetchone()[0]
            album = self._insert("ZALBUM", "Album", {"ZNAME": name, "ZINDEX": index,
                                                     "ZSMARTALBUM": 1 if smart else 0})
        self.conn.execute("INSERT OR IGNORE INTO Z_1STUDIES (Z_1ALBUMS, Z_5STUDIES)"
                          " VALUES (?, ?)", (album, study_pk))
        self._update("ZALBUM", album, {})
        self.conn.commit()
        return album

    # -- studies that leave, and come back -------------------------------------------------
    def _snapshot(self, study_pk):
        """A study's rows and file bytes, taken before it is deleted."""
        study = self._row("ZSTUDY", study_pk)
        series = [self._row("ZSERIES", pk) for (pk,) in self.conn.execute(
            "SELECT Z_PK FROM ZSERIES WHERE ZSTUDY = ? ORDER BY Z_PK", (study_pk,)).fetchall()]
        images = [self._row("ZIMAGE", pk) for (pk,) in self.conn.execute(
            "SELECT im.Z_PK FROM ZIMAGE im JOIN ZSERIES se ON se.Z_PK = im.ZSERIES"
            " WHERE se.ZSTUDY = ? ORDER BY im.Z_PK", (study_pk,)).fetchall()]
        files = {}
        for image in images:
            path = self._path_of(image["ZPATHNUMBER"], image["ZPATHSTRING"])
            if path not in files and os.path.isfile(path):
                with open(path, "rb") as handle:
                    files[path] = handle.read()
        report = self._report_path(study)
        if report and os.path.isfile(report):
            with open(report, "rb") as handle:
                files[report] = handle.read()
        albums = [name for (name,) in self.conn.execute(
            "SELECT al.ZNAME FROM ZALBUM al JOIN Z_1STUDIES j ON j.Z_1ALBUMS = al.Z_PK"
            " WHERE j.Z_5STUDIES = ?", (study_pk,))]
        return {"study": study, "series": series, "images": images, "files": files,
                "albums": albums}

    def _report_path(self, study):
        url = study["ZREPORTURL"]
        if not url or url.startswith(("http://", "https://")):
            return None
        return url if url.startswith("/") else os.path.join(self.horos_data, url)

    def _remove_study(self, study_pk, delete_outside_files):
        """Delete a study the way a Core Data delete of a DicomStudy does: its ZIMAGE and
        ZSERIES rows go with it (cascade rules of the model), its album links are
        nullified (Z_1STUDIES), the files inside the library folder are unlinked (and the
        files elsewhere when asked), the report file too (DicomStudy.m validateForDelete).
        Z_PRIMARYKEY keeps its Z_MAX. Returns the StudyInstanceUID."""
        snapshot = self._snapshot(study_pk)
        uid = snapshot["study"]["ZSTUDYINSTANCEUID"]
        inside = self.horos_data.rstrip("/") + "/"
        for path in snapshot["files"]:
            if delete_outside_files or path.startswith(inside):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self.conn.execute("DELETE FROM ZIMAGE WHERE ZSERIES IN"
                          " (SELECT Z_PK FROM ZSERIES WHERE ZSTUDY = ?)", (study_pk,))
        self.conn.execute("DELETE FROM ZSERIES WHERE ZSTUDY = ?", (study_pk,))
        self.conn.execute("DELETE FROM Z_1STUDIES WHERE Z_5STUDIES = ?", (study_pk,))
        self.conn.execute("DELETE FROM ZSTUDY WHERE Z_PK = ?", (study_pk,))
        self.deleted_studies.setdefault(uid, []).append(snapshot)
        return uid

    def autoclean_candidates(self, mode=2, dont_delete_commented=True, now=None):
        """The studies Horos's free-space auto-cleaning would delete, in its order
        (DicomDatabase+Clean.mm cleanForFreeSpaceMB): locked studies, studies in an album
        and, with dontDeleteStudiesWithComments (default on), studies with any comment are
        spared; the rest go oldest first by mode (AutocleanSpaceMode): 0 study date,
        1 last opened (else added, else study date), 2 added (else study date; Horos's
        default). Studies added less than 2 hours ago are skipped. Studies with no date
        at all come last here (Horos's sort leaves that undefined). Returns Z_PKs."""
        now = now or dt.datetime.now()
        recent = local_to_coredata(now) - AUTOCLEAN_RECENT_SECONDS
        ranked = []
        for row in self.conn.execute(
                "SELECT Z_PK, ZLOCKEDSTUDY, ZCOMMENT, ZCOMMENT2, ZCOMMENT3, ZCOMMENT4, ZDATE,"
                " ZDATEADDED, ZDATEOPENED, EXISTS (SELECT 1 FROM Z_1STUDIES"
                " WHERE Z_5STUDIES = ZSTUDY.Z_PK) FROM ZSTUDY ORDER BY Z_PK").fetchall():
            pk, locked, c1, c2, c3, c4, date, added, opened, in_album = row
            if locked or in_album:
                continue
            if dont_delete_commented and any(c for c in (c1, c2, c3, c4)):
                continue
            if added is not None and added > recent:
                continue
            if mode == 0:
                when = date
            elif mode == 1:
                when = opened if opened is not None else (added if added is not None
                                                          else date)
            else:
                when = added if added is not None else date
            ranked.append((when is None, when or 0, pk))
        return [pk for _none, _when, pk in sorted(ranked)]

    def autoclean(self, count=None, free_bytes=None, mode=2, dont_delete_commented=True,
                  now=None):
        """Delete studies AS HOROS'S AUTO-CLEANING DOES when the library's volume is below
        its free-space threshold (DicomDatabase+Clean.mm cleanForFreeSpaceMB), in the order
        and with the exceptions of autoclean_candidates: for each study, the files inside
        the library folder are unlinked (files added in place elsewhere stay, unless
        AUTOCLEANINGDELETEORIGINAL), then its ZIMAGE, ZSERIES and ZSTUDY rows are deleted.
        It stops after `count` studies, or once the deleted files add up to `free_bytes`
        (Horos stops once free space is back above the threshold), or when none is left.
        Horos deletes at most AUTOCLEAN_MAX_PER_PASS (51) studies per pass, one pass every
        15 minutes: a call here may stand for several passes. Commits. Returns the deleted
        StudyInstanceUIDs."""
        deleted, freed = [], 0
        for pk in self.autoclean_candidates(mode, dont_delete_commented, now):
            if count is not None and len(deleted) >= count:
                break
            if free_bytes is not None and freed >= free_bytes:
                break
            inside = self.horos_data.rstrip("/") + "/"
            freed += sum(os.path.getsize(p) for p in self.study_paths(pk)
                         if p.startswith(inside) and os.path.isfile(p))
            deleted.append(self._remove_study(pk, delete_outside_files=False))
        self.conn.commit()
        return deleted

    def delete_study(self, study_pk, delete_in_place_files=False):
        """A user deletes a study in the browser (BrowserController.m delObjects): a locked
        study cannot be deleted (ValueError, as Horos refuses); one in albums is deleted
        anyway (the "All" answer); the files Horos copied into the library are deleted
        (DicomImage.m validateForDelete queues them), files added in place only with
        delete_in_place_files ("Delete the files"). Commits. Returns the
        StudyInstanceUID."""
        if self._row("ZSTUDY", study_pk)["ZLOCKEDSTUDY"]:
            raise ValueError("study %d is locked: Horos refuses to delete it" % study_pk)
        uid = self._remove_study(study_pk, delete_outside_files=delete_in_place_files)
        self.conn.commit()
        return uid

    def empty_library(self, new_store=False):
        """Every study leaves at once, FILES LEFT IN PLACE, as the backup sees it when
        Database.sql looks empty or is replaced:

        - new_store=False: the ZSTUDY, ZSERIES and ZIMAGE rows (and album links) are gone
          from the same store; Z_PRIMARYKEY keeps its Z_MAX;
        - new_store=True: as "Rebuild Database" starts (DicomDatabase.mm rebuild:YES):
          Database.sql is moved to "Database.sql - old" and a new empty store takes its
          place, so new rows start again at Z_PK 1. (Horos then re-adds the files of
          DATABASE.noindex; this is the library before, or without, that.)

        Snapshots are kept for reimport_study. Returns the UIDs that left."""
        uids = []
        for (pk,) in self.conn.execute("SELECT Z_PK FROM ZSTUDY ORDER BY Z_PK").fetchall():
            snapshot = self._snapshot(pk)
            uid = snapshot["study"]["ZSTUDYINSTANCEUID"]
            self.deleted_studies.setdefault(uid, []).append(snapshot)
            uids.append(uid)
        if new_store:
            self.conn.commit()
            self.conn.close()
            old = self.db_path + " - old"
            if os.path.exists(old):
                os.remove(old)
            os.replace(self.db_path, old)
            self._open_store()
        else:
            for table in ("ZIMAGE", "ZSERIES", "Z_1STUDIES", "ZSTUDY"):
                self.conn.execute("DELETE FROM %s" % table)
            self.conn.commit()
        return uids

    def reimport_study(self, uid, when=None):
        """A study that left comes back, as Horos imports it again (the files sent or
        dropped into INCOMING.noindex; DicomDatabase.mm addFilesAtPaths): new ZSTUDY,
        ZSERIES and ZIMAGE rows with NEW Z_PKs (Core Data never reuses one), the same
        StudyInstanceUID and DICOM fields, ZDATEADDED = `when` (default now), its files
        copied to new DATABASE.noindex numbers (a file added in place that still exists is
        linked where it is). An import is not generatedByOsiriX: ZGENERATEDBYOSIRIX is
        NULL on every row, Horos's own SR files included (their series are still found by
        ZID and ZNAME). Comments, status, key images and albums come back only from an
        annotations SR among the files (DicomStudy.m reapplyAnnotationsFromDICOMSR), the
        report only from a report SR; lock and last-opened date do not.

        Uses the oldest snapshot taken when it left. Commits. Returns the new study Z_PK.
        """
        snapshot = self.deleted_studies[uid].pop(0)
        if not self.deleted_studies[uid]:
            del self.deleted_studies[uid]
        added = local_to_coredata(when or dt.datetime.now())
        own = {HOROS_SR_SERIES[k]: k for k in HOROS_SR_SERIES}
        kinds = set(own.get((s["ZID"], s["ZNAME"])) for s in snapshot["series"])
        has_annotations = "annotations" in kinds
        study = dict(snapshot["study"])
        for column in ("Z_PK", "Z_ENT", "Z_OPT"):
            study.pop(column)
        study.update(ZDATEADDED=added, ZDATEOPENED=None, ZLOCKEDSTUDY=None)
        if not has_annotations:
            study.update(ZCOMMENT=None, ZCOMMENT2=None, ZCOMMENT3=None, ZCOMMENT4=None,
                         ZSTATETEXT=0)
        report = self._report_path(snapshot["study"])
        if "report" in kinds and report in snapshot["files"]:
            if not os.path.exists(report):
                with open(report, "wb") as handle:
                    handle.write(snapshot["files"][report])
        else:
            study["ZREPORTURL"] = None
        study_pk = self._insert("ZSTUDY", "Study", study)
        series_map = {}
        for series in snapshot["series"]:
            values = dict(series)
            old_pk = values.pop("Z_PK")
            values.pop("Z_ENT")
            values.pop("Z_OPT")
            values.update(ZSTUDY=study_pk, ZDATEADDED=added)
            if not has_annotations:
                values.update(ZCOMMENT=None, ZCOMMENT2=None, ZCOMMENT3=None, ZCOMMENT4=None,
                              ZSTATETEXT=None)
            series_map[old_pk] = self._insert("ZSERIES", "Series", values)
        moved = {}
        paths = self.study_files.setdefault(uid, set())
        for image in snapshot["images"]:
            values = dict(image)
            for column in ("Z_PK", "Z_ENT", "Z_OPT"):
                values.pop(column)
            old_path = self._path_of(image["ZPATHNUMBER"], image["ZPATHSTRING"])
            if old_path not in moved:
                moved[old_path] = self._reimport_file(old_path, snapshot["files"])
            number, string, stored, new_path = moved[old_path]
            values.update(ZSERIES=series_map[image["ZSERIES"]], ZPATHNUMBER=number,
                          ZPATHSTRING=string, ZSTOREDINDATABASEFOLDER=stored,
                          ZGENERATEDBYOSIRIX=None)
            if not has_annotations:
                values["ZSTOREDISKEYIMAGE"] = None
            self._insert("ZIMAGE", "Image", values)
            if new_path is not None:
                if not os.path.exists(old_path):
                    paths.discard(old_path)
                paths.add(new_path)
        if has_annotations:
            for name in snapshot["albums"]:
                row = self.conn.execute("SELECT Z_PK FROM ZALBUM WHERE ZNAME = ?"
                                        " AND COALESCE(ZSMARTALBUM, 0) = 0", (name,)).fetchone()
                if row:
                    self.conn.execute("INSERT OR IGNORE INTO Z_1STUDIES VALUES (?, ?)",
                                      (row[0], study_pk))
        self.conn.commit()
        return study_pk

    def _reimport_file(self, old_path, files):
        """Where an imported file goes: (ZPATHNUMBER, ZPATHSTRING, in database, path)."""
        inside = self.horos_data.rstrip("/") + "/"
        if not old_path.startswith(inside) and os.path.isfile(old_path):
            return None, old_path, 0, old_path           # linked in place again
        if old_path not in files:
            return None, None, 1, None                   # nothing to import: a dead row
        extension = os.path.splitext(old_path)[1].lstrip(".").lower() or "dcm"
        if len(extension) not in (3, 4):
            extension = "dcm"
        number, path = self._new_database_path(extension)
        with open(path, "wb") as handle:
            handle.write(files[old_path])
        if extension == "dcm":
            return number, None, 1, path
        return None, os.path.basename(path), 1, path

    def add_large_study(self, uid, images=20000, modality="CT", series=1, size=200,
                        create_files=True, **study_fields):
        """A study of many images (thin-slice CT, cardiac, perfusion: 20,000 and more),
        built fast: its ZIMAGE rows in one executemany, each row with ITS OWN small file
        in DATABASE.noindex (a plan keeps one entry per file, so a real export needs them
        all), `images` spread over `series` series. The counts are set as finish() would.
        20,000 images take 1-2 s (the file creations). Commits. Returns the study's Z_PK."""
        study_pk = self.add_study(uid, modality=modality, **study_fields)
        per_series = [images // series + (1 if i < images % series else 0)
                      for i in range(series)]
        template = fake_dicom_bytes(uid, max(size, 160))
        paths = self.study_files.setdefault(uid, set())
        made_dirs = set()
        for number, count in enumerate(per_series, 1):
            series_pk = self.add_series(study_pk, modality=modality,
                                        description="Series %d" % number, number=number)
            first_pk = self._next_pks("Image", count)
            first_number = self.next_path_number
            self.next_path_number += count
            rows = []
            for i in range(count):
                path_number = first_number + i
                path = database_path_for_number(self.database_dir, path_number,
                                                self.folder_size)
                rows.append((first_pk + i, ENTITIES["Image"], 1, series_pk, path_number, 1,
                             i + 1, 0, 1, None if modality.strip().upper() == "CT"
                             else modality, fake_sop_uid(path).encode("ascii")))
                paths.add(path)
                if create_files:
                    folder = os.path.dirname(path)
                    if folder not in made_dirs:
                        os.makedirs(folder, exist_ok=True)
                        made_dirs.add(folder)
                    # Unique bytes per file without a hash each: the number at the end.
                    # os.open: a third of io.open's cost, for 20,000 files.
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    try:
                        os.write(fd, template[:len(template) - 12] + b"%012d" % path_number)
                    finally:
                        os.close(fd)
            self.conn.executemany(
                "INSERT INTO ZIMAGE (Z_PK, Z_ENT, Z_OPT, ZSERIES, ZPATHNUMBER,"
                " ZSTOREDINDATABASEFOLDER, ZINSTANCENUMBER, ZFRAMEID, ZSTOREDNUMBEROFFRAMES,"
                " ZSTOREDMODALITY, ZCOMPRESSEDSOPINSTANCEUID) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                rows)
            self.conn.execute("UPDATE ZSERIES SET ZNUMBEROFIMAGES = ? WHERE Z_PK = ?",
                              (count, series_pk))
        self.conn.execute("UPDATE ZSTUDY SET ZNUMBEROFIMAGES = ? WHERE Z_PK = ?",
                          (images, study_pk))
        self.conn.commit()
        return study_pk

    def finish(self, summarize=True):
        """Fill the counts and study modality summary Horos maintains, and commit.

        As DicomSeries.m/DicomStudy.m do: an SR series stores no count (NULL here, as
        older stores have it; Horos's own SR series keep the model's default 0, which
        DicomSeries.m noFiles never replaces for an SR); a study's count skips SR and PR
        series; a count is negative when a series holds multi-frame objects. Studies
        created with an explicit `modality` keep it (to inject a stale or odd summary).
        """
        study_sums = {}
        own = set(HOROS_SR_SERIES.values())
        for series_pk, study_pk, modality, number, name in self.conn.execute(
                "SELECT Z_PK, ZSTUDY, ZMODALITY, ZID, ZNAME FROM ZSERIES").fetchall():
            rows, multi_frame = self.conn.execute(
                "SELECT COUNT(*), MAX(ZSTOREDNUMBEROFFRAMES) > 1 FROM ZIMAGE WHERE ZSERIES = ?",
                (series_pk,)).fetchone()
            kind = (modality or "").strip().upper()
            if kind == "SR":
                count = 0 if (number, name) in own else None
            else:
                count = -rows if multi_frame else rows
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
    # The scanner's protocol is in ZSERIESDESCRIPTION; what Horos shows is in ZNAME.
    s1 = lib.add_series(ct, "CT", "Topogram", 1, protocol="AbdomenRoutine")
    s2 = lib.add_series(ct, "CT", "Abdomen 3mm", 2, protocol="AbdomenRoutine")
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
    # Padding and case, as some scanners send.
    t1 = lib.add_series(mr, " mr ", "T1 SAG", 1, protocol="t1_se_sag")
    for _ in range(4):
        lib.add_image(t1, size=2500)
    # Multi-frame enhanced MR: one file, one ZIMAGE row per frame.
    mf = lib.add_series(mr, "MR", "DWI enhanced", 2, protocol="ep2d_diff_3scan")
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
