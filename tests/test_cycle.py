"""End-to-end: the script run as a subprocess, as launchd runs it, on a fake library."""

import datetime as dt
import fcntl
import os
import random
import shutil
import sqlite3
import zipfile

import pytest

from conftest import (backup_root, file_digest, files_named, issues_rows, manifest_of,
                      run_cycle, run_script, state_rows, tree_snapshot, zip_payload,
                      zips_on_disk)
from fake_horos import FakeHorosLibrary, build_sample_library

# What the sample library must give, computed by hand from its DICOM-local values.
SAMPLE_EXPECTED = {
    "1.2.392.200036.9116.2.6.1.48.1215.1551385800.1":
        "2019_03/YAMADA_TARO_1950-01-01_2019-03-01_"
        "1.2.392.200036.9116.2.6.1.48.1215.1551385800.1.zip",
    "1.3.12.2.1107.5.2.30.25245.30000019030112345678900000001":
        "2019_03/JOAO_SAO_BENTO_1988-07-14_2019-03-15_"
        "1.3.12.2.1107.5.2.30.25245.30000019030112345678900000001.zip",
    "1.2.840.113619.2.55.3.2831164355.10.1553000000.1":
        "2019_04/MULLER_JURGEN_1961-02-28_2019-04-02_"
        "1.2.840.113619.2.55.3.2831164355.10.1553000000.1.zip",
    "1.2.840.113704.1.111.2000.1":
        "1999_12/O_BRIEN_ANNE-MARIE_1940-12-31_1999-12-31_1.2.840.113704.1.111.2000.1.zip",
    "1.2.3.4.5.6.7.8.9.666":
        "2020_01/etc_passwd_script_x_y_UNKNOWN_2020-01-10_1.2.3.4.5.6.7.8.9.666.zip",
    "1.2.3.4.5.6.7.8.9.888": "2020_02/UNKNOWN_1990-01-01_2020-02-29_1.2.3.4.5.6.7.8.9.888.zip",
    "1.2.3.4.5.6.7.8.9.999": "UNKNOWN_DATE/NODATE_PAT_UNKNOWN_UNKNOWN_1.2.3.4.5.6.7.8.9.999.zip",
    "1.2.3.4.5.6.7.8.9.1010":
        "2020_03/EMPTY_SUMMARY_UNKNOWN_2020-03-01_1.2.3.4.5.6.7.8.9.1010.zip",
    "1.2.3.4.5.6.7.8.9.1111": "2020_04/TWIN_PAT_UNKNOWN_2020-04-04_1.2.3.4.5.6.7.8.9.1111.zip",
    "1.2.3.4.5.6.7.8.10.0": "2020_12/SMITH_PAT0_1970-01-01_2020-12-31_1.2.3.4.5.6.7.8.10.0.zip",
    "1.2.3.4.5.6.7.8.10.1": "2021_01/SMITH_PAT1_1971-01-01_2021-01-31_1.2.3.4.5.6.7.8.10.1.zip",
    "1.2.3.4.5.6.7.8.10.2": "2021_02/SMITH_PAT2_1972-01-01_2021-02-28_1.2.3.4.5.6.7.8.10.2.zip",
    "1.2.3.4.5.6.7.8.10.3": "2021_03/SMITH_PAT3_1973-01-01_2021-03-31_1.2.3.4.5.6.7.8.10.3.zip",
}
LONG_NAME_UID = "1.2.3.4.5.6.7.8.9.777"
NOT_EXPORTED = {"1.2.3.4.5.6.7.8.11.1", "1.2.3.4.5.6.7.8.11.2", "1.2.3.4.5.6.7.8.11.3",
                "1.2.3.4.5.6.7.8.11.4"}


@pytest.fixture
def sample(tmp_path):
    lib = build_sample_library(str(tmp_path / "PACS"))
    yield lib
    lib.close()


def assert_zip_holds_study(lib, zip_path, uid):
    """The ZIP holds exactly the study's files, byte for byte, and a true manifest."""
    manifest = manifest_of(zip_path)
    payload = zip_payload(zip_path)
    expected_sources = lib.study_files[uid]
    sources = {entry["name"]: entry["source"] for entry in manifest["files"]}
    assert set(sources.values()) == expected_sources
    assert set(payload) == set(sources)
    for member, data in payload.items():
        with open(sources[member], "rb") as original:
            assert data == original.read(), member
    assert manifest["study"]["study_uid"] == uid
    assert manifest["missing"] == []
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.testzip() is None
        for name in archive.namelist():
            assert not name.startswith("/") and ".." not in name.split("/")


def test_sample_library_exports_exactly_the_ct_mr_studies(sample):
    before = file_digest(sample.db_path)
    result = run_cycle(sample)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    root = backup_root(sample)
    rows = {r["study_uid"]: r for r in state_rows(root)}
    assert set(rows) == set(SAMPLE_EXPECTED) | {LONG_NAME_UID}
    assert not set(rows) & NOT_EXPORTED
    for uid, relpath in SAMPLE_EXPECTED.items():
        assert rows[uid]["zip_path"] == relpath
        assert rows[uid]["zip_bytes"] == os.path.getsize(os.path.join(root, relpath))
        assert rows[uid]["file_count"] == len(sample.study_files[uid])
        assert_zip_holds_study(sample, os.path.join(root, relpath), uid)
    long_path = rows[LONG_NAME_UID]["zip_path"]
    assert long_path.startswith("2020_01/WOLFESCHLEGELSTEINHAUSENBERGERDORFF_HUBERT")
    assert long_path.endswith("_1975-05-05_2020-01-11_1.2.3.4.5.6.7.8.9.777.zip")
    assert len(os.path.basename(long_path)) - len(".zip") == 128
    assert set(zips_on_disk(root)) == {r["zip_path"] for r in rows.values()}
    # Horos's database is read, never written.
    assert file_digest(sample.db_path) == before
    assert not os.path.exists(sample.db_path + "-journal")
    assert "cycle done: 14 studies" in result.stdout
    with open(os.path.join(root, "logs", "horos_backup.log"), encoding="utf-8") as log:
        assert "cycle done: 14 studies" in log.read()


def test_manifest_fields(sample):
    run_cycle(sample)
    root = backup_root(sample)
    uid = "1.3.12.2.1107.5.2.30.25245.30000019030112345678900000001"
    manifest = manifest_of(os.path.join(root, SAMPLE_EXPECTED[uid]))
    assert manifest["format"] == "horos-backup-manifest"
    assert manifest["format_version"] == 1
    assert manifest["tool_version"]
    assert manifest["exported_at"].endswith("Z")
    assert manifest["study"] == {
        "study_uid": uid, "patient_name": "JOÃO^SÃO BENTO", "patient_id": "P-1002",
        "birth_date": "1988-07-14", "study_date": "2019-03-15",
        "study_time": "2019-03-15T23:10:00", "accession_number": "A1002",
        "description": "MR BRAIN", "modalities": ["MR", "KO", "PR"],
        "horos_study_pks": manifest["study"]["horos_study_pks"],
        # Nobody has read it yet: no comment, the model's default status, no report.
        "comment": None, "comment2": None, "comment3": None, "comment4": None,
        "status": 0, "report_url": None, "key_images": []}
    assert [s["modality"] for s in manifest["series"]] == ["mr", "MR", "KO", "PR"]
    assert [s["file_count"] for s in manifest["series"]] == [4, 1, 1, 1]
    # The description Horos shows (ZNAME), the scanner's protocol apart.
    assert [(s["description"], s["protocol_name"]) for s in manifest["series"]] == [
        ("T1 SAG", "t1_se_sag"), ("DWI enhanced", "ep2d_diff_3scan"),
        ("Key images", None), ("Horos ROIs", None)]
    assert [s["folder"] for s in manifest["series"]] == [
        "0001_mr_T1_SAG", "0002_MR_DWI_enhanced", "0003_KO_Key_images", "0004_PR_Horos_ROIs"]
    # 12 frames, one file: the multi-frame object is in the ZIP once.
    assert sum(1 for f in manifest["files"] if f["name"].startswith("0002_MR_DWI")) == 1
    for entry in manifest["files"]:
        assert entry["size"] == os.path.getsize(entry["source"])


def test_sr_pr_ko_and_pdf_series_are_in_the_zip(sample):
    run_cycle(sample)
    root = backup_root(sample)
    names = set(zip_payload(os.path.join(
        root, SAMPLE_EXPECTED["1.2.392.200036.9116.2.6.1.48.1215.1551385800.1"])))
    assert names == {"0001_CT_Topogram/9998.dcm", "0001_CT_Topogram/9999.dcm",
                     "0002_CT_Abdomen_3mm/10000.dcm", "0002_CT_Abdomen_3mm/10001.dcm",
                     "0002_CT_Abdomen_3mm/10002.dcm", "0900_SR_Dose_Report/20005.dcm",
                     "0901_DOC_Report_PDF/20006.pdf"}


def test_series_folders_are_named_as_horos_shows_the_series(tmp_path):
    """Horos keeps the DICOM SeriesDescription in ZNAME and the ProtocolName in
    ZSERIESDESCRIPTION (DicomDatabase.mm); its own SR series have no protocol."""
    lib = FakeHorosLibrary(tmp_path)
    study = lib.add_study("1.2.3.4.77.1", "NAMES^TEST", "P-77",
                          study_date=dt.datetime(2021, 5, 4, 9, 0), description="MR KNEE")
    described = lib.add_series(study, "MR", "PD FS COR", 3, protocol="pd_tse_fs_cor")
    lib.add_image(described, size=1500)
    # A file without a SeriesDescription: Horos stores "unnamed".
    unnamed = lib.add_series(study, "MR", "unnamed", 4, protocol="localizer")
    lib.add_image(unnamed, size=1500)
    # A store written without the description (empty ZNAME): the protocol is all there is.
    protocol_only = lib.add_series(study, "MR", "", 5, protocol="t1_vibe_ax")
    lib.add_image(protocol_only, size=1500)
    lib.add_horos_sr(study, "roi", size=700, when=dt.datetime.now() - dt.timedelta(days=2))
    lib.finish()
    assert run_cycle(lib).returncode == 0
    (name,) = zips_on_disk(backup_root(lib))
    path = os.path.join(backup_root(lib), name)
    folders = {member.split("/")[0] for member in zip_payload(path)}
    assert folders == {"0003_MR_PD_FS_COR", "0004_MR_unnamed", "0005_MR_t1_vibe_ax",
                       "5002_SR_OsiriX_ROI_SR"}
    series = {s["folder"]: (s["description"], s["protocol_name"])
              for s in manifest_of(path)["series"]}
    assert series == {"0003_MR_PD_FS_COR": ("PD FS COR", "pd_tse_fs_cor"),
                      "0004_MR_unnamed": ("unnamed", "localizer"),
                      "0005_MR_t1_vibe_ax": ("t1_vibe_ax", "t1_vibe_ax"),
                      "5002_SR_OsiriX_ROI_SR": ("OsiriX ROI SR", None)}


def without_run_files(snapshot):
    """The log grows, the lock file holds the last run's PID, and the state records each
    run and each re-read of an old ZIP: all of these change on every run."""
    return {k: v for k, v in snapshot.items()
            if not k.startswith("logs/") and k not in (".tmp/.run.lock", "export_state.sqlite")}


def backup_content(root):
    """What an idle cycle must leave alone: every table but `runs`, without verified_at."""
    rows = [{k: v for k, v in row.items() if k != "verified_at"} for row in state_rows(root)]
    others = [state_rows(root, "SELECT * FROM %s" % table) for table in (
        "failures", "changed_studies", "writes_in_progress", "meta")]
    return rows, others


def test_idle_cycle_changes_nothing(sample):
    assert run_cycle(sample).returncode == 0
    root = backup_root(sample)
    before = without_run_files(tree_snapshot(root)), backup_content(root)
    again = run_cycle(sample)
    assert again.returncode == 0
    assert "cycle done: 0 studies" in again.stdout
    assert (without_run_files(tree_snapshot(root)), backup_content(root)) == before
    runs = state_rows(root, "SELECT outcome, studies FROM runs ORDER BY id")
    assert runs == [{"outcome": "ok", "studies": 14}, {"outcome": "ok", "studies": 0}]


def build_dated_library(root, count=40, seed=7):
    """`count` CT/MR studies with shuffled dates (some unknown, some tied) among others."""
    rng = random.Random(seed)
    lib = FakeHorosLibrary(root)
    expected = []
    base = dt.datetime(2015, 1, 1, 8, 0)
    uids = ["1.2.826.0.1.%d" % (1000 + i) for i in range(count)]
    rng.shuffle(uids)
    for i, uid in enumerate(uids):
        if i % 13 == 5:
            when = None
        elif i % 7 == 3:
            when = base  # ties: ordered by UID
        else:
            when = base + dt.timedelta(days=rng.randrange(3000), hours=rng.randrange(24))
        lib.add_simple_study(uid, "CT" if i % 2 else "MR", images=1, study_date=when,
                             size=600, patient="PAT%d" % i, patient_id="ID%d" % i)
        expected.append((when is None, when or base, uid))
        if i % 5 == 0:  # interleave studies that are not CT/MR
            other = lib.add_study("1.2.826.9.%d" % i, study_date=base - dt.timedelta(days=i))
            lib.add_image(lib.add_series(other, "US", "us", 1), size=300)
    lib.finish()
    return lib, [uid for _, _, uid in sorted(expected)]


def test_fifteen_per_cycle_oldest_first(tmp_path):
    lib, order = build_dated_library(str(tmp_path / "PACS"))
    root = backup_root(lib)
    exported = []
    for cycle, expected_count in enumerate((15, 15, 10, 0)):
        result = run_cycle(lib)
        assert result.returncode == 0, result.stderr
        rows = state_rows(root, "SELECT study_uid FROM exported_studies")
        new = sorted({r["study_uid"] for r in rows} - set(exported),
                     key=order.index)
        assert len(new) == expected_count, "cycle %d" % cycle
        assert new == order[len(exported):len(exported) + expected_count]
        exported.extend(new)
    assert len(zips_on_disk(root)) == 40
    lib.close()


def test_batch_size_flag(tmp_path):
    lib, order = build_dated_library(str(tmp_path / "PACS"), count=10)
    assert run_cycle(lib, "--batch-size", "4").returncode == 0
    uids = {r["study_uid"] for r in state_rows(backup_root(lib))}
    assert uids == set(order[:4])
    lib.close()


def test_missing_sentinel_creates_nothing(sample, tmp_path):
    os.remove(os.path.join(sample.pacs_root, ".pacs_sentinel"))
    before = sorted(os.listdir(sample.pacs_root))
    result = run_cycle(sample)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert ".pacs_sentinel" in result.stderr and "mounted" in result.stderr
    assert sorted(os.listdir(sample.pacs_root)) == before
    assert not os.path.exists(os.path.join(sample.pacs_root, "Backup"))
    # An unmounted volume: --pacs-root names a folder that is not even there.
    ghost = str(tmp_path / "Volumes" / "PACS")
    result = run_script("--pacs-root", ghost)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert not os.path.exists(ghost)


def test_lock_held_by_another_run_skips_quietly(sample):
    root = backup_root(sample)
    os.makedirs(os.path.join(root, ".tmp"))
    with open(os.path.join(root, ".tmp", ".run.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cycle(sample)
    assert result.returncode == 0, result.stderr
    assert "another run holds" in result.stdout
    assert zips_on_disk(root) == {}
    assert run_cycle(sample).returncode == 0
    assert len(zips_on_disk(root)) == 14


def test_incoming_over_limit_skips_the_cycle(sample):
    for i in range(6):
        sub = os.path.join(sample.incoming_dir, "batch%d" % (i % 2))
        os.makedirs(sub, exist_ok=True)
        open(os.path.join(sub, "f%d.dcm" % i), "w").close()
    result = run_cycle(sample, "--incoming-max-files", "5")
    assert result.returncode == 0, result.stderr
    root = backup_root(sample)
    assert zips_on_disk(root) == {}
    kinds = [row["kind"] for row in issues_rows(root)]
    assert kinds == ["INCOMING_OVER_LIMIT"]
    with open(os.path.join(root, "issues.csv"), encoding="utf-8") as handle:
        assert handle.readline().strip() == "timestamp,kind,study_uid,detail,extra"
    result = run_cycle(sample, "--incoming-max-files", "6")
    assert result.returncode == 0
    assert len(zips_on_disk(root)) == 14


def test_month_done_markers(sample):
    run_cycle(sample)
    root = backup_root(sample)
    markers = set(files_named(root, ".month_done"))
    months = {relpath.split("/")[0] for relpath in SAMPLE_EXPECTED.values()}
    assert markers == {m + "/.month_done" for m in months if m != "UNKNOWN_DATE"}
    # A late study for 2019-03 arrives: the month is no longer complete.
    lib = FakeHorosLibrary(sample.pacs_root)
    lib.add_simple_study("1.2.3.99", "CT", images=1, study_date=dt.datetime(2019, 3, 20, 10))
    lib.finish()
    lib.close()
    result = run_cycle(sample, "--batch-size", "1")
    assert result.returncode == 0
    assert os.path.exists(os.path.join(root, "2019_03", ".month_done"))  # exported this cycle
    lib = FakeHorosLibrary(sample.pacs_root)
    lib.add_simple_study("1.2.3.98", "CT", images=1, study_date=dt.datetime(2019, 3, 21, 10))
    lib.add_simple_study("1.2.3.00", "CT", images=1, study_date=dt.datetime(2018, 1, 1, 10))
    lib.finish()
    lib.close()
    run_cycle(sample, "--batch-size", "1")  # exports only the 2018 study
    assert not os.path.exists(os.path.join(root, "2019_03", ".month_done"))
    assert os.path.exists(os.path.join(root, "2018_01", ".month_done"))
    run_cycle(sample, "--batch-size", "1")
    assert os.path.exists(os.path.join(root, "2019_03", ".month_done"))


def test_current_month_gets_no_marker_and_keeps_its_zips(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    now = dt.datetime.now().replace(microsecond=0) - dt.timedelta(hours=3)
    lib.add_simple_study("1.2.5.1", "CT", images=2, study_date=now)
    lib.finish()
    assert run_cycle(lib).returncode == 0
    root = backup_root(lib)
    month = "%04d_%02d" % (now.year, now.month)
    zips = zips_on_disk(root)
    assert list(zips) == [z for z in zips if z.startswith(month + "/")] and len(zips) == 1
    assert not os.path.exists(os.path.join(root, month, ".month_done"))
    for _ in range(2):
        assert run_cycle(lib).returncode == 0
    assert zips_on_disk(root) == zips
    lib.close()


def test_order_by_date_added(tmp_path):
    lib = FakeHorosLibrary(str(tmp_path / "PACS"))
    now = dt.datetime.now()
    lib.add_simple_study("1.1", study_date=dt.datetime(2010, 1, 1),
                         date_added=now - dt.timedelta(days=1))
    lib.add_simple_study("1.2", study_date=dt.datetime(2020, 1, 1),
                         date_added=now - dt.timedelta(days=30))
    lib.finish()
    assert run_cycle(lib, "--order-by", "date_added", "--batch-size", "1").returncode == 0
    assert [r["study_uid"] for r in state_rows(backup_root(lib))] == ["1.2"]
    lib.close()


def test_modalities_flag(sample):
    result = run_cycle(sample, "--modalities", "us,OCT")
    assert result.returncode == 0
    assert {r["study_uid"] for r in state_rows(backup_root(sample))} == \
        {"1.2.3.4.5.6.7.8.11.2", "1.2.3.4.5.6.7.8.11.3"}


@pytest.mark.parametrize("compression", ["stored", "deflate"])
def test_compression_flags(sample, compression):
    args = ["--compression", compression, "--compress-level", "9"]
    assert run_cycle(sample, *args).returncode == 0
    root = backup_root(sample)
    uid = "1.2.392.200036.9116.2.6.1.48.1215.1551385800.1"
    path = os.path.join(root, SAMPLE_EXPECTED[uid])
    with zipfile.ZipFile(path) as archive:
        types = {i.compress_type for i in archive.infolist()
                 if i.filename != "horos-backup-manifest.json"}
    assert types == {zipfile.ZIP_STORED if compression == "stored" else zipfile.ZIP_DEFLATED}
    assert_zip_holds_study(sample, path, uid)


def test_paths_given_on_their_own(sample, tmp_path):
    horos = str(tmp_path / "Elsewhere" / "Horos Data")
    shutil.move(sample.horos_data, horos)
    target = str(tmp_path / "Target")
    result = run_cycle(sample, "--horos-data", horos, "--backup-root", target)
    assert result.returncode == 0, result.stderr
    # DATABASE.noindex moved with Horos Data; the in-place study's absolute paths did not.
    assert set(zips_on_disk(target)) == set(SAMPLE_EXPECTED.values()) | {
        r["zip_path"] for r in state_rows(target) if r["study_uid"] == LONG_NAME_UID}
    assert not os.path.exists(os.path.join(sample.pacs_root, "Backup"))


@pytest.mark.parametrize("damage, message", [
    ("missing", "no Horos database"),
    ("garbage", "not a readable SQLite database"),
    ("no_table", "no table ZIMAGE"),
    ("no_column", "ZSERIES has no column ZMODALITY"),
])
def test_unusable_database_is_one_line_and_nonzero(sample, damage, message):
    db = sample.db_path
    sample.close()
    if damage == "missing":
        os.remove(db)
    elif damage == "garbage":
        with open(db, "wb") as handle:
            handle.write(b"this is not sqlite" * 100)
    else:
        conn = sqlite3.connect(db)
        if damage == "no_table":
            conn.execute("DROP TABLE ZIMAGE")
        else:
            conn.execute("ALTER TABLE ZSERIES RENAME TO ZSERIES_OLD")
            conn.execute("CREATE TABLE ZSERIES AS SELECT Z_PK, Z_ENT, Z_OPT, ZSTUDY, ZID, "
                         "ZSERIESINSTANCEUID, ZSERIESDESCRIPTION, ZDATEADDED, "
                         "ZNUMBEROFIMAGES FROM ZSERIES_OLD")
        conn.commit()
        conn.close()
    result = run_cycle(sample)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    root = backup_root(sample)
    assert zips_on_disk(root) == {}
    assert state_rows(root) == []


def test_max_run_seconds_starts_no_new_study_but_always_one(tmp_path):
    lib, order = build_dated_library(str(tmp_path / "PACS"), count=5)
    result = run_cycle(lib, "--max-run-seconds", "0.000001", "--max-mbps", "500")
    assert result.returncode == 0, result.stderr
    assert "--max-run-seconds" in result.stdout
    assert [r["study_uid"] for r in state_rows(backup_root(lib))] == order[:1]
    assert run_cycle(lib, "--max-run-seconds", "0").returncode == 0      # 0: no limit
    assert len(state_rows(backup_root(lib))) == 5
    lib.close()
