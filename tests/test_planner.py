"""Unit tests of the pure parts: dates, names, path rules, selection."""

import datetime as dt
import os
import shlex
import sys
import time

import pytest

import horos_backup_export as hbe
from fake_horos import local_to_coredata, write_horos_preferences


def study_info(uid="1.2.3", patient="DOE^JOHN", birth=None, when=None):
    return hbe.StudyInfo(uid=uid, pks=(1,), patient_name=patient, patient_id="P",
                         birth_date=birth, study_datetime=when, accession_number="",
                         description="", modalities=("CT",))


# -- dates ----------------------------------------------------------------------------

def test_coredata_epoch_is_2001_utc():
    assert hbe.COREDATA_EPOCH_OFFSET == int(
        dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc).timestamp())


def test_birth_date_stored_as_tokyo_midnight_stays_on_its_day():
    # Horos stores 1950-01-01 as local midnight: 15:00 UTC on 1949-12-31 in Tokyo.
    stored = local_to_coredata(dt.date(1950, 1, 1))
    assert dt.datetime.fromtimestamp(stored + hbe.COREDATA_EPOCH_OFFSET,
                                     dt.timezone.utc).day == 31
    assert hbe.coredata_to_local_date(stored) == dt.date(1950, 1, 1)


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/Anchorage", "Pacific/Kiritimati"])
def test_local_dates_round_trip_in_zones_far_from_utc(zone):
    old = os.environ["TZ"]
    os.environ["TZ"] = zone
    time.tzset()
    try:
        for moment in (dt.datetime(2019, 3, 1, 0, 30), dt.datetime(1999, 12, 31, 23, 59),
                       dt.datetime(2024, 2, 29, 12, 0)):
            assert hbe.coredata_to_local(local_to_coredata(moment)) == moment
            assert hbe.month_folder(moment) == "%04d_%02d" % (moment.year, moment.month)
    finally:
        os.environ["TZ"] = old
        time.tzset()


@pytest.mark.parametrize("value", [None, "", "not a date", float("nan"), float("inf"),
                                   1e300, -1e300, b"\x00\xff"])
def test_unknown_or_absurd_dates_are_unknown(value):
    assert hbe.coredata_to_local(value) is None


def test_dates_as_text_and_integer_are_read():
    stored = local_to_coredata(dt.datetime(2020, 5, 6, 7, 8))
    assert hbe.coredata_to_local(str(stored)) == dt.datetime(2020, 5, 6, 7, 8)
    assert hbe.coredata_to_local(int(stored)) == dt.datetime(2020, 5, 6, 7, 8)


def test_dates_before_2001_are_negative_and_fine():
    stored = local_to_coredata(dt.date(1931, 7, 4))
    assert stored < 0
    assert hbe.coredata_to_local_date(stored) == dt.date(1931, 7, 4)


# -- names ----------------------------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [
    ("JOÃO^SÃO", "JOAO_SAO"),
    ("Müller^Jürgen", "Muller_Jurgen"),
    ("O'BRIEN^ANNE-MARIE", "O_BRIEN_ANNE-MARIE"),
    ("../../etc/passwd", "etc_passwd"),
    ("..", "UNKNOWN"),
    ("", "UNKNOWN"),
    (None, "UNKNOWN"),
    ("山田^太郎", "UNKNOWN"),
    ("a\x00b/c\\d", "a_b_c_d"),
    ("\u202eevil\u202c.zip", "evil_.zip"),
    ("  DOE  ^  JOHN  ", "DOE_JOHN"),
    ("___x...", "x"),
    ("ﬁle", "file"),  # NFKD folds the ligature
])
def test_sanitize_part(raw, clean):
    assert hbe.sanitize_part(raw) == clean


def test_zip_name_fields_and_unknowns():
    info = study_info(uid="1.2.840.1", patient="DOE^JOHN", birth=dt.date(1950, 1, 1),
                      when=dt.datetime(2019, 3, 1, 5, 30))
    assert hbe.zip_base_name(info) == "DOE_JOHN_1950-01-01_2019-03-01_1.2.840.1"
    assert hbe.zip_relpath(info) == "2019_03/DOE_JOHN_1950-01-01_2019-03-01_1.2.840.1.zip"
    unknown = study_info(uid="1.2.840.2", patient="", birth=None, when=None)
    assert hbe.zip_relpath(unknown) == "UNKNOWN_DATE/UNKNOWN_UNKNOWN_UNKNOWN_1.2.840.2.zip"


def test_long_name_is_cut_before_the_uid_and_keeps_the_dates():
    uid = "1.3.12.2.1107.5.2.30.25245.3000001903011234567890000000123456789"
    info = study_info(uid=uid, patient="WOLFESCHLEGELSTEIN^" + "HUBERT_" * 60,
                      birth=dt.date(1975, 5, 5), when=dt.datetime(2020, 1, 11))
    name = hbe.zip_base_name(info)
    assert len(name) == 128
    assert name.endswith("_1975-05-05_2020-01-11_" + uid)
    assert name.startswith("WOLFESCHLEGELSTEIN_HUBERT")
    assert "__" not in name


def test_cut_name_does_not_end_its_patient_part_with_underscore():
    uid = "1." + "2" * 60
    # Cutting at the room left lands just after a `_` of the patient name.
    for length in range(30, 60):
        info = study_info(uid=uid, patient="AB_" * length, birth=None, when=None)
        name = hbe.zip_base_name(info)
        assert len(name) <= 128
        assert "__" not in name and name.endswith("_UNKNOWN_UNKNOWN_" + uid)


def test_hostile_overlong_uid_gets_a_bounded_unique_name():
    a = study_info(uid="9" * 300 + ".1")
    b = study_info(uid="9" * 300 + ".2")
    assert len(hbe.zip_base_name(a)) <= 128
    assert hbe.zip_base_name(a) != hbe.zip_base_name(b)


def test_same_study_always_gets_the_same_name():
    info = study_info(uid="1.2.3", patient="JOÃO", birth=dt.date(2000, 1, 2),
                      when=dt.datetime(2010, 5, 6))
    assert hbe.zip_relpath(info) == hbe.zip_relpath(info) == \
        "2010_05/JOAO_2000-01-02_2010-05-06_1.2.3.zip"


# -- Horos path rules (DicomImage.m) --------------------------------------------------

DB = "/H/DATABASE.noindex"


@pytest.mark.parametrize("number, expected", [
    (1, DB + "/10000/1.dcm"),
    (9999, DB + "/10000/9999.dcm"),
    (10000, DB + "/20000/10000.dcm"),
    (12345, DB + "/20000/12345.dcm"),
    (1234567, DB + "/1240000/1234567.dcm"),
    (0, DB + "/10000/0.dcm"),
    (12345.0, DB + "/20000/12345.dcm"),
    ("12345", DB + "/20000/12345.dcm"),
])
def test_path_number_rule(number, expected):
    assert hbe.resolve_image_path(DB, number, None) == expected


def test_path_number_wins_over_path_string():
    assert hbe.resolve_image_path(DB, 5, "/elsewhere/x.dcm") == DB + "/10000/5.dcm"


def test_absolute_path_string_is_used_as_is():
    assert hbe.resolve_image_path(DB, None, "/Volumes/CD/IM0001") == "/Volumes/CD/IM0001"


@pytest.mark.parametrize("path_string, expected", [
    ("20005.pdf", DB + "/30000/20005.pdf"),
    ("9999.dcm", DB + "/10000/9999.dcm"),
    ("report.pdf", DB + "/10000/report.pdf"),
    ("123abc.pdf", DB + "/10000/123abc.pdf"),
    ("45678xyz.zip", DB + "/50000/45678xyz.zip"),
])
def test_relative_path_string_rule(path_string, expected):
    assert hbe.resolve_image_path(DB, None, path_string) == expected


def test_custom_folder_size():
    assert hbe.resolve_image_path(DB, 2500, None, folder_size=1000) == DB + "/3000/2500.dcm"


def test_no_path_at_all():
    assert hbe.resolve_image_path(DB, None, None) is None
    assert hbe.resolve_image_path(DB, None, "") is None


def series(pk, number, modality="CT", description="Axial", uid=None):
    return hbe.SeriesInfo(pk=pk, uid=uid or "1.9.%d" % pk, number=number, modality=modality,
                          description=description)


def image(series_pk, number=None, path=None, instance=None):
    return hbe.ImageRow(pk=0, series_pk=series_pk, path_number=number, path_string=path,
                        instance_number=instance)


def test_multi_frame_rows_give_one_file_and_series_get_folders():
    rows = [image(1, 10, instance=1), image(1, 10, instance=1), image(1, 10, instance=1),
            image(1, 11, instance=2), image(2, 12, instance=1),
            image(2, None, "/In/Place/IM1", instance=2)]
    ordered, files = hbe.plan_study_files([series(2, 5, "SR", "Dose"), series(1, 2)], rows, DB)
    assert [s.pk for s in ordered] == [1, 2]
    assert [f.member for f in files] == [
        "0002_CT_Axial/10.dcm", "0002_CT_Axial/11.dcm",
        "0005_SR_Dose/12.dcm", "0005_SR_Dose/IM1"]
    assert files[3].path == "/In/Place/IM1"


def test_member_names_are_unique_and_safe():
    rows = [image(1, None, "/a/IM1"), image(1, None, "/b/IM1"), image(1, None, "/c/../IM1"),
            image(2, None, "/x/..")]
    ordered, files = hbe.plan_study_files(
        [series(1, 1, "CT", "../../evil"), series(2, 1, "CT", "../../evil")], rows, DB)
    members = [f.member for f in files]
    assert len(set(members)) == len(members) == 4
    for member in members:
        assert not member.startswith("/")
        assert ".." not in member.split("/")
    assert members[0].startswith("0001_CT_evil/")
    assert members[3].startswith("0001_CT_evil_2/")


# -- selection -------------------------------------------------------------------------

@pytest.mark.parametrize("text, tokens", [
    ("CT", ("CT",)), ("CT\\PT", ("CT", "PT")), (" mr ", ("MR",)),
    ("RTSTRUCT\\RTPLAN", ("RTSTRUCT", "RTPLAN")), (None, ()), ("", ()), ("CT\\\\ct", ("CT",)),
])
def test_modality_tokens(text, tokens):
    assert hbe.modality_tokens(text) == tokens


@pytest.mark.parametrize("tokens, eligible", [
    (("CT",), True), (("MR",), True), (("PT", "CT"), True), (("RTSTRUCT", "RTPLAN"), False),
    (("OCT",), False), (("US",), False), (("SR",), False), ((), False), (("CTA",), False),
])
def test_eligibility_is_whole_token(tokens, eligible):
    assert hbe.is_eligible(tokens, hbe.wanted_modalities(("CT", " mr"))) is eligible


def horos_study(uid, date, added=None, mods=("CT",), fingerprint="f", base=None):
    return hbe.HorosStudy(uid=uid, pks=(1,), study_date=date, date_added=added,
                          last_added=added, modalities=mods, fingerprint=fingerprint,
                          base_fingerprint=fingerprint if base is None else base)


NOW = 1_800_000_000.0          # Unix seconds
HOUR = 3600.0


def select(studies, exported=(), changed=(), failures=(), order_by="study_date",
           settle=0.0, now=NOW, bases=None):
    """changed: {uid: time of the last edit or None}, or uids (changes that are not edits)."""
    exported = dict(exported) if not isinstance(exported, dict) else exported
    if not isinstance(changed, dict):
        changed = dict.fromkeys(changed)
    return hbe.plan_selection(studies, exported, changed, dict(failures), ("CT", "MR"),
                              order_by, now, settle, bases=bases)


def uids(selection, limit=None):
    return [c.study.uid for c in selection.queue[:limit]]


def test_queue_oldest_first_ties_by_uid_unknown_last():
    studies = [horos_study("9", None), horos_study("3", 100.0), horos_study("2", 100.0),
               horos_study("1", 300.0), horos_study("8", -5000.0),
               horos_study("7", 50.0, mods=("US",))]
    selection = select(studies)
    assert uids(selection) == ["8", "2", "3", "1", "9"]
    assert selection.eligible == 5
    assert uids(select(studies, exported={"8": "f"}), 2) == ["2", "3"]


def test_queue_by_date_added():
    studies = [horos_study("a", 1.0, added=500.0), horos_study("b", 2.0, added=100.0)]
    assert uids(select(studies, order_by="date_added")) == ["b", "a"]


def test_changed_studies_go_first_and_unchanged_ones_not_at_all():
    studies = [horos_study("old-new", 1.0), horos_study("changed", 50.0, fingerprint="g"),
               horos_study("flagged", 60.0), horos_study("same", 2.0)]
    selection = select(studies, exported={"changed": "f", "flagged": "f", "same": "f"},
                       changed={"flagged"})
    assert [(c.study.uid, c.reason) for c in selection.queue] == [
        ("changed", "changed"), ("flagged", "changed"), ("old-new", "new")]
    assert selection.up_to_date == 1


def test_waiting_failures_take_no_slot_until_due_or_changed():
    studies = [horos_study("broken%d" % i, float(i)) for i in range(15)] + \
        [horos_study("good%d" % i, 100.0 + i) for i in range(15)]
    failures = {"broken%d" % i: hbe.Failure("broken%d" % i, "NO_FILES", 1, NOW + HOUR, "f")
                for i in range(15)}
    selection = select(studies, failures=failures)
    assert uids(selection, 15) == ["good%d" % i for i in range(15)]
    assert selection.waiting == 15
    due = dict(failures, broken3=hbe.Failure("broken3", "NO_FILES", 2, NOW - 1, "f"))
    moved = dict(failures, broken4=hbe.Failure("broken4", "NO_FILES", 2, NOW + HOUR, "old"))
    assert [(c.study.uid, c.reason) for c in select(studies, failures=due).queue][0] == \
        ("broken3", "retry")
    assert uids(select(studies, failures=moved), 1) == ["broken4"]


def test_unsettled_studies_wait():
    recent = NOW - hbe.COREDATA_EPOCH_OFFSET - 10 * 60   # added 10 minutes ago
    settled = NOW - hbe.COREDATA_EPOCH_OFFSET - 61 * 60
    studies = [horos_study("recent", 1.0, added=recent), horos_study("settled", 2.0,
                                                                      added=settled),
               horos_study("never-added", 3.0, added=None)]
    selection = select(studies, settle=60 * 60)
    assert uids(selection) == ["settled", "never-added"]
    assert selection.unsettled == 1
    assert uids(select(studies, settle=0)) == ["recent", "settled", "never-added"]
    future = NOW - hbe.COREDATA_EPOCH_OFFSET + 30 * 86400    # a clock that was wrong
    assert uids(select([horos_study("future", 1.0, added=future)], settle=3600)) == ["future"]


def test_retry_back_off_grows_then_stays_daily():
    assert [hbe.retry_delay(n) for n in range(1, 7)] == \
        [HOUR, 6 * HOUR, 24 * HOUR, 24 * HOUR, 24 * HOUR, 24 * HOUR]


# The columns of CANDIDATES_SQL, in its order; the reader's work NULL unless given.
CANDIDATE_COLUMNS = ("pk", "uid", "study_date", "date_added", "modality_summary",
                     "series_modalities", "fingerprint_text", "annotations_text",
                     "series_annotations")


def candidate_rows(*rows):
    return [dict(zip(CANDIDATE_COLUMNS, row + (None,) * (len(CANDIDATE_COLUMNS) - len(row))))
            for row in rows]


def test_two_rows_with_one_uid_are_one_study():
    rows = candidate_rows(  # in Z_PK order
        (3, "1.2.3", 100.0, 11.0, "SR", "SR", "100000|SR|1|A|P2|0|1|1"),
        (4, "4.5.6", None, 12.0, "US", "US", "0|US|1|B|P3|0|1|1"),
        (7, "1.2.3 ", 200.0, 10.0, "CT", "CT\\ ct ", "200000|CT|5|A|P1|0|1|5"),
    )
    studies = {s.uid: s for s in hbe.group_candidates(rows)}
    assert set(studies) == {"1.2.3", "4.5.6"}
    assert studies["1.2.3"].pks == (3, 7)
    assert studies["1.2.3"].study_date == 100.0
    assert studies["1.2.3"].date_added == 11.0
    assert studies["1.2.3"].last_added == 11.0
    assert studies["1.2.3"].modalities == ("SR", "CT")
    alone = hbe.group_candidates(rows[:1])[0]
    assert studies["1.2.3"].fingerprint != alone.fingerprint


def test_fingerprint_moves_with_what_horos_keeps_and_nothing_else():
    row = (7, "1.2.3", 200.0, 10.0, "CT", "CT", "200000|CT|5|A|P1|0|1|5")

    def fingerprint(**changes):
        values = dict(zip(("pk", "uid", "date", "added", "summary", "series", "text"), row))
        values.update(changes)
        return hbe.group_candidates(candidate_rows(tuple(values.values())))[0].fingerprint

    same = fingerprint()
    assert fingerprint() == same
    assert fingerprint(pk=99, added=999.0) == same     # renumbered rows, a study sent again
    assert fingerprint(text="200000|CT|6|A|P1|0|2|6") != same   # a late series
    assert fingerprint(text="200000|CT|5|B|P1|0|1|5") != same   # a renamed patient


def test_odd_date_types_in_candidate_rows():
    rows = candidate_rows((1, "1.1", "612345678.5", 5, "CT", None, "x"),
                          (2, "2.2", "junk", None, "MR", None, "y"),
                          (3, "3.3", float("nan"), 1e300, "CT", None, "z"))
    studies = {s.uid: s for s in hbe.group_candidates(rows)}
    assert studies["1.1"].study_date == 612345678.5 and studies["1.1"].last_added == 5
    assert studies["2.2"].study_date is None and studies["2.2"].last_added is None
    assert studies["3.3"].study_date is None


def test_month_markers_need_every_eligible_study_and_a_finished_month():
    jan = local_to_coredata(dt.datetime(2020, 1, 15))
    studies = [horos_study("a", jan), horos_study("b", jan),
               horos_study("c", jan, mods=("US",))]
    counts = hbe.month_completeness(studies, {"a": "f"}, ("CT",))
    assert counts == {"2020_01": (2, 1)}
    assert hbe.month_is_over("2020_01", dt.date(2020, 2, 1))
    assert not hbe.month_is_over("2020_01", dt.date(2020, 1, 31))
    assert not hbe.month_is_over("UNKNOWN_DATE", dt.date(2030, 1, 1))


# -- gentle I/O -------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_throttle_sleeps_to_hold_the_rate():
    clock = FakeClock()
    throttle = hbe.Throttle(2.0, clock=clock, sleep=clock.sleep)   # 2 MB/s
    throttle(1_000_000)            # 1 MB at once: 0.5 s ahead of the rate
    clock.now += 0.2               # reading took 0.2 s of that
    throttle(1_000_000)            # 2 MB after 0.7 s: 0.3 s ahead
    clock.now += 2.0               # a slow disk: behind the rate, no sleep
    throttle(1_000_000)
    assert clock.slept == [0.5, 0.3]


def test_no_throttle_at_zero():
    clock = FakeClock()
    throttle = hbe.Throttle(0, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        throttle(10_000_000)
    assert clock.slept == []


# -- configuration ---------------------------------------------------------------------

def test_path_constants_apply_unless_pacs_root_is_given(tmp_path, monkeypatch):
    # What a person does who edits the constants at the top of the copied script.
    import importlib.util
    with open(hbe.__file__, encoding="utf-8") as handle:
        text = handle.read()
    for old, new in (
            ("HOROS_DATA_DIR = os.path.join(PACS_ROOT, HOROS_DATA_SUBDIR)",
             'HOROS_DATA_DIR = "/Volumes/RAID/Horos Data"'),
            ("BACKUP_ROOT = os.path.join(PACS_ROOT, BACKUP_SUBDIR)",
             'BACKUP_ROOT = "/Volumes/BACKUP/Horos"'),
            ("BATCH_SIZE = 15 ", "BATCH_SIZE = 4 ")):
        assert text.count(old) == 1
        text = text.replace(old, new)
    edited = tmp_path / "horos_backup_export.py"
    edited.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("edited_copy", str(edited))
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "edited_copy", copy)     # dataclasses look it up
    spec.loader.exec_module(copy)
    cfg = copy.config_from_args(copy.parse_args([]))
    assert (cfg.pacs_root, cfg.sentinel, cfg.horos_data, cfg.backup_root) == (
        "/Volumes/PACS", "/Volumes/PACS/.pacs_sentinel", "/Volumes/RAID/Horos Data",
        "/Volumes/BACKUP/Horos")
    assert cfg.batch_size == 4
    cfg = copy.config_from_args(copy.parse_args(["--pacs-root", "/X"]))
    assert (cfg.sentinel, cfg.horos_data, cfg.backup_root) == (
        "/X/.pacs_sentinel", "/X/Database/Horos Data", "/X/Backup")
    cfg = copy.config_from_args(copy.parse_args(["status", "--pacs-root", "/X",
                                                 "--backup-root", "/B/H"]))
    assert (cfg.horos_data, cfg.backup_root) == ("/X/Database/Horos Data", "/B/H")


def locations(cfg):
    return (cfg.pacs_root, cfg.sentinel, cfg.backup_root, cfg.horos_data,
            os.path.expanduser(cfg.horos_prefs_file))


@pytest.mark.parametrize("argv", [
    [],
    ["--pacs-root", "/Volumes/RAID 2"],
    ["--pacs-root", "/Volumes/RAID", "--backup-root", "/Volumes/Backup Disk/Horos"],
    ["--backup-root", "/Volumes/Backup/Horos"],
    ["--pacs-root", "/X", "--horos-data", "/Users/rad/Documents/Horos Data"],
    ["--horos-data", "/Users/rad/Horos Data"],
    ["--horos-prefs", "{tmp}/it's horos.plist"],
    ["--pacs-root", "/Volumes/PACS", "--backup-root", "/Volumes/PACS/Backup"],
])
@pytest.mark.parametrize("with_preferences", [False, True])
def test_the_commands_an_alert_names_reach_the_same_backup_and_library(
        argv, with_preferences, tmp_path, monkeypatch):
    """location_flags, put before any command's name, gives back every location of the
    run that named it: what the plist passed, what Horos's preferences chose."""
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = [word.format(tmp=tmp_path) for word in argv]
    write_horos_preferences({}, path=str(tmp_path / "it's horos.plist"))
    if with_preferences:
        write_horos_preferences({"DATABASELOCATION": 1,
                                 "DATABASELOCATIONURL": "/Volumes/Other/Library"},
                                home=str(tmp_path))
    cfg = hbe.config_from_args(hbe.parse_args(argv))
    flags = hbe.location_flags(cfg)
    for command in ("status", "find", "acknowledge-shrink"):
        again = hbe.config_from_args(hbe.parse_args(shlex.split(flags) + [command]))
        assert locations(again)[:3] == locations(cfg)[:3], (command, flags)
        if command == "status":                    # the one of them that reads Horos
            assert locations(again) == locations(cfg), flags
    if not argv:                    # a run on the defaults: the commands need no flag
        assert flags == ""
    if argv == ["--pacs-root", "/Volumes/RAID 2"]:      # the usual plist: nothing more
        assert flags == " --pacs-root '/Volumes/RAID 2'"


@pytest.mark.parametrize("argv", [["--batch-size", "0"], ["--batch-size", "x"],
                                  ["--compress-level", "10"], ["--min-free-gb", "-1"],
                                  ["--max-mbps", "nan"], ["--modalities", ","],
                                  ["--order-by", "name"], ["restore", "a.zip"]])
def test_bad_flags_are_refused_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        hbe.parse_args(argv)
    assert stopped.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_files_decision_for_the_cycle_and_the_dry_run():
    missing = hbe.Failure("u", "MISSING_FILES", 2, 0.0, "f")
    other = hbe.Failure("u", "FILE_CHANGED", 5, 0.0, "f")
    outcome = hbe.Outcome
    assert hbe.files_decision(0, 3, None, 3) == outcome.NO_FILES
    assert hbe.files_decision(3, 0, missing, 3) == outcome.EXPORTED
    assert hbe.files_decision(2, 1, None, 3) == outcome.DEFERRED
    assert hbe.files_decision(2, 1, missing, 3) == outcome.DEFERRED   # 2 deferrals of 3
    assert hbe.files_decision(2, 1, missing, 2) == outcome.PARTIAL    # used up
    assert hbe.files_decision(2, 1, other, 1) == outcome.DEFERRED     # others don't count
    assert hbe.files_decision(2, 1, None, 0) == outcome.PARTIAL
