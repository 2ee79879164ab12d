#!/usr/bin/env python3
"""horos_backup_export: one verified ZIP per CT/MR study of a Horos library.

launchd runs this file every 10 minutes (com.horos.backup.plist). Each run is one
cycle: it picks the next few studies Horos holds that are not backed up yet, writes
each one as a ZIP in a monthly folder under BACKUP_ROOT, verifies it, and records it
in BACKUP_ROOT/export_state.sqlite. A person can run the same file by hand; the
README documents every flag, file and format.

Python 3.8+ standard library only: the file is copied to /Volumes/PACS/Backup/ and
run by macOS's /usr/bin/python3.

Sections, in the order data flows; each uses only what is above it:
  constants - shared helpers - data types - Horos reader - Horos preferences -
  planner (pure) - clinic hours (pure) - departures (pure) - archive writer - state
  store - edit check - issues, logs and progress - file modes - alerts - cycle - mirror -
  operator commands - doctor - find - restore - CLI
"""

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime as dt
import difflib
import errno
import fcntl
import functools
import gc
import hashlib
import heapq
import itertools
import json
import logging
import logging.handlers
import math
import os
import plistlib
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass
from xml.parsers.expat import ExpatError
from typing import (Any, Callable, Container, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple)


# =====================================================================================
# Constants
# =====================================================================================
#
# The settings first: each is the default of one flag (declared once, on its Config
# field), and editing it here changes what the copy launchd runs does. The README's
# configuration table lists them; a test checks that the three agree.

TOOL_VERSION = "1.1.0"

# The commands: the first word on the command line (CYCLE: none, a backup cycle).
CYCLE = "cycle"
STATUS = "status"
VERIFY = "verify"
RESTORE = "restore"
REINDEX = "reindex"
RETRY = "retry"
DOCTOR = "doctor"
FIND = "find"
TEST_ALERT = "test-alert"
ACKNOWLEDGE_SHRINK = "acknowledge-shrink"
MIRROR = "mirror"
EVERY_COMMAND = (CYCLE, STATUS, VERIFY, RESTORE, REINDEX, RETRY, DOCTOR, FIND, TEST_ALERT,
                 ACKNOWLEDGE_SHRINK, MIRROR)
OPENS_A_DATABASE = tuple(c for c in EVERY_COMMAND if c not in (TEST_ALERT,
                                                               ACKNOWLEDGE_SHRINK))
READS_HOROS_DATA = (CYCLE, STATUS, DOCTOR, RESTORE)     # Horos Data and its preferences
ALERTING_COMMANDS = (CYCLE, STATUS, VERIFY, TEST_ALERT, ACKNOWLEDGE_SHRINK, MIRROR)
# The jobs with a clock (a cycle, a mirror run): the heartbeat and --alert-after-hours.
CYCLE_ALERTING = (CYCLE, STATUS, VERIFY, TEST_ALERT, MIRROR)

PACS_ROOT = "/Volumes/PACS"                                     # --pacs-root
# Where the sentinel, Horos Data and the backup sit on the PACS volume; --pacs-root X
# puts them below X instead.
SENTINEL_NAME = ".pacs_sentinel"
HOROS_DATA_NAME = "Horos Data"
HOROS_DATA_SUBDIR = os.path.join("Database", HOROS_DATA_NAME)
BACKUP_SUBDIR = "Backup"
SENTINEL = os.path.join(PACS_ROOT, SENTINEL_NAME)               # follows --pacs-root
HOROS_DATA_DIR = os.path.join(PACS_ROOT, HOROS_DATA_SUBDIR)     # --horos-data
BACKUP_ROOT = os.path.join(PACS_ROOT, BACKUP_SUBDIR)            # --backup-root
# Horos's settings, of the user who runs Horos (expanded with that user's HOME).
HOROS_PREFS = "~/Library/Preferences/org.horosproject.horos.plist"  # --horos-prefs

BATCH_SIZE = 15                                                 # --batch-size
INCOMING_MAX_FILES = 25_000                                     # --incoming-max-files
ORDER_BY = "study_date"                                         # --order-by
MODS = ("CT", "MR")                                             # --modalities CT,MR
USE_DB_COPY = False                                             # --use-db-copy

# Deflate level 1 halves CT and MR (about 51% of the bytes on CT-like data) for a fifth
# of level 6's CPU; levels 6 and 9 save 1-2% more (BENCHMARKS.md). On a small Mac with a
# USB disk, writing and re-reading half the bytes pays for the CPU.
COMPRESSION = "deflate"                                         # --compression
COMPRESS_LEVEL = 1                                              # --compress-level
BUSY_TIMEOUT_SECONDS = 30.0                                     # --busy-timeout

# A study is exported once Horos has added nothing to it for this long. CT arrives in
# minutes, but MR scanners send each series as it finishes over a 30-45 minute exam,
# and reconstructions or reports can trail; anything later still triggers a re-export.
# An edited study (ROIs, comments, report...) is exported again once the reader has
# edited nothing in it for as long: once per reading session, not per keystroke.
SETTLE_MINUTES = 60                                             # --settle-minutes
MISSING_RETRIES = 3                                             # --missing-retries
MIN_FREE_GB = 20.0                                              # --min-free-gb

# Each cycle re-reads this many of the longest-unverified ZIPs: at 144 cycles a day,
# 50,000 ZIPs are all read back about every four months.
VERIFY_PER_RUN = 3                                              # --verify-per-run

# Off by default: under launchd the job runs with LowPriorityIO, so macOS already puts
# Horos's reads first. A cap helps a person who runs the script by hand next to Horos.
MAX_MBPS = 0.0                                                  # --max-mbps

# Stop starting new studies after this long, so a cycle of big CT studies ends before
# launchd's next tick (600 s); the lock would make that tick skip anyway.
MAX_RUN_SECONDS = 480.0                                         # --max-run-seconds

# Inside clinic hours (local time, the end exclusive; 19-07 wraps past midnight) a cycle
# exports up to BATCH_SIZE studies, so Horos and its users never feel it. Outside them
# it keeps going until MAX_RUN_SECONDS: a 50,000-study backlog drains over nights and
# weekends instead of taking weeks at 15 per cycle. "none": no cap at any hour;
# "00-24": the cap at every hour of every day.
CLINIC_HOURS = "07-19"                                          # --clinic-hours
CLINIC_DAYS = "mon-fri"                                         # --clinic-days

# Alerts (README: Alerts). No channel is set by default: a cycle then sends nothing.
ALERT_EMAIL = ""             # --alert-email ADDR[,ADDR...]; "" sends no email
SMTP_HOST = ""               # --smtp-host
SMTP_PORT = 587              # --smtp-port (465: TLS from the start)
SMTP_USER = ""               # --smtp-user; "" sends without logging in (a local relay)
SMTP_PASSWORD_FILE = ""      # --smtp-password-file; never the password itself
ALERT_COMMAND = ""           # --alert-command, run by /bin/sh -c
HEARTBEAT_URL = ""           # --heartbeat-url (healthchecks.io style: URL, URL/fail)
ALERT_AFTER_HOURS = 24.0     # --alert-after-hours; 0: at the first failed cycle
ALERT_SUBJECT_ENV = "HOROS_BACKUP_ALERT_SUBJECT"   # the subject, for --alert-command

# Rows per candidate-scan transaction (for tests and the benchmark, a hidden flag).
# Measured at 150,000 studies / 750,000 series on this project's 2-core machine, idle:
# 1,000 studies take 4-6 ms in SQLite, 2,000 take 9-12 ms, 5,000 23-28 ms, and the
# whole scan costs the same 0.6-0.7 s at any size from 500 up. Under a load of 3
# (BENCHMARKS.md) 2,000 reached 53 ms: a reader that loses the CPU mid-transaction
# keeps the lock meanwhile. 1,000 kept the longest near 25 ms there, half the 50 ms
# target, for a slower Mac; a chunk's rows are grouped after its transaction ends.
# Since the scan also reads the reader's work (comments, status, Horos's SR series), a
# study costs a third more (at 50,000 studies, 7.6 ms of CPU per 1,000 against 5.9):
# 750 holds each transaction as long as 1,000 did, for the same total.
HOROS_CHUNK_ROWS = 750                                          # --horos-chunk-rows

MAX_NAME_NOEXT = 128         # longest ZIP name without `.zip`
VERIFY_MIN_AGE_DAYS = 30     # a cycle re-reads only ZIPs last read longer ago than this
VERIFY_DEFAULT_LIMIT = 100   # `verify` with no --all/--limit/--max-gb
LAUNCHD_INTERVAL_SECONDS = 600   # StartInterval in com.horos.backup.plist (for the ETA)
LOCK_WAIT_SECONDS = 900      # how long an operator command waits for a running cycle
LOG_MAX_BYTES = 100 * 1024 * 1024
LOG_BACKUP_COUNT = 10

# issues.csv rotates like the log: an INCOMING that stays over the limit adds 144 rows a
# day for as long as it lasts.
ISSUES_MAX_BYTES = 10 * 1024 * 1024
ISSUES_BACKUP_COUNT = 5

# The ZIPs, the state, issues.csv and the logs hold patient data: what we create under
# BACKUP_ROOT grants group and others nothing (folders 0700, files 0600), whatever the
# umask of launchd or of the person's shell. 0o027 lets the folder's group read (README,
# "File modes").
BACKUP_UMASK = 0o077

ORDER_CHOICES = ("study_date", "date_added")
COMPRESSION_CHOICES = ("stored", "deflate")
VERIFY_ATTEMPTS = 3          # write + testzip() attempts before a study counts as failed
RETRY_BACKOFF_SECONDS = (3600, 6 * 3600, 24 * 3600)  # after failure 1, 2, 3+ (then daily)
DB_FOLDER_SIZE = 10000       # Horos preference DefaultFolderSizeForDB
HOROS_AUTO_CLEANING_SIZE = 1024   # Horos's default auto-cleaning threshold, in MB (MiB)
COREDATA_EPOCH_OFFSET = 978307200  # 2001-01-01T00:00:00Z in Unix seconds
COPY_CHUNK_BYTES = 1024 * 1024
GB = 1000 ** 3               # MIN_FREE_GB is in the decimal gigabytes Finder shows
MIB = 1024 * 1024            # Horos's "MB"

# Names on disk. Users and their scripts rely on these (README, "Files").
BACKUP_SENTINEL_NAME = ".backup_sentinel"   # in BACKUP_ROOT's parent, when on another disk
HOROS_DATABASE_FILE = "Database.sql"
HOROS_FILES_DIR = "DATABASE.noindex"
HOROS_INCOMING_DIR = "INCOMING.noindex"
STATE_FILE = "export_state.sqlite"
ISSUES_FILE = "issues.csv"
LOG_DIR = "logs"
LOG_FILE = "horos_backup.log"
TMP_DIR = ".tmp"
LOCK_FILE = ".run.lock"
DB_COPY_DIR = "dbcopy"
DB_COPY_FILE = "Database_copy.sql"
PART_SUFFIX = ".part"
MONTH_DONE_FILE = ".month_done"
UNKNOWN = "UNKNOWN"
UNKNOWN_DATE_FOLDER = "UNKNOWN_DATE"
MONTH_FOLDER = re.compile(r"^(\d{4}_\d{2}|%s)$" % UNKNOWN_DATE_FOLDER)
MANIFEST_NAME = "horos-backup-manifest.json"
MANIFEST_FORMAT = "horos-backup-manifest"
MANIFEST_FORMAT_VERSION = 1
ISSUES_HEADER = ("timestamp", "kind", "study_uid", "detail", "extra")

# ZIP can store no timestamp before 1980 or after 2107 (MS-DOS date fields).
ZIP_MIN_DATE_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_MAX_DATE_TIME = (2107, 12, 31, 23, 59, 58)
MAX_MEMBER_PART = 80         # characters of one folder or file name inside a ZIP

EXIT_OK = 0
EXIT_FAILED = 1       # the cycle or command could not run; one line on stderr says why
EXIT_USAGE = 2        # a bad command line (argparse's own code)
EXIT_INTERRUPTED = 130

# issues.csv kinds (README: issues.csv). The first five are also a failed study's
# `failures.kind`.
NO_FILES = "NO_FILES"                        # none of its files exist
MISSING_FILES = "MISSING_FILES"              # some are missing: deferred
FILE_CHANGED = "FILE_CHANGED"                # a file moved while it was zipped
UNREADABLE_FILE = "UNREADABLE_FILE"
ZIP_BAD = "ZIP_BAD"                          # failed verification as it was written
PARTIAL = "PARTIAL"                          # exported without its missing files
INCOMING_OVER_LIMIT = "INCOMING_OVER_LIMIT"  # the cycle was skipped
HOROS_DB_UNREADABLE = "HOROS_DB_UNREADABLE"
DISK_LOW = "DISK_LOW"
DISK_FULL = "DISK_FULL"
VERIFY_FAILED = "VERIFY_FAILED"              # a ZIP read back is missing or damaged
UNREADABLE_ZIP = "UNREADABLE_ZIP"            # a ZIP whose manifest cannot be read
# A ZIP the state lists, found missing or damaged on BACKUP_ROOT by `mirror` as it read it
# to copy it: the mirror keeps the copy it has.
MIRROR_SOURCE_BAD = "MIRROR_SOURCE_BAD"


class Outcome:
    """What a cycle did with a study it took up (export_study), or would do
    (files_decision, the dry run). NO_FILES and DEFERRED come before anything is
    written: the study leaves its batch slot to the next one."""
    EXPORTED = "exported"
    PARTIAL = "partial"          # exported without the files still missing
    DEFERRED = "deferred"        # some files missing: tried again later
    NO_FILES = "no_files"        # none of its files exist
    FAILED = "failed"            # written, but it failed (FILE_CHANGED, ZIP_BAD ...)


class Reason:
    """Why a study is in the export queue (Candidate.reason), in the order the queue
    takes them: re-exports of changed and edited studies first, then new studies and
    retries, and last the studies an older version exported without the reader's work
    (an upgrade never holds up a study that has no backup at all)."""
    CHANGED = "changed"          # exported; Horos added images, renamed the patient...
    EDITED = "edited"            # exported; the reader's work changed (README: Edits)
    NEW = "new"
    RETRY = "retry"              # failed before, and due again
    UPGRADE = "upgrade"          # exported by a version that recorded no reader's work
    REEXPORTS = (CHANGED, EDITED, UPGRADE)


# Horos's own SR series, where it keeps the reader's work (DicomStudy.m): kind ->
# (ZSERIES.ZID, ZSERIES.ZNAME). Horos finds each by that number, that exact name and an
# SR SOP class (ZSERIESSOPCLASSUID 1.2.840.10008.5.1.4.1.1.88.x), never by
# ZIMAGE.ZGENERATEDBYOSIRIX, which a re-import or a rebuild leaves NULL: so do we.
HOROS_SR_SERIES = {"roi": (5002, "OsiriX ROI SR"), "report": (5003, "OsiriX Report SR"),
                   "annotations": (5004, "OsiriX Annotations SR")}
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


# runs.outcome (README: State): how a cycle ended.
CYCLE_OK = "ok"
CYCLE_SKIPPED_INCOMING = "skipped_incoming"
CYCLE_DISK_LOW = "disk_low"
CYCLE_DISK_FULL = "disk_full"
CYCLE_HOROS_UNREADABLE = "horos_unreadable"
CYCLE_ERROR = "error"
CYCLE_SKIPPED_LOCK = "skipped_lock"   # another run holds the lock; not recorded in runs

# How a `mirror --to DIR` run ended (MirrorSummary.outcome, its log's last line).
MIRROR_COMPLETE = "complete"         # DIR holds every ZIP it could copy
MIRROR_INCOMPLETE = "incomplete"     # stopped by --max-run-seconds, or a copy failed
MIRROR_UNPLUGGED = "unplugged"       # DIR's disk is not connected: nothing was done
MIRROR_SKIPPED_LOCK = "skipped_lock"     # another run holds DIR's lock
MIRROR_ERROR = "error"               # it could not run (one line on stderr says why)


# =====================================================================================
# Shared helpers: errors, values, text for people, time, durable files, flag values
# =====================================================================================
#
# What several layers use: the errors main() turns into one line and an exit code,
# values read from Horos's columns (damaged stores hold anything), text for people,
# UTC times, files written whole or not at all, and the parsers of flag values.

log = logging.getLogger("horos_backup_export")


class CannotRun(Exception):
    """The cycle or command cannot run: printed as one line, exit EXIT_FAILED."""


class HorosUnreadable(CannotRun):
    """Database.sql is missing, damaged, locked, or not a Horos store."""


class DiskSpaceProblem(CannotRun):
    """The backup volume is (nearly) full: the cycle stops; the next one continues."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind         # DISK_LOW or DISK_FULL


class Terminated(Exception):
    """launchd (or kill) sent SIGTERM."""


def raise_terminated(_signum, _frame):
    raise Terminated()


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, sqlite3.OperationalError) and "full" in str(error)


def as_text(value) -> str:
    """A column value as text: Core Data stores text, but damaged stores hold anything."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def as_int(value) -> Optional[int]:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(as_text(value)) if not isinstance(value, float) else value
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return int(number)


def coredata_seconds(value) -> Optional[float]:
    """Core Data seconds from a REAL, an INTEGER or a numeric TEXT; None otherwise."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        try:
            seconds = float(as_text(value).strip())
        except ValueError:
            return None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return seconds


def coredata_to_local(value) -> Optional[dt.datetime]:
    """Core Data seconds -> naive local datetime, None when unknown or absurd.

    Horos builds these values from DICOM tags in the Mac's local time zone, so local
    time (not UTC) gives back the date the scanner wrote.
    """
    seconds = coredata_seconds(value)
    if seconds is None:
        return None
    try:
        return dt.datetime.fromtimestamp(seconds + COREDATA_EPOCH_OFFSET)
    except (OverflowError, OSError, ValueError):
        return None


def coredata_to_local_date(value) -> Optional[dt.date]:
    moment = coredata_to_local(value)
    return moment.date() if moment else None


def format_date(day: Optional[dt.date]) -> str:
    return "%04d-%02d-%02d" % (day.year, day.month, day.day) if day else UNKNOWN


def modality_tokens(text) -> Tuple[str, ...]:
    """`CT\\PT` -> ('CT', 'PT'): trimmed, upper-case, whole tokens, in order, no repeats."""
    tokens = []
    for raw in as_text(text).split("\\"):
        token = raw.strip().upper()
        if token and token not in tokens:
            tokens.append(token)
    return tuple(tokens)


def strip_accents(text: str) -> str:
    """NFKD with the combining marks removed: JOÃO -> JOAO, Müller -> Muller."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def printable(text) -> str:
    """A name as one safe line on a terminal (no control characters)."""
    return "".join(ch if ch.isprintable() else "?" for ch in as_text(text))


def plural(count: int, noun: str, nouns: str = "") -> str:
    return "%d %s" % (count, noun if count == 1 else nouns or noun + "s")


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return "%.0f %s" % (count, unit) if unit == "B" else "%.1f %s" % (count, unit)
        count /= 1000.0
    return "%.2f TB" % count


def format_duration(seconds: float) -> str:
    if seconds >= 86400:
        return "%.1f days" % (seconds / 86400)
    if seconds >= 3600:
        return "%.1f h" % (seconds / 3600)
    return "%.0f min" % (seconds / 60)


def hours_text(seconds: float) -> str:
    return "%.0f min" % (seconds / 60) if seconds < 3600 else "%.1f h" % (seconds / 3600)


def utc_iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc_iso(text) -> float:
    """Unix seconds of a utc_iso() string; 0 (long past) for anything else."""
    try:
        moment = dt.datetime.strptime(as_text(text), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return 0.0
    return moment.replace(tzinfo=dt.timezone.utc).timestamp()


def local_time_text(utc_text) -> str:
    """A state timestamp as the Mac's local time, for people."""
    seconds = parse_utc_iso(utc_text)
    if not seconds:
        return as_text(utc_text) or "-"
    return dt.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def nearest_existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def same_disk(path: str, other: str) -> bool:
    """Whether two paths (or the folders that would hold them) are on one file system."""
    return os.stat(nearest_existing(path)).st_dev == os.stat(nearest_existing(other)).st_dev


def durable_sync(fd: int) -> None:
    """fsync that reaches the disk: on macOS plain fsync stops in the drive's cache."""
    full_fsync = getattr(fcntl, "F_FULLFSYNC", None)
    if full_fsync is not None:
        try:
            fcntl.fcntl(fd, full_fsync)
            return
        except OSError as error:  # some file systems (SMB, FAT) refuse F_FULLFSYNC
            log.debug("F_FULLFSYNC refused (%s); using fsync", error)
    os.fsync(fd)


def sync_directory(path: str) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        durable_sync(fd)
    finally:
        os.close(fd)


def write_small_file(path: str, text: str) -> None:
    """Write a small file whole or not at all (temp file, fsync, rename)."""
    partial = path + PART_SUFFIX
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        durable_sync(handle.fileno())
    os.replace(partial, path)


def remove_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def bounded_number(kind, low, high=None):
    """An argparse type: a number of `kind` (int or float) from low to high."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a %s" % (
                text, "whole number" if kind is int else "number")) from None
        if value != value or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                "must be from %s to %s" % (low, high) if high is not None
                else "must be %s or more" % low)
        return value
    return parse


positive_int = bounded_number(int, 1)
non_negative_int = bounded_number(int, 0)
non_negative_float = bounded_number(float, 0)
compress_level = bounded_number(int, 0, 9)


def parse_modalities(text: str) -> Tuple[str, ...]:
    tokens = tuple(t.strip().upper() for t in text.split(",") if t.strip())
    if not tokens:
        raise argparse.ArgumentTypeError("give at least one modality, e.g. CT,MR")
    return tokens


def parse_addresses(text: str) -> Tuple[str, ...]:
    """--alert-email: comma-separated addresses, each with one @."""
    addresses = tuple(part.strip() for part in text.split(",") if part.strip())
    for address in addresses:
        if address.count("@") != 1 or any(c in address for c in " <>\"\r\n"):
            raise argparse.ArgumentTypeError("%r is not an email address" % address)
    return addresses


def day_argument(text: str) -> dt.date:
    """--since: a local calendar day, `YYYY-MM-DD`."""
    try:
        return dt.datetime.strptime(text.strip(), "%Y-%m-%d").date()
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a day: use YYYY-MM-DD, e.g. 2026-11-24"
                                         % text) from None


# Studies that left together share their time: find --left-horos after an emptied
# library asks this 50,000 times of a handful of values, and strptime is slow.
@functools.lru_cache(maxsize=1024)
def local_day(utc_text) -> Optional[dt.date]:
    """The Mac's local calendar day of a state timestamp (UTC); None when unreadable."""
    seconds = parse_utc_iso(utc_text)
    return dt.datetime.fromtimestamp(seconds).date() if seconds else None


def month_argument(text: str) -> str:
    """--month: `2019_03` (a month folder; `2019-03` works too) or UNKNOWN_DATE."""
    month = text.strip().replace("-", "_")
    if not MONTH_FOLDER.match(month):
        raise argparse.ArgumentTypeError("%r is not a month: use YYYY_MM, e.g. 2019_03, "
                                         "or %s" % (text, UNKNOWN_DATE_FOLDER))
    return month


# =====================================================================================
# Data types
# =====================================================================================
#
# The settings first. Each is one field of Config (or AlertConfig) whose default is its
# constant and whose metadata is its Flag: the argparse flags, which command takes
# which, and the README's configuration table all follow from these declarations.

@dataclass(frozen=True)
class Flag:
    """How a setting is given on the command line."""
    name: str                       # "--batch-size"
    constant: str                   # "BATCH_SIZE": the constant that holds the default
    help: str                       # " (default X)" is added from the field's default
    commands: Tuple[str, ...]       # the commands that take it (CYCLE: a backup cycle)
    type: Optional[Callable[[str], object]] = None   # parses text, the constant's too
    choices: Optional[Tuple[str, ...]] = None
    metavar: Optional[str] = None
    switch: bool = False            # takes no value: on when given
    default_text: str = ""          # the default in --help, when not the value itself
    hidden: bool = False            # not in --help (for tests and the benchmark)


def setting(default, flag: Flag):
    """A field whose default is a constant users may edit, and whose flag is `flag`."""
    return dataclasses.field(default=default, metadata={"flag": flag})


@dataclass(frozen=True)
class HorosPreferences:
    """What Horos's settings say; Horos's defaults for what the file does not hold."""
    path: str
    found: bool = False              # False: no file at the default path
    folder_size: int = DB_FOLDER_SIZE
    database_location: int = 0       # 0: ~/Documents/Horos Data; 1: DATABASELOCATIONURL
    database_location_url: str = ""
    auto_cleaning: bool = True
    auto_cleaning_size: int = HOROS_AUTO_CLEANING_SIZE   # MB, or -N: N % of the volume
    problem: str = ""                # doctor only: why the file could not be used


@dataclass(frozen=True)
class AlertConfig:
    """The alert channels (README: Alerts); the password is read from its file."""
    emails: Tuple[str, ...] = setting(ALERT_EMAIL, Flag(
        "--alert-email", "ALERT_EMAIL", "email alerts to these addresses (needs --smtp-host)",
        ALERTING_COMMANDS, type=parse_addresses, metavar="ADDR[,ADDR...]"))
    smtp_host: str = setting(SMTP_HOST, Flag(
        "--smtp-host", "SMTP_HOST", "mail server for --alert-email", ALERTING_COMMANDS))
    smtp_port: int = setting(SMTP_PORT, Flag(
        "--smtp-port", "SMTP_PORT", "its port; STARTTLS when offered, 465 is TLS from the "
        "start", ALERTING_COMMANDS, type=bounded_number(int, 1, 65535)))
    smtp_user: str = setting(SMTP_USER, Flag(
        "--smtp-user", "SMTP_USER", "log in as this user (only over TLS)",
        ALERTING_COMMANDS))
    smtp_password_file: str = setting(SMTP_PASSWORD_FILE, Flag(
        "--smtp-password-file", "SMTP_PASSWORD_FILE", "the password, first line of a file "
        "only its owner can read (chmod 600)", ALERTING_COMMANDS, metavar="FILE"))
    command: str = setting(ALERT_COMMAND, Flag(
        "--alert-command", "ALERT_COMMAND", "run by /bin/sh -c for each alert: the message "
        "on stdin, the subject in $%s" % ALERT_SUBJECT_ENV, ALERTING_COMMANDS, metavar="CMD"))
    heartbeat_url: str = setting(HEARTBEAT_URL, Flag(
        "--heartbeat-url", "HEARTBEAT_URL", "requested after every cycle that ends well, "
        "URL/fail after a failed one", CYCLE_ALERTING, metavar="URL"))
    after_hours: float = setting(ALERT_AFTER_HOURS, Flag(
        "--alert-after-hours", "ALERT_AFTER_HOURS", "alert when no cycle has succeeded (mirror: "
        "the mirror has not been complete) for this long; 0: at the first failed cycle",
        CYCLE_ALERTING,
        type=non_negative_float))
    smtp_password: str = dataclasses.field(default="", repr=False)

    @property
    def channels(self) -> Tuple[str, ...]:
        """The channels that carry messages (the heartbeat carries none)."""
        return (("email",) if self.emails else ()) + (("command",) if self.command else ())


@dataclass(frozen=True)
class Config:
    """Everything a run depends on, resolved from flags and constants."""
    pacs_root: str = setting(PACS_ROOT, Flag(
        "--pacs-root", "PACS_ROOT", "the PACS volume; holds %s" % SENTINEL_NAME,
        EVERY_COMMAND))
    horos_data: str = setting(HOROS_DATA_DIR, Flag(
        "--horos-data", "HOROS_DATA_DIR", "the Horos Data folder", READS_HOROS_DATA,
        default_text="PACS_ROOT/%s, or the folder Horos's preferences name"
        % HOROS_DATA_SUBDIR))
    backup_root: str = setting(BACKUP_ROOT, Flag(
        "--backup-root", "BACKUP_ROOT", "where ZIPs and state go", EVERY_COMMAND,
        default_text="PACS_ROOT/%s" % BACKUP_SUBDIR))
    batch_size: int = setting(BATCH_SIZE, Flag(
        "--batch-size", "BATCH_SIZE", "studies per cycle in clinic hours", (CYCLE, STATUS),
        type=positive_int))
    incoming_max_files: int = setting(INCOMING_MAX_FILES, Flag(
        "--incoming-max-files", "INCOMING_MAX_FILES", "skip the cycle while "
        "INCOMING.noindex holds more files; restore --into-horos fills it up to this",
        (CYCLE, RESTORE), type=positive_int))
    order_by: str = setting(ORDER_BY, Flag(
        "--order-by", "ORDER_BY", "export order, oldest first", (CYCLE,),
        choices=ORDER_CHOICES))
    modalities: Tuple[str, ...] = setting(MODS, Flag(
        "--modalities", "MODS", "studies to back up, comma-separated", (CYCLE, STATUS),
        type=parse_modalities))
    use_db_copy: bool = setting(USE_DB_COPY, Flag(
        "--use-db-copy", "USE_DB_COPY", "read a snapshot of Database.sql in "
        "BACKUP_ROOT/.tmp/dbcopy", (CYCLE,), switch=True))
    compression: str = setting(COMPRESSION, Flag(
        "--compression", "COMPRESSION", "ZIP member compression", (CYCLE,),
        choices=COMPRESSION_CHOICES))
    compress_level: int = setting(COMPRESS_LEVEL, Flag(
        "--compress-level", "COMPRESS_LEVEL", "deflate level 0-9", (CYCLE,),
        type=bounded_number(int, 0, 9)))
    busy_timeout: float = setting(BUSY_TIMEOUT_SECONDS, Flag(
        "--busy-timeout", "BUSY_TIMEOUT_SECONDS", "seconds to wait for a locked database",
        OPENS_A_DATABASE, type=non_negative_float))
    settle_minutes: float = setting(SETTLE_MINUTES, Flag(
        "--settle-minutes", "SETTLE_MINUTES", "export a study once Horos added nothing to "
        "it, and the reader edited nothing in it, for this long", (CYCLE, STATUS),
        type=non_negative_float))
    missing_retries: int = setting(MISSING_RETRIES, Flag(
        "--missing-retries", "MISSING_RETRIES", "times a study with missing files is "
        "deferred before it is exported without them", (CYCLE,), type=non_negative_int))
    min_free_gb: float = setting(MIN_FREE_GB, Flag(
        "--min-free-gb", "MIN_FREE_GB", "free space to leave on the backup volume; 0 turns "
        "the check off", (CYCLE, STATUS, DOCTOR), type=non_negative_float))
    verify_per_run: int = setting(VERIFY_PER_RUN, Flag(
        "--verify-per-run", "VERIFY_PER_RUN", "old ZIPs each cycle reads back", (CYCLE,),
        type=non_negative_int))
    max_mbps: float = setting(MAX_MBPS, Flag(
        "--max-mbps", "MAX_MBPS", "cap on MB/s read while exporting, verifying and "
        "mirroring; 0: no cap", (CYCLE, VERIFY, MIRROR), type=non_negative_float))
    max_run_seconds: float = setting(MAX_RUN_SECONDS, Flag(
        "--max-run-seconds", "MAX_RUN_SECONDS", "start no new study (mirror: no new ZIP) "
        "after this long; 0: no limit", (CYCLE, STATUS, MIRROR), type=non_negative_float))
    verbose: bool = setting(False, Flag(
        "--verbose", "", "debug logging", EVERY_COMMAND, switch=True))
    horos_prefs_file: str = setting(HOROS_PREFS, Flag(
        "--horos-prefs", "HOROS_PREFS", "Horos's preferences", READS_HOROS_DATA,
        metavar="PLIST"))
    clinic_hours: str = setting(CLINIC_HOURS, Flag(
        "--clinic-hours", "CLINIC_HOURS", "local hours Horos is in use, the end exclusive "
        "(19-07 wraps): up to --batch-size studies per cycle then, until --max-run-seconds "
        "outside; none: never capped; 00-24: always", (CYCLE, STATUS), metavar="HH-HH"))
    clinic_days: str = setting(CLINIC_DAYS, Flag(
        "--clinic-days", "CLINIC_DAYS", "days with clinic hours: mon-fri, mon-sat, "
        "mon,wed,fri", (CYCLE, STATUS), metavar="DAYS"))
    horos_chunk_rows: int = setting(HOROS_CHUNK_ROWS, Flag(
        "--horos-chunk-rows", "HOROS_CHUNK_ROWS", "ZSTUDY rows per read transaction on "
        "Database.sql", (CYCLE, STATUS), type=positive_int, hidden=True))
    # Derived, not flags: the sentinel follows --pacs-root; Horos's preferences are read
    # from --horos-prefs; the alert settings are checked and the password read.
    sentinel: str = SENTINEL
    horos_prefs: HorosPreferences = HorosPreferences(path="")
    alerts: AlertConfig = AlertConfig()

    @property
    def folder_size(self) -> int:
        """Horos's DefaultFolderSizeForDB: where the path rule finds every file."""
        return self.horos_prefs.folder_size

    @property
    def database_path(self) -> str:
        return os.path.join(self.horos_data, HOROS_DATABASE_FILE)

    @property
    def horos_files_dir(self) -> str:
        return os.path.join(self.horos_data, HOROS_FILES_DIR)

    @property
    def incoming_dir(self) -> str:
        return os.path.join(self.horos_data, HOROS_INCOMING_DIR)

    @property
    def tmp_dir(self) -> str:
        return os.path.join(self.backup_root, TMP_DIR)

    @property
    def lock_path(self) -> str:
        return os.path.join(self.tmp_dir, LOCK_FILE)

    @property
    def state_path(self) -> str:
        return os.path.join(self.backup_root, STATE_FILE)

    @property
    def issues_path(self) -> str:
        return os.path.join(self.backup_root, ISSUES_FILE)

    @property
    def log_path(self) -> str:
        return os.path.join(self.backup_root, LOG_DIR, LOG_FILE)


def setting_fields() -> List[dataclasses.Field]:
    """The fields of Config and AlertConfig that have a flag, in --help order."""
    return [field for kind in (Config, AlertConfig) for field in dataclasses.fields(kind)
            if "flag" in field.metadata]


@dataclass
class ReadTimes:
    """The read transactions on Database.sql: how many, their total and the longest."""
    transactions: int = 0
    seconds: float = 0.0
    longest: float = 0.0

    def add(self, seconds: float) -> None:
        self.transactions += 1
        self.seconds += seconds
        self.longest = max(self.longest, seconds)


@dataclass
class HorosStudy:
    """One StudyInstanceUID as the candidate scan sees it (one or more ZSTUDY rows).

    Every cycle makes one per study of the library (50,000+) while it holds Horos's
    database: slots keep them small and, unlike frozen=True, cheap to create. Nothing
    changes one once made.
    """
    __slots__ = ("uid", "pks", "study_date", "date_added", "last_added", "modalities",
                 "fingerprint", "base_fingerprint")
    uid: str
    pks: Tuple[int, ...]
    study_date: Optional[float]      # Core Data seconds, None when unknown
    date_added: Optional[float]
    last_added: Optional[float]      # newest ZSTUDY.ZDATEADDED of its rows
    modalities: Tuple[str, ...]      # tokens of ZSTUDY.ZMODALITY and of every series
    fingerprint: str
    base_fingerprint: str            # without the reader's work: version 1.0's fingerprint


@dataclass(frozen=True)
class StudyInfo:
    """What the ZIP's name and manifest say about a study; the reader's work as Horos
    holds it in Database.sql (the comments, the status, the report's URL) too."""
    uid: str
    pks: Tuple[int, ...]
    patient_name: str
    patient_id: str
    birth_date: Optional[dt.date]
    study_datetime: Optional[dt.datetime]
    accession_number: str
    description: str
    modalities: Tuple[str, ...]
    comments: Tuple[Optional[str], ...] = (None, None, None, None)   # ZCOMMENT...ZCOMMENT4
    status: Optional[int] = None        # ZSTATETEXT: 0 none, 1 unread ... 4 validated
    report_url: Optional[str] = None    # ZREPORTURL


@dataclass(frozen=True)
class SeriesInfo:
    pk: int
    uid: str
    number: Optional[int]
    modality: str
    description: str                    # as Horos shows it (series_description)
    horos_sr: str = ""                  # a kind of HOROS_SR_SERIES, or "" (not Horos's own)
    comments: Tuple[Optional[str], ...] = (None, None, None, None)
    status: Optional[int] = None
    protocol_name: Optional[str] = None   # DICOM ProtocolName: ZSERIESDESCRIPTION


@dataclass(frozen=True)
class ImageRow:
    pk: int
    series_pk: int
    path_number: object
    path_string: object
    instance_number: object
    key_image: bool = False             # ZIMAGE.ZSTOREDISKEYIMAGE (1, or NULL: never 0)


@dataclass(frozen=True)
class StudyRows:
    """One study as one read transaction found it: its fields, series and image rows."""
    info: StudyInfo
    series: Tuple[SeriesInfo, ...]
    images: Tuple[ImageRow, ...]


@dataclass(frozen=True)
class TableRanges:
    """The lowest and highest Z_PK of ZSTUDY and ZIMAGE (doctor's sample)."""
    first_study: Optional[int]
    last_study: Optional[int]
    first_image: Optional[int]
    last_image: Optional[int]


@dataclass(frozen=True)
class SourceFile:
    """One file of a study: where it is, its name inside the ZIP, its size when listed."""
    member: str
    path: str
    series_uid: str
    size: int = -1           # -1 until stat_files has seen it
    key_image: bool = False  # one of its rows (frames) is a key image


@dataclass(frozen=True)
class StudyPlan:
    """One study the cycle will write: its files and where its ZIP goes."""
    info: StudyInfo
    series: Tuple[SeriesInfo, ...]
    files: Tuple[SourceFile, ...]
    zip_relpath: str
    fingerprint: str
    reason: str = Reason.NEW     # why it is in the queue (Candidate.reason)
    base_fingerprint: str = ""   # HorosStudy.base_fingerprint


@dataclass(frozen=True)
class Failure:
    """A study that could not be exported, and when to try it again."""
    study_uid: str
    kind: str
    attempts: int
    next_attempt: float      # Unix seconds
    fingerprint: str         # of the study when it failed: a change retries it at once


@dataclass(frozen=True)
class Candidate:
    study: HorosStudy
    reason: str              # a Reason


@dataclass(frozen=True)
class ChangeMark:
    """An exported study a cycle saw change since its export (a `changed_studies` row):
    it is exported again. edited_at: when the reader last edited it, as far as the
    cycles can tell (Unix seconds; the settle clock of an edit); None when the change
    is not an edit (image rows Horos added, which settle by the study's dateAdded).
    fingerprint: the study's when that edit was seen: an edit seen only in Database.sql
    moves it again, and restarts the clock."""
    edited_at: Optional[float] = None
    fingerprint: Optional[str] = None


@dataclass
class WatchedFile:
    """A file of one of Horos's own SR series in an exported study, as it was when its
    bytes went into the ZIP (a `horos_sr_files` row). Horos rewrites these in place, so
    a size or mtime that differs now means the ZIP holds old bytes. Slots: a cycle
    reads one per watched file (tens of thousands)."""
    __slots__ = ("study_uid", "path", "size", "mtime_ns")
    study_uid: str
    path: str
    size: int
    mtime_ns: int


@dataclass
class Selection:
    """What the planner made of the library: the head of the queue, and counts."""
    queue: List[Candidate]   # in export order; only the first `limit` when one was given
    pending: int = 0         # the whole queue: ready to export now
    changed: int = 0         # of which exported studies Horos changed since (REEXPORTS)
    edited: int = 0          # of those, the ones the reader edited (Reason.EDITED)
    eligible: int = 0
    up_to_date: int = 0      # exported, and Horos has not changed them since
    waiting: int = 0         # failed, waiting for their next attempt
    unsettled: int = 0       # Horos added to them less than SETTLE_MINUTES ago


@dataclass(frozen=True)
class LeftBatch:
    """The exported studies one cycle found gone from Horos, those of them still gone.

    A cycle's new departures are one batch, named by the time that cycle started: an
    auto-cleaning pass takes a few studies, a rebuilt or emptied Database.sql takes
    thousands at once (README: Alerts). batch_size is how many that cycle found gone,
    0 for those already gone when the cycles began to record departures."""
    left_at: str                     # UTC, the start of the cycle that first saw them gone
    batch_size: int
    studies: int                     # of them, still gone from Horos
    source_bytes: int                # their files, as they were in Horos
    months: Mapping[str, int]        # month folder -> studies


@dataclass(frozen=True)
class Departures:
    """What one cycle's complete scan of Horos found about the exported studies: the
    batches are those of the last LEFT_RECENT_DAYS and every batch of
    SHRINK_MIN_STUDIES or more, oldest first, as the state holds them after the scan."""
    exported: int                    # studies in the backup when the scan began
    left: int                        # gone since the last scan: this cycle's batch
    returned: int                    # recorded as gone, and back in Horos
    batches: Tuple[LeftBatch, ...]


@dataclass
class CycleSummary:
    """What one cycle did: its `runs` row, the log's last line, what alerts read."""
    outcome: str = CYCLE_ERROR       # runs.outcome; CYCLE_SKIPPED_LOCK is not recorded
    detail: str = ""
    issue_kinds: Dict[str, int] = dataclasses.field(default_factory=dict)  # issues.csv rows
    studies: int = 0
    files: int = 0
    source_bytes: int = 0
    zip_bytes: int = 0
    failed: int = 0
    deferred: int = 0
    verified: int = 0
    horos_seconds: Optional[float] = None
    horos_times: ReadTimes = dataclasses.field(default_factory=ReadTimes)
    departures: Optional[Departures] = None   # None: no complete scan of Horos


# =====================================================================================
# Horos reader: every query on Database.sql, read-only, in short read transactions
# =====================================================================================
#
# Horos keeps Database.sql in rollback-journal mode: while any reader holds a read
# transaction, Horos cannot commit, and a commit that waits longer than Horos's busy
# timeout is lost (an import or an edit Horos must retry or report). So no read here
# lasts long whatever the library's size: the candidate scan reads ZSTUDY in chunks
# of Z_PK, each in its own transaction, and each study's plan is one more; the lock is
# released between them, and files are zipped after the connection is closed.
#
# Rows read in different transactions need not agree, and need not: a study Horos
# changes between two chunks is only seen as it was in one of them, and is seen again
# next cycle. Its fingerprint is either the new one (the change came before its chunk)
# or the old one (after), and its plan, read later, holds at least as much as that
# fingerprint says; an old fingerprint recorded with a newer ZIP only makes the next
# cycle see a difference and export it again. New image rows are found by Z_PK above
# the high-water mark, read before the scan: rows added later are above it and caught
# next cycle. A study deleted in between is skipped when its plan finds no row.
#
# A plan is read the same way: its study's fields and series in one transaction, then
# its image rows series by series in Z_PK order, a chunk per transaction (a 20,000-image
# study held Database.sql for 160 ms in one). Horos may commit between two chunks. A
# series added after the first transaction, or rows added to a series after its chunk,
# are not in this ZIP; they came after the scan that read the fingerprint recorded
# with it, so the next cycle finds that fingerprint different and exports the study
# again, with them. Rows Horos deletes between chunks are simply not read, and their
# files are gone with them (the study is deferred as missing files, or partial). Rows
# of Horos's own SR series added meanwhile are above the high-water mark read before
# the scan, and flag the study next cycle.

# New image rows per transaction: one index lookup each, cheaper than a study's row.
IMAGE_CHUNK_FACTOR = 10
# A plan's image rows per transaction: a seek on the ZSERIES index and its rows, in the
# order of the index (no sort). Measured on a 20,000-image study: 1.3 us of SQLite per
# row, so 3,750 rows (with 750 studies per scan chunk) hold the lock about as long as a
# chunk of the scan (5-6 ms); the rows become ImageRows after the transaction.
PLAN_IMAGE_CHUNK_FACTOR = 5

REQUIRED_COLUMNS = {
    "ZSTUDY": ("Z_PK", "ZSTUDYINSTANCEUID", "ZNAME", "ZPATIENTID", "ZDATEOFBIRTH", "ZDATE",
               "ZDATEADDED", "ZMODALITY", "ZACCESSIONNUMBER", "ZSTUDYNAME",
               "ZNUMBEROFIMAGES"),
    "ZSERIES": ("Z_PK", "ZSTUDY", "ZMODALITY", "ZSERIESINSTANCEUID", "ZSERIESDESCRIPTION",
                "ZID", "ZNUMBEROFIMAGES"),
    "ZIMAGE": ("Z_PK", "ZSERIES", "ZPATHNUMBER", "ZPATHSTRING"),
}

# The first read of a transaction takes the SHARED lock, waiting while Horos commits.
TAKE_SHARED_LOCK_SQL = "SELECT 1 FROM sqlite_master LIMIT 1"

# One row per ZSTUDY row with what the planner needs, in Z_PK order (the table's own
# order: no sort), :limit rows after Z_PK :after (a seek on the primary key). The
# fingerprint's fields are formatted here as integers and strings only: the text form
# of a REAL changed in SQLite 3.43, and a macOS update must not make every study look
# changed. Series' dateAdded is not read: Horos sets the study's
# in the same place, for every file it imports (DicomDatabase.mm).
#
# The reader's work, for the fingerprint: annotations_text is NULL unless the study has
# a comment, a status (0 is "none", the model's default), a report URL or one of
# Horos's own SR series (counted by kind: 1, 2^20, 2^40 per ROI, report, annotations
# series); series_annotations is NULL unless a series has a comment or a status. A
# study with neither keeps version 1.0's fingerprint, so an upgrade re-exports only
# the studies that hold annotations. A comparison with NULL is NULL, false in a WHEN:
# no COALESCE needed. The SR series are counted by a CASE inside one SUM, whose WHEN
# stops at the first false test (three SUMs of boolean ANDs cost three times as much:
# an AND computed as a value evaluates both sides). Texts are prefixed by their
# length, so no comment can pass for two; the series' parts are joined in no
# particular order (GROUP_CONCAT has none) and sorted in group_candidates. Measured at
# 50,000 studies (BENCHMARKS.md): 7 ms of CPU per 1,000 studies, against 5.3 without. Key images
# (ZIMAGE.ZSTOREDISKEYIMAGE) are not here: reading them would scan the image rows of
# the whole library, and ZSERIES.ZNUMBEROFKEYIMAGES is never written by Horos. Every
# key-image change makes Horos write a new annotations SR (a new image row, found
# above the high-water mark; DicomStudy.m archiveAnnotationsAsDICOMSR), so the study is
# exported again all the same. {placeholders} are column names or NULL
# (OPTIONAL_COLUMN_SQL), never values.
CANDIDATES_SQL = """
SELECT st.Z_PK AS pk, st.ZSTUDYINSTANCEUID AS uid, st.ZDATE AS study_date,
       st.ZDATEADDED AS date_added, st.ZMODALITY AS modality_summary,
       GROUP_CONCAT(se.ZMODALITY, '\\') AS series_modalities,
       printf('%d|%s|%d|%s|%s|%d|%d|%d', st.ZDATE * 1000, st.ZMODALITY,
              st.ZNUMBEROFIMAGES, st.ZNAME, st.ZPATIENTID, st.ZDATEOFBIRTH * 1000,
              COUNT(se.Z_PK), SUM(se.ZNUMBEROFIMAGES)) AS fingerprint_text,
       CASE WHEN {study_comment} != '' OR {study_comment2} != ''
                 OR {study_comment3} != '' OR {study_comment4} != ''
                 OR {study_status} != 0 OR {report_url} != ''
                 OR SUM(CASE WHEN se.ZID = :roi_number AND {series_name} = :roi_name
                                  AND {series_sop_class} LIKE :sr_sop_class THEN 1
                             WHEN se.ZID = :report_number AND {series_name} = :report_name
                                  AND {series_sop_class} LIKE :sr_sop_class THEN 1048576
                             WHEN se.ZID = :annotations_number
                                  AND {series_name} = :annotations_name
                                  AND {series_sop_class} LIKE :sr_sop_class
                             THEN 1099511627776 END) > 0
            THEN printf('%d:%s|%d:%s|%d:%s|%d:%s|%d|%d:%s|%d',
                        length({study_comment}), {study_comment},
                        length({study_comment2}), {study_comment2},
                        length({study_comment3}), {study_comment3},
                        length({study_comment4}), {study_comment4}, {study_status},
                        length({report_url}), {report_url},
                        SUM(CASE WHEN se.ZID = :roi_number AND {series_name} = :roi_name
                                      AND {series_sop_class} LIKE :sr_sop_class THEN 1
                                 WHEN se.ZID = :report_number
                                      AND {series_name} = :report_name
                                      AND {series_sop_class} LIKE :sr_sop_class THEN 1048576
                                 WHEN se.ZID = :annotations_number
                                      AND {series_name} = :annotations_name
                                      AND {series_sop_class} LIKE :sr_sop_class
                                 THEN 1099511627776 END))
       END AS annotations_text,
       GROUP_CONCAT(CASE WHEN {series_comment} != '' OR {series_comment2} != ''
                              OR {series_comment3} != '' OR {series_comment4} != ''
                              OR {series_status} != 0
                         THEN printf('%d:%s|%d:%s|%d:%s|%d:%s|%d',
                                     length({series_comment}), {series_comment},
                                     length({series_comment2}), {series_comment2},
                                     length({series_comment3}), {series_comment3},
                                     length({series_comment4}), {series_comment4},
                                     {series_status})
                    END, char(30)) AS series_annotations
FROM ZSTUDY AS st
LEFT JOIN ZSERIES AS se ON se.ZSTUDY = st.Z_PK
WHERE st.Z_PK > :after
GROUP BY st.Z_PK
ORDER BY st.Z_PK
LIMIT :limit
"""

# What GROUP_CONCAT puts between the series' parts of series_annotations (char(30)).
SERIES_ANNOTATIONS_SEPARATOR = "\x1e"

# The parameters of CANDIDATES_SQL and NEW_IMAGE_ROWS_SQL that name Horos's own SR series.
HOROS_SR_PARAMETERS = dict(
    sr_sop_class=SR_SOP_CLASS_PREFIX + "%",
    **{"%s_number" % kind: number for kind, (number, _name) in HOROS_SR_SERIES.items()},
    **{"%s_name" % kind: name for kind, (_number, name) in HOROS_SR_SERIES.items()})

STUDY_INFO_SQL = """
SELECT st.ZNAME AS patient_name, st.ZPATIENTID AS patient_id,
       st.ZDATEOFBIRTH AS birth_date, st.ZACCESSIONNUMBER AS accession_number,
       st.ZSTUDYNAME AS description, {study_comment} AS comment,
       {study_comment2} AS comment2, {study_comment3} AS comment3,
       {study_comment4} AS comment4, {study_status} AS status, {report_url} AS report_url
FROM ZSTUDY AS st
WHERE st.Z_PK = ?
"""

STUDY_SERIES_SQL = """
SELECT se.Z_PK AS pk, {series_uid} AS uid, se.ZID AS number, se.ZMODALITY AS modality,
       se.ZSERIESDESCRIPTION AS protocol_name, {series_name} AS name,
       {series_sop_class} AS sop_class, {series_comment} AS comment,
       {series_comment2} AS comment2, {series_comment3} AS comment3,
       {series_comment4} AS comment4, {series_status} AS status
FROM ZSERIES AS se
WHERE se.ZSTUDY = ?
"""

# One series' image rows after Z_PK :after, in Z_PK order: a seek on the ZSERIES index,
# whose entries are in Z_PK order within a series (no sort).
SERIES_IMAGES_SQL = """
SELECT im.Z_PK AS pk, im.ZSERIES AS series_pk, im.ZPATHNUMBER AS path_number,
       im.ZPATHSTRING AS path_string, {instance_number} AS instance_number,
       {key_image} AS key_image
FROM ZIMAGE AS im
WHERE im.ZSERIES = :series AND im.Z_PK > :after
ORDER BY im.Z_PK
LIMIT :limit
"""

OPTIONAL_COLUMN_SQL = {
    # placeholder: (table, column, expression when present, expression when absent)
    "series_uid": ("ZSERIES", "ZSERIESDICOMUID",
                   "COALESCE(se.ZSERIESDICOMUID, se.ZSERIESINSTANCEUID)",
                   "se.ZSERIESINSTANCEUID"),
    "instance_number": ("ZIMAGE", "ZINSTANCENUMBER", "im.ZINSTANCENUMBER", "NULL"),
    "key_image": ("ZIMAGE", "ZSTOREDISKEYIMAGE", "im.ZSTOREDISKEYIMAGE", "NULL"),
    "study_comment": ("ZSTUDY", "ZCOMMENT", "st.ZCOMMENT", "NULL"),
    "study_comment2": ("ZSTUDY", "ZCOMMENT2", "st.ZCOMMENT2", "NULL"),
    "study_comment3": ("ZSTUDY", "ZCOMMENT3", "st.ZCOMMENT3", "NULL"),
    "study_comment4": ("ZSTUDY", "ZCOMMENT4", "st.ZCOMMENT4", "NULL"),
    "study_status": ("ZSTUDY", "ZSTATETEXT", "st.ZSTATETEXT", "NULL"),
    "report_url": ("ZSTUDY", "ZREPORTURL", "st.ZREPORTURL", "NULL"),
    "series_name": ("ZSERIES", "ZNAME", "se.ZNAME", "NULL"),
    "series_sop_class": ("ZSERIES", "ZSERIESSOPCLASSUID", "se.ZSERIESSOPCLASSUID", "NULL"),
    "series_comment": ("ZSERIES", "ZCOMMENT", "se.ZCOMMENT", "NULL"),
    "series_comment2": ("ZSERIES", "ZCOMMENT2", "se.ZCOMMENT2", "NULL"),
    "series_comment3": ("ZSERIES", "ZCOMMENT3", "se.ZCOMMENT3", "NULL"),
    "series_comment4": ("ZSERIES", "ZCOMMENT4", "se.ZCOMMENT4", "NULL"),
    "series_status": ("ZSERIES", "ZSTATETEXT", "se.ZSTATETEXT", "NULL"),
}

# Core Data never reuses a Z_PK, so image rows above the highest one seen last cycle
# are new. Horos's own SRs (ROIs, annotations, key images) add rows that change no
# count it keeps: this catches them for the price of the new rows only, and tells the
# rows of its own SR series (the reader's work) from the others (images that came late).
IMAGE_HIGH_WATER_SQL = "SELECT MAX(Z_PK) AS top FROM ZIMAGE"

NEW_IMAGE_ROWS_SQL = """
SELECT im.Z_PK AS pk, se.ZSTUDY AS study_pk, se.ZID AS number, {series_name} AS name,
       {series_sop_class} AS sop_class
FROM ZIMAGE AS im
LEFT JOIN ZSERIES AS se ON se.Z_PK = im.ZSERIES
WHERE im.Z_PK > :after AND im.Z_PK <= :top
ORDER BY im.Z_PK
LIMIT :limit
"""

# doctor's sample. Two statements each, not MIN and MAX in one: SQLite answers a lone
# MIN() or MAX() of the primary key from the b-tree's edge, but scans the whole table
# for both at once.
FIRST_STUDY_PK_SQL = "SELECT MIN(Z_PK) AS pk FROM ZSTUDY"
LAST_STUDY_PK_SQL = "SELECT MAX(Z_PK) AS pk FROM ZSTUDY"
FIRST_IMAGE_PK_SQL = "SELECT MIN(Z_PK) AS pk FROM ZIMAGE"
LAST_IMAGE_PK_SQL = "SELECT MAX(Z_PK) AS pk FROM ZIMAGE"

# One primary-key lookup per sampled row: the cost does not grow with the library.
IMAGE_AT_OR_AFTER_SQL = """
SELECT Z_PK AS pk, ZSERIES AS series_pk, ZPATHNUMBER AS path_number,
       ZPATHSTRING AS path_string, NULL AS instance_number, NULL AS key_image
FROM ZIMAGE
WHERE Z_PK >= ?
ORDER BY Z_PK
LIMIT 1
"""

BACKUP_PAGES_PER_STEP = 2048   # --use-db-copy: pages copied per step, lock released between


def horos_uri(db_path: str) -> str:
    return "file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(db_path))


def describe_sqlite_error(error: sqlite3.Error, db_path: str, busy_timeout: float) -> str:
    """One line saying why Database.sql could not be read, and what to do."""
    text = str(error)
    if "locked" in text or "busy" in text:
        return ("Horos database %s stayed locked for more than %g s; try again later"
                % (db_path, busy_timeout))
    journal = db_path + "-journal"
    if "readonly" in text and os.path.exists(journal) and os.path.getsize(journal) > 0:
        return ("Horos database %s has a hot journal (Horos crashed or is mid-write); "
                "it cannot be read until Horos opens it again; try again later" % db_path)
    if "not a database" in text or "malformed" in text or "encrypted" in text:
        return "Horos database %s is not a readable SQLite database (%s)" % (db_path, text)
    return "cannot read Horos database %s: %s" % (db_path, text)


def replacing_decoder(raw: bytes) -> str:
    # Damaged stores hold non-UTF-8 text; a replacement character beats a crash.
    return raw.decode("utf-8", "replace")


def open_horos_readonly(db_path: str, busy_timeout: float) -> sqlite3.Connection:
    """Database.sql opened read-only (never written, never a journal created)."""
    if not os.path.isfile(db_path):
        raise HorosUnreadable("no Horos database at %s (check --horos-data)" % db_path)
    try:
        conn = sqlite3.connect(horos_uri(db_path), uri=True, timeout=busy_timeout,
                               isolation_level=None, check_same_thread=False)
    except sqlite3.Error as error:
        raise HorosUnreadable(describe_sqlite_error(error, db_path, busy_timeout)) from None
    conn.text_factory = replacing_decoder
    conn.row_factory = sqlite3.Row
    return conn


def read_table_columns(conn: sqlite3.Connection) -> Dict[str, set]:
    """{table: {column}} for the Horos tables, checked against REQUIRED_COLUMNS."""
    columns = {}
    for table, required in REQUIRED_COLUMNS.items():
        # A table name from REQUIRED_COLUMNS, never a value: PRAGMA takes no parameter.
        present = {row["name"].upper()
                   for row in conn.execute("PRAGMA table_info(%s)" % table)}
        if not present:
            raise HorosUnreadable("Horos database has no table %s: is this a Horos "
                                  "Database.sql?" % table)
        missing = [c for c in required if c not in present]
        if missing:
            raise HorosUnreadable("Horos database table %s has no column %s (unsupported "
                                  "Horos version?)" % (table, ", ".join(missing)))
        columns[table] = present
    return columns


def optional_sql(sql: str, columns: Dict[str, set]) -> str:
    fragments = {placeholder: present if column in columns[table] else absent
                 for placeholder, (table, column, present, absent)
                 in OPTIONAL_COLUMN_SQL.items()}
    return sql.format(**fragments)


def image_row(row: sqlite3.Row) -> ImageRow:
    return ImageRow(pk=row["pk"], series_pk=row["series_pk"],
                    path_number=row["path_number"], path_string=row["path_string"],
                    instance_number=row["instance_number"],
                    key_image=bool(as_int(row["key_image"])))


def horos_sr_kind(number, name, sop_class) -> str:
    """Which of Horos's own SR series a series is ("roi", "report", "annotations"), by
    its ZID, its exact ZNAME and an SR SOP class, as DicomStudy.m finds them; ""
    for any other series (a scanner's dose SR included)."""
    if not as_text(sop_class).startswith(SR_SOP_CLASS_PREFIX):
        return ""
    for kind, (horos_number, horos_name) in HOROS_SR_SERIES.items():
        if as_int(number) == horos_number and as_text(name) == horos_name:
            return kind
    return ""


def optional_text(value) -> Optional[str]:
    """A text column that may be NULL, as Horos holds it (NULL stays None)."""
    return None if value is None else as_text(value)


def first_set(values: Iterable, unset=("", 0)):
    """The first value that is set (not NULL, "" or 0), else the first one, else None:
    for the study fields of a study on several ZSTUDY rows."""
    values = list(values)
    return next((value for value in values if value is not None and value not in unset),
                values[0] if values else None)


def series_description(name, protocol_name) -> str:
    """The series description as Horos shows it.

    Horos's names are crossed (DicomDatabase.mm): ZSERIES.ZNAME holds the DICOM
    SeriesDescription ("unnamed" when the file has none), and ZSERIES.ZSERIESDESCRIPTION
    the ProtocolName. Only a store without ZNAME, or a row with it empty, falls back
    to the protocol."""
    description = as_text(name)
    return description if description.strip() else as_text(protocol_name)


def series_info(row: sqlite3.Row) -> SeriesInfo:
    return SeriesInfo(pk=row["pk"], uid=as_text(row["uid"]), number=as_int(row["number"]),
                      modality=as_text(row["modality"]).strip(),
                      description=series_description(row["name"], row["protocol_name"]),
                      horos_sr=horos_sr_kind(row["number"], row["name"], row["sop_class"]),
                      comments=tuple(optional_text(row[column]) for column in (
                          "comment", "comment2", "comment3", "comment4")),
                      status=as_int(row["status"]),
                      protocol_name=optional_text(row["protocol_name"]))



@dataclass
class SeriesScan:
    """Where a plan's reading of image rows stands: the series still to read (the first
    one from Z_PK `after` on)."""
    series: List[int]
    after: int = 0


@dataclass(frozen=True)
class NewImageRows:
    """ZSTUDY Z_PKs of the image rows Horos added since the high-water mark."""
    studies: set             # every new row's study
    horos_sr_studies: set    # of those, the studies with a new row in Horos's own SR series


class HorosReader:
    """Database.sql open read-only; every read in a transaction of its own.

    The connection stays open between transactions (opening costs more than a chunk),
    and holds no lock between them: in rollback-journal mode SQLite drops the SHARED
    lock at the end of each transaction.
    """

    def __init__(self, conn: sqlite3.Connection, chunk_rows: int, times: ReadTimes):
        self.conn = conn
        self.chunk_rows = chunk_rows
        self.times = times
        with self.transaction():
            self.columns = read_table_columns(conn)
        self.candidates_sql = optional_sql(CANDIDATES_SQL, self.columns)
        self.new_images_sql = optional_sql(NEW_IMAGE_ROWS_SQL, self.columns)
        self.info_sql = optional_sql(STUDY_INFO_SQL, self.columns)
        self.series_sql = optional_sql(STUDY_SERIES_SQL, self.columns)
        self.images_sql = optional_sql(SERIES_IMAGES_SQL, self.columns)
        self.plan_chunk_rows = chunk_rows * PLAN_IMAGE_CHUNK_FACTOR

    @contextlib.contextmanager
    def transaction(self):
        """Timed from the moment SQLite holds the SHARED lock (waiting for one of
        Horos's commits to end is not holding it) to the ROLLBACK that releases it.

        Python's cyclic garbage collector waits until the lock is released: a cycle
        holds a few hundred thousand objects (a study, its rows), and a full collection
        that starts while a chunk is fetched keeps Horos waiting for it (measured: the
        longest transaction went from 10 to 40 ms at 150,000 studies).
        """
        started = None
        collecting = gc.isenabled()
        gc.disable()
        self.conn.execute("BEGIN")
        try:
            self.conn.execute(TAKE_SHARED_LOCK_SQL).fetchone()
            started = time.perf_counter()
            yield self.conn
        finally:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if started is not None:
                self.times.add(time.perf_counter() - started)
            if collecting:
                gc.enable()

    def candidate_chunks(self) -> Iterator[List[sqlite3.Row]]:
        """CANDIDATES_SQL rows, chunk_rows ZSTUDY rows per read transaction, in Z_PK
        order.

        sqlite3 decodes the text in C; only a chunk holding text that is not UTF-8 is
        read again with the replacing decoder (one Python call per value).
        """
        after = 0
        while True:
            bounds = dict(HOROS_SR_PARAMETERS, after=after, limit=self.chunk_rows)
            self.conn.text_factory = str
            try:
                with self.transaction() as conn:
                    rows = conn.execute(self.candidates_sql, bounds).fetchall()
            except sqlite3.OperationalError as error:
                if "decode" not in str(error):
                    raise
                log.debug("Database.sql holds text that is not UTF-8: %s", error)
                self.conn.text_factory = replacing_decoder
                with self.transaction() as conn:
                    rows = conn.execute(self.candidates_sql, bounds).fetchall()
            finally:
                self.conn.text_factory = replacing_decoder
            if rows:
                yield rows
            if len(rows) < self.chunk_rows:
                return
            after = rows[-1]["pk"]

    def image_high_water(self) -> int:
        with self.transaction() as conn:
            return conn.execute(IMAGE_HIGH_WATER_SQL).fetchone()["top"] or 0

    def new_image_rows(self, after: int, top: int) -> NewImageRows:
        """The studies of the image rows after `after` up to `top`, in chunks."""
        found = NewImageRows(studies=set(), horos_sr_studies=set())
        limit = self.chunk_rows * IMAGE_CHUNK_FACTOR
        while after < top:
            with self.transaction() as conn:
                rows = conn.execute(self.new_images_sql,
                                    {"after": after, "top": top, "limit": limit}).fetchall()
            for row in rows:
                if row["study_pk"] is None:
                    continue
                found.studies.add(row["study_pk"])
                if horos_sr_kind(row["number"], row["name"], row["sop_class"]):
                    found.horos_sr_studies.add(row["study_pk"])
            if len(rows) < limit:
                break
            after = rows[-1]["pk"]
        return found

    def read_images(self, conn: sqlite3.Connection, scan: SeriesScan,
                    budget: int) -> List[sqlite3.Row]:
        """Up to `budget` image rows of scan's series from where it stopped, within the
        caller's transaction; a series is dropped from scan once read to its end."""
        rows: List[sqlite3.Row] = []
        while scan.series and len(rows) < budget:
            wanted = budget - len(rows)
            got = conn.execute(self.images_sql, {"series": scan.series[0],
                                                 "after": scan.after,
                                                 "limit": wanted}).fetchall()
            rows.extend(got)
            if len(got) < wanted:
                scan.series.pop(0)
                scan.after = 0
            else:
                scan.after = got[-1]["pk"]
        return rows

    def read_study(self, study: HorosStudy) -> Optional[StudyRows]:
        """The fields, series and image rows of one study (all its ZSTUDY rows); None when
        Horos deleted it since the scan. The fields, the series and the first image rows
        are one read transaction; the rest of the image rows follow, plan_chunk_rows per
        transaction (see the top of this section for what Horos may do in between)."""
        with self.transaction() as conn:
            found = [row for row in (conn.execute(self.info_sql, (pk,)).fetchone()
                                     for pk in study.pks) if row is not None]
            if not found:
                return None
            series_rows = [row for pk in study.pks
                           for row in conn.execute(self.series_sql, (pk,))]
            scan = SeriesScan([row["pk"] for row in series_rows])
            image_rows = self.read_images(conn, scan, self.plan_chunk_rows)
        while scan.series:
            with self.transaction() as conn:
                image_rows.extend(self.read_images(conn, scan, self.plan_chunk_rows))
        first = found[0]
        info = StudyInfo(
            uid=study.uid, pks=study.pks, patient_name=as_text(first["patient_name"]),
            patient_id=as_text(first["patient_id"]),
            birth_date=coredata_to_local_date(first["birth_date"]),
            study_datetime=coredata_to_local(study.study_date),
            accession_number=as_text(first["accession_number"]),
            description=as_text(first["description"]), modalities=study.modalities,
            comments=tuple(optional_text(first_set(row[column] for row in found))
                           for column in ("comment", "comment2", "comment3", "comment4")),
            status=as_int(first_set(row["status"] for row in found)),
            report_url=optional_text(first_set(row["report_url"] for row in found)))
        return StudyRows(info=info, series=tuple(series_info(row) for row in series_rows),
                         images=tuple(image_row(row) for row in image_rows))

    def table_ranges(self) -> TableRanges:
        """The lowest and highest Z_PK of ZSTUDY and of ZIMAGE (None: an empty table)."""
        with self.transaction() as conn:
            first_study, last_study, first_image, last_image = (
                conn.execute(sql).fetchone()["pk"] for sql in (
                    FIRST_STUDY_PK_SQL, LAST_STUDY_PK_SQL, FIRST_IMAGE_PK_SQL,
                    LAST_IMAGE_PK_SQL))
        return TableRanges(first_study, last_study, first_image, last_image)

    def images_at_or_after(self, targets: Sequence[int], group: int) -> List[ImageRow]:
        """The first image row at or after each Z_PK in targets, each row once, `group`
        lookups per read transaction."""
        rows: List[ImageRow] = []
        seen = set()
        for first in range(0, len(targets), group):
            with self.transaction() as conn:
                for target in targets[first:first + group]:
                    row = conn.execute(IMAGE_AT_OR_AFTER_SQL, (target,)).fetchone()
                    if row is not None and row["pk"] not in seen:
                        seen.add(row["pk"])
                        rows.append(image_row(row))
        return rows


@contextlib.contextmanager
def open_horos_reader(db_path: str, busy_timeout: float, chunk_rows: int = HOROS_CHUNK_ROWS,
                      times: Optional[ReadTimes] = None):
    """A HorosReader on Database.sql; SQLite errors become one-line HorosUnreadable."""
    conn = open_horos_readonly(db_path, busy_timeout)
    try:
        yield HorosReader(conn, chunk_rows, times if times is not None else ReadTimes())
    except sqlite3.Error as error:
        raise HorosUnreadable(describe_sqlite_error(error, db_path, busy_timeout)) from None
    finally:
        conn.close()


def database_stamp(db_path: str) -> Dict[str, int]:
    """What changes whenever Horos commits: size, mtime and SQLite's file change counter.

    Read with plain file I/O before any connection to the file is open in this process:
    closing another descriptor on an open SQLite file drops SQLite's POSIX locks.
    """
    st = os.stat(db_path)
    with open(db_path, "rb") as db_file:
        header = db_file.read(100)
    counter = int.from_bytes(header[24:28], "big") if len(header) >= 28 else -1
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "change_counter": counter}


def read_stamp(stamp_path: str) -> Optional[dict]:
    """The stamp saved with the database copy; None (take a new copy) if unreadable."""
    try:
        with open(stamp_path, encoding="utf-8") as stamp_file:
            return json.load(stamp_file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("database copy stamp %s is unreadable (%s); copying again",
                    stamp_path, error)
        return None


def refresh_db_copy(db_path: str, copy_dir: str, busy_timeout: float) -> str:
    """A snapshot of Database.sql, taken again whenever the source changed since."""
    if not os.path.isfile(db_path):
        raise HorosUnreadable("no Horos database at %s (check --horos-data)" % db_path)
    os.makedirs(copy_dir, exist_ok=True)
    copy_path = os.path.join(copy_dir, DB_COPY_FILE)
    stamp_path = copy_path + ".stamp.json"
    stamp = database_stamp(db_path)
    if read_stamp(stamp_path) == stamp and os.path.isfile(copy_path):
        log.debug("database copy %s is current", copy_path)
        return copy_path
    partial = copy_path + PART_SUFFIX
    if os.path.exists(partial):
        os.remove(partial)
    source = open_horos_readonly(db_path, busy_timeout)
    target = sqlite3.connect(partial)
    started = time.monotonic()
    try:
        # Copied in steps: Horos can commit between steps (the copy then restarts).
        source.backup(target, pages=BACKUP_PAGES_PER_STEP, sleep=0.01)
    except sqlite3.Error as error:
        raise HorosUnreadable(describe_sqlite_error(error, db_path, busy_timeout)) from None
    finally:
        target.close()
        source.close()
    with open(partial, "rb+") as copied:
        durable_sync(copied.fileno())
    os.replace(partial, copy_path)
    write_small_file(stamp_path, json.dumps(stamp))
    log.info("database copy refreshed in %.2f s: %s", time.monotonic() - started, copy_path)
    return copy_path


# =====================================================================================
# Horos preferences: folder size, library location, auto-cleaning (read, never written)
# =====================================================================================
#
# Horos keeps its settings in the macOS defaults domain org.horosproject.horos, a binary
# plist in ~/Library/Preferences of the user who runs it; an absent key means Horos's
# built-in default (DefaultsOsiriX.m). Two settings decide whether this backup works
# and whether it destroys data: DefaultFolderSizeForDB moves every file of the library
# (the path rule), and Database Auto-Cleaning deletes studies when the library's volume
# has less free space than its threshold, so a backup on that volume must never write
# below it. Values set from Horos's settings window may be numbers or strings ("1024"),
# booleans true/false, 1/0 or "YES"/"NO": all are accepted.

PREF_FOLDER_SIZE = "DefaultFolderSizeForDB"
PREF_LOCATION = "DATABASELOCATION"
PREF_LOCATION_URL = "DATABASELOCATIONURL"
PREF_AUTO_CLEANING = "AUTOCLEANINGSPACE"
PREF_AUTO_CLEANING_SIZE = "AUTOCLEANINGSPACESIZE"
HOROS_WARNING_FACTOR = 1.2        # Horos warns once free space is within 20 % above it
RESERVE_MIN_FREE = "min_free_gb"                  # Reserve.source values (status --json)
RESERVE_AUTO_CLEANING = "horos_auto_cleaning"


class HorosPreferencesUnreadable(CannotRun):
    """Horos's preferences file exists but cannot be read, or holds a value we cannot use."""


@dataclass(frozen=True)
class Reserve:
    """Free space a cycle leaves on the backup volume, and why that much."""
    bytes: int
    source: str                      # RESERVE_MIN_FREE or RESERVE_AUTO_CLEANING
    detail: str                      # for people: where the figure comes from
    horos_threshold: Optional[int]   # Horos's threshold on this volume; None: it does not apply


def preference_int(values: Mapping, key: str, default: int) -> int:
    value = values.get(key)
    if value is None:
        return default
    if isinstance(value, (bool, int)):
        return int(value)
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if number != number or number in (float("inf"), float("-inf")):
        raise HorosPreferencesUnreadable("Horos preference %s is %r, not a number"
                                         % (key, value))
    return int(number)


def preference_bool(values: Mapping, key: str, default: bool) -> bool:
    value = values.get(key)
    if value is None:
        return default
    if isinstance(value, (bool, int, float)):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("yes", "true", "y", "t"):
            return True
        if text in ("no", "false", "n", "f", ""):
            return False
        if re.fullmatch(r"[+-]?\d+(\.\d*)?", text):
            return float(text) != 0
    raise HorosPreferencesUnreadable("Horos preference %s is %r, not true or false"
                                     % (key, value))


def preferences_from_values(path: str, values: Mapping) -> HorosPreferences:
    """HorosPreferences from the plist's top-level dictionary."""
    folder_size = preference_int(values, PREF_FOLDER_SIZE, 0)
    if folder_size < 0:
        raise HorosPreferencesUnreadable("Horos preference %s is %d, not a folder size"
                                         % (PREF_FOLDER_SIZE, folder_size))
    url = values.get(PREF_LOCATION_URL, "")
    if not isinstance(url, str):
        raise HorosPreferencesUnreadable("Horos preference %s is %r, not a folder"
                                         % (PREF_LOCATION_URL, url))
    return HorosPreferences(
        path=path, found=True, folder_size=folder_size or DB_FOLDER_SIZE,
        database_location=preference_int(values, PREF_LOCATION, 0),
        database_location_url=url,
        auto_cleaning=preference_bool(values, PREF_AUTO_CLEANING, True),
        auto_cleaning_size=preference_int(values, PREF_AUTO_CLEANING_SIZE,
                                          HOROS_AUTO_CLEANING_SIZE))


def read_horos_preferences(path: str) -> HorosPreferences:
    """Horos's preferences from its plist (binary or XML).

    FileNotFoundError when there is no file; HorosPreferencesUnreadable when there is
    one that cannot be used.
    """
    try:
        with open(path, "rb") as handle:
            values = plistlib.load(handle)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, ExpatError) as error:
        raise HorosPreferencesUnreadable("Horos preferences %s cannot be read (%s)"
                                         % (path, error)) from None
    if not isinstance(values, dict):
        raise HorosPreferencesUnreadable("Horos preferences %s hold no dictionary" % path)
    try:
        return preferences_from_values(path, values)
    except HorosPreferencesUnreadable as error:
        raise HorosPreferencesUnreadable("%s (in %s)" % (error, path)) from None


def load_horos_preferences(path: str, explicit: bool, tolerant: bool = False
                           ) -> HorosPreferences:
    """The preferences a run uses. No file at the default path: Horos's defaults. A
    path given with --horos-prefs must be there. tolerant (doctor): a file that cannot
    be used gives Horos's defaults and its problem, instead of CannotRun."""
    try:
        return read_horos_preferences(path)
    except FileNotFoundError:
        if explicit:
            raise HorosPreferencesUnreadable(
                "Horos preferences %s (--horos-prefs) do not exist" % path) from None
        return HorosPreferences(path=path)
    except HorosPreferencesUnreadable as error:
        if tolerant and not explicit:
            return HorosPreferences(path=path, problem=str(error))
        raise


def location_url_path(url: str) -> str:
    """DATABASELOCATIONURL as a path: a file:// URL (percent-encoded) or a plain path."""
    text = url.strip()
    if text.lower().startswith("file:"):
        return urllib.parse.unquote(urllib.parse.urlparse(text).path)
    return text


def horos_data_folder(prefs: HorosPreferences, home: str) -> str:
    """The Horos Data folder Horos uses, by DATABASELOCATION and DATABASELOCATIONURL."""
    if prefs.database_location == 1 and prefs.database_location_url.strip():
        folder = location_url_path(prefs.database_location_url).rstrip("/") or "/"
        if os.path.basename(folder) == HOROS_DATA_NAME:
            return folder
        return os.path.join(folder, HOROS_DATA_NAME)
    return os.path.join(home, "Documents", HOROS_DATA_NAME)


def default_locations(pacs_root: Optional[str], prefs: HorosPreferences) -> Tuple[str, str]:
    """(BACKUP_ROOT, the Horos Data folder) when not given on their own: below
    --pacs-root when it is given (pacs_root), else the constants, Horos Data following
    Horos's preferences when they were found."""
    if pacs_root is not None:
        return (os.path.join(pacs_root, BACKUP_SUBDIR),
                os.path.join(pacs_root, HOROS_DATA_SUBDIR))
    horos_data = horos_data_folder(prefs, os.path.expanduser("~")) if prefs.found \
        else HOROS_DATA_DIR
    return BACKUP_ROOT, horos_data


def auto_cleaning_threshold(size: int, total_bytes: int) -> int:
    """Horos's threshold in bytes: size MB, or -N: N % of the volume's total size."""
    if size > 0:
        return size * MIB
    return total_bytes * -size // 100


def describe_auto_cleaning(prefs: HorosPreferences) -> str:
    if not prefs.auto_cleaning:
        return "auto-cleaning off"
    if prefs.auto_cleaning_size < 0:
        return "auto-cleaning on below %d %% of the volume" % -prefs.auto_cleaning_size
    return "auto-cleaning on below %d MB" % prefs.auto_cleaning_size


def effective_reserve(min_free_gb: float, prefs: HorosPreferences, total_bytes: int,
                      same_disk: bool) -> Reserve:
    """MIN_FREE_GB, or 1.2 x Horos's auto-cleaning threshold when that is larger, the
    threshold counting only when auto-cleaning is on and the backup shares the volume
    that holds the library (Horos deletes studies below it)."""
    minimum = int(min_free_gb * GB)
    threshold = None
    if prefs.auto_cleaning and same_disk:
        threshold = auto_cleaning_threshold(prefs.auto_cleaning_size, total_bytes)
    horos = int(math.ceil(threshold * HOROS_WARNING_FACTOR)) if threshold else 0
    if horos > minimum:
        size = prefs.auto_cleaning_size
        setting = "%d %% of the volume" % -size if size < 0 else "%d MB" % size
        return Reserve(horos, RESERVE_AUTO_CLEANING, "%g x Horos's auto-cleaning threshold "
                       "of %s, %s; below it Horos deletes studies from the library's volume, "
                       "which the backup shares" % (HOROS_WARNING_FACTOR,
                                                    format_bytes(threshold), setting),
                       threshold)
    if not prefs.auto_cleaning:
        why = "Horos's auto-cleaning is off"
    elif not same_disk:
        why = "the backup is on another disk than the library"
    else:
        why = "more than %g x Horos's auto-cleaning threshold of %s" % (
            HOROS_WARNING_FACTOR, format_bytes(threshold or 0))
    return Reserve(minimum, RESERVE_MIN_FREE, "--min-free-gb %g, %s" % (
        min_free_gb, why if why.startswith("more") else "as " + why), threshold)


def backup_space(cfg: Config, folder: str) -> Tuple[Reserve, int, int]:
    """(the reserve, free bytes, total bytes) of the volume that holds `folder`."""
    existing = nearest_existing(folder)
    usage = os.statvfs(existing)
    total = usage.f_blocks * usage.f_frsize
    reserve = effective_reserve(cfg.min_free_gb, cfg.horos_prefs,
                                total, same_disk(existing, cfg.horos_data))
    return reserve, usage.f_bavail * usage.f_frsize, total


def log_horos_preferences(cfg: Config) -> None:
    """Once per cycle: which Horos settings apply."""
    prefs = cfg.horos_prefs
    if prefs.found:
        log.debug("Horos preferences %s: folder size %d, %s", prefs.path, prefs.folder_size,
                  describe_auto_cleaning(prefs))
    else:
        log.info("no Horos preferences at %s: Horos's defaults apply (folder size %d, %s)",
                 prefs.path, prefs.folder_size, describe_auto_cleaning(prefs))


# =====================================================================================
# Planner: pure functions from values to values (names, paths, selection)
# =====================================================================================
#
# No file, database or clock here: what the readers found goes in, what the cycle
# does comes out. The tests call these directly.


def wanted_modalities(wanted: Iterable[str]) -> frozenset:
    return frozenset(m.strip().upper() for m in wanted)


def is_eligible(modalities: Iterable[str], wanted: frozenset) -> bool:
    """Whole-token match: an RTSTRUCT/RTPLAN study is not CT, an OCT study is not CT.

    wanted: from wanted_modalities(), made once per scan of the library.
    """
    return not wanted.isdisjoint(modalities)


def month_folder(study_datetime: Optional[dt.datetime]) -> str:
    if study_datetime is None:
        return UNKNOWN_DATE_FOLDER
    return "%04d_%02d" % (study_datetime.year, study_datetime.month)


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


def sanitize_part(text) -> str:
    """ASCII letters, digits, `.` and `-`; every other run becomes one `_`.

    Accents are dropped first (strip_accents); `_` and `.` are stripped from both ends,
    so `..` and hidden names cannot appear.
    """
    cleaned = _NAME_UNSAFE.sub("_", strip_accents(as_text(text))).strip("_.")
    return cleaned or UNKNOWN


def zip_base_name(info: StudyInfo, max_len: int = MAX_NAME_NOEXT) -> str:
    """`{patient}_{birth}_{studydate}_{uid}` without `.zip`, at most max_len long.

    Only the part before the UID is cut, the patient name first so the two dates stay:
    the UID is what makes the name unique. A UID that alone exceeds max_len (no valid
    DICOM UID does) is cut and given a hash suffix, so two such studies still differ.
    """
    uid_part = sanitize_part(info.uid)
    if len(uid_part) >= max_len:
        digest = hashlib.sha1(info.uid.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return uid_part[:max_len - 17] + "_" + digest
    study_day = info.study_datetime.date() if info.study_datetime else None
    patient = sanitize_part(info.patient_name)
    dates = format_date(info.birth_date) + "_" + format_date(study_day)
    room = max_len - len(uid_part) - 1          # for `{patient}_{dates}`
    if len(patient) + 1 + len(dates) > room:
        patient_room = room - len(dates) - 1
        if patient_room >= 1:
            patient = patient[:patient_room].rstrip("_")
        else:
            return ((patient + "_" + dates)[:room].rstrip("_") + "_" + uid_part).lstrip("_")
    return patient + "_" + dates + "_" + uid_part


def zip_relpath(info: StudyInfo) -> str:
    """Path of a study's ZIP relative to the backup root: `YYYY_MM/<name>.zip`."""
    return month_folder(info.study_datetime) + "/" + zip_base_name(info) + ".zip"


def _c_int_div(number: int, divisor: int) -> int:
    # Horos computes the folder in C, where integer division truncates toward zero.
    quotient = abs(number) // divisor
    return quotient if number >= 0 else -quotient


def _leading_int(text: str) -> int:
    # NSString intValue: optional spaces and sign, then digits; 0 when there are none.
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else 0


def resolve_image_path(files_dir: str, path_number, path_string,
                       folder_size: int = DB_FOLDER_SIZE) -> Optional[str]:
    """Where a ZIMAGE row's file is, by the rules of Horos's DicomImage.m.

    1. ZPATHNUMBER N:            files_dir/<(N // F + 1) * F>/<N>.dcm
    2. absolute ZPATHSTRING:     as it is (added in place, maybe on another volume)
    3. relative ZPATHSTRING S:   files_dir/<(leading int of S without ext // F + 1) * F>/S
    """
    number = as_int(path_number)
    if number is not None:
        folder = (_c_int_div(number, folder_size) + 1) * folder_size
        return os.path.join(files_dir, str(folder), "%d.dcm" % number)
    text = as_text(path_string)
    if not text:
        return None
    if text.startswith("/"):
        return text
    stem = os.path.splitext(text)[0]
    folder = (_c_int_div(_leading_int(stem), folder_size) + 1) * folder_size
    return os.path.join(files_dir, str(folder), text)


def _unique_name(name: str, taken: set) -> str:
    if name not in taken:
        taken.add(name)
        return name
    stem, ext = os.path.splitext(name)
    counter = 2
    while "%s_%d%s" % (stem, counter, ext) in taken:
        counter += 1
    unique = "%s_%d%s" % (stem, counter, ext)
    taken.add(unique)
    return unique


def series_folder_name(series: SeriesInfo) -> str:
    number = "%04d" % series.number if series.number is not None and series.number >= 0 \
        else UNKNOWN
    name = "%s_%s_%s" % (number, sanitize_part(series.modality),
                         sanitize_part(series.description))
    return name[:MAX_MEMBER_PART].rstrip("_.")


def _member_file_name(path: str) -> str:
    name = sanitize_part(os.path.basename(path))
    if len(name) <= MAX_MEMBER_PART:
        return name
    stem, ext = os.path.splitext(name)
    return stem[:MAX_MEMBER_PART - len(ext)] + ext


def _series_sort_key(series: SeriesInfo):
    return (series.number is None, series.number or 0, series.uid, series.pk)


def plan_study_files(series: Sequence[SeriesInfo], images: Sequence[ImageRow],
                     files_dir: str, folder_size: int = DB_FOLDER_SIZE
                     ) -> Tuple[Tuple[SeriesInfo, ...], Tuple[SourceFile, ...]]:
    """Every file of every series, each once (multi-frame rows share a file).

    Members go in one folder per series (`0002_CT_Abdomen_3mm/10001.dcm`), in series
    number then instance number order; names are unique within the ZIP.
    """
    ordered_series = tuple(sorted(series, key=_series_sort_key))
    by_series: Dict[int, List[ImageRow]] = {s.pk: [] for s in ordered_series}
    for image in images:
        if image.series_pk in by_series:
            by_series[image.series_pk].append(image)
    # One file, several rows (the frames of a multi-frame object): the file is a key
    # image when any of its frames is.
    key_paths = {resolve_image_path(files_dir, image.path_number, image.path_string,
                                    folder_size) for image in images if image.key_image}
    folders: set = set()
    members: set = set()
    seen_paths: set = set()
    files: List[SourceFile] = []
    for s in ordered_series:
        folder = _unique_name(series_folder_name(s), folders)
        rows = sorted(by_series[s.pk], key=lambda im: (as_int(im.instance_number) or 0,
                                                       as_text(im.path_string),
                                                       as_int(im.path_number) or 0))
        for image in rows:
            path = resolve_image_path(files_dir, image.path_number, image.path_string,
                                      folder_size)
            if path is None or path in seen_paths:
                continue
            seen_paths.add(path)
            member = _unique_name(folder + "/" + _member_file_name(path), members)
            files.append(SourceFile(member=member, path=path, series_uid=s.uid,
                                    key_image=path in key_paths))
    return ordered_series, tuple(files)


def study_fingerprint(parts: Sequence[str]) -> str:
    """A cheap digest of what Horos keeps about a study.

    For one ZSTUDY row, parts is its text from CANDIDATES_SQL: date, modality summary,
    numberOfImages, patient name, ID and birth date, series count and images summed
    over its series, then (annotated_text) the reader's work when there is any. For a
    study of several rows, parts are the rows' digests. It moves when Horos adds or
    removes series or images (Horos recomputes the counts before it saves), the patient
    is renamed, or the reader changes a comment, the status or the report; reading it
    costs no scan of ZIMAGE. Row keys and dateAdded stay out: a Horos "Rebuild
    Database" renumbers every row, and a study sent again touches dateAdded, without
    changing what a backup holds.
    """
    text = parts[0] if len(parts) == 1 else "#".join(sorted(parts))
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def annotated_text(text: str, annotations, series_annotations) -> str:
    """A row's fingerprint text with the reader's work (CANDIDATES_SQL's
    annotations_text and series_annotations) after it; the series' parts sorted, so
    that the order SQLite joined them in does not count (it follows Z_PK, which a
    Rebuild Database renumbers)."""
    series = sorted(as_text(series_annotations).split(SERIES_ANNOTATIONS_SEPARATOR)) \
        if series_annotations is not None else []
    return "%s|annotations|%s|series|%s" % (text, as_text(annotations),
                                            SERIES_ANNOTATIONS_SEPARATOR.join(series))


def _seconds(value) -> Optional[float]:
    # Core Data writes REALs, which a TIMESTAMP column (NUMERIC affinity) keeps as
    # INTEGER when whole; only damaged stores need the general conversion.
    kind = type(value)
    if (kind is float or kind is int) and -1e12 < value < 1e12:
        return value
    return coredata_seconds(value)


def group_candidates(rows: Iterable[Mapping]) -> List[HorosStudy]:
    """Candidate rows (HorosReader.candidate_chunks), in Z_PK order -> one HorosStudy
    per StudyInstanceUID.

    Two ZSTUDY rows can carry one UID (the study received under two patient IDs):
    they are one backup, dated by its first row that has a date. This runs once per
    study of the library: rows are consumed as they come (no list of 50,000 rows), and
    each modality string (`CT`, `MR`, `CT\\PT` repeat thousands of times) is parsed
    once.
    """
    parsed: Dict[Tuple[object, object], Tuple[str, ...]] = {}
    studies: Dict[str, HorosStudy] = {}
    row_prints: Dict[str, Tuple[List[str], List[str]]] = {}   # only UIDs with several rows
    for row in rows:
        pk, uid, text = row["pk"], row["uid"], row["fingerprint_text"]
        summary, series_modalities = row["modality_summary"], row["series_modalities"]
        uid = (uid if type(uid) is str else as_text(uid)).strip() or "HOROS-PK-%d" % pk
        tokens = parsed.get((summary, series_modalities))
        if tokens is None:
            tokens = parsed[(summary, series_modalities)] = tuple(dict.fromkeys(
                modality_tokens(summary) + modality_tokens(series_modalities)))
        date, added = _seconds(row["study_date"]), _seconds(row["date_added"])
        base_print = study_fingerprint((as_text(text),))
        annotations, series_annotations = row["annotations_text"], row["series_annotations"]
        if annotations is None and series_annotations is None:
            row_print = base_print
        else:
            row_print = study_fingerprint((annotated_text(as_text(text), annotations,
                                                          series_annotations),))
        first = studies.get(uid)
        if first is None:
            studies[uid] = HorosStudy(uid, (pk,), date, added, added, tokens, row_print,
                                      base_print)
            continue
        prints, bases = row_prints.setdefault(uid, ([first.fingerprint],
                                                    [first.base_fingerprint]))
        prints.append(row_print)
        bases.append(base_print)
        studies[uid] = HorosStudy(
            uid=uid, pks=first.pks + (pk,),
            study_date=first.study_date if first.study_date is not None else date,
            date_added=first.date_added,
            last_added=max((m for m in (first.last_added, added) if m is not None),
                           default=None),
            modalities=tuple(dict.fromkeys(first.modalities + tokens)),
            fingerprint=study_fingerprint(prints), base_fingerprint=study_fingerprint(bases))
    return list(studies.values())


def plan_study(rows: StudyRows, study: HorosStudy, files_dir: str, folder_size: int,
               reason: str = Reason.NEW) -> StudyPlan:
    """What the cycle writes for one study: its files in ZIP order, and its ZIP's name."""
    ordered_series, files = plan_study_files(rows.series, rows.images, files_dir,
                                             folder_size)
    return StudyPlan(info=rows.info, series=ordered_series, files=files,
                     zip_relpath=zip_relpath(rows.info), fingerprint=study.fingerprint,
                     reason=reason, base_fingerprint=study.base_fingerprint)


def retry_delay(attempts: int) -> float:
    """Back-off after the n-th failure in a row: 1 h, 6 h, 1 day, then daily."""
    return RETRY_BACKOFF_SECONDS[min(max(attempts, 1), len(RETRY_BACKOFF_SECONDS)) - 1]

def missing_deferrals(previous: Optional[Failure]) -> int:
    """How many times in a row the study was deferred for missing files."""
    return previous.attempts if previous and previous.kind == MISSING_FILES else 0


def files_decision(present: int, missing: int, previous: Optional[Failure],
                   missing_retries: int) -> str:
    """What to do with a study, given which of its files exist: Outcome.NO_FILES with
    none; DEFERRED while files are missing and deferrals are left (Horos may still be
    writing them: wait, but not for ever); else EXPORTED, or PARTIAL without the
    missing files."""
    if not present:
        return Outcome.NO_FILES
    if not missing:
        return Outcome.EXPORTED
    if missing_deferrals(previous) < missing_retries:
        return Outcome.DEFERRED
    return Outcome.PARTIAL


def difference(study: HorosStudy, recorded: str, recorded_base: Optional[str]
               ) -> Optional[str]:
    """How an exported study differs from its export, by its fingerprints: None when it
    does not; Reason.CHANGED when what Horos keeps about its images and patient moved
    (its base fingerprint); else only the reader's work moved: Reason.EDITED, or
    Reason.UPGRADE when the export was made by a version that recorded none of it
    (recorded_base None; version 1.0's fingerprint was the base one)."""
    if study.fingerprint == recorded:
        return None
    if study.base_fingerprint != (recorded if recorded_base is None else recorded_base):
        return Reason.CHANGED
    return Reason.UPGRADE if recorded_base is None else Reason.EDITED


def plan_selection(studies: Sequence[HorosStudy], exported: Mapping[str, str],
                   changed: Mapping[str, Optional[float]], failures: Mapping[str, Failure],
                   wanted: Sequence[str], order_by: str, now: float,
                   settle_seconds: float, limit: Optional[int] = None,
                   bases: Optional[Mapping[str, Optional[str]]] = None) -> Selection:
    """The export queue: studies Horos changed or the reader edited since their export
    first, then new studies and retries, then the re-exports of an upgrade.

    Each part is oldest first by study date (or date added), ties by UID, unknown dates
    last. Left out: studies that are exported and unchanged, studies Horos added to
    within settle_seconds, studies the reader edited within settle_seconds, and failed
    studies waiting for their next attempt (unless Horos changed them since they
    failed). Failed studies take no slot while they wait. With a limit, only the head
    of the queue is ordered (a partial sort of 50,000 studies is what keeps the read
    transaction short); the counts cover all of it.

    exported: {uid: fingerprint recorded}. changed: exported studies a cycle saw change
    ({uid: Unix time of the reader's last edit seen, or None}; ChangeMark). bases: the
    recorded base fingerprints that are not the fingerprint itself, None for an export
    of a version that recorded no reader's work (see difference). An edit seen only
    now (in the fingerprints, with no mark yet) counts as made now.
    """
    def order_key(candidate: Candidate):
        study = candidate.study
        when = study.study_date if order_by == "study_date" else study.date_added
        return (when is None, when or 0.0, study.uid)

    bases = bases or {}
    wanted_set = wanted_modalities(wanted)
    settled_before = now - settle_seconds - COREDATA_EPOCH_OFFSET   # in Core Data seconds
    # A dateAdded far in the future is a damaged value or a clock that was wrong: such a
    # study must not wait for ever. The same for an edit dated by a file's mtime.
    bogus_after = now + 3600 - COREDATA_EPOCH_OFFSET
    edits_settled_before, edits_bogus_after = now - settle_seconds, now + 3600
    selection = Selection(queue=[])
    first: List[Candidate] = []
    rest: List[Candidate] = []
    upgrades: List[Candidate] = []
    for study in studies:
        if not is_eligible(study.modalities, wanted_set):
            continue
        selection.eligible += 1
        uid = study.uid
        known = exported.get(uid)
        flagged = uid in changed
        if known == study.fingerprint and not flagged:
            selection.up_to_date += 1
            continue
        failure = failures.get(uid)
        if failure and failure.next_attempt > now and failure.fingerprint == study.fingerprint:
            selection.waiting += 1
            continue
        if study.last_added is not None and settled_before < study.last_added < bogus_after:
            selection.unsettled += 1
            continue
        if known is None:
            rest.append(Candidate(study, Reason.RETRY if failure else Reason.NEW))
            continue
        reason = difference(study, known, bases.get(uid, known))
        edited_at = changed.get(uid)
        if edited_at is not None:
            reason = Reason.EDITED
        elif reason == Reason.EDITED:
            edited_at = now
        elif flagged or reason is None:
            reason = Reason.CHANGED          # image rows Horos added since
        if edited_at is not None and edits_settled_before < edited_at < edits_bogus_after:
            selection.unsettled += 1
            continue
        if reason == Reason.UPGRADE:
            upgrades.append(Candidate(study, reason))
        else:
            first.append(Candidate(study, reason))
            selection.edited += reason == Reason.EDITED
    selection.pending = len(first) + len(rest) + len(upgrades)
    selection.changed = len(first) + len(upgrades)
    if limit is None:
        selection.queue = (sorted(first, key=order_key) + sorted(rest, key=order_key)
                           + sorted(upgrades, key=order_key))
    else:
        queue = heapq.nsmallest(limit, first, key=order_key)
        for part in (rest, upgrades):
            queue += heapq.nsmallest(limit - len(queue), part, key=order_key)
        selection.queue = queue
    return selection


def month_completeness(studies: Sequence[HorosStudy], exported: Mapping[str, str],
                       wanted: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """{month folder: (eligible, exported)} over the studies Horos holds."""
    wanted_set = wanted_modalities(wanted)
    months: Dict[str, List[int]] = {}
    for study in studies:
        if not is_eligible(study.modalities, wanted_set):
            continue
        counts = months.setdefault(month_folder(coredata_to_local(study.study_date)), [0, 0])
        counts[0] += 1
        if study.uid in exported:
            counts[1] += 1
    return {month: (counts[0], counts[1]) for month, counts in months.items()}


def month_is_over(month: str, today: dt.date) -> bool:
    if month == UNKNOWN_DATE_FOLDER:
        return False
    year, number = (int(p) for p in month.split("_"))
    return (year, number) < (today.year, today.month)


# =====================================================================================
# Clinic hours: when a cycle stops at BATCH_SIZE (pure; the clock is passed in)
# =====================================================================================

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")   # datetime.weekday() order
DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


@dataclass(frozen=True)
class ClinicSchedule:
    """When Horos is in use. hours: (start, end) local hours, the end exclusive, wrapping
    past midnight when start > end; None: never (no cap). days: weekday numbers, Monday 0."""
    hours: Optional[Tuple[int, int]]
    days: Tuple[int, ...]


def parse_clinic_hours(text: str) -> Optional[Tuple[int, int]]:
    """`07-19`, `19-07`, `00-24` -> (start, end); `none` -> None. ValueError otherwise."""
    cleaned = text.strip().lower()
    if cleaned == "none":
        return None
    match = re.fullmatch(r"(\d{1,2})-(\d{1,2})", cleaned)
    if not match:
        raise ValueError("--clinic-hours %r: give HH-HH in local time (07-19, 19-07, "
                         "00-24) or none" % text)
    start, end = int(match.group(1)), int(match.group(2))
    if start > 23 or end > 24:
        raise ValueError("--clinic-hours %r: hours go from 00 to 24 (00-24 is the whole "
                         "day)" % text)
    if start == end % 24 and (start, end) != (0, 24):
        raise ValueError("--clinic-hours %r: the start and the end are the same hour; use "
                         "00-24 for the whole day or none for no clinic hours" % text)
    return start, end


def parse_clinic_days(text: str) -> Tuple[int, ...]:
    """`mon-fri`, `mon-sat`, `mon,wed,fri`, `sat-sun`, `fri-mon` -> weekday numbers."""
    days = set()
    for part in text.strip().lower().split(","):
        ends = [e.strip() for e in part.split("-")]
        ends = [e[:3] if e in DAY_NAMES else e for e in ends]
        if len(ends) > 2 or not all(e in WEEKDAYS for e in ends):
            raise ValueError("--clinic-days %r: give days like mon-fri, mon-sat or "
                             "mon,wed,fri (mon tue wed thu fri sat sun)" % text)
        first, last = WEEKDAYS.index(ends[0]), WEEKDAYS.index(ends[-1])
        days.update((first + step) % 7 for step in range((last - first) % 7 + 1))
    return tuple(sorted(days))


def clinic_schedule(hours_text: str, days_text: str) -> ClinicSchedule:
    return ClinicSchedule(parse_clinic_hours(hours_text), parse_clinic_days(days_text))


def config_schedule(cfg: Config) -> ClinicSchedule:
    """The schedule of --clinic-hours and --clinic-days (checked when the flags were read)."""
    return clinic_schedule(cfg.clinic_hours, cfg.clinic_days)


def in_clinic_hours(schedule: ClinicSchedule, local: dt.datetime) -> bool:
    """Whether a cycle starting at this local time is capped at BATCH_SIZE.

    A window that wraps past midnight belongs to the day it starts on: with 19-07 and
    mon-fri, Saturday 03:00 is still Friday's night, Monday 03:00 is not clinic time.
    00-24 is every hour of every day, whatever the days say.
    """
    if schedule.hours is None:
        return False
    start, end = schedule.hours
    if (start, end) == (0, 24):
        return True
    if start < end:
        return local.weekday() in schedule.days and start <= local.hour < end
    if local.hour >= start:
        return local.weekday() in schedule.days
    return local.hour < end and (local.weekday() - 1) % 7 in schedule.days


def capped_at(cfg: Config, now: float) -> bool:
    """Whether a cycle (or the dry run, or status's `clinic.now`) starting at Unix time
    `now` is in clinic hours, in the Mac's local time."""
    return in_clinic_hours(config_schedule(cfg), dt.datetime.fromtimestamp(now))


def cycles_to_drain(backlog: int, schedule: ClinicSchedule, start: dt.datetime,
                    inside: float, outside: float, interval_seconds: int,
                    max_cycles: int = 10 * 52 * 7 * 144) -> int:
    """launchd cycles until `backlog` studies are exported, at `inside` studies per
    cycle in clinic hours and `outside` per cycle out of them; max_cycles at most."""
    left, cycles, moment = float(backlog), 0, start
    step = dt.timedelta(seconds=interval_seconds)
    while left > 0 and cycles < max_cycles:
        left -= max(inside if in_clinic_hours(schedule, moment) else outside, 1e-3)
        cycles += 1
        moment += step
    return cycles


# =====================================================================================
# Departures: exported studies Horos no longer has (pure)
# =====================================================================================
#
# Horos deletes studies on its own (Database Auto-Cleaning is on by default), users
# delete them, and whole libraries vanish at once (a rebuilt or damaged Database.sql,
# Horos opening an empty library when its disk is missing). The backup keeps every ZIP
# whatever Horos does; what this adds is knowing which studies are only in the backup
# now, and since when. Each cycle compares its complete scan of Horos with the backup:
# a study is gone when its StudyInstanceUID is in no ZSTUDY row, and back as soon as
# one holds it again. What to tell the practice is decided in Alerts.


@dataclass(frozen=True)
class DepartureCheck:
    """One scan of Horos against the backup (compare_with_horos)."""
    left: Tuple[str, ...]            # exported, gone from Horos, not recorded as gone yet
    returned: Tuple[str, ...]        # recorded as gone, in Horos again


def compare_with_horos(exported: Iterable[str], recorded_gone: Iterable[str],
                       in_horos: Iterable[str]) -> DepartureCheck:
    """Which exported studies left Horos since the last check, and which came back.

    in_horos: the UIDs of a complete scan (every ZSTUDY row, eligible or not: a study
    whose modality changed is still in Horos). A partial or failed read must never get
    here: every study it did not reach would count as gone."""
    present = set(in_horos)
    gone = {uid for uid in exported if uid not in present}
    recorded = set(recorded_gone)
    return DepartureCheck(left=tuple(sorted(gone - recorded)),
                          returned=tuple(sorted(recorded & present)))


def left_since(left_at: Optional[str], since: Optional[dt.date]) -> bool:
    """Whether a study recorded as gone at `left_at` (UTC) is selected by --since: first
    seen gone on that local day or later (any day when since is None)."""
    if left_at is None:
        return False
    day = local_day(left_at)
    return since is None or (day is not None and day >= since)


# =====================================================================================
# Archive writer: the ZIP, fsync, verify, rename
# =====================================================================================
#
# Crash-safety order for one study: write `<name>.zip.part`, fsync it, read it back
# (testzip + manifest), rename it to `<name>.zip`, fsync the folder, and only then
# record it in the state. A ZIP is visible under its final name only once verified.


class FileChanged(Exception):
    """A source file vanished, shrank or grew while it was being zipped."""


class ZipVerifyFailed(Exception):
    """A written ZIP failed verification VERIFY_ATTEMPTS times."""


class SourceUnreadable(Exception):
    """A source file exists but cannot be read (permissions, I/O error)."""


def zip_date_time(mtime: float) -> Tuple[int, int, int, int, int, int]:
    """A file's mtime as a ZIP timestamp, clamped to what the format can hold."""
    try:
        stamp = tuple(time.localtime(mtime)[:6])
    except (OverflowError, OSError, ValueError):
        return ZIP_MIN_DATE_TIME
    return min(max(stamp, ZIP_MIN_DATE_TIME), ZIP_MAX_DATE_TIME)


def zip_compression(name: str) -> int:
    return zipfile.ZIP_DEFLATED if name == "deflate" else zipfile.ZIP_STORED


def bypass_cache(fd: int) -> bool:
    """On macOS, make reads of fd skip the buffer cache (F_NOCACHE); False elsewhere.

    A file read once by a backup should not push Horos's images out of the cache.
    """
    nocache = getattr(fcntl, "F_NOCACHE", None)
    if nocache is None:
        return False
    try:
        fcntl.fcntl(fd, nocache, 1)
    except OSError as error:  # advisory only: reading works without it
        log.debug("F_NOCACHE refused: %s", error)
        return False
    return True


def open_source(path: str):
    """A study file opened for one sequential read that should not evict Horos's cache."""
    handle = open(path, "rb", buffering=0)
    bypass_cache(handle.fileno())
    return handle


class Throttle:
    """Caps the bytes read per second (MAX_MBPS; 0: no cap) by sleeping when ahead.

    Called with each chunk's size; the clock and sleep are passed in for the tests.
    """

    def __init__(self, max_mbps: float, clock=time.monotonic, sleep=time.sleep):
        self.bytes_per_second = max_mbps * 1e6
        self.clock, self.sleep = clock, sleep
        self.started: Optional[float] = None
        self.done = 0

    def __call__(self, count: int) -> None:
        if self.bytes_per_second <= 0:
            return
        if self.started is None:
            self.started = self.clock()
        self.done += count
        ahead = self.done / self.bytes_per_second - (self.clock() - self.started)
        if ahead > 0:
            self.sleep(ahead)


class ThrottledReader:
    """A file whose reads go through a Throttle (for re-reading ZIPs)."""

    def __init__(self, handle, throttle: Throttle):
        self.handle, self.throttle = handle, throttle

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.throttle(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()


@dataclass(frozen=True)
class WrittenMember:
    """One file as it went into a ZIP."""
    source: SourceFile
    info: zipfile.ZipInfo
    mtime_ns: int            # the file's when it was opened: what the edit check compares


def copy_member(archive: zipfile.ZipFile, source: SourceFile, compression: int,
                level: int, buffer: memoryview, on_bytes) -> WrittenMember:
    """Stream one file into the archive; FileChanged if it moved meanwhile.

    Errors reading the source become FileChanged/SourceUnreadable (a problem of this
    study); errors writing the archive propagate as OSError (a problem of the backup
    volume, such as ENOSPC). A file rewritten in place while it was read (Horos saving
    ROIs, or writing a comment into every file of a study) may keep its size: its mtime
    tells, and the bytes read are a mix of two versions.
    """
    try:
        src = open_source(source.path)
    except FileNotFoundError:
        raise FileChanged("%s vanished before it could be read" % source.path) from None
    except OSError as error:
        raise SourceUnreadable("cannot open %s: %s" % (source.path, error)) from None
    with src:
        st = os.fstat(src.fileno())
        if source.size >= 0 and st.st_size != source.size:
            raise FileChanged("%s changed size since the study was listed (%d bytes, now %d)"
                              % (source.path, source.size, st.st_size))
        info = zipfile.ZipInfo(source.member, zip_date_time(st.st_mtime))
        info.compress_type = compression
        # zipfile reads the level from this attribute (3.8-3.12 name; 3.13 keeps it).
        info._compresslevel = level if compression == zipfile.ZIP_DEFLATED else None
        info.external_attr = 0o100644 << 16
        info.file_size = st.st_size      # lets zipfile switch to ZIP64 for files >= 4 GiB
        copied = 0
        with archive.open(info, "w") as dst:
            while True:
                try:
                    count = src.readinto(buffer)
                except OSError as error:
                    raise SourceUnreadable("cannot read %s: %s" % (source.path, error)) \
                        from None
                if not count:
                    break
                dst.write(buffer[:count])
                copied += count
                on_bytes(count)
        if copied != st.st_size:
            raise FileChanged("%s changed size while being read (%d bytes expected, %d read)"
                              % (source.path, st.st_size, copied))
        after = os.fstat(src.fileno())
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise FileChanged("%s was rewritten while being read" % source.path)
    return WrittenMember(source, archive.getinfo(source.member), st.st_mtime_ns)


def manifest_for(plan: StudyPlan, members: Sequence[WrittenMember],
                 missing: Sequence[str], exported_at: str) -> dict:
    """The manifest stored as MANIFEST_NAME at the root of every ZIP (README: Manifest).

    The reader's work is recorded as Horos held it in Database.sql when the plan was
    read: comments, status and report URL of the study, comments and status of each
    series, and which members are key images."""
    info = plan.info
    counts: Dict[str, int] = {}
    for member in members:
        counts[member.source.series_uid] = counts.get(member.source.series_uid, 0) + 1
    folders = {}
    for source in plan.files:
        folders.setdefault(source.series_uid, source.member.split("/")[0])
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "tool": "horos_backup_export",
        "tool_version": TOOL_VERSION,
        "exported_at": exported_at,
        "fingerprint": plan.fingerprint,
        "base_fingerprint": plan.base_fingerprint,
        "study": {
            "study_uid": info.uid,
            "patient_name": info.patient_name,
            "patient_id": info.patient_id,
            "birth_date": info.birth_date.isoformat() if info.birth_date else None,
            "study_date": info.study_datetime.date().isoformat()
            if info.study_datetime else None,
            "study_time": info.study_datetime.isoformat(timespec="seconds")
            if info.study_datetime else None,
            "accession_number": info.accession_number,
            "description": info.description,
            "modalities": list(info.modalities),
            "horos_study_pks": list(info.pks),
            "comment": info.comments[0], "comment2": info.comments[1],
            "comment3": info.comments[2], "comment4": info.comments[3],
            "status": info.status,
            "report_url": info.report_url,
            "key_images": [m.info.filename for m in members if m.source.key_image],
        },
        "series": [{"series_uid": s.uid, "number": s.number, "modality": s.modality,
                    "description": s.description, "protocol_name": s.protocol_name,
                    "folder": folders.get(s.uid),
                    "file_count": counts.get(s.uid, 0), "horos_sr": s.horos_sr or None,
                    "comment": s.comments[0], "comment2": s.comments[1],
                    "comment3": s.comments[2], "comment4": s.comments[3],
                    "status": s.status} for s in plan.series],
        "files": [{"name": m.info.filename, "size": m.info.file_size,
                   "crc32": "%08x" % m.info.CRC, "source": m.source.path,
                   "mtime_ns": m.mtime_ns} for m in members],
        "missing": list(missing),
    }


def write_zip(part_path: str, plan: StudyPlan, files: Sequence[SourceFile],
              missing: Sequence[str], compression: str, level: int, on_bytes,
              exported_at: str) -> dict:
    """Write the ZIP to part_path and fsync it; returns the manifest written."""
    method = zip_compression(compression)
    buffer = memoryview(bytearray(COPY_CHUNK_BYTES))
    with open(part_path, "wb", buffering=COPY_CHUNK_BYTES) as raw:
        with zipfile.ZipFile(raw, "w", compression=method, allowZip64=True) as archive:
            members = [copy_member(archive, source, method, level, buffer, on_bytes)
                       for source in files]
            manifest = manifest_for(plan, members, missing, exported_at)
            manifest_info = zipfile.ZipInfo(MANIFEST_NAME, zip_date_time(time.time()))
            manifest_info.compress_type = zipfile.ZIP_DEFLATED
            manifest_info.external_attr = 0o100644 << 16
            archive.writestr(manifest_info, json.dumps(manifest, indent=1, ensure_ascii=False))
        raw.flush()
        durable_sync(raw.fileno())
    return manifest


def open_for_verify(path: str):
    """Open a just-written file so that reading it hits the disk, not the page cache."""
    handle = open(path, "rb")
    if not bypass_cache(handle.fileno()) and hasattr(os, "posix_fadvise"):
        # The file was fsynced, so its cached pages are clean and can be dropped.
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return handle


ZIP_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError,
                   KeyError, ValueError, NotImplementedError, RuntimeError)


def read_manifest(archive: zipfile.ZipFile) -> dict:
    try:
        raw = archive.read(MANIFEST_NAME)
    except KeyError:
        raise ValueError("no %s: not a ZIP written by horos_backup_export"
                         % MANIFEST_NAME) from None
    manifest = json.loads(raw.decode("utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError("%s is not a horos-backup manifest" % MANIFEST_NAME)
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > MANIFEST_FORMAT_VERSION:
        raise ValueError("manifest format version %r is not one this script reads (up to "
                         "%d): update horos_backup_export.py" % (version,
                                                                 MANIFEST_FORMAT_VERSION))
    return manifest


def verify_zip(path: str, throttle: Optional[Throttle] = None
               ) -> Tuple[Optional[str], Optional[dict]]:
    """Re-read a ZIP: every member's CRC, and the manifest against the members.

    Returns (problem or None, manifest or None).
    """
    try:
        with ThrottledReader(open_for_verify(path), throttle or Throttle(0)) as handle, \
                zipfile.ZipFile(handle) as archive:
            bad = archive.testzip()
            if bad is not None:
                return "CRC or header error in member %s" % bad, None
            manifest = read_manifest(archive)
            members = {zi.filename: zi for zi in archive.infolist()
                       if zi.filename != MANIFEST_NAME}
            listed = {entry["name"]: entry for entry in manifest["files"]}
            if set(members) != set(listed):
                return ("members and manifest differ (%d members, %d listed)"
                        % (len(members), len(listed))), manifest
            for name, entry in listed.items():
                zi = members[name]
                if zi.file_size != entry["size"] or "%08x" % zi.CRC != entry["crc32"]:
                    return "member %s does not match the manifest" % name, manifest
            return None, manifest
    except ZIP_READ_ERRORS as error:
        return "%s: %s" % (type(error).__name__, error), None


def write_verified_zip(final_path: str, plan: StudyPlan, files: Sequence[SourceFile],
                       missing: Sequence[str], compression: str, level: int, on_bytes,
                       exported_at: str, throttle: Optional[Throttle] = None) -> dict:
    """Write, fsync, verify (VERIFY_ATTEMPTS tries), rename, fsync the folder.

    Returns the manifest. On any error the `.part` file is removed and nothing is
    left under the final name that was not there before.
    """
    folder = os.path.dirname(final_path)
    os.makedirs(folder, exist_ok=True)
    part_path = final_path + PART_SUFFIX
    problem = None
    for attempt in range(1, VERIFY_ATTEMPTS + 1):
        try:
            manifest = write_zip(part_path, plan, files, missing, compression, level,
                                 on_bytes, exported_at)
            problem, _ = verify_zip(part_path, throttle)
            if problem is None:
                os.replace(part_path, final_path)
                sync_directory(folder)
                return manifest
        finally:
            if os.path.exists(part_path):
                remove_if_present(part_path)
        log.warning("verify failed for %s (attempt %d of %d): %s",
                    final_path, attempt, VERIFY_ATTEMPTS, problem)
    raise ZipVerifyFailed("%s still failed verification after %d attempts: %s"
                          % (final_path, VERIFY_ATTEMPTS, problem))


# =====================================================================================
# State store: every query on BACKUP_ROOT/export_state.sqlite
# =====================================================================================
#
# Written in short transactions with synchronous=FULL (and fullfsync on macOS), in
# rollback-journal mode so the file alone is always the whole state. Times are UTC,
# ISO 8601 with a Z (`datetime(exported_at, 'localtime')` shows local time in sqlite3).

STATE_SCHEMA_VERSION = 8
RUNS_KEPT = 5000             # newest rows kept in `runs` (about five weeks of cycles)

# The statements that bring a state database from version n-1 to n, run in order in one
# transaction each; a new file runs them all. Never edit a released step: add one.
STATE_MIGRATIONS = {
    1: (
        """
        CREATE TABLE exported_studies (
            study_uid     TEXT PRIMARY KEY,
            zip_path      TEXT NOT NULL,
            zip_bytes     INTEGER NOT NULL,
            file_count    INTEGER NOT NULL,
            missing_count INTEGER NOT NULL DEFAULT 0,
            source_bytes  INTEGER NOT NULL DEFAULT 0,
            fingerprint   TEXT NOT NULL,
            study_date    TEXT,
            month         TEXT NOT NULL,
            patient_name  TEXT,
            modalities    TEXT,
            exported_at   TEXT NOT NULL,
            verified_at   TEXT
        )
        """,
        "CREATE INDEX exported_studies_month ON exported_studies (month)",
        """
        CREATE TABLE writes_in_progress (
            zip_path    TEXT PRIMARY KEY,
            study_uid   TEXT NOT NULL,
            started_at  TEXT NOT NULL
        )
        """,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
    ),
    2: (
        # The ZIP a re-export replaces under another name: removed once the new one is
        # recorded, and by the next cycle if this one is killed in between.
        "ALTER TABLE writes_in_progress ADD COLUMN replaces TEXT",
        """
        CREATE TABLE failures (
            study_uid        TEXT PRIMARY KEY,
            kind             TEXT NOT NULL,
            detail           TEXT,
            attempts         INTEGER NOT NULL,
            first_failed_at  TEXT NOT NULL,
            last_failed_at   TEXT NOT NULL,
            next_attempt_at  TEXT NOT NULL,
            fingerprint      TEXT
        )
        """,
        """
        CREATE TABLE changed_studies (
            study_uid    TEXT PRIMARY KEY,
            detected_at  TEXT NOT NULL
        )
        """,
    ),
    3: (
        """
        CREATE TABLE runs (
            id             INTEGER PRIMARY KEY,
            started_at     TEXT NOT NULL,
            seconds        REAL NOT NULL,
            outcome        TEXT NOT NULL,
            studies        INTEGER NOT NULL DEFAULT 0,
            files          INTEGER NOT NULL DEFAULT 0,
            zip_bytes      INTEGER NOT NULL DEFAULT 0,
            source_bytes   INTEGER NOT NULL DEFAULT 0,
            failed         INTEGER NOT NULL DEFAULT 0,
            deferred       INTEGER NOT NULL DEFAULT 0,
            verified       INTEGER NOT NULL DEFAULT 0,
            horos_seconds  REAL,
            detail         TEXT
        )
        """,
        "CREATE INDEX exported_studies_verified ON exported_studies (verified_at)",
    ),
    4: (
        # What `find` searches besides name, UID, date and modalities. NULL in rows of an
        # older version until their ZIP's manifest is read (a cycle's backfill, or
        # reindex); the partial index finds those rows without a scan.
        "ALTER TABLE exported_studies ADD COLUMN patient_id TEXT",
        "ALTER TABLE exported_studies ADD COLUMN accession_number TEXT",
        "ALTER TABLE exported_studies ADD COLUMN birth_date TEXT",
        """
        CREATE INDEX exported_studies_unread ON exported_studies (study_uid)
        WHERE patient_id IS NULL
        """,
        # One row per study restored --into-horos, per target (the real path of the
        # INCOMING.noindex it went into): a study is never fed twice to one library.
        """
        CREATE TABLE restores (
            target       TEXT NOT NULL,
            study_uid    TEXT NOT NULL,
            zip_path     TEXT NOT NULL,
            restored_at  TEXT NOT NULL,
            PRIMARY KEY (target, study_uid)
        )
        """,
        """
        CREATE TABLE restore_targets (
            target       TEXT PRIMARY KEY,
            selection    TEXT NOT NULL,
            left_count   INTEGER NOT NULL,
            last_run_at  TEXT NOT NULL
        )
        """,
    ),
    5: (
        # Reads of Database.sql are many short transactions since this step:
        # horos_seconds is their total, these the longest one and how many there were.
        "ALTER TABLE runs ADD COLUMN horos_longest_seconds REAL",
        "ALTER TABLE runs ADD COLUMN horos_transactions INTEGER",
    ),
    6: (
        # The reader's work (README: Edits in Horos). The fingerprint without it, which
        # tells an edit from new images; NULL in rows of a version that recorded none of
        # it, whose fingerprint was this base one.
        "ALTER TABLE exported_studies ADD COLUMN base_fingerprint TEXT",
        # When the reader last edited a changed study (the settle clock of an edit), and
        # the study's fingerprint then (an edit seen in Database.sql alone restarts the
        # clock when it moves again); NULL for a change that is not an edit.
        "ALTER TABLE changed_studies ADD COLUMN edited_at TEXT",
        "ALTER TABLE changed_studies ADD COLUMN fingerprint TEXT",
        # The files of Horos's own SR series in each exported study, as they were when
        # they went into its ZIP: Horos rewrites them in place, and every cycle compares.
        """
        CREATE TABLE horos_sr_files (
            study_uid  TEXT NOT NULL,
            path       TEXT NOT NULL,
            size       INTEGER NOT NULL,
            mtime_ns   INTEGER NOT NULL,
            PRIMARY KEY (study_uid, path)
        )
        """,
    ),
    7: (
        # Exported studies Horos no longer has, since when, and how many left with them
        # (one cycle's batch): what find --left-horos lists and alerts count. A row goes
        # when the study is back in Horos; the exported row and the ZIP never go.
        """
        CREATE TABLE left_horos (
            study_uid   TEXT PRIMARY KEY,
            left_at     TEXT NOT NULL,
            batch_size  INTEGER NOT NULL
        )
        """,
        "CREATE INDEX left_horos_left_at ON left_horos (left_at)",
    ),
    8: (
        # Each folder `mirror --to DIR` has fed, and what it held after its last run: the
        # mirror's disk may be in a drawer, and status still says how far behind it is.
        """
        CREATE TABLE mirrors (
            target            TEXT PRIMARY KEY,
            last_run_at       TEXT NOT NULL,
            last_complete_at  TEXT
        )
        """,
        """
        CREATE TABLE mirrored_studies (
            target       TEXT NOT NULL,
            study_uid    TEXT NOT NULL,
            zip_path     TEXT NOT NULL,
            zip_bytes    INTEGER NOT NULL,
            exported_at  TEXT NOT NULL,
            PRIMARY KEY (target, study_uid)
        )
        """,
    ),
}

EXPORTED_FINGERPRINTS_SQL = """
SELECT study_uid, fingerprint, base_fingerprint FROM exported_studies
"""

EXPORTED_ROW_SQL = """
SELECT study_uid, zip_path, zip_bytes, file_count, missing_count, fingerprint,
       exported_at
FROM exported_studies
WHERE study_uid = ?
"""

LISTED_ZIPS_SQL = "SELECT study_uid, zip_path, zip_bytes, exported_at FROM exported_studies"

UPSERT_EXPORTED_SQL = """
INSERT INTO exported_studies (study_uid, zip_path, zip_bytes, file_count, missing_count,
                              source_bytes, fingerprint, study_date, month, patient_name,
                              modalities, exported_at, verified_at, base_fingerprint)
VALUES (:study_uid, :zip_path, :zip_bytes, :file_count, :missing_count, :source_bytes,
        :fingerprint, :study_date, :month, :patient_name, :modalities, :exported_at,
        :verified_at, :base_fingerprint)
ON CONFLICT (study_uid) DO UPDATE SET
    zip_path = excluded.zip_path, zip_bytes = excluded.zip_bytes,
    file_count = excluded.file_count, missing_count = excluded.missing_count,
    source_bytes = excluded.source_bytes, fingerprint = excluded.fingerprint,
    study_date = excluded.study_date, month = excluded.month,
    patient_name = excluded.patient_name, modalities = excluded.modalities,
    exported_at = excluded.exported_at, verified_at = excluded.verified_at,
    base_fingerprint = excluded.base_fingerprint
"""

# A row of an older version whose study holds none of the reader's work: its
# fingerprint is its base one (see ExportState.record_bases).
RECORD_BASE_SQL = """
UPDATE exported_studies SET base_fingerprint = fingerprint
WHERE study_uid = ? AND base_fingerprint IS NULL
"""

FORGET_SR_FILES_SQL = "DELETE FROM horos_sr_files WHERE study_uid = ?"

WATCH_SR_FILE_SQL = """
INSERT OR REPLACE INTO horos_sr_files (study_uid, path, size, mtime_ns)
VALUES (?, ?, ?, ?)
"""

SR_FILES_SQL = "SELECT study_uid, path, size, mtime_ns FROM horos_sr_files"

DELETE_EXPORTED_SQL = "DELETE FROM exported_studies WHERE study_uid = ?"

# Apart from UPSERT_EXPORTED_SQL so that rows of an older version can be filled alone.
SET_SEARCH_FIELDS_SQL = """
UPDATE exported_studies
SET patient_id = :patient_id, accession_number = :accession_number,
    birth_date = :birth_date
WHERE study_uid = :study_uid
"""

BEGIN_WRITE_SQL = """
INSERT OR REPLACE INTO writes_in_progress (zip_path, study_uid, started_at, replaces)
VALUES (?, ?, ?, ?)
"""

END_WRITE_SQL = "DELETE FROM writes_in_progress WHERE zip_path = ?"

WRITES_IN_PROGRESS_SQL = "SELECT zip_path, study_uid, replaces FROM writes_in_progress"

FAILURES_SQL = """
SELECT study_uid, kind, attempts, next_attempt_at, fingerprint
FROM failures
"""

FAILURE_ATTEMPTS_SQL = "SELECT attempts FROM failures WHERE study_uid = ?"

RECORD_FAILURE_SQL = """
INSERT INTO failures (study_uid, kind, detail, attempts, first_failed_at, last_failed_at,
                      next_attempt_at, fingerprint)
VALUES (:study_uid, :kind, :detail, :attempts, :now, :now, :next_attempt_at, :fingerprint)
ON CONFLICT (study_uid) DO UPDATE SET
    kind = excluded.kind, detail = excluded.detail, attempts = excluded.attempts,
    last_failed_at = excluded.last_failed_at, next_attempt_at = excluded.next_attempt_at,
    fingerprint = excluded.fingerprint
"""

CLEAR_FAILURE_SQL = "DELETE FROM failures WHERE study_uid = ?"

# Failed studies by their last kind, and those failing since :failing_before that were
# still tried after :retried_after (a study Horos deleted keeps its row but is no
# longer tried): what alerts count.
FAILURES_BY_KIND_SQL = """
SELECT kind, COUNT(*) AS studies,
       SUM(first_failed_at <= :failing_before AND last_failed_at >= :retried_after)
           AS failing_long
FROM failures
GROUP BY kind
"""

CHANGED_STUDIES_SQL = "SELECT study_uid, edited_at, fingerprint FROM changed_studies"

# A mark is only ever written with news (a first change, a later edit): detected_at
# stays the first time the study was seen changed.
NOTE_CHANGED_SQL = """
INSERT INTO changed_studies (study_uid, detected_at, edited_at, fingerprint)
VALUES (:study_uid, :now, :edited_at, :fingerprint)
ON CONFLICT (study_uid) DO UPDATE SET
    edited_at = excluded.edited_at, fingerprint = excluded.fingerprint
"""

CLEAR_CHANGED_SQL = "DELETE FROM changed_studies WHERE study_uid = ?"

RECORD_RUN_SQL = """
INSERT INTO runs (started_at, seconds, outcome, studies, files, zip_bytes, source_bytes,
                  failed, deferred, verified, horos_seconds, detail, horos_longest_seconds,
                  horos_transactions)
VALUES (:started_at, :seconds, :outcome, :studies, :files, :zip_bytes, :source_bytes,
        :failed, :deferred, :verified, :horos_seconds, :detail, :horos_longest_seconds,
        :horos_transactions)
"""

PRUNE_RUNS_SQL = "DELETE FROM runs WHERE id <= (SELECT MAX(id) FROM runs) - ?"

LAST_RUNS_SQL = """
SELECT started_at, seconds, outcome, studies, files, zip_bytes, source_bytes, failed,
       deferred, verified, horos_seconds, detail, horos_longest_seconds, horos_transactions
FROM runs
ORDER BY id DESC
LIMIT ?
"""

# Oldest-verified first; never-verified (NULL) before all. UTC ISO times compare as
# text, so the age filter and the limit stay in SQLite (LIMIT -1: no limit).
VERIFY_QUEUE_SQL = """
SELECT study_uid, zip_path, zip_bytes
FROM exported_studies
WHERE verified_at IS NULL OR verified_at < :verified_before
ORDER BY verified_at IS NOT NULL, verified_at, zip_path
LIMIT :limit
"""

MARK_VERIFIED_SQL = "UPDATE exported_studies SET verified_at = ? WHERE study_uid = ?"

RETRY_NOW_SQL = "UPDATE failures SET next_attempt_at = ? WHERE study_uid = ?"

GET_META_SQL = "SELECT value FROM meta WHERE key = ?"

SET_META_SQL = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"

META_IMAGE_HIGH_WATER = "horos_image_high_water"

STATE_TOTALS_SQL = """
SELECT COUNT(*) AS exported, COALESCE(SUM(zip_bytes), 0) AS zip_bytes,
       COALESCE(SUM(missing_count > 0), 0) AS partial
FROM exported_studies
"""

STATE_MONTHS_SQL = """
SELECT month, COUNT(*) AS studies
FROM exported_studies
GROUP BY month
"""

UNREAD_ROWS_SQL = """
SELECT study_uid, zip_path
FROM exported_studies
WHERE patient_id IS NULL
ORDER BY study_uid
LIMIT ?
"""

UNREAD_COUNT_SQL = "SELECT COUNT(*) AS unread FROM exported_studies WHERE patient_id IS NULL"

BACKUP_STUDIES_SQL = """
SELECT e.study_uid, e.zip_path, e.zip_bytes, e.file_count, e.source_bytes, e.study_date,
       e.patient_name, e.patient_id, e.accession_number, e.birth_date, e.modalities,
       l.left_at
FROM exported_studies AS e
LEFT JOIN left_horos AS l ON l.study_uid = e.study_uid
"""

RESTORED_UIDS_SQL = "SELECT study_uid, restored_at FROM restores WHERE target = ?"

# A study that left Horos again after it was restored there is fed again
# (restore --left-horos): its row then says when it went the second time.
RECORD_RESTORE_SQL = """
INSERT INTO restores (target, study_uid, zip_path, restored_at)
VALUES (:target, :study_uid, :zip_path, :restored_at)
ON CONFLICT (target, study_uid) DO UPDATE SET
    zip_path = excluded.zip_path, restored_at = excluded.restored_at
"""

FORGET_RESTORE_SQL = "DELETE FROM restores WHERE target = ? AND study_uid = ?"

RESTORED_ZIP_PATHS_SQL = "SELECT zip_path FROM restores WHERE target = ?"

RECORD_RESTORE_TARGET_SQL = """
INSERT OR REPLACE INTO restore_targets (target, selection, left_count, last_run_at)
VALUES (:target, :selection, :left_count, :last_run_at)
"""

RESTORE_TARGETS_SQL = """
SELECT t.target, t.selection, t.left_count, t.last_run_at,
       (SELECT COUNT(*) FROM restores AS r WHERE r.target = t.target) AS restored
FROM restore_targets AS t
ORDER BY t.last_run_at DESC
"""

ALL_RESTORES_SQL = "SELECT target, study_uid, zip_path, restored_at FROM restores"

ALL_RESTORE_TARGETS_SQL = """
SELECT target, selection, left_count, last_run_at FROM restore_targets
"""

LEFT_HOROS_UIDS_SQL = "SELECT study_uid FROM left_horos"

RECORD_LEFT_SQL = """
INSERT OR IGNORE INTO left_horos (study_uid, left_at, batch_size) VALUES (?, ?, ?)
"""

FORGET_LEFT_SQL = "DELETE FROM left_horos WHERE study_uid = ?"

NEWEST_LEFT_SQL = "SELECT MAX(left_at) AS newest FROM left_horos"

# When the cycles began to record departures: the first check records the studies
# already gone as batch 0 (when they left is unknown, and nobody is told again).
META_LEFT_HOROS_SINCE = "left_horos_since"

# The batches still (partly) gone, by month: those first seen gone after :recent_after,
# and the large ones of any age (an open LIBRARY_SHRANK counts what is left of them).
LEFT_BATCHES_SQL = """
SELECT l.left_at, l.batch_size, e.month, COUNT(*) AS studies,
       COALESCE(SUM(e.source_bytes), 0) AS source_bytes
FROM left_horos AS l
JOIN exported_studies AS e ON e.study_uid = l.study_uid
WHERE l.left_at >= :recent_after OR l.batch_size >= :large
GROUP BY l.left_at, l.batch_size, e.month
ORDER BY l.left_at, e.month
"""

LEFT_COUNTS_SQL = """
SELECT COUNT(*) AS total, COALESCE(SUM(l.left_at >= :recent_after), 0) AS recent
FROM left_horos AS l
JOIN exported_studies AS e ON e.study_uid = l.study_uid
"""

ALL_LEFT_HOROS_SQL = "SELECT study_uid, left_at, batch_size FROM left_horos"

RECORD_MIRROR_RUN_SQL = """
INSERT INTO mirrors (target, last_run_at, last_complete_at)
VALUES (:target, :now, CASE WHEN :complete THEN :now END)
ON CONFLICT (target) DO UPDATE SET
    last_run_at = excluded.last_run_at,
    last_complete_at = COALESCE(excluded.last_complete_at, mirrors.last_complete_at)
"""

MIRRORED_STUDIES_SQL = """
SELECT study_uid, zip_path, zip_bytes, exported_at
FROM mirrored_studies
WHERE target = ?
"""

RECORD_MIRRORED_SQL = """
INSERT OR REPLACE INTO mirrored_studies (target, study_uid, zip_path, zip_bytes, exported_at)
VALUES (:target, :study_uid, :zip_path, :zip_bytes, :exported_at)
"""

FORGET_MIRRORED_SQL = "DELETE FROM mirrored_studies WHERE target = ? AND study_uid = ?"

# Behind: studies whose ZIP, as this state lists it now, the mirror did not hold after
# its last run (one primary-key lookup per study).
MIRRORS_SQL = """
SELECT m.target, m.last_run_at, m.last_complete_at,
       (SELECT COUNT(*) FROM mirrored_studies AS c WHERE c.target = m.target) AS studies,
       (SELECT COUNT(*) FROM exported_studies AS e
        WHERE NOT EXISTS (
            SELECT 1 FROM mirrored_studies AS c
            WHERE c.target = m.target AND c.study_uid = e.study_uid
              AND c.zip_path = e.zip_path AND c.zip_bytes = e.zip_bytes
              AND c.exported_at = e.exported_at)) AS behind
FROM mirrors AS m
ORDER BY m.target
"""

# meta keys of a mirror's own state (README: State).
META_MIRROR_OF = "mirror_of"                   # the BACKUP_ROOT it copies
META_MIRROR_COMPLETE_AT = "mirror_complete_at"


@dataclass(frozen=True)
class ExportedRow:
    study_uid: str
    zip_path: str
    zip_bytes: int
    file_count: int
    missing_count: int
    fingerprint: str
    exported_at: str


@dataclass(frozen=True)
class WriteInProgress:
    """A ZIP a run began to write and has not recorded (README: writes_in_progress)."""
    zip_path: str
    study_uid: str
    replaces: Optional[str]       # the ZIP of the same study under its old name


@dataclass(frozen=True)
class VerifyItem:
    study_uid: str
    zip_path: str
    zip_bytes: int


@dataclass(frozen=True)
class FailureCount:
    """Studies whose last failure is of one kind, and how many of them fail for long."""
    studies: int
    failing_long: int


@dataclass(frozen=True)
class StateTotals:
    exported: int
    zip_bytes: int
    partial: int             # exported without some missing files


@dataclass
class ListedZip:
    """A study's ZIP as a state lists it: what `mirror` compares (a re-export, in place or
    under a new name, changes the export time). Made once per study of a backup each
    mirror run: slots keep that cheap, as for HorosStudy. Nothing changes one once made."""
    __slots__ = ("study_uid", "zip_path", "zip_bytes", "exported_at")
    study_uid: str
    zip_path: str
    zip_bytes: int
    exported_at: str


def listed_zip_of(row: sqlite3.Row) -> ListedZip:
    """A ListedZip from a row that holds its four columns (exported or mirrored)."""
    return ListedZip(row["study_uid"], row["zip_path"], row["zip_bytes"], row["exported_at"])


@dataclass(frozen=True)
class MirrorStatus:
    """One folder `mirror --to DIR` has fed (README: mirrors), as this state knows it."""
    target: str
    last_run_at: str
    last_complete_at: Optional[str]
    studies: int             # ZIPs it held after its last run
    behind: int              # studies it does not hold as this state lists them now


@dataclass(frozen=True)
class RestoreTarget:
    """One library `restore --into-horos` feeds (README: restore_targets)."""
    target: str
    selection: str
    left: int
    last_run_at: str
    restored: int


@dataclass
class StateView:
    """What the planner needs from the state, read once per cycle."""
    exported: Dict[str, str]          # study_uid -> fingerprint
    changed: Dict[str, ChangeMark]
    failures: Dict[str, Failure]
    image_high_water: Optional[int]
    # Recorded base fingerprints that are not the fingerprint itself (None: exported by
    # a version that recorded no reader's work); plan_selection's `bases`.
    bases: Dict[str, Optional[str]] = dataclasses.field(default_factory=dict)
    sr_files: List[WatchedFile] = dataclasses.field(default_factory=list)
    left_horos: set = dataclasses.field(default_factory=set)   # recorded as gone from Horos


@dataclass
class BackupStudy:
    """One study of the backup as its state row tells it (find, restore).

    find makes one per study of the backup (50,000+) each time it runs: slots keep
    that cheap, as for HorosStudy. Nothing changes one once made.
    """
    __slots__ = ("uid", "zip_path", "zip_bytes", "file_count", "source_bytes", "study_date",
                 "patient_name", "patient_id", "accession_number", "birth_date",
                 "modalities", "left_at")
    uid: str
    zip_path: str                      # relative to BACKUP_ROOT
    zip_bytes: int
    file_count: int
    source_bytes: int
    study_date: Optional[str]          # YYYY-MM-DD
    patient_name: str
    patient_id: Optional[str]          # None: written by an older version, not read yet
    accession_number: Optional[str]
    birth_date: Optional[str]
    modalities: Tuple[str, ...]
    left_at: Optional[str]             # UTC: first seen gone from Horos; None: in Horos


def connect_state_read_only(path: str, busy_timeout: float) -> sqlite3.Connection:
    """The state opened for reading, never written, even on a read-only disk.

    On a disk nobody can write (a recovery disk mounted read-only) nothing can change
    the file, so it is opened immutable: no lock is taken (some read-only file systems
    refuse one). If a cycle was cut off mid-write there (the disk unplugged, then
    mounted read-only), the file holds half a transaction and only its `-journal` can
    undo it: SQLite rolls it back in a scratch copy, and that copy is read.
    """
    path = os.path.abspath(path)
    uri = "file:%s?mode=ro" % urllib.parse.quote(path)
    if os.access(os.path.dirname(path), os.W_OK):
        return sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
    journal = path + "-journal"
    if not (os.path.isfile(journal) and os.path.getsize(journal) > 0):
        return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)
    memory = sqlite3.connect(":memory:", isolation_level=None)
    with tempfile.TemporaryDirectory(prefix="horos-backup-state-") as scratch:
        copy = os.path.join(scratch, STATE_FILE)
        shutil.copyfile(path, copy)
        shutil.copyfile(journal, copy + "-journal")
        recovered = sqlite3.connect(copy, isolation_level=None)
        try:
            recovered.backup(memory)
        finally:
            recovered.close()
    log.debug("read %s through a copy: its hot journal was rolled back there", path)
    return memory


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()["user_version"]


class ExportState:
    """export_state.sqlite: what is exported, what failed, what a killed run was writing,
    what was restored where. Every query on it is a method here.

    read_only=True never writes the file, nor creates it: a missing file reads as
    empty, and a file from an older version is upgraded in a copy in memory.
    """

    def __init__(self, path: str, busy_timeout: float = BUSY_TIMEOUT_SECONDS,
                 read_only: bool = False):
        self.path = path
        try:
            if read_only:
                self.conn = self.open_read_only(path, busy_timeout)
            else:
                self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
                self.conn.execute("PRAGMA journal_mode = DELETE")
                self.conn.execute("PRAGMA synchronous = FULL")
                self.conn.execute("PRAGMA fullfsync = ON")
            self.conn.row_factory = sqlite3.Row
            self.migrate()
        except sqlite3.Error as error:
            if is_disk_full(error):
                raise DiskSpaceProblem(DISK_FULL, "backup volume full: cannot update %s"
                                       % path) from None
            raise CannotRun("state database %s cannot be used (%s); move it aside and run "
                            "`horos_backup_export.py reindex` to rebuild it from the ZIPs"
                            % (path, error)) from None

    @staticmethod
    def open_read_only(path: str, busy_timeout: float) -> sqlite3.Connection:
        memory = sqlite3.connect(":memory:", isolation_level=None)
        if not os.path.exists(path):
            return memory
        conn = connect_state_read_only(path, busy_timeout)
        conn.row_factory = sqlite3.Row
        if schema_version(conn) >= STATE_SCHEMA_VERSION:
            memory.close()
            return conn
        conn.backup(memory)
        conn.close()
        return memory

    def migrate(self) -> None:
        version = schema_version(self.conn)
        if version > STATE_SCHEMA_VERSION:
            raise CannotRun("state database %s was written by a newer version (schema %d); "
                            "update horos_backup_export.py" % (self.path, version))
        # Only what is missing runs: an idle cycle must not touch the file.
        for step in range(version + 1, STATE_SCHEMA_VERSION + 1):
            with self.transaction() as conn:
                for statement in STATE_MIGRATIONS[step]:
                    conn.execute(statement)
                # A PRAGMA takes no parameter; step is one of our own integers.
                conn.execute("PRAGMA user_version = %d" % step)

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def transaction(self):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- exported studies ---------------------------------------------------------------

    def exported_fingerprints(self) -> Dict[str, str]:
        return self.fingerprints()[0]

    def fingerprints(self) -> Tuple[Dict[str, str], Dict[str, Optional[str]]]:
        """({uid: fingerprint}, {uid: base fingerprint} of the rows whose base is not the
        fingerprint itself: None for the rows of an older version)."""
        exported: Dict[str, str] = {}
        bases: Dict[str, Optional[str]] = {}
        for row in self.conn.execute(EXPORTED_FINGERPRINTS_SQL):
            uid, fingerprint, base = row["study_uid"], row["fingerprint"], row["base_fingerprint"]
            exported[uid] = fingerprint
            if base != fingerprint:
                bases[uid] = base
        return exported, bases

    def view(self) -> StateView:
        exported, bases = self.fingerprints()
        return StateView(exported=exported, changed=self.changes(), failures=self.failures(),
                         image_high_water=self.image_high_water(), bases=bases,
                         sr_files=self.sr_files(), left_horos=self.left_horos_uids())

    def exported_row(self, study_uid: str) -> Optional[ExportedRow]:
        row = self.conn.execute(EXPORTED_ROW_SQL, (study_uid,)).fetchone()
        return ExportedRow(**dict(row)) if row else None

    def listed_zips(self) -> Dict[str, ListedZip]:
        """Every exported study's ZIP, read in one statement (a consistent view)."""
        return {row["study_uid"]: listed_zip_of(row)
                for row in self.conn.execute(LISTED_ZIPS_SQL)}

    def listed_zip(self, study_uid: str) -> Optional[ListedZip]:
        row = self.conn.execute(EXPORTED_ROW_SQL, (study_uid,)).fetchone()
        return listed_zip_of(row) if row else None

    def forget_export(self, study_uid: str) -> None:
        with self.transaction() as conn:
            conn.execute(DELETE_EXPORTED_SQL, (study_uid,))

    def record_export(self, record: Mapping[str, object], sr_files: Sequence[WatchedFile],
                      keep_write: bool = False) -> None:
        """The study's row and its watched SR files, the end of its write, of its failures
        and of its change mark, in one transaction.

        keep_write: the write still has a replaced ZIP to remove (see end_write).
        """
        uid = record["study_uid"]
        with self.transaction() as conn:
            conn.execute(UPSERT_EXPORTED_SQL, dict(record))
            conn.execute(SET_SEARCH_FIELDS_SQL, dict(record))
            conn.execute(FORGET_SR_FILES_SQL, (uid,))
            conn.executemany(WATCH_SR_FILE_SQL, [(uid, f.path, f.size, f.mtime_ns)
                                                 for f in sr_files])
            conn.execute(CLEAR_FAILURE_SQL, (uid,))
            conn.execute(CLEAR_CHANGED_SQL, (uid,))
            if not keep_write:
                conn.execute(END_WRITE_SQL, (record["zip_path"],))

    def replace_exported(self, records: Sequence[Mapping[str, object]],
                         sr_files: Sequence[WatchedFile]) -> None:
        """reindex: the rows of these records and these watched files, in one
        transaction."""
        with self.transaction() as conn:
            conn.executemany(UPSERT_EXPORTED_SQL, [dict(r) for r in records])
            conn.executemany(SET_SEARCH_FIELDS_SQL, [dict(r) for r in records])
            conn.executemany(WATCH_SR_FILE_SQL, [(f.study_uid, f.path, f.size, f.mtime_ns)
                                                 for f in sr_files])

    def sr_files(self) -> List[WatchedFile]:
        """Every watched SR file of every exported study (horos_sr_files)."""
        return [WatchedFile(row["study_uid"], row["path"], row["size"], row["mtime_ns"])
                for row in self.conn.execute(SR_FILES_SQL)]

    def totals(self) -> StateTotals:
        return StateTotals(**dict(self.conn.execute(STATE_TOTALS_SQL).fetchone()))

    def exported_by_month(self) -> Dict[str, int]:
        return {row["month"]: row["studies"] for row in self.conn.execute(STATE_MONTHS_SQL)}

    def backup_studies(self) -> List[BackupStudy]:
        """Every exported study, as find and restore see it."""
        parsed: Dict[object, Tuple[str, ...]] = {}   # `CT`, `MR\SR` repeat thousands of times
        studies = []
        for row in self.conn.execute(BACKUP_STUDIES_SQL):
            modalities = parsed.get(row["modalities"])
            if modalities is None:
                modalities = parsed[row["modalities"]] = modality_tokens(row["modalities"])
            studies.append(BackupStudy(
                as_text(row["study_uid"]), as_text(row["zip_path"]), row["zip_bytes"] or 0,
                row["file_count"] or 0, row["source_bytes"] or 0, row["study_date"],
                as_text(row["patient_name"]), row["patient_id"], row["accession_number"],
                row["birth_date"], modalities, row["left_at"]))
        return studies

    # -- the find fields of rows an older version wrote ---------------------------------

    def unread_rows(self, limit: int) -> List[Tuple[str, str]]:
        """(study_uid, zip_path) of rows whose find fields were never read."""
        return [(row["study_uid"], row["zip_path"])
                for row in self.conn.execute(UNREAD_ROWS_SQL, (limit,))]

    def unread_count(self) -> int:
        return self.conn.execute(UNREAD_COUNT_SQL).fetchone()["unread"]

    def set_search_fields(self, updates: Sequence[Mapping[str, object]]) -> None:
        with self.transaction() as conn:
            conn.executemany(SET_SEARCH_FIELDS_SQL, [dict(u) for u in updates])

    # -- writes under way ---------------------------------------------------------------

    def begin_write(self, study_uid: str, zip_path: str, replaces: Optional[str],
                    now: float) -> None:
        with self.transaction() as conn:
            conn.execute(BEGIN_WRITE_SQL, (zip_path, study_uid, utc_iso(now), replaces))

    def end_write(self, zip_path: str) -> None:
        with self.transaction() as conn:
            conn.execute(END_WRITE_SQL, (zip_path,))

    def writes_in_progress(self) -> List[WriteInProgress]:
        return [WriteInProgress(**dict(row))
                for row in self.conn.execute(WRITES_IN_PROGRESS_SQL)]

    # -- failures -----------------------------------------------------------------------

    def failures(self) -> Dict[str, Failure]:
        return {row["study_uid"]: Failure(
            study_uid=row["study_uid"], kind=row["kind"], attempts=row["attempts"],
            next_attempt=parse_utc_iso(row["next_attempt_at"]),
            fingerprint=as_text(row["fingerprint"]))
            for row in self.conn.execute(FAILURES_SQL)}

    def record_failure(self, study_uid: str, kind: str, detail: str, fingerprint: str,
                       now: float) -> int:
        """Count one more failure; returns how many in a row the study has had."""
        with self.transaction() as conn:
            row = conn.execute(FAILURE_ATTEMPTS_SQL, (study_uid,)).fetchone()
            attempts = (row["attempts"] if row else 0) + 1
            conn.execute(RECORD_FAILURE_SQL, {
                "study_uid": study_uid, "kind": kind, "detail": detail, "attempts": attempts,
                "now": utc_iso(now), "next_attempt_at": utc_iso(now + retry_delay(attempts)),
                "fingerprint": fingerprint})
        return attempts

    def retry_now(self, study_uids: Iterable[str], now: float) -> List[str]:
        """Clear the back-off of these failed studies; returns those that had one."""
        cleared = []
        with self.transaction() as conn:
            for uid in study_uids:
                if conn.execute(RETRY_NOW_SQL, (utc_iso(now), uid)).rowcount:
                    cleared.append(uid)
        return cleared

    def failures_by_kind(self, failing_before: float,
                         retried_after: float) -> Dict[str, FailureCount]:
        return {row["kind"]: FailureCount(row["studies"], row["failing_long"] or 0)
                for row in self.conn.execute(FAILURES_BY_KIND_SQL, {
                    "failing_before": utc_iso(failing_before),
                    "retried_after": utc_iso(retried_after)})}

    # -- verification -------------------------------------------------------------------

    def verify_queue(self, verified_before: Optional[float] = None,
                     limit: Optional[int] = None) -> List[VerifyItem]:
        """The ZIPs to read back, longest unverified first."""
        # "~" sorts after every ISO time: no age filter.
        before = utc_iso(verified_before) if verified_before is not None else "~"
        return [VerifyItem(**dict(row)) for row in self.conn.execute(VERIFY_QUEUE_SQL, {
            "verified_before": before, "limit": -1 if limit is None else limit})]

    def mark_verified(self, study_uid: str, now: float) -> None:
        with self.transaction() as conn:
            conn.execute(MARK_VERIFIED_SQL, (utc_iso(now), study_uid))

    # -- runs, changes Horos made -------------------------------------------------------

    def record_run(self, run: Mapping[str, object]) -> None:
        with self.transaction() as conn:
            conn.execute(RECORD_RUN_SQL, dict(run))
            conn.execute(PRUNE_RUNS_SQL, (RUNS_KEPT,))

    def last_runs(self, count: int) -> List[Dict[str, object]]:
        return [dict(row) for row in self.conn.execute(LAST_RUNS_SQL, (count,))]

    def changes(self) -> Dict[str, ChangeMark]:
        """The change marks (changed_studies), by study."""
        return {row["study_uid"]: ChangeMark(
            edited_at=parse_utc_iso(row["edited_at"]) if row["edited_at"] else None,
            fingerprint=row["fingerprint"]) for row in self.conn.execute(CHANGED_STUDIES_SQL)}

    def image_high_water(self) -> Optional[int]:
        return as_int(self.meta(META_IMAGE_HIGH_WATER))

    def meta(self, key: str) -> Optional[str]:
        row = self.conn.execute(GET_META_SQL, (key,)).fetchone()
        return row["value"] if row else None

    def set_meta(self, values: Mapping[str, str]) -> None:
        with self.transaction() as conn:
            conn.executemany(SET_META_SQL, list(values.items()))

    def note_horos_changes(self, marks: Mapping[str, ChangeMark], high_water: int,
                           now: float, plain: Iterable[str] = ()) -> None:
        """Remember what changed in exported studies (edits, image rows Horos added), how
        far we looked for new image rows, and which rows of an older version are of
        studies that hold none of the reader's work (`plain`, see record_bases)."""
        with self.transaction() as conn:
            conn.executemany(RECORD_BASE_SQL, [(uid,) for uid in plain])
            conn.executemany(NOTE_CHANGED_SQL, [{
                "study_uid": uid, "now": utc_iso(now), "fingerprint": mark.fingerprint,
                "edited_at": utc_iso(mark.edited_at) if mark.edited_at is not None else None}
                for uid, mark in sorted(marks.items())])
            conn.execute(SET_META_SQL, (META_IMAGE_HIGH_WATER, str(high_water)))

    # -- restores into a Horos library --------------------------------------------------

    def restored_uids(self, target: str) -> Dict[str, str]:
        """{study_uid: restored_at} of the studies restored into target."""
        return {row["study_uid"]: row["restored_at"]
                for row in self.conn.execute(RESTORED_UIDS_SQL, (target,))}

    def restored_zip_paths(self, target: str) -> List[str]:
        return [row["zip_path"] for row in self.conn.execute(RESTORED_ZIP_PATHS_SQL, (target,))]

    def record_restore(self, target: str, study_uid: str, zip_path: str, now: float) -> None:
        with self.transaction() as conn:
            conn.execute(RECORD_RESTORE_SQL, {"target": target, "study_uid": study_uid,
                                              "zip_path": zip_path,
                                              "restored_at": utc_iso(now)})

    def forget_restore(self, target: str, study_uid: str) -> None:
        with self.transaction() as conn:
            conn.execute(FORGET_RESTORE_SQL, (target, study_uid))

    def record_restore_target(self, target: str, selection: str, left: int,
                              now: float) -> None:
        with self.transaction() as conn:
            conn.execute(RECORD_RESTORE_TARGET_SQL, {"target": target, "selection": selection,
                                                     "left_count": left,
                                                     "last_run_at": utc_iso(now)})

    def restore_targets(self) -> List[RestoreTarget]:
        return [RestoreTarget(target=row["target"], selection=row["selection"],
                              left=row["left_count"], last_run_at=row["last_run_at"],
                              restored=row["restored"])
                for row in self.conn.execute(RESTORE_TARGETS_SQL)]

    # -- mirrors this backup feeds ------------------------------------------------------

    def record_mirror_run(self, target: str, now: float, complete: bool,
                          held: Mapping[str, ListedZip]) -> None:
        """After a mirror run: its times, and the ZIPs `target` holds now (only the rows
        that changed are written, so an idle run costs one small transaction)."""
        known = {row["study_uid"]: listed_zip_of(row)
                 for row in self.conn.execute(MIRRORED_STUDIES_SQL, (target,))}
        changed = [{"target": target, "study_uid": uid, "zip_path": row.zip_path,
                    "zip_bytes": row.zip_bytes, "exported_at": row.exported_at}
                   for uid, row in held.items() if known.get(uid) != row]
        gone = [(target, uid) for uid in known if uid not in held]
        with self.transaction() as conn:
            conn.execute(RECORD_MIRROR_RUN_SQL, {"target": target, "now": utc_iso(now),
                                                 "complete": complete})
            conn.executemany(RECORD_MIRRORED_SQL, changed)
            conn.executemany(FORGET_MIRRORED_SQL, gone)

    def mirrors(self) -> List[MirrorStatus]:
        return [MirrorStatus(target=row["target"], last_run_at=row["last_run_at"],
                             last_complete_at=row["last_complete_at"],
                             studies=row["studies"], behind=row["behind"])
                for row in self.conn.execute(MIRRORS_SQL)]

    def copy_restores_from(self, old: "ExportState") -> None:
        """reindex: the restore progress and the departures of the state it replaces."""
        restores = [dict(row) for row in old.conn.execute(ALL_RESTORES_SQL)]
        targets = [dict(row) for row in old.conn.execute(ALL_RESTORE_TARGETS_SQL)]
        departed = [(row["study_uid"], row["left_at"], row["batch_size"])
                    for row in old.conn.execute(ALL_LEFT_HOROS_SQL)]
        since = old.conn.execute(GET_META_SQL, (META_LEFT_HOROS_SINCE,)).fetchone()
        with self.transaction() as conn:
            conn.executemany(RECORD_RESTORE_SQL, restores)
            conn.executemany(RECORD_RESTORE_TARGET_SQL, targets)
            conn.executemany(RECORD_LEFT_SQL, departed)
            if since is not None:
                conn.execute(SET_META_SQL, (META_LEFT_HOROS_SINCE, since["value"]))

    # -- studies that left Horos --------------------------------------------------------

    def left_horos_uids(self) -> set:
        return {row["study_uid"] for row in self.conn.execute(LEFT_HOROS_UIDS_SQL)}

    def left_horos_since(self) -> Optional[str]:
        """When the cycles began to record departures (None: never yet)."""
        row = self.conn.execute(GET_META_SQL, (META_LEFT_HOROS_SINCE,)).fetchone()
        return as_text(row["value"]) if row else None

    def record_departures(self, left: Sequence[str], returned: Sequence[str],
                          now: float) -> bool:
        """One cycle's check, in one transaction: `left` are gone since `now` (one batch;
        batch 0 at the first check, when how long they have been gone is unknown), the
        `returned` are forgotten. Nothing of the backup itself changes. Returns whether
        this was the first check."""
        first = self.left_horos_since() is None
        batch = 0 if first else len(left)
        with self.transaction() as conn:
            # Alerts take a batch later than the last they looked at as new: one recorded
            # in the same second as the one before (a cycle run by hand), or after the
            # clock was set back, must still come later.
            stamp = utc_iso(now)
            newest = conn.execute(NEWEST_LEFT_SQL).fetchone()["newest"]
            if left and newest is not None and newest >= stamp:
                stamp = utc_iso(parse_utc_iso(newest) + 1)
            conn.executemany(RECORD_LEFT_SQL, [(uid, stamp, batch) for uid in left])
            conn.executemany(FORGET_LEFT_SQL, [(uid,) for uid in returned])
            if first:
                conn.execute(SET_META_SQL, (META_LEFT_HOROS_SINCE, utc_iso(now)))
        return first

    def left_batches(self, recent_after: float, large: int) -> List[LeftBatch]:
        """The batches first seen gone after recent_after, and those of `large` studies
        or more whatever their age, counting only their studies still gone; oldest
        first."""
        by_batch: Dict[Tuple[str, int], List[sqlite3.Row]] = {}
        for row in self.conn.execute(LEFT_BATCHES_SQL, {"recent_after": utc_iso(recent_after),
                                                        "large": large}):
            by_batch.setdefault((row["left_at"], row["batch_size"]), []).append(row)
        return [LeftBatch(left_at=left_at, batch_size=size,
                          studies=sum(row["studies"] for row in rows),
                          source_bytes=sum(row["source_bytes"] for row in rows),
                          months={row["month"]: row["studies"] for row in rows})
                for (left_at, size), rows in by_batch.items()]

    def left_counts(self, recent_after: float) -> Tuple[int, int]:
        """(studies first seen gone after recent_after, in all), of those still gone."""
        row = self.conn.execute(LEFT_COUNTS_SQL, {"recent_after": utc_iso(recent_after)}
                                ).fetchone()
        return row["recent"], row["total"]


def export_record(manifest: Mapping, zip_path: str, zip_bytes: int, verified_at: str) -> dict:
    """The exported_studies row for a ZIP, from the manifest inside it."""
    study = manifest["study"]
    study_date = study.get("study_date")
    return {
        "study_uid": study["study_uid"],
        "zip_path": zip_path,
        "zip_bytes": zip_bytes,
        "file_count": len(manifest["files"]),
        "missing_count": len(manifest.get("missing", [])),
        "source_bytes": sum(int(f["size"]) for f in manifest["files"]),
        "fingerprint": manifest.get("fingerprint", ""),
        "study_date": study_date,
        "month": zip_path.split("/")[0],
        "patient_name": study.get("patient_name"),
        "modalities": "\\".join(study.get("modalities", [])),
        "exported_at": manifest["exported_at"],
        "verified_at": verified_at,
        "patient_id": as_text(study.get("patient_id")),
        "accession_number": as_text(study.get("accession_number")),
        "birth_date": study.get("birth_date"),
        "base_fingerprint": manifest.get("base_fingerprint"),
    }


def watched_sr_files(manifest: Mapping) -> List[WatchedFile]:
    """The files of Horos's own SR series a ZIP holds, with their size and mtime when
    they were read, from its manifest (a cycle's export, an adopted ZIP, reindex). A
    manifest of an older version records neither: nothing to watch."""
    folders = {series.get("folder") for series in manifest.get("series", [])
               if series.get("horos_sr")}
    uid = manifest["study"]["study_uid"]
    return [WatchedFile(uid, entry["source"], int(entry["size"]), int(entry["mtime_ns"]))
            for entry in manifest["files"]
            if entry["name"].split("/")[0] in folders and entry.get("mtime_ns") is not None]


# =====================================================================================
# Edit check: what the reader changed in Horos after the export
# =====================================================================================
#
# The reader's work on a study often comes after its export: ROIs and measurements, key
# images, comments, the status, the report. Horos keeps it in its own SR series and in
# columns of Database.sql (README: Edits in Horos), and changes it in three ways, each
# found here without reading a DICOM file:
# - it rewrites an ROI or report SR file in place (same path, same image row, new bytes
#   and mtime): the watched SR files of the exported studies (horos_sr_files) are
#   stat'ed every cycle, and a size or mtime other than the ZIP's is an edit;
# - it writes a new annotations SR for every change of a comment, the status or a key
#   image: a new image row in one of its own SR series, above the high-water mark;
# - it changes the columns (comments, status, report URL), which the fingerprint holds.
# An edited study is exported again once it has had no edit for SETTLE_MINUTES. A
# rewritten file dates the edit by its mtime; Database.sql records no time, so an edit
# seen only there is dated by the cycle that first sees it (ChangeMark.edited_at).


@dataclass
class EditCheck:
    """One look at the watched SR files of the exported studies Horos still has."""
    files: int = 0                   # files stat'ed
    seconds: float = 0.0
    # study_uid -> the newest mtime (Unix s) of its SR files whose size or mtime is not
    # the ZIP's: rewritten since the export.
    rewritten: Dict[str, float] = dataclasses.field(default_factory=dict)
    vanished: set = dataclasses.field(default_factory=set)   # a watched file is gone


def check_sr_files(watched: Iterable[WatchedFile], in_horos: Container[str],
                   clock=time.perf_counter) -> EditCheck:
    """Stat the watched SR files of the studies in `in_horos` (a study Horos deleted keeps
    its ZIP and its rows; its files went with it, and looking at them would tell
    nothing)."""
    check = EditCheck()
    started = clock()
    for watched_file in watched:
        uid = watched_file.study_uid
        if uid not in in_horos:
            continue
        check.files += 1
        try:
            st = os.stat(watched_file.path)
        except (FileNotFoundError, NotADirectoryError):
            check.vanished.add(uid)
            continue
        except OSError as error:
            # Not readable now (a permission, an I/O error): no news either way; the next
            # cycle looks again.
            log.warning("cannot look at %s (an SR file of study %s): %s", watched_file.path,
                        uid, error)
            continue
        if st.st_size == watched_file.size and st.st_mtime_ns == watched_file.mtime_ns:
            continue
        mtime = st.st_mtime_ns / 1e9
        check.rewritten[uid] = max(mtime, check.rewritten.get(uid, mtime))
    check.seconds = clock() - started
    return check


def edits_seen(studies: Iterable[HorosStudy], exported: Mapping[str, str],
               bases: Mapping[str, Optional[str]], changed: Mapping[str, ChangeMark],
               check: EditCheck, sr_row_uids: Container[str], row_uids: Container[str],
               now: float) -> Dict[str, ChangeMark]:
    """The change marks to record for the exported studies, from what this look found:
    only news, so that a cycle that finds none writes nothing.

    An edit: an SR file rewritten later than the last edit recorded (dated by its
    mtime, in whole seconds as the state keeps times); a new image row in one of Horos's
    own SR series (sr_row_uids), a watched file gone, or the reader's work changed in
    Database.sql with a fingerprint not seen before (dated now). A change that is not
    an edit: new image rows elsewhere (row_uids), marked once.
    """
    marks: Dict[str, ChangeMark] = {}
    for study in studies:
        uid = study.uid
        recorded = exported.get(uid)
        if recorded is None:
            continue
        previous = changed.get(uid)
        last = previous.edited_at if previous is not None else None
        when: Optional[float] = None
        if uid in check.rewritten:
            mtime = float(int(check.rewritten[uid]))
            if last is None or mtime > last:
                when = mtime
        seen_now = uid in sr_row_uids or (uid in check.vanished and last is None)
        if difference(study, recorded, bases.get(uid, recorded)) == Reason.EDITED and (
                previous is None or previous.fingerprint != study.fingerprint):
            seen_now = True
        if seen_now:
            when = max(when, now) if when is not None else now
        if when is not None:
            marks[uid] = ChangeMark(edited_at=max(when, last) if last is not None else when,
                                    fingerprint=study.fingerprint)
        elif uid in row_uids and previous is None:
            marks[uid] = ChangeMark()
    return marks


def plain_old_exports(studies: Iterable[HorosStudy], exported: Mapping[str, str],
                      bases: Mapping[str, Optional[str]]) -> List[str]:
    """The exports of a version that recorded no reader's work (base None) whose study is
    unchanged and holds none of it (its fingerprint is the base one, and the one
    recorded). Once their base is recorded, the reader's first comment on one of them is
    an edit; left unrecorded, it would look like an upgrade (difference). The first
    cycle after an upgrade records them all, once."""
    return [study.uid for study in studies
            if study.uid in bases and bases[study.uid] is None
            and study.fingerprint == study.base_fingerprint == exported.get(study.uid)]


def known_changes(changed: Mapping[str, ChangeMark], marks: Mapping[str, ChangeMark]
                  ) -> Dict[str, Optional[float]]:
    """plan_selection's `changed`: the recorded marks with this look's news over them."""
    merged = {uid: mark.edited_at for uid, mark in changed.items()}
    merged.update((uid, mark.edited_at) for uid, mark in marks.items())
    return merged


# =====================================================================================
# Issues, logs and progress
# =====================================================================================


# Excel and Numbers run a cell that starts with one of these as a formula
# (`=HYPERLINK(...)` in a study UID from a hostile DICOM file).
CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe_cell(text: str) -> str:
    """A cell a spreadsheet shows as text: a leading `'` before a formula start."""
    return "'" + text if text.startswith(CSV_FORMULA_STARTS) else text


def rotate_numbered(path: str, count: int) -> None:
    """path -> path.1 -> ... -> path.<count>; the oldest is dropped (as the log's)."""
    for number in range(count - 1, 0, -1):
        older = "%s.%d" % (path, number)
        if os.path.exists(older):
            os.replace(older, "%s.%d" % (path, number + 1))
    os.replace(path, path + ".1")


class IssueLog:
    """BACKUP_ROOT/issues.csv (README: issues.csv), and the kinds one run added to it:
    alerting reads those from here (a cycle's summary), never from the file."""

    def __init__(self, path: str, written: Optional[Dict[str, int]] = None):
        self.path = path
        self.written = written if written is not None else {}

    def add(self, kind: str, study_uid: str = "", detail: str = "", extra: str = "") -> None:
        """One row. Counted even when the disk refuses it: a full disk must not turn
        one problem into a crash, nor hide it from alerts."""
        self.written[kind] = self.written.get(kind, 0) + 1
        try:
            size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
            if size >= ISSUES_MAX_BYTES:
                # Renamed, never truncated: `tail -F issues.csv` follows the new file.
                rotate_numbered(self.path, ISSUES_BACKUP_COUNT)
                log.info("%s reached %s: renamed to %s.1, a new one begins", self.path,
                         format_bytes(size), ISSUES_FILE)
                size = 0
            with open(self.path, "a", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                if size == 0:
                    writer.writerow(ISSUES_HEADER)
                writer.writerow([csv_safe_cell(as_text(cell)) for cell in (
                    utc_iso(time.time()), kind, study_uid, detail, extra)])
        except OSError as error:
            log.error("cannot add %s row to %s: %s", kind, self.path, error)


class ConsoleFormatter(logging.Formatter):
    """Log lines for a terminal or launchd's StandardOutPath: never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        plain = logging.makeLogRecord(dict(record.__dict__, exc_info=None, exc_text=None,
                                           stack_info=None))
        return super().format(plain)


class LogFileHandler(logging.handlers.RotatingFileHandler):
    """The rotating log; if the disk refuses a line, say so once on stderr."""
    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print("horos_backup_export: cannot write log %s: %s" % (self.baseFilename, error),
                  file=sys.stderr)


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class ConsoleHandler(logging.StreamHandler):
    """stdout; on a terminal a log line first wipes the live progress line."""

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream.isatty():
            self.stream.write(CLEAR_LINE)
        super().emit(record)


def setup_console_logging(verbose: bool) -> None:
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    handler = ConsoleHandler(sys.stdout)
    handler.setFormatter(ConsoleFormatter(LOG_FORMAT))
    log.addHandler(handler)


CLEAR_LINE = "\r\033[K"


class Progress:
    """A live line for a person at a terminal: n of N, patient, files, MB, MB/s.

    Under launchd stdout is a file, and this draws nothing: the log lines say it all.
    """

    def __init__(self, stream=None):
        self.stream = stream if stream is not None and stream.isatty() else None
        self.label = ""
        self.done = 0
        self.total = 0
        self.started = self.drawn = 0.0

    def start(self, label: str, total_bytes: int) -> None:
        self.label, self.done, self.total = label, 0, total_bytes
        self.started = self.drawn = time.monotonic()
        self.draw()

    def advance(self, count: int) -> None:
        self.done += count
        if self.stream is not None and time.monotonic() - self.drawn >= 0.25:
            self.draw()

    def draw(self) -> None:
        if self.stream is None:
            return
        self.drawn = time.monotonic()
        line = self.line(max(self.drawn - self.started, 1e-6))
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write(CLEAR_LINE + line[:width])
        self.stream.flush()

    def line(self, seconds: float) -> str:
        return "%s  %.1f of %.1f MB  %.1f MB/s" % (self.label, self.done / 1e6,
                                                   self.total / 1e6, self.done / 1e6 / seconds)

    def clear(self) -> None:
        if self.stream is not None:
            self.stream.write(CLEAR_LINE)
            self.stream.flush()


def setup_file_logging(cfg: Config) -> None:
    os.makedirs(os.path.dirname(cfg.log_path), exist_ok=True)
    handler = LogFileHandler(cfg.log_path, maxBytes=LOG_MAX_BYTES,
                             backupCount=LOG_BACKUP_COUNT, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.addHandler(handler)


# =====================================================================================
# File modes: the backup is private to the account that runs it
# =====================================================================================
#
# One mechanism: each command that writes under BACKUP_ROOT (a cycle, verify, reindex,
# retry) and `restore --to` set the process umask to BACKUP_UMASK before creating
# anything. Every folder, `.part` (renamed with its mode), state database, issues.csv,
# log, lock and database copy is then born private, rotations included: a rename keeps
# the mode, and SQLite creates its journal with the database file's own mode. Nothing
# is chmod-ed after the fact, except a backup an older version made 0755/0644, which
# the next run tightens once.


def use_backup_umask() -> int:
    """From here on this process creates folders 0700 and files 0600 (BACKUP_UMASK);
    returns the umask it replaced."""
    return os.umask(BACKUP_UMASK)


@contextlib.contextmanager
def umask_of(mask: int):
    """What is created inside gets `mask`'s modes (restore into Horos: the user's own)."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def remove_forbidden_access(path: str) -> bool:
    """Clear the mode bits BACKUP_UMASK forbids (never through a symlink); True if any."""
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or not mode & BACKUP_UMASK:
        return False
    os.chmod(path, mode & ~BACKUP_UMASK)
    return True


def make_backup_root_private(backup_root: str) -> None:
    """Tighten a backup whose files group or others can read (an older version's).

    Walks BACKUP_ROOT only while BACKUP_ROOT itself grants too much, and changes it
    last: an idle cycle costs one stat, and a walk that was killed runs again.
    """
    if not stat.S_IMODE(os.stat(backup_root).st_mode) & BACKUP_UMASK:
        return
    changed = 0
    refused: List[OSError] = []
    for folder, dirs, files in os.walk(backup_root, onerror=refused.append):
        for name in dirs + files:
            try:
                changed += remove_forbidden_access(os.path.join(folder, name))
            except FileNotFoundError:
                continue        # a `.part` a running cycle removed meanwhile
            except OSError as error:
                refused.append(error)
    try:
        changed += remove_forbidden_access(backup_root)
    except OSError as error:
        refused.append(error)
    log.info("made %s under %s private to this account (folders 0700, files 0600: they "
             "hold patient data)", plural(changed, "file or folder", "files and folders"),
             backup_root)
    if refused:
        # Whatever stays open inside is out of other accounts' reach once BACKUP_ROOT is
        # 0700; if BACKUP_ROOT itself refused, the next run walks again.
        log.warning("could not change the mode of %s under %s, e.g. %s",
                    plural(len(refused), "entry", "entries"), backup_root, refused[0])


# =====================================================================================
# Alerts: email, a command and a heartbeat URL, so the backup is never silent
# =====================================================================================
#
# After every cycle (and after `verify`), what happened is reduced to a RunReport; a
# pure function decides, from the bookkeeping kept in the user's Library (outside the
# backup volume, so it works while that volume is missing), which problems to alert
# about and which are resolved, and whether studies that left Horos make a notice;
# thin edges send by SMTP, run a command, and request the heartbeat URL, all within
# ALERT_BUDGET_SECONDS. Alerts carry no patient data.

ALERT_BUDGET_SECONDS = 10.0      # everything alerting does after one cycle, worst case
SMTP_TIMEOUT_SECONDS = 6.0
COMMAND_TIMEOUT_SECONDS = 5.0
HEARTBEAT_TIMEOUT_SECONDS = 3.0
ALERT_RESERVE_SECONDS = 2.0      # kept for each channel still to come
ALERT_STATE_BUSY_SECONDS = 2.0   # the state's failures, read after a cycle
ALERT_REPEAT_SECONDS = 24 * 3600     # one problem alerts at most once a day
STUDY_FAILING_DAYS = 7               # "failing for a week" digest
STUDY_RETRIED_WITHIN_DAYS = 2        # ...of studies still retried (still in Horos)
ALERT_BOOK_DIR = os.path.join("~", "Library", "Application Support", "horos_backup_export")
ALERT_BOOK_FILE = "alerts.json"
# A mirror job keeps its own file beside it (+ its folder, made safe, and a digest of it):
# two jobs never write one file, so neither can lose the other's bookkeeping.
MIRROR_BOOK_PREFIX = "alerts-mirror-"
ALERT_BOOK_VERSION = 1
ALERT_BOOK_LOCK_SUFFIX = ".lock"     # alerts.json.lock: see alert_book_lock
ALERT_LINE_WIDTH = 76

# Problems: each is one incident at a time, alerted at most once a day while it lasts.
NO_SUCCESSFUL_CYCLE = "NO_SUCCESSFUL_CYCLE"
LIBRARY_SHRANK = "LIBRARY_SHRANK"   # many exported studies gone from Horos in one cycle
STUDIES_FAILING = "STUDIES_FAILING"
AT_ONCE_KINDS = (DISK_LOW, DISK_FULL, VERIFY_FAILED, ZIP_BAD)   # issues.csv kinds
# A mirror job's: its clock (not complete for --alert-after-hours), then what it met.
MIRROR_BEHIND = "MIRROR_BEHIND"
MIRROR_AT_ONCE_KINDS = (MIRROR_SOURCE_BAD, ZIP_BAD, DISK_LOW, DISK_FULL)
PROBLEM_ORDER = (NO_SUCCESSFUL_CYCLE, MIRROR_BEHIND, LIBRARY_SHRANK) + AT_ONCE_KINDS + (
    MIRROR_SOURCE_BAD, STUDIES_FAILING)
# A notice, not a problem: studies left Horos (auto-cleaning, a user's delete). At most
# once a day, only when some left since the last one; there is nothing to resolve.
STUDIES_LEFT_HOROS = "STUDIES_LEFT_HOROS"

# LIBRARY_SHRANK: a share of the backup gone from Horos in one cycle, more than a
# library loses day to day: 10 % of the exported studies, rounded up, yet never fewer
# than 10 (a small library losing 3 studies gets a notice) nor more than 500 (losing
# 500 at once is a problem however large the library). One auto-cleaning pass takes
# up to 51 studies (one pass every 15 minutes): below about 500 studies it can be one.
SHRINK_SHARE_PERCENT = 10
SHRINK_MIN_STUDIES = 10
SHRINK_MAX_STUDIES = 500
LEFT_RECENT_DAYS = 7          # departures a notice may count; status's "last 7 days"
NOTICE_MONTHS_LISTED = 12     # study months a notice names (the rest are counted)

# What a run was, as alerting sees it. RUN_INCOMPLETE: a mirror run that left ZIPs to
# copy (out of time, the disk not connected): no failure, but no success either.
RUN_OK, RUN_SKIPPED, RUN_FAILED, RUN_COMMAND = "ok", "skipped", "failed", "command"
RUN_INCOMPLETE = "incomplete"

PROBLEM_TITLES = {
    NO_SUCCESSFUL_CYCLE: "no successful backup cycle",
    LIBRARY_SHRANK: "studies vanished from Horos's library",
    DISK_LOW: "backup volume low on space",
    DISK_FULL: "backup volume full",
    VERIFY_FAILED: "damaged or missing ZIPs",
    ZIP_BAD: "ZIPs failing verification as they are written",
    STUDIES_FAILING: "studies failing for a week",
}
# A mirror job's titles; "{mirror}" is its folder.
MIRROR_TITLES = {
    MIRROR_BEHIND: "mirror {mirror} not up to date",
    MIRROR_SOURCE_BAD: "ZIPs missing or damaged on BACKUP_ROOT",
    ZIP_BAD: "ZIPs failing verification as they are copied to the mirror",
    DISK_LOW: "mirror disk low on space",
    DISK_FULL: "mirror disk full",
}


class AlertNotSent(Exception):
    """A channel refused or could not deliver; the text says why (no patient data)."""


@dataclass(frozen=True)
class RunReport:
    """What one cycle (or `verify`) found, in words and numbers free of patient data."""
    status: str                                   # RUN_OK, RUN_SKIPPED, RUN_FAILED, RUN_COMMAND
    reason: str = ""                              # why it failed or was skipped
    kinds: Mapping[str, int] = dataclasses.field(default_factory=dict)  # issues.csv rows
    zip_bad_waiting: Optional[int] = None         # studies whose last failure is ZIP_BAD
    failing_week: Optional[Mapping[str, int]] = None   # studies failing 7+ days, by kind
    free_bytes: Optional[int] = None              # on the backup volume (mirror: its disk)
    departures: Optional[Departures] = None       # None: Horos was not read in full
    horos_cleaning: str = ""                      # Horos's auto-cleaning, its volume's space
    acknowledged: Tuple[str, ...] = ()            # problems the operator closed
    mirror: str = ""                              # a mirror job's folder (DIR)
    location_flags: str = ""                      # for the commands a message names


# -- bookkeeping: ~/Library/Application Support/horos_backup_export/alerts.json -------

@dataclass
class Incident:
    """A problem while it lasts (alerts.json `problems`)."""
    since: str                       # UTC ISO
    last_alert: Optional[str] = None
    count: int = 0
    text: str = ""


@dataclass
class ResolvedIncident:
    """A problem that was alerted and has cleared, its "resolved" not yet delivered."""
    since: str
    cleared: str


@dataclass
class SentAlert:
    at: str
    subject: str
    problems: List[str]
    resolved: List[str]
    channels: List[str]
    notices: List[str] = dataclasses.field(default_factory=list)


@dataclass
class AlertBook:
    """What alerting remembers between runs (alerts.json, README: Alerts)."""
    last_success: Optional[str] = None       # UTC ISO of the last good cycle
    first_failure: Optional[str] = None      # of the first failed cycle since then
    failed_cycles: int = 0
    problems: Dict[str, Incident] = dataclasses.field(default_factory=dict)
    unsent_resolved: Dict[str, ResolvedIncident] = dataclasses.field(default_factory=dict)
    last_alert: Optional[SentAlert] = None
    # Studies that left Horos, by their batch (LeftBatch.left_at, UTC; later is newer):
    left_seen: Optional[str] = None          # the newest batch a decision has looked at
    left_announced: Optional[str] = None     # the newest a STUDIES_LEFT_HOROS counted
    left_announced_at: Optional[str] = None  # when that notice went out
    shrink_batches: List[str] = dataclasses.field(default_factory=list)  # LIBRARY_SHRANK's

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["version"] = ALERT_BOOK_VERSION
        return data

    @classmethod
    def from_json(cls, data) -> "AlertBook":
        """The bookkeeping a file holds; ValueError when it has another shape (a file
        edited by hand, another version's)."""
        def text_or_none(value) -> Optional[str]:
            if value is not None and not isinstance(value, str):
                raise ValueError("%r is not a time" % (value,))
            return value

        def mapping(value) -> dict:
            if not isinstance(value, dict):
                raise ValueError("%r is not an object" % (value,))
            return value

        if not isinstance(data, dict) or data.get("version") != ALERT_BOOK_VERSION:
            raise ValueError("not a version %d bookkeeping" % ALERT_BOOK_VERSION)
        try:
            problems = {name: Incident(since=str(mapping(p)["since"]),
                                       last_alert=text_or_none(p.get("last_alert")),
                                       count=int(p.get("count", 0)),
                                       text=str(p.get("text", "")))
                        for name, p in mapping(data.get("problems", {})).items()}
            unsent = {name: ResolvedIncident(since=str(mapping(u)["since"]),
                                             cleared=str(u["cleared"]))
                      for name, u in mapping(data.get("unsent_resolved", {})).items()}
            last = data.get("last_alert")
            sent = SentAlert(**mapping(last)) if last is not None else None
            failed_cycles = data.get("failed_cycles", 0)
            if not isinstance(failed_cycles, int):
                raise ValueError("failed_cycles %r is not a number" % (failed_cycles,))
            shrink_batches = data.get("shrink_batches", [])
            if not isinstance(shrink_batches, list) or not all(
                    isinstance(batch, str) for batch in shrink_batches):
                raise ValueError("shrink_batches %r is not a list of times" % (shrink_batches,))
        except (KeyError, TypeError) as error:
            raise ValueError("missing or unexpected field %s" % error) from None
        return cls(last_success=text_or_none(data.get("last_success")),
                   first_failure=text_or_none(data.get("first_failure")),
                   failed_cycles=failed_cycles, problems=problems, unsent_resolved=unsent,
                   last_alert=sent, left_seen=text_or_none(data.get("left_seen")),
                   left_announced=text_or_none(data.get("left_announced")),
                   left_announced_at=text_or_none(data.get("left_announced_at")),
                   shrink_batches=shrink_batches)


@dataclass(frozen=True)
class Notice:
    """A STUDIES_LEFT_HOROS to send: how many studies, its words, and the newest batch
    it counts (LeftBatch.left_at)."""
    studies: int
    text: str
    through: str


@dataclass
class AlertPlan:
    """What decide_alerts found: problems to alert about now, resolved ones to announce,
    and a notice of studies that left Horos."""
    due: List[str]
    resolved: List[str]
    book: AlertBook          # the bookkeeping after this run, deliveries not yet counted
    notice: Optional[Notice] = None


def read_password_file(path: str) -> str:
    """The SMTP password: the first line of a file nobody but its owner can read."""
    try:
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise CannotRun("--smtp-password-file %s is readable by others (mode %03o); "
                            "run: chmod 600 '%s'" % (path, st.st_mode & 0o777, path))
        with open(path, encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise CannotRun("--smtp-password-file %s cannot be read: %s" % (path, error)) \
            from None
    if not password:
        raise CannotRun("--smtp-password-file %s is empty" % path)
    return password


def checked_alert_config(alerts: AlertConfig) -> AlertConfig:
    """The alert settings, checked, with the password read: each mistake is one line
    and exit 1."""
    if alerts.emails and not alerts.smtp_host:
        raise CannotRun("--alert-email needs --smtp-host (the mail server to send through)")
    if bool(alerts.smtp_user) != bool(alerts.smtp_password_file):
        raise CannotRun("--smtp-user and --smtp-password-file go together")
    url = alerts.heartbeat_url
    if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise CannotRun("--heartbeat-url %s is not an http:// or https:// URL" % url)
    if not alerts.smtp_password_file:
        return alerts
    return dataclasses.replace(alerts, smtp_password=read_password_file(
        os.path.expanduser(alerts.smtp_password_file)))


def alert_book_path() -> str:
    """Under the home folder (HOME), never on the backup volume."""
    return os.path.join(os.path.expanduser(ALERT_BOOK_DIR), ALERT_BOOK_FILE)


def load_alert_book(path: str) -> AlertBook:
    """The bookkeeping, or a fresh one (logged) when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return AlertBook()
    except (OSError, ValueError) as error:
        log.error("alert bookkeeping %s is unreadable (%s); starting it afresh", path, error)
        return AlertBook()
    try:
        return AlertBook.from_json(data)
    except ValueError as error:
        log.error("alert bookkeeping %s is not a version %d bookkeeping (%s); starting it "
                  "afresh", path, ALERT_BOOK_VERSION, error)
        return AlertBook()


@contextlib.contextmanager
def alert_book_lock(path: str):
    """One run at a time between reading a bookkeeping file and saving it: a cycle,
    `verify` and `acknowledge-shrink` all update alerts.json, and without the lock the
    one that saves last would drop what the other recorded. A holder keeps it for at
    most ALERT_BUDGET_SECONDS (its deliveries). A lock that cannot be taken (HOME not
    writable) costs one log line: the run goes on without it."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path + ALERT_BOOK_LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        log.error("cannot lock alert bookkeeping %s: %s", path, error)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def save_alert_book(path: str, book: AlertBook) -> None:
    """Whole or not at all; a folder we cannot write costs one log line, not the cycle."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_small_file(path, json.dumps(book.to_json(), indent=1, sort_keys=True) + "\n")
    except OSError as error:
        log.error("cannot write alert bookkeeping %s: %s (alerts may repeat every cycle "
                  "until it can be written)", path, error)


# -- the decision: pure -----------------------------------------------------------------

def observe_clock(book: AlertBook, report: RunReport, now: float, after_seconds: float,
                  problem: str, first: str, never: str) -> Optional[str]:
    """The clock of a job's successes (a cycle that succeeds, a mirror run that ends
    complete), kept in `book`: "" after a success, the `since …` text once `problem` is
    overdue, None when that cannot be told yet.

    A skipped run neither succeeds nor fails, but does not hide a success that is long
    overdue; RUN_INCOMPLETE counts as not a success.
    """
    if report.status == RUN_OK:
        book.last_success, book.first_failure, book.failed_cycles = utc_iso(now), None, 0
        return ""
    if report.status not in (RUN_FAILED, RUN_SKIPPED, RUN_INCOMPLETE):
        return None
    if report.status != RUN_SKIPPED:
        book.failed_cycles += 1
        if not book.first_failure:
            book.first_failure = utc_iso(now)
    reference = book.last_success or book.first_failure
    overdue = reference is not None and now - parse_utc_iso(reference) >= after_seconds
    if report.status == RUN_SKIPPED:
        overdue = problem in book.problems or (overdue and after_seconds > 0)
    if not overdue:
        return None
    if book.last_success:
        return "since %s (%s ago)" % (local_time_text(book.last_success),
                                      hours_text(now - parse_utc_iso(reference)))
    return "since %s at %s (%s since alerting began)" % (
        first, local_time_text(book.first_failure), never)


def observe_mirror(book: AlertBook, report: RunReport, now: float,
                   after_seconds: float) -> Dict[str, Optional[Tuple[int, str]]]:
    """observe_run for a `mirror --to DIR` job, whose success is a complete run
    (report.mirror is DIR)."""
    seen: Dict[str, Optional[Tuple[int, str]]] = {}
    since = observe_clock(book, report, now, after_seconds, MIRROR_BEHIND,
                          "the first incomplete run", "none was complete")
    if since is not None:
        seen[MIRROR_BEHIND] = (0, "") if not since else (
            1, "The mirror %s has not been brought up to date %s. Last run: %s. Runs "
            "since: %d." % (report.mirror, since, report.reason or report.status,
                            book.failed_cycles))
    free = (" Free space on the mirror's disk now: %s." % format_bytes(report.free_bytes)
            if report.free_bytes is not None else "")
    texts = {
        MIRROR_SOURCE_BAD: lambda count: "%s listed in BACKUP_ROOT's state %s missing or "
                                         "damaged on BACKUP_ROOT when the mirror read %s to "
                                         "copy %s; the mirror kept the copies it had. "
                                         "`verify` on BACKUP_ROOT exports them again while "
                                         "Horos still has them." % (
                                             plural(count, "ZIP"),
                                             "was" if count == 1 else "were",
                                             "it" if count == 1 else "them",
                                             "it" if count == 1 else "them"),
        ZIP_BAD: lambda count: "%s failed verification %d times as %s copied to the "
                               "mirror, while BACKUP_ROOT's %s (a failing mirror "
                               "disk?)." % (plural(count, "ZIP"), VERIFY_ATTEMPTS,
                                            "it was" if count == 1 else "they were",
                                            "verifies" if count == 1 else "verify"),
        DISK_LOW: lambda count: "The mirror's disk has less free space than the next ZIP "
                                "needs: the mirror stops before copying it." + free,
        DISK_FULL: lambda count: "The mirror's disk filled up while a ZIP was copied: the "
                                 "run stopped and removed the partial file." + free,
    }
    for kind in MIRROR_AT_ONCE_KINDS:
        count = report.kinds.get(kind, 0)
        if count:
            seen[kind] = (count, texts[kind](count))
        elif report.status == RUN_OK:
            seen[kind] = (0, "")
    return seen


def observe_run(book: AlertBook, report: RunReport, now: float,
                after_seconds: float) -> Dict[str, Optional[Tuple[int, str]]]:
    """{problem: (count, text) if it is on, (0, "") if it is off, None if unknown}.

    Updates the cycle clock in `book` (last success, first failure). A skipped cycle
    neither succeeds nor fails, but does not hide a success that is long overdue.
    """
    seen: Dict[str, Optional[Tuple[int, str]]] = {}
    since = observe_clock(book, report, now, after_seconds, NO_SUCCESSFUL_CYCLE,
                          "the first failed cycle", "none has succeeded")
    if since is not None:
        seen[NO_SUCCESSFUL_CYCLE] = (0, "") if not since else (
            1, "No backup cycle has succeeded %s. Last cycle: %s. Failed cycles since: %d."
            % (since, report.reason or report.status, book.failed_cycles))
    free = (" Free space on the backup volume now: %s." % format_bytes(report.free_bytes)
            if report.free_bytes is not None else "")
    texts = {
        DISK_LOW: lambda count: "The backup volume has less free space than the next "
                                "study needs plus the reserve (--min-free-gb, or 1.2 x "
                                "Horos's auto-cleaning threshold when the backup shares "
                                "the library's disk): cycles stop before writing." + free,
        DISK_FULL: lambda count: "The backup volume filled up while a ZIP was written: "
                                 "the cycle stopped and removed the partial file." + free,
        VERIFY_FAILED: lambda count: "%s missing or damaged when read back; their "
                                     "studies are exported again while Horos still has "
                                     "them." % plural(count, "ZIP was", "ZIPs were"),
        ZIP_BAD: lambda count: "%s not be backed up: the ZIP failed verification %d "
                               "times as it was written (a failing backup disk or "
                               "memory?)." % (plural(count, "study could", "studies could"),
                                              VERIFY_ATTEMPTS),
    }
    for kind in AT_ONCE_KINDS:
        count = report.kinds.get(kind, 0)
        if kind == ZIP_BAD:
            count = max(count, report.zip_bad_waiting or 0)
        if count:
            seen[kind] = (count, texts[kind](count))
        elif report.status == RUN_OK and (kind != ZIP_BAD
                                          or report.zip_bad_waiting is not None):
            seen[kind] = (0, "")
    if report.failing_week is not None and report.status != RUN_COMMAND:
        total = sum(report.failing_week.values())
        by_kind = ", ".join("%s %d" % (kind, count)
                            for kind, count in sorted(report.failing_week.items()) if count)
        seen[STUDIES_FAILING] = (total, "%s failing to export for %d days or more, and "
                                 "still retried: %s." % (
                                     plural(total, "study", "studies"), STUDY_FAILING_DAYS,
                                     by_kind)) if total else (0, "")
    return seen


def shrink_threshold(exported: int) -> int:
    """How many exported studies gone from Horos in one cycle make a LIBRARY_SHRANK."""
    share = -(-exported * SHRINK_SHARE_PERCENT // 100)           # rounded up
    return min(SHRINK_MAX_STUDIES, max(SHRINK_MIN_STUDIES, share))


def location_flags(cfg: Config) -> str:
    """The flags that take a command run by hand to this run's backup and library: the
    plist often gives --pacs-root, and a command named in an alert without it would
    look at /Volumes/PACS. Only what differs from what the command would derive alone,
    shell-quoted; they go before the command's name, where every command takes them."""
    flags = []
    pacs_root = cfg.pacs_root if cfg.pacs_root != os.path.abspath(PACS_ROOT) else None
    if pacs_root is not None:
        flags.append(("--pacs-root", pacs_root))
    backup_root, horos_data = default_locations(pacs_root, cfg.horos_prefs)
    if cfg.backup_root != os.path.abspath(backup_root):
        flags.append(("--backup-root", cfg.backup_root))
    if cfg.horos_data != os.path.abspath(horos_data):
        flags.append(("--horos-data", cfg.horos_data))
    prefs = os.path.abspath(os.path.expanduser(cfg.horos_prefs_file))
    if prefs != os.path.abspath(os.path.expanduser(HOROS_PREFS)):
        flags.append(("--horos-prefs", prefs))
    return "".join(" %s %s" % (flag, shlex.quote(value)) for flag, value in flags)


def script_command(arguments: str, flags: str = "") -> str:
    """A command line of this script for a person to run; flags: location_flags."""
    return "python3 %s%s %s" % (shlex.quote(os.path.abspath(__file__)), flags, arguments)


def months_text(batches: Sequence[LeftBatch]) -> str:
    """`2019_03 (2), 2021_01 (1)`: the study months of these batches, oldest first."""
    months: Dict[str, int] = {}
    for batch in batches:
        for month, count in batch.months.items():
            months[month] = months.get(month, 0) + count
    names = sorted(months)
    text = ", ".join("%s (%d)" % (month, months[month])
                     for month in names[:NOTICE_MONTHS_LISTED])
    more = len(names) - NOTICE_MONTHS_LISTED
    if more > 0:
        text += " and %d more %s" % (more, "month" if more == 1 else "months")
    return text


def seen_gone_text(batches: Sequence[LeftBatch]) -> str:
    first, last = local_time_text(batches[0].left_at), local_time_text(batches[-1].left_at)
    if first == last:
        return "first seen gone at %s" % first
    return "first seen gone between %s and %s" % (first, last)


def departure_commands(since: str, flags: str, acknowledge: bool = False) -> List[str]:
    """The lines of a departure message that name the commands (README: Alerts)."""
    lines = ["List them:      " + script_command("find --left-horos --since %s" % since,
                                                 flags),
             "Put them back:  " + script_command("restore --left-horos --since %s "
                                                 "--into-horos" % since, flags)]
    if acknowledge:
        lines.append("Acknowledge:    " + script_command(ACKNOWLEDGE_SHRINK, flags))
    return lines


def observe_departures(book: AlertBook, report: RunReport, now: float
                       ) -> Tuple[Tuple[int, str], Optional[Notice]]:
    """LIBRARY_SHRANK ((count, text), or (0, "") when off) and the STUDIES_LEFT_HOROS
    notice due, from the batches a complete scan of Horos left in the state. Updates
    the departure marks of `book`.

    A batch is new to alerts once: book.left_seen is the newest a decision looked at,
    so the batch of a cycle killed before its alerts is taken up by the next one. A new
    batch of shrink_threshold studies or more starts LIBRARY_SHRANK, or joins the one
    open; the incident lasts while at least that many of its studies are still gone.
    Every smaller batch of the last LEFT_RECENT_DAYS newer than the last notice goes
    into the next one, at most one a day: the studies of a LIBRARY_SHRANK are not in a
    notice. The studies found gone by the first check (batch 0) left before anyone
    looked: they are in neither.
    """
    facts = report.departures
    threshold = shrink_threshold(facts.exported)
    recent_after = utc_iso(now - LEFT_RECENT_DAYS * 86400)
    batches = [batch for batch in facts.batches if batch.batch_size > 0]
    new = [batch for batch in batches if batch.left_at >= recent_after
           and (book.left_seen is None or batch.left_at > book.left_seen)]
    if batches:
        book.left_seen = max(book.left_seen or "", batches[-1].left_at)
    incident = book.shrink_batches + [batch.left_at for batch in new
                                      if batch.batch_size >= threshold]
    members = [batch for batch in batches if batch.left_at in incident]
    gone = sum(batch.studies for batch in members)
    shrink = (0, "")
    if incident and gone >= threshold:
        book.shrink_batches = incident
        shrink = (gone, "\n".join([
            "%d of the %d studies in the backup are gone from Horos's library, lost at "
            "once (%s; %s of files). The likely causes: Horos's Database.sql was "
            "rebuilt (\"Rebuild Database\"), emptied or damaged; Horos is running on "
            "another library (when the library's disk is missing as Horos starts, it "
            "opens a new, empty one in the home folder); or a disk problem. The backup "
            "still holds every study: nothing is removed from it. Check which library "
            "Horos has open before putting anything back; if the library really shrank, "
            "acknowledge it." % (gone, facts.exported,
                                 seen_gone_text(members),
                                 format_bytes(sum(b.source_bytes for b in members)))]
            + departure_commands(local_day(members[0].left_at).isoformat(),
                                 report.location_flags, True)))
    else:
        book.shrink_batches = []
    pending = [batch for batch in batches if batch.left_at >= recent_after
               and batch.batch_size < threshold and batch.left_at not in incident
               and (book.left_announced is None or batch.left_at > book.left_announced)]
    last = book.left_announced_at
    if not pending or (last is not None and now - parse_utc_iso(last) < ALERT_REPEAT_SECONDS):
        return shrink, None
    studies = sum(batch.studies for batch in pending)
    prose = "%s left Horos's library (%s): study months %s; %s of files. The backup keeps " \
        "%s. %s" % (plural(studies, "study", "studies"), seen_gone_text(pending),
                    months_text(pending), format_bytes(sum(b.source_bytes for b in pending)),
                    "it" if studies == 1 else "every one of them", report.horos_cleaning)
    text = "\n".join([prose.strip()] + departure_commands(
        local_day(pending[0].left_at).isoformat(), report.location_flags))
    return shrink, Notice(studies=studies, text=text, through=pending[-1].left_at)


def decide_alerts(book: AlertBook, report: RunReport, now: float,
                  after_seconds: float, observe=observe_run) -> AlertPlan:
    """Which problems to alert about now, which to announce as resolved, and the notice
    of studies that left Horos (observe_departures). `observe`: the job's observe_run.

    A problem alerts when its incident starts, then at most once every
    ALERT_REPEAT_SECONDS while it lasts (and again each run until a delivery works);
    when it clears, one resolved message (if it was ever alerted). A problem that
    clears and comes back is a new incident. The operator closes a LIBRARY_SHRANK by
    acknowledging it (the library really shrank).
    """
    book = copy.deepcopy(book)           # values in, values out
    problems, unsent = book.problems, book.unsent_resolved
    observed = observe(book, report, now, after_seconds)
    notice = None
    if report.departures is not None:
        observed[LIBRARY_SHRANK], notice = observe_departures(book, report, now)
    if LIBRARY_SHRANK in report.acknowledged:
        observed[LIBRARY_SHRANK] = (0, "")
        book.shrink_batches = []
    for name, seen in observed.items():
        if seen is None:
            continue
        count, text = seen
        current = problems.get(name)
        if count:
            if current is None:
                current = problems[name] = Incident(since=utc_iso(now))
                unsent.pop(name, None)
            current.count, current.text = count, text
        elif current is not None:
            del problems[name]
            if current.last_alert:
                unsent[name] = ResolvedIncident(since=current.since, cleared=utc_iso(now))
    due = [name for name in PROBLEM_ORDER if name in problems and (
        not problems[name].last_alert
        or now - parse_utc_iso(problems[name].last_alert) >= ALERT_REPEAT_SECONDS)]
    resolved = [name for name in PROBLEM_ORDER if name in unsent]
    return AlertPlan(due=due, resolved=resolved, book=book, notice=notice)


def record_delivery(plan: AlertPlan, now: float, subject: str,
                    channels: Sequence[str]) -> AlertBook:
    """The bookkeeping once a message went out by at least one channel."""
    book = copy.deepcopy(plan.book)
    for name in plan.due:
        book.problems[name].last_alert = utc_iso(now)
    for name in plan.resolved:
        book.unsent_resolved.pop(name, None)
    if plan.notice is not None:
        book.left_announced, book.left_announced_at = plan.notice.through, utc_iso(now)
    book.last_alert = SentAlert(at=utc_iso(now), subject=subject, problems=list(plan.due),
                                resolved=list(plan.resolved), channels=list(channels),
                                notices=[STUDIES_LEFT_HOROS] if plan.notice else [])
    return book


# The spaces of `82.6 GB` and `2019_05 (1)`, which a line must not break at.
UNBROKEN_SPACE = re.compile(r"(?<=\d) (?=[KMGT]?B\b|\(\d+\))")


@dataclass(frozen=True)
class AlertJob:
    """Whose alerts: the cycle job's (alerts.json, also `verify`'s) or one mirror job's
    (its own file), each with its own clock problem, titles and footer."""
    book_path: str
    observe: Callable[[AlertBook, RunReport, float, float],
                      Dict[str, Optional[Tuple[int, str]]]]
    clock_problem: str                   # NO_SUCCESSFUL_CYCLE or MIRROR_BEHIND
    titles: Mapping[str, str]
    mirror: str = ""                     # a mirror job's folder


def cycle_alert_job() -> AlertJob:
    return AlertJob(alert_book_path(), observe_run, NO_SUCCESSFUL_CYCLE, PROBLEM_TITLES)


def mirror_book_path(mirror: str) -> str:
    """The bookkeeping of the mirror job of `mirror`, next to alerts.json."""
    digest = hashlib.sha1(mirror.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return os.path.join(os.path.dirname(alert_book_path()), "%s%s-%s.json" % (
        MIRROR_BOOK_PREFIX, sanitize_part(mirror)[:60], digest))


def mirror_alert_job(mirror: str) -> AlertJob:
    return AlertJob(mirror_book_path(mirror), observe_mirror, MIRROR_BEHIND,
                    {name: title.format(mirror=mirror)
                     for name, title in MIRROR_TITLES.items()}, mirror)


def compose_alert(cfg: Config, plan: AlertPlan, host: str,
                  job: Optional[AlertJob] = None) -> Tuple[str, str]:
    """(subject, body). Only kinds, counts, times, the host and our own paths: never a
    patient name, ID, birth date, study UID or ZIP name (those are in issues.csv)."""
    problems, unsent = plan.book.problems, plan.book.unsent_resolved
    job = job or cycle_alert_job()

    def title(name: str) -> str:
        if name == job.clock_problem and plan.book.last_success:
            return "%s since %s" % (job.titles[name],
                                    local_time_text(plan.book.last_success))
        return job.titles[name] if name in (job.clock_problem, STUDIES_FAILING) \
            else "%s (%s)" % (name, job.titles[name])

    def paragraph(text: str) -> List[str]:
        # The first line is prose, wrapped, never between a number and its unit or
        # count (`82.6 GB`, `2019_05 (1)`); the lines after it name commands, kept whole.
        prose, *commands = text.split("\n")
        prose = UNBROKEN_SPACE.sub("\0", prose)
        wrapped = textwrap.fill(prose, ALERT_LINE_WIDTH, initial_indent="  ",
                                subsequent_indent="  ", break_long_words=False,
                                break_on_hyphens=False)
        return [wrapped.replace("\0", " ")] + ["  " + line for line in commands]

    notice = plan.notice
    notice_title = "%s left Horos" % plural(notice.studies, "study", "studies") \
        if notice else ""
    if plan.due:
        subject = "[Horos backup] %s on %s: %s" % (
            "PROBLEM" if len(plan.due) == 1 else "%d PROBLEMS" % len(plan.due), host,
            "; ".join(title(name) for name in plan.due))
        if notice:
            subject += " (notice: %s)" % notice_title
    elif notice:
        subject = "[Horos backup] NOTICE on %s: %s" % (host, notice_title)
    else:
        subject = "[Horos backup] RESOLVED on %s: %s" % (host, ", ".join(plan.resolved))
    if plan.resolved and (plan.due or notice):
        subject += " (resolved: %s)" % ", ".join(plan.resolved)
    lines = []
    for name in plan.due:
        problem = problems[name]
        lines += ["PROBLEM %s, since %s" % (name, local_time_text(problem.since))]
        lines += paragraph(problem.text) + [""]
    if notice:
        lines += ["NOTICE %s" % STUDIES_LEFT_HOROS] + paragraph(notice.text) + [""]
    for name in plan.resolved:
        lines += ["RESOLVED %s (from %s to %s)" % (name, local_time_text(unsent[name].since),
                                                   local_time_text(unsent[name].cleared)),
                  ""]
    if plan.due:
        lines += [textwrap.fill("A problem is repeated at most once a day while it lasts; "
                                "one message says when it is resolved.", ALERT_LINE_WIDTH),
                  ""]
    if notice:
        lines += [textwrap.fill("A notice comes at most once a day, only when more studies "
                                "left Horos; it has nothing to resolve.", ALERT_LINE_WIDTH),
                  ""]
    lines += alert_footer(cfg, host, job.mirror)
    return subject, "\n".join(lines) + "\n"


def alert_footer(cfg: Config, host: str, mirror: str = "") -> List[str]:
    where = ["Mirror:       %s" % mirror,
             "Mirror log:   %s" % os.path.join(mirror, LOG_DIR, LOG_FILE)] if mirror else []
    return ["Host:         %s" % host,
            "BACKUP_ROOT:  %s" % cfg.backup_root] + where + [
            "Details:      %s" % cfg.issues_path,
            "Log:          %s" % cfg.log_path,
            "Status:       " + script_command(STATUS, location_flags(cfg)),
            "",
            "This message carries no patient data (no names, IDs, birth dates, study UIDs",
            "or ZIP names): issues.csv and the log on the Mac name the studies."]


# -- what a run was: the cycle's summary and the state's failures ----------------------

def free_bytes_of(path: str) -> Optional[int]:
    try:
        usage = os.statvfs(nearest_existing(path))
    except OSError:
        return None
    return usage.f_bavail * usage.f_frsize


def read_failure_facts(cfg: Config, now: float
                       ) -> Tuple[Optional[int], Optional[Dict[str, int]]]:
    """(studies whose last failure is ZIP_BAD, studies failing for a week by kind) from
    the state, or Nones when it cannot be read."""
    if not os.path.isfile(cfg.sentinel) or not os.path.isfile(cfg.state_path):
        return None, None
    try:
        state = ExportState(cfg.state_path, min(cfg.busy_timeout, ALERT_STATE_BUSY_SECONDS),
                            read_only=True)
    except CannotRun as error:
        log.debug("alerts cannot read the state: %s", error)
        return None, None
    try:
        counts = state.failures_by_kind(now - STUDY_FAILING_DAYS * 86400,
                                        now - STUDY_RETRIED_WITHIN_DAYS * 86400)
    except sqlite3.Error as error:
        log.debug("alerts cannot read the state: %s", error)
        return None, None
    finally:
        state.close()
    zip_bad = counts[ZIP_BAD].studies if ZIP_BAD in counts else 0
    return zip_bad, {kind: c.failing_long for kind, c in counts.items() if c.failing_long}


def failure_reason(cfg: Config, error: BaseException) -> str:
    """Why a cycle failed, in fixed words: error texts may name a ZIP (a patient)."""
    if isinstance(error, DiskSpaceProblem):
        return "stopped by %s (see issues.csv)" % error.kind
    if not os.path.isfile(cfg.sentinel):
        return ("the PACS sentinel %s is missing (is the PACS volume mounted?)"
                % cfg.sentinel)
    if not os.path.isdir(os.path.dirname(cfg.backup_root)):
        return "%s does not exist (is the backup disk mounted?)" % os.path.dirname(
            cfg.backup_root)
    if isinstance(error, HorosUnreadable):
        return ("Horos's database %s could not be read (locked, a hot journal after a "
                "crash, damaged or missing; the log says which)" % cfg.database_path)
    if isinstance(error, CannotRun):
        return "the cycle could not run (the log and stderr say why)"
    return "unexpected error %s (the log has the details)" % type(error).__name__


def cycle_report(cfg: Config, summary: CycleSummary,
                 error: Optional[BaseException]) -> RunReport:
    """What alerting makes of a cycle: its summary (the issue kinds it wrote, how it
    ended), the error that stopped it, and the state's failures."""
    zip_bad, failing = (read_failure_facts(cfg, time.time()) if cfg.alerts.channels
                        else (None, None))
    kinds = dict(summary.issue_kinds)
    if error is not None:
        if isinstance(error, DiskSpaceProblem):
            kinds[error.kind] = max(1, kinds.get(error.kind, 0))
        status, reason = RUN_FAILED, failure_reason(cfg, error)
    elif summary.outcome == CYCLE_SKIPPED_LOCK:
        status, reason = RUN_SKIPPED, "skipped: another run holds the lock"
    elif summary.outcome == CYCLE_SKIPPED_INCOMING:
        status, reason = RUN_SKIPPED, "skipped: Horos is busy importing (INCOMING_OVER_LIMIT)"
    else:
        status, reason = RUN_OK, ""
    free = free_bytes_of(cfg.backup_root) if kinds.get(DISK_LOW) or kinds.get(DISK_FULL) \
        else None
    departures = summary.departures
    cleaning = horos_cleaning_text(cfg) if departures and cfg.alerts.channels else ""
    return RunReport(status=status, reason=reason, kinds=kinds, zip_bad_waiting=zip_bad,
                     failing_week=failing, free_bytes=free, departures=departures,
                     horos_cleaning=cleaning, location_flags=location_flags(cfg))


def horos_cleaning_text(cfg: Config) -> str:
    """Horos's auto-cleaning and the free space on the library's volume, in words: the
    usual reason studies leave Horos (DicomDatabase+Clean.mm)."""
    prefs = cfg.horos_prefs
    try:
        usage = os.statvfs(nearest_existing(cfg.horos_data))
    except OSError as error:
        log.debug("cannot read the free space of %s: %s", cfg.horos_data, error)
        return "Horos's %s." % describe_auto_cleaning(prefs)
    free = format_bytes(usage.f_bavail * usage.f_frsize)
    if not prefs.auto_cleaning:
        return "Horos's auto-cleaning is off; the library's volume has %s free now." % free
    size = prefs.auto_cleaning_size
    threshold = auto_cleaning_threshold(size, usage.f_blocks * usage.f_frsize)
    return ("Horos's auto-cleaning is on, the usual cause: it deletes studies while the "
            "library's volume has less than %s free (%s); that volume has %s free now. "
            "Make room there before putting them back, or Horos deletes studies again."
            % (format_bytes(threshold), "%d %% of the volume" % -size if size < 0
               else "%d MB" % size, free))


# -- the edges: SMTP, a command, an HTTP request ---------------------------------------

class Deadline:
    """ALERT_BUDGET_SECONDS shared by the channels, keeping time for those still to come."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.clock = clock
        self.end = clock() + seconds

    def timeout(self, cap: float, later: int) -> float:
        return max(0.0, min(cap, self.end - self.clock() - ALERT_RESERVE_SECONDS * later))


def require_time(seconds: float) -> None:
    """AlertNotSent when the budget leaves a channel too little time to try."""
    if seconds < 0.5:
        raise AlertNotSent("no time left in the %g s alert budget" % ALERT_BUDGET_SECONDS)


def within(seconds: float, action) -> None:
    """action() in a thread, given at most `seconds` (a DNS lookup ignores socket
    timeouts); AlertNotSent if it fails or is still at it."""
    require_time(seconds)
    failure: List[str] = []

    def run() -> None:
        try:
            action()
        except Exception as error:  # reported by the caller's log line, with its type
            failure.append(str(error) if isinstance(error, AlertNotSent)
                           else "%s: %s" % (type(error).__name__, error))
    worker = threading.Thread(target=run, name="alert", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise AlertNotSent("no answer within %.1f s" % seconds)
    if failure:
        raise AlertNotSent(failure[0])


# The mail, TLS and HTTP modules cost every run about 8 MB of memory (ssl above all), and
# only a run that sends an alert needs them: they are imported where they are used.

def alert_email_message(alerts: AlertConfig, subject: str, body: str, host: str):
    """The alert as an email.message.EmailMessage."""
    import email.message
    import email.utils
    message = email.message.EmailMessage()
    message["Subject"] = subject
    message["From"] = alerts.smtp_user if "@" in alerts.smtp_user \
        else "horos_backup_export@%s" % (host or "localhost")
    message["To"] = ", ".join(alerts.emails)
    message["Date"] = email.utils.formatdate(localtime=True)
    message["Message-ID"] = email.utils.make_msgid(domain=host or None)
    message.set_content(body)
    return message


def send_email(alerts: AlertConfig, message, timeout: float) -> None:
    """STARTTLS when offered (port 465: TLS from the start); log in only over TLS."""
    import smtplib
    import ssl
    context = ssl.create_default_context()
    if alerts.smtp_port == 465:
        client = smtplib.SMTP_SSL(alerts.smtp_host, alerts.smtp_port, timeout=timeout,
                                  context=context)
    else:
        client = smtplib.SMTP(alerts.smtp_host, alerts.smtp_port, timeout=timeout)
    with client:
        client.ehlo()
        tls = alerts.smtp_port == 465
        if not tls and client.has_extn("starttls"):
            client.starttls(context=context)
            client.ehlo()
            tls = True
        if alerts.smtp_user:
            if not tls:
                raise AlertNotSent("%s:%d offers no STARTTLS: the password is not sent in "
                                   "clear" % (alerts.smtp_host, alerts.smtp_port))
            client.login(alerts.smtp_user, alerts.smtp_password)
        client.send_message(message)


def run_alert_command(command: str, subject: str, body: str, timeout: float) -> None:
    """/bin/sh -c COMMAND, the body on stdin, the subject in HOROS_BACKUP_ALERT_SUBJECT."""
    env = dict(os.environ, **{ALERT_SUBJECT_ENV: subject})
    # Its own process group, so a timeout ends what it started too (osascript, curl).
    process = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               start_new_session=True)
    try:
        _out, err = process.communicate(body.encode("utf-8"), timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AlertNotSent("still running after %.1f s; stopped" % timeout) from None
    if process.returncode:
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise AlertNotSent("exit status %d %s" % (process.returncode, last[0][:200]))


def heartbeat_target(url: str, failed: bool) -> str:
    """URL after a good cycle, URL/fail after a failed one (healthchecks.io's rule)."""
    if not failed:
        return url
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/fail"))


def ping_heartbeat(url: str, timeout: float) -> None:
    import urllib.request
    request = urllib.request.Request(url, headers={
        "User-Agent": "horos_backup_export/%s" % TOOL_VERSION})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read(1024)


def deliver(alerts: AlertConfig, subject: str, body: str, deadline: Deadline,
            later: int) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Send by every configured channel: (channels that worked, [(channel, why not)])."""
    host = socket.gethostname()
    sent: List[str] = []
    failed: List[Tuple[str, str]] = []
    if alerts.emails:
        message = alert_email_message(alerts, subject, body, host)
        timeout = deadline.timeout(SMTP_TIMEOUT_SECONDS, later + len(alerts.channels) - 1)
        try:
            within(timeout, lambda: send_email(alerts, message, timeout))
            sent.append("email")
        except AlertNotSent as error:
            failed.append(("email", "to %s via %s:%d: %s" % (
                ", ".join(alerts.emails), alerts.smtp_host, alerts.smtp_port, error)))
    if alerts.command:
        timeout = deadline.timeout(COMMAND_TIMEOUT_SECONDS, later)
        try:
            require_time(timeout)
            run_alert_command(alerts.command, subject, body, timeout)
            sent.append("command")
        except (AlertNotSent, OSError) as error:
            failed.append(("command", str(error)))
    for channel, why in failed:
        log.error("alert by %s not sent: %s", channel, why)
    return sent, failed


def alert_after_run(cfg: Config, report: RunReport, heartbeat: bool,
                    job: Optional[AlertJob] = None) -> None:
    """Decide, send, record; then ping the heartbeat. Never raises for a channel."""
    alerts = cfg.alerts
    job = job or cycle_alert_job()
    deadline = Deadline(ALERT_BUDGET_SECONDS)
    ping = heartbeat and bool(alerts.heartbeat_url)
    if alerts.channels:
        path = job.book_path
        with alert_book_lock(path):
            now = time.time()
            plan = decide_alerts(load_alert_book(path), report, now,
                                 alerts.after_hours * 3600, job.observe)
            book = plan.book
            if plan.due or plan.resolved or plan.notice:
                subject, body = compose_alert(cfg, plan, socket.gethostname(), job)
                sent, _failed = deliver(alerts, subject, body, deadline, 1 if ping else 0)
                if sent:
                    book = record_delivery(plan, now, subject, sent)
                    log.info("alert sent by %s: %s", " and ".join(sent), subject)
            save_alert_book(path, book)
    if ping:
        url = heartbeat_target(alerts.heartbeat_url, report.status == RUN_FAILED)
        timeout = deadline.timeout(HEARTBEAT_TIMEOUT_SECONDS, 0)
        try:
            within(timeout, lambda: ping_heartbeat(url, timeout))
        except AlertNotSent as error:
            log.error("heartbeat %s not reached: %s", url, error)


def alerting(cfg: Config) -> bool:
    return bool(cfg.alerts.channels or cfg.alerts.heartbeat_url)


def run_with_alerts(cfg: Config, run: Callable[[], int],
                    report: Callable[[Optional[BaseException]], RunReport],
                    job: Optional[AlertJob] = None) -> int:
    """A job's run (a cycle, a mirror run), then its alerts and heartbeat, whatever its
    outcome; report(error) says what the run was (error None: it returned)."""
    if not alerting(cfg):
        return run()
    try:
        code = run()
    except Terminated:
        raise                    # launchd stopping the job: no outcome to report
    except Exception as error:   # re-raised: main() prints and logs it as before
        alert_after_run(cfg, report(error), True, job)
        raise
    alert_after_run(cfg, report(None), True, job)
    return code


def alert_status(cfg: Config) -> dict:
    """The `alerts` object of `status --json` (never the password)."""
    alerts = cfg.alerts
    path = alert_book_path()
    book = load_alert_book(path) if os.path.exists(path) else AlertBook()
    return {
        "email": list(alerts.emails), "smtp_host": alerts.smtp_host or None,
        "smtp_port": alerts.smtp_port, "smtp_user": alerts.smtp_user or None,
        "smtp_password_file": alerts.smtp_password_file or None,
        "command": alerts.command or None, "heartbeat_url": alerts.heartbeat_url or None,
        "alert_after_hours": alerts.after_hours, "bookkeeping": path,
        "last_success": book.last_success,
        "open_problems": {name: {"since": problem.since, "count": problem.count,
                                 "last_alert": problem.last_alert}
                          for name, problem in sorted(book.problems.items())},
        "last_alert": dataclasses.asdict(book.last_alert) if book.last_alert else None,
    }


def print_alert_status(status: Mapping) -> None:
    print("Alerts")
    channels = []
    if status["email"]:
        channels.append("email to %s via %s:%d%s" % (
            ", ".join(status["email"]), status["smtp_host"], status["smtp_port"],
            " as %s" % status["smtp_user"] if status["smtp_user"] else ""))
    if status["command"]:
        channels.append("command %s" % status["command"])
    print("  %-16s %s" % ("channels", "; ".join(channels) or "none"))
    print("  %-16s %s" % ("heartbeat", status["heartbeat_url"] or "none"))
    print("  %-16s after %g h without a successful cycle" % ("no-success alert",
                                                             status["alert_after_hours"]))
    for name, problem in status["open_problems"].items():
        print("  %-16s %s since %s" % ("open problem", name,
                                       local_time_text(problem["since"])))
    last = status["last_alert"]
    print("  %-16s %s" % ("last alert", "%s by %s: %s" % (
        local_time_text(last["at"]), " and ".join(last["channels"]), last["subject"])
        if last else "none sent"))


# =====================================================================================
# Cycle: sentinels, lock, INCOMING, recovery, read Horos, export, month markers
# =====================================================================================
#
# One cycle: check the volumes, take the lock, clean up after a killed run, read
# Horos in short transactions, export the head of the queue (each study written,
# verified and renamed before the state records it), mark finished months, re-read a
# few old ZIPs. What it did is its CycleSummary: the `runs` row, the log's last line
# and, through cycle_with_alerts, the alerts.

ZIP_ENTRY_OVERHEAD = 256       # bytes a member adds to a stored ZIP, headers and all
# What the cycle writes after a study passed the free-space check besides its ZIP: the
# state's rows and rollback journal, the log, issues.csv. Counted so that the reserve is
# left alone by all of it, not only by the ZIPs.
RECORD_ALLOWANCE_BYTES = 1024 * 1024

# Manifests of rows an older version wrote are read for at most this long per cycle
# (50,000 on a USB disk take minutes); the next cycles continue, `reindex` does all.
BACKFILL_SECONDS = 60
BACKFILL_ROWS_PER_STEP = 200


def check_sentinels(cfg: Config) -> None:
    """Before anything is created: an unmounted volume must never get folders.

    The PACS volume must hold its sentinel. A BACKUP_ROOT on another file system must
    have a `.backup_sentinel` in its parent folder (the backup disk's root for
    `/Volumes/BACKUP/Horos`), and a BACKUP_ROOT's parent is never created.
    """
    if not os.path.isfile(cfg.sentinel):
        raise CannotRun("sentinel %s is missing: is the PACS volume mounted? "
                        "(nothing was done)" % cfg.sentinel)
    parent = os.path.dirname(cfg.backup_root)
    if not os.path.isdir(parent):
        raise CannotRun("%s does not exist: is the backup disk mounted? (nothing was done)"
                        % parent)
    if not same_disk(cfg.backup_root, cfg.pacs_root):
        backup_sentinel = os.path.join(parent, BACKUP_SENTINEL_NAME)
        if not os.path.isfile(backup_sentinel):
            raise CannotRun("%s is on another disk than %s and %s is missing: is the backup "
                            "disk mounted? (nothing was done)"
                            % (cfg.backup_root, cfg.pacs_root, backup_sentinel))


@contextlib.contextmanager
def run_lock(lock_path: str):
    """Yields True while this process holds BACKUP_ROOT/.tmp/.run.lock, else False."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        yield True
    finally:
        os.close(fd)


def lock_holder(lock_path: str) -> Tuple[bool, Optional[int]]:
    """(held, pid of the holder) without disturbing a running cycle for longer than a
    single flock call."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, as_int(os.read(fd, 32).decode("ascii", "replace").strip())
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


def count_files_up_to(folder: str, limit: int) -> int:
    """Files below `folder`, counting stops once past `limit`."""
    count = 0
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                        continue
                    count += 1
                    if count > limit:
                        return count
        except (FileNotFoundError, NotADirectoryError):
            continue  # Horos empties INCOMING while we count
    return count


def open_backup_root(cfg: Config) -> int:
    """BACKUP_ROOT ready for a run that writes: private modes from here on, .tmp and the
    log, an older backup tightened. Returns the umask the user had. The caller has
    checked that the volume is there (nothing is created on one that is not)."""
    user_umask = use_backup_umask()
    os.makedirs(cfg.tmp_dir, exist_ok=True)
    setup_file_logging(cfg)
    make_backup_root_private(cfg.backup_root)
    return user_umask


def clean_tmp_dir(cfg: Config) -> None:
    """Remove what a killed run left in BACKUP_ROOT/.tmp (not the lock or the db copy)."""
    for entry in os.scandir(cfg.tmp_dir):
        if entry.name in (LOCK_FILE, DB_COPY_DIR):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            remove_if_present(entry.path)
        log.info("removed leftover %s", entry.path)


@dataclass
class Cycle:
    """What every step of one cycle reads and writes."""
    cfg: Config
    state: ExportState
    issues: IssueLog
    summary: CycleSummary
    progress: Progress
    now: float               # Unix time the cycle started: the settle clock, the state's
    started: float           # time.monotonic() then: MAX_RUN_SECONDS


# -- recovery: what a killed run left ---------------------------------------------------

def remove_replaced_zip(cfg: Config, replaced: Optional[str], current: str) -> None:
    """Delete the ZIP a re-export under a new name replaced (never the current one)."""
    if not replaced or replaced == current:
        return
    path = os.path.join(cfg.backup_root, replaced)
    if os.path.exists(path):
        os.remove(path)
        sync_directory(os.path.dirname(path))
        log.info("removed %s: replaced by %s", replaced, current)


def recover_interrupted_writes(cfg: Config, state: ExportState, issues: IssueLog) -> None:
    """Finish what a killed run left: remove `.part` files, adopt verified ZIPs.

    A run killed between the rename and the state commit leaves a complete, verified
    ZIP that the state does not know: it is adopted (recorded from its manifest), so
    the study is not written a second time. A run killed after the commit may leave
    the ZIP that a renamed study's new ZIP replaced: it is removed now.
    """
    for write in state.writes_in_progress():
        final_path = os.path.join(cfg.backup_root, write.zip_path)
        if os.path.exists(final_path + PART_SUFFIX):
            remove_if_present(final_path + PART_SUFFIX)
            log.info("removed partial %s%s left by an interrupted run", write.zip_path,
                     PART_SUFFIX)
        if os.path.exists(final_path) and adopt_or_discard(cfg, state, issues, write):
            remove_replaced_zip(cfg, write.replaces, write.zip_path)
        state.end_write(write.zip_path)


def adopt_or_discard(cfg: Config, state: ExportState, issues: IssueLog,
                     write: WriteInProgress) -> bool:
    """Whether the state now records the ZIP of `write` (adopting it if need be)."""
    relpath, uid = write.zip_path, write.study_uid
    final_path = os.path.join(cfg.backup_root, relpath)
    row = state.exported_row(uid)
    try:
        with zipfile.ZipFile(final_path) as archive:
            recorded = (row is not None and row.zip_path == relpath
                        and read_manifest(archive).get("exported_at") == row.exported_at)
    except ZIP_READ_ERRORS:
        recorded = False
    if recorded:
        return True
    problem, manifest = verify_zip(final_path)
    if problem is None and manifest is not None and manifest["study"]["study_uid"] == uid:
        state.record_export(export_record(manifest, relpath, os.path.getsize(final_path),
                                          utc_iso(time.time())), watched_sr_files(manifest),
                            keep_write=True)
        log.info("adopted %s: complete and verified, written by an interrupted run", relpath)
        return True
    remove_if_present(final_path)
    problem = problem or "its manifest names another study"
    log.warning("removed %s: left by an interrupted run and not verifiable (%s); the study "
                "will be exported again", relpath, problem)
    # Mostly it was verified before its rename: damage now means the disk lost data.
    issues.add(VERIFY_FAILED, uid, problem, relpath)
    if row is not None and row.zip_path == relpath:
        state.forget_export(uid)
    return False


def search_fields_from_zip(cfg: Config, issues: IssueLog, study_uid: str,
                           relpath: str) -> dict:
    """The find fields of one ZIP, read from its manifest only (not its members).

    An unreadable ZIP gets empty fields (not NULL), so no cycle reads it again;
    `verify` is what finds and replaces damaged ZIPs.
    """
    path = os.path.join(cfg.backup_root, relpath)
    try:
        with zipfile.ZipFile(path) as archive:
            record = export_record(read_manifest(archive), relpath, 0, None)
        return dict(record, study_uid=study_uid)
    except ZIP_READ_ERRORS as error:
        log.warning("cannot read the manifest of %s (%s): its patient ID, accession number "
                    "and birth date stay unknown to find", relpath, error)
        issues.add(UNREADABLE_ZIP, study_uid, str(error), relpath)
        return {"study_uid": study_uid, "patient_id": "", "accession_number": "",
                "birth_date": None}


def backfill_search_fields(cfg: Config, state: ExportState, issues: IssueLog,
                           deadline: float, clock=time.monotonic) -> int:
    """Fill patient ID, accession number and birth date of the rows an older version
    wrote, from their ZIPs' manifests, until `deadline` (on `clock`).

    Rows are committed a step at a time, so a killed cycle keeps what it read and the
    next one goes on from there. Returns how many rows were filled.
    """
    filled = 0
    while clock() < deadline:
        rows = state.unread_rows(BACKFILL_ROWS_PER_STEP)
        if not rows:
            break
        updates = []
        for uid, relpath in rows:
            updates.append(search_fields_from_zip(cfg, issues, uid, relpath))
            if clock() >= deadline:
                break
        state.set_search_fields(updates)
        filled += len(updates)
    if filled:
        left = state.unread_count()
        log.info("find: read patient IDs from %s written by an older version (%s)",
                 plural(filled, "manifest"),
                 "%d left for the next cycles" % left if left else "all done")
    return filled


# -- reading Horos ----------------------------------------------------------------------

@dataclass
class LibraryRead:
    """Every study Horos holds, and what changed in the exported ones since last looked."""
    studies: List[HorosStudy]
    marks: Dict[str, ChangeMark]   # news to record (edits_seen)
    edit_check: EditCheck
    image_high_water: int
    # Exported by an older version, unchanged, and holding none of the reader's work:
    # their base fingerprint is the one recorded (plain_old_exports).
    plain: List[str] = dataclasses.field(default_factory=list)


@dataclass
class HorosSnapshot:
    """What one read of Horos saw: the studies, the queue and the plans to export."""
    studies: List[HorosStudy]
    selection: Selection
    plans: List[StudyPlan]         # of the head of selection.queue
    marks: Dict[str, ChangeMark]   # what changed in exported studies: news to record
    image_high_water: int
    seconds_held: float            # all its read transactions together
    times: Optional[ReadTimes] = None
    plain: List[str] = dataclasses.field(default_factory=list)   # LibraryRead.plain


def database_for_cycle(cfg: Config) -> str:
    """Database.sql, or with --use-db-copy its snapshot, refreshed if Horos changed it."""
    if not cfg.use_db_copy:
        return cfg.database_path
    return refresh_db_copy(cfg.database_path, os.path.join(cfg.tmp_dir, DB_COPY_DIR),
                           cfg.busy_timeout)


def read_candidates(reader: HorosReader) -> List[HorosStudy]:
    """Every study in the library, ZSTUDY and ZSERIES read in chunks.

    The rows of all chunks are grouped together: two ZSTUDY rows of one UID in
    different chunks are still one study. A chunk's rows are grouped after its read
    transaction has ended.
    """
    return group_candidates(row for chunk in reader.candidate_chunks() for row in chunk)


def read_library(reader: HorosReader, view: StateView, now: float) -> LibraryRead:
    """The studies, in short read transactions, and what changed in the exported ones:
    image rows above the high-water mark (read first: rows Horos adds during the scan
    are above it and found next cycle), SR files rewritten (stat'ed after the scan,
    with no transaction open), the reader's work in the fingerprints."""
    top = reader.image_high_water()
    new_rows = NewImageRows(studies=set(), horos_sr_studies=set())
    # top < high_water: Horos rebuilt its database and numbered its rows anew.
    if view.image_high_water is not None and view.image_high_water < top:
        new_rows = reader.new_image_rows(view.image_high_water, top)
    studies = read_candidates(reader)
    watched = {f.study_uid for f in view.sr_files}
    check = check_sr_files(view.sr_files, {s.uid for s in studies if s.uid in watched})
    row_uids, sr_row_uids = set(), set()
    if new_rows.studies:
        for study in studies:
            # A study back in Horos has only new rows (a re-import, a rebuilt library):
            # they say nothing of an edit, and its fingerprint tells whether it changed.
            if study.uid in view.exported and study.uid not in view.left_horos \
                    and not new_rows.studies.isdisjoint(study.pks):
                row_uids.add(study.uid)
                if not new_rows.horos_sr_studies.isdisjoint(study.pks):
                    sr_row_uids.add(study.uid)
    marks = edits_seen(studies, view.exported, view.bases, view.changed, check, sr_row_uids,
                       row_uids, now)
    plain = plain_old_exports(studies, view.exported, view.bases)
    log.debug("edit check: %d SR files of exported studies stat'ed in %.1f ms, %d studies "
              "with one rewritten or gone", check.files, check.seconds * 1000,
              len(set(check.rewritten) | check.vanished))
    return LibraryRead(studies=studies, marks=marks, edit_check=check,
                       image_high_water=top, plain=plain)


def read_plans(reader: HorosReader, candidates: Iterable[Candidate],
               files_dir: str, folder_size: int = DB_FOLDER_SIZE) -> List[StudyPlan]:
    """The plans of these candidates, one read transaction each; a study Horos deleted
    since the scan is left out."""
    plans = []
    for candidate in candidates:
        rows = reader.read_study(candidate.study)
        if rows is None:
            log.info("study %s: Horos deleted it since the scan; skipped",
                     candidate.study.uid)
            continue
        plans.append(plan_study(rows, candidate.study, files_dir, folder_size,
                                candidate.reason))
    return plans


def read_horos(cfg: Config, view: StateView, now: float, db_path: str,
               capped: bool = True, times: Optional[ReadTimes] = None) -> HorosSnapshot:
    """Select the queue and read the plans of its head, in short read transactions.

    capped (clinic hours): the queue holds the next BATCH_SIZE studies and as many
    spares (a study that fails before it is written gives its slot to the next).
    Uncapped: the whole queue, of which the head's plans are read here and the rest's
    by later_plans, a group at a time, while the cycle exports.
    """
    times = times if times is not None else ReadTimes()
    started = time.monotonic()
    with open_horos_reader(db_path, cfg.busy_timeout, cfg.horos_chunk_rows,
                           times) as reader:
        library = read_library(reader, view, now)
        selection = plan_selection(library.studies, view.exported,
                                   known_changes(view.changed, library.marks),
                                   view.failures, cfg.modalities, cfg.order_by, now,
                                   cfg.settle_minutes * 60,
                                   limit=cfg.batch_size * 2 if capped else None,
                                   bases=view.bases)
        plans = read_plans(reader, selection.queue[:cfg.batch_size * 2],
                           cfg.horos_files_dir, cfg.folder_size)
    log.debug("read %d studies from %s in %.3f s: %d read transactions, %.3f s in all, "
              "the longest %.1f ms", len(library.studies), db_path,
              time.monotonic() - started, times.transactions, times.seconds,
              times.longest * 1000)
    return HorosSnapshot(studies=library.studies, selection=selection, plans=plans,
                         marks=library.marks, image_high_water=library.image_high_water,
                         seconds_held=times.seconds, times=times, plain=library.plain)


def later_plans(cfg: Config, db_path: str, candidates: Sequence[Candidate],
                times: ReadTimes) -> Iterable[StudyPlan]:
    """Plans of the rest of an uncapped queue, read a group at a time as they are
    needed: Database.sql is open only while a group is read, never while zipping."""
    group = cfg.batch_size * 2
    for first in range(0, len(candidates), group):
        with open_horos_reader(db_path, cfg.busy_timeout, cfg.horos_chunk_rows,
                               times) as reader:
            plans = read_plans(reader, candidates[first:first + group], cfg.horos_files_dir,
                               cfg.folder_size)
        yield from plans


# -- exporting --------------------------------------------------------------------------

def stat_files(files: Sequence[SourceFile]) -> Tuple[List[SourceFile], List[str], int]:
    """(present files with their sizes, missing paths, bytes present)."""
    present, missing, total = [], [], 0
    for source in files:
        try:
            size = os.stat(source.path).st_size
        except (FileNotFoundError, NotADirectoryError):
            missing.append(source.path)
            continue
        present.append(dataclasses.replace(source, size=size))
        total += size
    return present, missing, total


def check_free_space(cfg: Config, folder: str, study_bytes: int, file_count: int) -> None:
    """Room for the study plus the reserve: MIN_FREE_GB, so Horos can still receive
    studies, or more, so Horos's auto-cleaning never starts (effective_reserve)."""
    reserve, free, _total = backup_space(cfg, folder)
    if reserve.bytes <= 0:
        return
    needed = (study_bytes + file_count * ZIP_ENTRY_OVERHEAD + RECORD_ALLOWANCE_BYTES
              + reserve.bytes)
    if free < needed:
        raise DiskSpaceProblem(DISK_LOW, "backup volume low: %s free, the next study needs "
                               "%s plus the %s reserve (%s)"
                               % (format_bytes(free), format_bytes(study_bytes),
                                  format_bytes(reserve.bytes), reserve.detail))


def record_failure(cycle: Cycle, plan: StudyPlan, kind: str, detail: str,
                   extra: str = "") -> None:
    attempts = cycle.state.record_failure(plan.info.uid, kind, detail, plan.fingerprint,
                                          cycle.now)
    log.warning("study %s not exported (%s, attempt %d, next in %s): %s", plan.info.uid,
                kind, attempts, format_duration(retry_delay(attempts)), detail)
    cycle.issues.add(kind, plan.info.uid, detail, extra)


# The failures of writing one study, by the kind each is recorded as.
WRITE_FAILURE_KINDS = ((FileChanged, FILE_CHANGED), (SourceUnreadable, UNREADABLE_FILE),
                       (ZipVerifyFailed, ZIP_BAD))


def export_study(cycle: Cycle, plan: StudyPlan, failures: Mapping[str, Failure],
                 label: str) -> str:
    """Write, verify and record one study's ZIP; returns its Outcome."""
    cfg, state, summary = cycle.cfg, cycle.state, cycle.summary
    uid = plan.info.uid
    present, missing, source_bytes = stat_files(plan.files)
    previous = failures.get(uid)
    decision = files_decision(len(present), len(missing), previous, cfg.missing_retries)
    if decision == Outcome.NO_FILES:
        record_failure(cycle, plan, NO_FILES, "none of its %d files exist"
                       % len(plan.files), missing[0] if missing else "")
        return decision
    if decision == Outcome.DEFERRED:
        record_failure(cycle, plan, MISSING_FILES, "%d of %d files missing "
                       "(deferral %d of %d before a partial export)"
                       % (len(missing), len(plan.files), missing_deferrals(previous) + 1,
                          cfg.missing_retries), missing[0])
        return decision
    final_path = os.path.join(cfg.backup_root, plan.zip_relpath)
    check_free_space(cfg, os.path.dirname(final_path), source_bytes, len(present))
    old = state.exported_row(uid)
    replaces = old.zip_path if old is not None and old.zip_path != plan.zip_relpath else None
    started = time.monotonic()
    state.begin_write(uid, plan.zip_relpath, replaces, cycle.now)
    cycle.progress.start("%s %s  %s" % (label, plan.info.patient_name or uid,
                                        plural(len(present), "file")), source_bytes)
    throttle = Throttle(cfg.max_mbps)

    def on_bytes(count: int) -> None:
        cycle.progress.advance(count)
        throttle(count)

    try:
        manifest = write_verified_zip(final_path, plan, present, missing, cfg.compression,
                                      cfg.compress_level, on_bytes, utc_iso(cycle.now),
                                      throttle)
    except (FileChanged, SourceUnreadable, ZipVerifyFailed) as error:
        state.end_write(plan.zip_relpath)
        kind = next(kind for failure, kind in WRITE_FAILURE_KINDS
                    if isinstance(error, failure))
        record_failure(cycle, plan, kind, str(error))
        return Outcome.FAILED
    except OSError as error:
        if not is_disk_full(error):
            raise
        # The .part is gone already; the next cycle's recovery ends the write record.
        raise DiskSpaceProblem(DISK_FULL, "backup volume full while writing %s: %s"
                               % (plan.zip_relpath, error)) from None
    finally:
        cycle.progress.clear()
    zip_bytes = os.path.getsize(final_path)
    state.record_export(export_record(manifest, plan.zip_relpath, zip_bytes,
                                      utc_iso(cycle.now)), watched_sr_files(manifest),
                        keep_write=replaces is not None)
    if replaces is not None:
        remove_replaced_zip(cfg, replaces, plan.zip_relpath)
        state.end_write(plan.zip_relpath)
    if missing:
        log.warning("study %s exported without its %d missing files", uid, len(missing))
        cycle.issues.add(PARTIAL, uid, "%d of %d files missing"
                         % (len(missing), len(plan.files)), missing[0])
    summary.studies += 1
    summary.files += len(present)
    summary.source_bytes += source_bytes
    summary.zip_bytes += zip_bytes
    seconds = time.monotonic() - started
    log.info("%s %s %s (%s, %s, %.1f s, %.1f MB/s)", label,
             "re-exported" if plan.reason in Reason.REEXPORTS else "exported",
             plan.zip_relpath,
             plural(len(present), "file"), format_bytes(zip_bytes), seconds,
             source_bytes / 1e6 / max(seconds, 1e-6))
    return decision


def over_time(cfg: Config, started: float) -> bool:
    return 0 < cfg.max_run_seconds < time.monotonic() - started


def export_plans(cycle: Cycle, plans: Iterable[StudyPlan], failures: Mapping[str, Failure],
                 capped: bool = True, total: Optional[int] = None) -> None:
    """Export up to BATCH_SIZE studies (capped: clinic hours), or until MAX_RUN_SECONDS
    (uncapped); studies deferred before writing take no slot.

    After MAX_RUN_SECONDS no new study is started (but every cycle exports at least
    one, so a slow start can never stop the queue; an uncapped cycle stops anyway once
    it has looked at 2 x BATCH_SIZE studies, so a queue of studies whose files are all
    missing cannot keep it going). Past BATCH_SIZE, an uncapped cycle looks at
    INCOMING.noindex again before each study: Horos may start importing.
    """
    cfg, summary = cycle.cfg, cycle.summary
    used = tried = 0
    if total is None:
        plans = list(plans)
        total = len(plans)
    if capped:
        total = min(cfg.batch_size, total)
    for plan in plans:
        if capped and used >= cfg.batch_size:
            break
        if (used or tried >= cfg.batch_size * 2) and over_time(cfg, cycle.started):
            log.info("ran for %.0f s (--max-run-seconds %g): the next study waits for the "
                     "next cycle", time.monotonic() - cycle.started, cfg.max_run_seconds)
            break
        if used >= cfg.batch_size and count_files_up_to(
                cfg.incoming_dir, cfg.incoming_max_files) > cfg.incoming_max_files:
            log.info("INCOMING.noindex holds more than %d files: Horos is busy importing; "
                     "the next study waits for the next cycle", cfg.incoming_max_files)
            break
        label = "[%d/%d]" % (used + 1, total)
        tried += 1
        outcome = export_study(cycle, plan, failures, label)
        if outcome in (Outcome.DEFERRED, Outcome.NO_FILES):
            summary.deferred += 1
            continue
        used += 1
        if outcome == Outcome.FAILED:
            summary.failed += 1


@dataclass
class VerifyResult:
    good: int = 0
    bad: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (zip, problem)
    bytes_read: int = 0


def verify_exported(cfg: Config, state: ExportState, issues: IssueLog, limit: Optional[int],
                    max_bytes: Optional[int], now: float, progress: Progress,
                    verified_before: Optional[float] = None,
                    started: Optional[float] = None) -> VerifyResult:
    """Re-read the longest-unverified ZIPs: every member's CRC, and the manifest.

    A good ZIP gets verified_at = now. A missing or damaged one gets a VERIFY_FAILED row
    and loses its state row, so the next cycle exports the study again while Horos still
    has it; the damaged file itself is left where it is.
    """
    result = VerifyResult()
    queue = state.verify_queue(verified_before, limit)
    for index, item in enumerate(queue, 1):
        if max_bytes is not None and result.bytes_read >= max_bytes:
            break
        if started is not None and over_time(cfg, started):
            break
        path = os.path.join(cfg.backup_root, item.zip_path)
        progress.start("verify %d/%d %s" % (index, len(queue), item.zip_path), item.zip_bytes)
        if os.path.exists(path):
            problem, _ = verify_zip(path, Throttle(cfg.max_mbps))
            result.bytes_read += os.path.getsize(path)
        else:
            problem = "the ZIP is missing"
        progress.advance(item.zip_bytes)
        progress.clear()
        if problem is None:
            state.mark_verified(item.study_uid, now)
            result.good += 1
            continue
        result.bad.append((item.zip_path, problem))
        log.error("verify failed: %s: %s; the study is exported again if Horos still has it",
                  item.zip_path, problem)
        issues.add(VERIFY_FAILED, item.study_uid, problem, item.zip_path)
        state.forget_export(item.study_uid)
    return result


def uids_text(uids: Sequence[str], shown: int = 10) -> str:
    """The first `shown` UIDs for the log, then how many more (a library of 50,000)."""
    more = len(uids) - shown
    return " ".join(uids[:shown]) + (" and %d more" % more if more > 0 else "")


def note_departures(cycle: Cycle, studies: Sequence[HorosStudy], view: StateView
                    ) -> Departures:
    """Record the exported studies a complete scan of Horos no longer found, forget
    those that are back. Their ZIPs and state rows stay whatever Horos does."""
    state, now = cycle.state, cycle.now
    check = compare_with_horos(view.exported, view.left_horos, (s.uid for s in studies))
    first = state.record_departures(check.left, check.returned, now)
    if check.left:
        pronoun = "it" if len(check.left) == 1 else "them"
        log.warning("%s no longer in Horos (%s): the backup keeps %s; "
                    "`find --left-horos` lists %s",
                    plural(len(check.left), "exported study is", "exported studies are"),
                    "already gone when departures began to be recorded" if first
                    else "first seen gone now", pronoun, pronoun)
        log.info("no longer in Horos: %s", uids_text(check.left))
    if check.returned:
        log.info("%s back in Horos: %s", plural(len(check.returned), "study", "studies"),
                 uids_text(check.returned))
    return Departures(exported=len(view.exported), left=len(check.left),
                      returned=len(check.returned),
                      batches=tuple(state.left_batches(now - LEFT_RECENT_DAYS * 86400,
                                                       SHRINK_MIN_STUDIES)))


def update_month_markers(cfg: Config, studies: Sequence[HorosStudy],
                         exported: Mapping[str, str], today: dt.date) -> None:
    """`.month_done` exists in a month folder exactly when every eligible study of that
    month is exported and the month is over."""
    for month, (eligible, done) in sorted(
            month_completeness(studies, exported, cfg.modalities).items()):
        marker = os.path.join(cfg.backup_root, month, MONTH_DONE_FILE)
        complete = eligible == done and month_is_over(month, today)
        if complete and not os.path.exists(marker) and os.path.isdir(os.path.dirname(marker)):
            write_small_file(marker, "month=%s eligible=%d exported=%d checked_at=%s\n"
                             % (month, eligible, done, utc_iso(time.time())))
            log.info("month %s complete: %s", month, plural(eligible, "study", "studies"))
        elif not complete and os.path.exists(marker):
            remove_if_present(marker)
            log.info("month %s no longer complete (%d of %d exported): marker removed",
                     month, done, eligible)


# -- the cycle --------------------------------------------------------------------------

def run_cycle(cfg: Config, summary: CycleSummary) -> int:
    """One cycle; `summary` says what it did, even when it raises."""
    check_sentinels(cfg)
    open_backup_root(cfg)
    log_horos_preferences(cfg)
    with run_lock(cfg.lock_path) as held:
        if not held:
            log.info("another run holds %s; skipping this cycle", cfg.lock_path)
            summary.outcome = CYCLE_SKIPPED_LOCK
            return EXIT_OK
        return locked_cycle(cfg, summary, Progress(sys.stdout))


def locked_cycle(cfg: Config, summary: CycleSummary, progress: Progress) -> int:
    issues = IssueLog(cfg.issues_path, summary.issue_kinds)
    state = ExportState(cfg.state_path, cfg.busy_timeout)
    cycle = Cycle(cfg=cfg, state=state, issues=issues, summary=summary, progress=progress,
                  now=time.time(), started=time.monotonic())
    try:
        if count_files_up_to(cfg.incoming_dir, cfg.incoming_max_files) \
                > cfg.incoming_max_files:
            log.info("INCOMING.noindex holds more than %d files: Horos is busy importing; "
                     "skipping this cycle", cfg.incoming_max_files)
            issues.add(INCOMING_OVER_LIMIT, "", "more than %d files in %s"
                       % (cfg.incoming_max_files, cfg.incoming_dir))
            summary.outcome = CYCLE_SKIPPED_INCOMING
            return EXIT_OK
        clean_tmp_dir(cfg)
        export_cycle(cycle)
        summary.outcome = CYCLE_OK
    except DiskSpaceProblem as problem:
        stop_for_disk_space(cycle, problem)
        raise
    except (OSError, sqlite3.OperationalError) as error:
        if not is_disk_full(error):
            summary.detail = str(error)
            if isinstance(error, sqlite3.OperationalError):
                raise CannotRun("state database %s: %s" % (cfg.state_path, error)) from None
            raise
        problem = DiskSpaceProblem(DISK_FULL, "backup volume full: %s" % error)
        stop_for_disk_space(cycle, problem)
        raise problem from None
    except HorosUnreadable as error:
        summary.outcome, summary.detail = CYCLE_HOROS_UNREADABLE, str(error)
        raise
    except CannotRun as error:
        summary.detail = str(error)
        raise
    finally:
        seconds = time.monotonic() - cycle.started
        record_run(state, cycle.now, seconds, summary)
        state.close()
        if summary.outcome == CYCLE_OK:
            log.info("cycle done: %s, %s, %s in %.1f s (%.1f MB/s; %s %.3f s, at most "
                     "%.1f ms at a time)%s%s%s",
                     plural(summary.studies, "study", "studies"),
                     plural(summary.files, "file"), format_bytes(summary.zip_bytes), seconds,
                     summary.source_bytes / 1e6 / max(seconds, 1e-6),
                     "database copy read in" if cfg.use_db_copy else "Horos database held",
                     summary.horos_seconds or 0.0, summary.horos_times.longest * 1000,
                     "; %d failed, %d deferred" % (summary.failed, summary.deferred)
                     if summary.failed or summary.deferred else "",
                     "; %d ZIPs re-verified" % summary.verified if summary.verified else "",
                     departures_text(summary.departures))
    return EXIT_OK


def departures_text(departures: Optional[Departures]) -> str:
    """The part of the cycle's last line about studies that left Horos, or came back."""
    if departures is None:
        return ""
    return "".join(("; %d left Horos" % departures.left if departures.left else "",
                    "; %d back in Horos" % departures.returned if departures.returned
                    else ""))


def record_run(state: ExportState, now: float, seconds: float, summary: CycleSummary) -> None:
    """One row in `runs`; a full disk may refuse it, which must not hide the real error."""
    try:
        state.record_run({
            "started_at": utc_iso(now), "seconds": round(seconds, 3),
            "outcome": summary.outcome, "studies": summary.studies, "files": summary.files,
            "zip_bytes": summary.zip_bytes, "source_bytes": summary.source_bytes,
            "failed": summary.failed, "deferred": summary.deferred,
            "verified": summary.verified,
            "horos_seconds": round(summary.horos_seconds, 4)
            if summary.horos_seconds is not None else None,
            "detail": summary.detail,
            "horos_longest_seconds": round(summary.horos_times.longest, 4)
            if summary.horos_times.transactions else None,
            "horos_transactions": summary.horos_times.transactions or None})
    except sqlite3.Error as error:
        log.error("cannot record this run in %s: %s", state.path, error)


def export_cycle(cycle: Cycle) -> None:
    """Recovery, one read of Horos, the exports, the month markers, a few re-reads."""
    cfg, state, summary, now = cycle.cfg, cycle.state, cycle.summary, cycle.now
    recover_interrupted_writes(cfg, state, cycle.issues)
    backfill_search_fields(cfg, state, cycle.issues, time.monotonic() + BACKFILL_SECONDS)
    view = state.view()
    capped = capped_at(cfg, now)
    times = summary.horos_times
    db_path = database_for_cycle(cfg)
    try:
        snapshot = read_horos(cfg, view, now, db_path, capped, times)
    except HorosUnreadable as error:
        cycle.issues.add(HOROS_DB_UNREADABLE, "", str(error))
        raise
    summary.horos_seconds = snapshot.seconds_held
    summary.departures = note_departures(cycle, snapshot.studies, view)
    if snapshot.marks or snapshot.plain or \
            snapshot.image_high_water != view.image_high_water:
        state.note_horos_changes(snapshot.marks, snapshot.image_high_water, now,
                                 snapshot.plain)
    for uid, mark in sorted(snapshot.marks.items()):
        if mark.edited_at is not None:
            log.info("study %s: the reader's work changed in Horos since its export (ROIs, "
                     "key images, comments, status or report); exported again once it has "
                     "had no edit for %g minutes", uid, cfg.settle_minutes)
    if not capped:
        log.info("outside clinic hours (--clinic-hours %s, --clinic-days %s): exporting "
                 "until --max-run-seconds %g", cfg.clinic_hours, cfg.clinic_days,
                 cfg.max_run_seconds)
    queue = snapshot.selection.queue
    plans = itertools.chain(snapshot.plans, later_plans(
        cfg, db_path, queue[cfg.batch_size * 2:], times)) if not capped else snapshot.plans
    try:
        export_plans(cycle, plans, view.failures, capped,
                     total=len(queue) if not capped else len(snapshot.plans))
    except HorosUnreadable as error:
        cycle.issues.add(HOROS_DB_UNREADABLE, "", str(error))
        raise
    finally:
        summary.horos_seconds = times.seconds
    update_month_markers(cfg, snapshot.studies, state.exported_fingerprints(),
                         dt.date.today())
    if cfg.verify_per_run > 0:
        verified = verify_exported(cfg, state, cycle.issues, cfg.verify_per_run, None, now,
                                   cycle.progress,
                                   verified_before=now - VERIFY_MIN_AGE_DAYS * 86400,
                                   started=cycle.started)
        summary.verified = verified.good + len(verified.bad)


def stop_for_disk_space(cycle: Cycle, problem: DiskSpaceProblem) -> None:
    cycle.summary.outcome = (CYCLE_DISK_LOW if problem.kind == DISK_LOW
                             else CYCLE_DISK_FULL)
    cycle.summary.detail = str(problem)
    log.error("%s: %s; the cycle stops after %s, the next one continues once there is "
              "room", problem.kind, problem, plural(cycle.summary.studies, "study",
                                                   "studies"))
    cycle.issues.add(problem.kind, "", str(problem))


def cycle_with_alerts(cfg: Config) -> int:
    """One cycle, then alerts and the heartbeat, whatever its outcome."""
    summary = CycleSummary()
    return run_with_alerts(cfg, lambda: run_cycle(cfg, summary),
                           lambda error: cycle_report(cfg, summary, error))


# =====================================================================================
# Mirror: a second backup root, kept identical and verified
# =====================================================================================
#
# `mirror --to DIR` brings DIR up to date from BACKUP_ROOT: every ZIP BACKUP_ROOT's state
# lists that DIR's own state does not list alike is copied with the archive writer's
# discipline (`.part`, fsync, read back with every member checked against the manifest,
# rename, folder fsync), then recorded in DIR's state, so find, verify, restore and
# reindex work on DIR as on BACKUP_ROOT. It reads BACKUP_ROOT only (no PACS volume, no
# Horos), and never re-reads what DIR holds (that is verify's job on each side).
#
# It never copies a loss: a ZIP missing or damaged on BACKUP_ROOT leaves DIR's copy as
# it is, a ZIP is replaced on DIR only by a newer one verified there, and nothing else
# is ever removed from DIR. A killed run is finished by the next one, as a cycle is
# (recover_interrupted_writes on DIR's own writes_in_progress).

# Left free on the mirror's disk besides the next ZIP: its state, journal and log must
# still be written, and APFS misbehaves on a full disk.
MIRROR_SPARE_BYTES = 1 * GB
# A ZIP path as the cycle writes it; anything else in a state (edited by hand) could
# name a file outside DIR.
MIRROR_ZIP_NAME = re.compile(r"^[A-Za-z0-9-][A-Za-z0-9._-]*\.zip$")


class SourceZipBad(Exception):
    """The ZIP on BACKUP_ROOT is missing, unreadable or fails verification."""


class MirrorCopyBad(Exception):
    """A copy failed verification VERIFY_ATTEMPTS times while its source verifies."""


@dataclass
class MirrorSummary:
    """What one mirror run did: its log's last line, BACKUP_ROOT's `mirrors` row, and
    what alerting reads (like a cycle's CycleSummary)."""
    outcome: str = MIRROR_ERROR
    detail: str = ""
    issue_kinds: Dict[str, int] = dataclasses.field(default_factory=dict)  # both issues.csv
    copied: int = 0
    replaced: int = 0        # of the copied: a newer ZIP of a study DIR held
    bytes: int = 0
    left: int = 0            # ZIPs it could copy but did not (out of time, failed copies)
    source_bad: int = 0      # ZIPs missing or damaged on BACKUP_ROOT
    failed: int = 0          # copies that failed verification on DIR


def holds_alike(held: Optional[ListedZip], listed: ListedZip) -> bool:
    """Whether the mirror's row is the source's ZIP: same study, path, size and export
    time (a re-export, in place or under a new name, changes the time)."""
    return held == listed


def safe_zip_path(relpath: str) -> bool:
    month, _, name = relpath.partition("/")
    return bool(MONTH_FOLDER.match(month)) and bool(MIRROR_ZIP_NAME.match(name))


def mirror_disk_missing(cfg: Config, target: str) -> str:
    """Why DIR's disk is not there, in words ("" when it is): BACKUP_ROOT's rule. The
    parent must exist, and on a disk other than the PACS volume hold .backup_sentinel."""
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        return "%s does not exist: the mirror's disk is not connected" % parent
    if not same_disk(target, cfg.pacs_root):
        sentinel = os.path.join(parent, BACKUP_SENTINEL_NAME)
        if not os.path.isfile(sentinel):
            return ("%s is missing: the mirror's disk is not connected (on a new disk, "
                    "create it: touch %s)" % (sentinel, sentinel))
    return ""


def check_mirror_source(cfg: Config, target: str) -> None:
    if not os.path.isdir(cfg.backup_root):
        raise CannotRun("no backup at %s: is the backup disk mounted? (check --backup-root; "
                        "nothing was done)" % cfg.backup_root)
    if not os.path.isfile(cfg.state_path):
        raise CannotRun("%s has no %s: nothing to mirror (reindex rebuilds it from the ZIPs)"
                        % (cfg.backup_root, STATE_FILE))
    source, mirror = os.path.realpath(cfg.backup_root), os.path.realpath(target)
    if mirror == source or mirror.startswith(source + os.sep) \
            or source.startswith(mirror + os.sep):
        raise CannotRun("--to %s and BACKUP_ROOT %s overlap: the mirror must be another "
                        "folder, on another disk (nothing was done)" % (target, cfg.backup_root))


def copy_file_synced(source: str, part: str, throttle: Throttle, on_bytes) -> None:
    """source -> part, its mtime kept, flushed to the disk; SourceZipBad when the
    source cannot be read (an OSError writing part is the mirror's disk)."""
    try:
        src = open_source(source)
    except FileNotFoundError:
        raise SourceZipBad("the ZIP is missing") from None
    except OSError as error:
        raise SourceZipBad("cannot open it: %s" % error) from None
    buffer = memoryview(bytearray(COPY_CHUNK_BYTES))
    with src, open(part, "wb") as dst:
        st = os.fstat(src.fileno())
        while True:
            try:
                count = src.readinto(buffer)
            except OSError as error:
                raise SourceZipBad("cannot read it: %s" % error) from None
            if not count:
                break
            dst.write(buffer[:count])
            throttle(count)
            on_bytes(count)
        dst.flush()
        # The copy keeps the original's time, so rsync or rclone see the two as alike.
        os.utime(dst.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
        durable_sync(dst.fileno())


def manifest_problem(problem: Optional[str], manifest: Optional[dict],
                     study_uid: str) -> Optional[str]:
    """verify_zip's problem, or that the ZIP is another study's (or names none)."""
    if problem is not None or manifest is None:
        return problem
    study = manifest.get("study")
    if not isinstance(study, dict) or as_text(study.get("study_uid")) != study_uid:
        return "its manifest names another study"
    return None


def copy_verified_zip(source: str, final: str, study_uid: str, throttle: Throttle,
                      on_bytes) -> dict:
    """Copy, fsync, read back (every member against the manifest), rename, fsync the
    folder: the archive writer's discipline. Returns the copy's manifest.

    A copy that fails verification is weighed against its source: a bad source is
    SourceZipBad at once (copying again cannot help); a good one is copied again, up
    to VERIFY_ATTEMPTS times, then MirrorCopyBad. Nothing is left under `final` that
    was not there before, and no `.part`.
    """
    folder = os.path.dirname(final)
    os.makedirs(folder, exist_ok=True)
    part = final + PART_SUFFIX
    problem = None
    for attempt in range(1, VERIFY_ATTEMPTS + 1):
        try:
            copy_file_synced(source, part, throttle, on_bytes)
            problem, manifest = verify_zip(part, throttle)
            problem = manifest_problem(problem, manifest, study_uid)
            if problem is None and manifest is not None:
                os.replace(part, final)
                sync_directory(folder)
                return manifest
        finally:
            remove_if_present(part)
        source_problem = manifest_problem(*verify_zip(source, throttle), study_uid)
        if source_problem is not None:
            raise SourceZipBad(source_problem)
        log.warning("mirror: the copy of %s failed verification (attempt %d of %d) while the "
                    "ZIP on BACKUP_ROOT verifies: %s", source, attempt, VERIFY_ATTEMPTS,
                    problem)
    raise MirrorCopyBad("the copy failed verification %d times while the ZIP on "
                        "BACKUP_ROOT verifies: %s" % (VERIFY_ATTEMPTS, problem))


def source_row_moved(cfg: Config, listed: ListedZip) -> bool:
    """Whether BACKUP_ROOT's state lists the study otherwise now than when the run read
    it: a cycle replaced or dropped its ZIP meanwhile, which is no loss."""
    state = ExportState(cfg.state_path, cfg.busy_timeout, read_only=True)
    try:
        return not holds_alike(state.listed_zip(listed.study_uid), listed)
    finally:
        state.close()


def check_mirror_space(folder: str, zip_bytes: int) -> None:
    free = free_bytes_of(folder)
    if free is not None and free < zip_bytes + MIRROR_SPARE_BYTES:
        raise DiskSpaceProblem(DISK_LOW, "mirror disk low: %s free, the next ZIP needs %s "
                               "and %s stay free" % (format_bytes(free),
                                                     format_bytes(zip_bytes),
                                                     format_bytes(MIRROR_SPARE_BYTES)))


@dataclass
class MirrorRun:
    """What every step of one mirror run reads and writes."""
    cfg: Config              # BACKUP_ROOT's
    mirror: Config           # the same, with DIR as its backup root
    state: ExportState       # DIR's
    source_issues: IssueLog  # BACKUP_ROOT's issues.csv: its ZIPs found bad
    issues: IssueLog         # DIR's: what went wrong on the mirror's side
    summary: MirrorSummary
    progress: Progress
    held: Dict[str, ListedZip]   # what DIR's state lists, kept as the run records copies


def mirror_one(run: MirrorRun, listed: ListedZip, label: str) -> None:
    """Copy one ZIP to DIR and record it there; a bad source, a copy that never
    verifies or a disk too full are counted and reported, DIR's own copy kept."""
    cfg, state, summary = run.cfg, run.state, run.summary
    uid, relpath = listed.study_uid, listed.zip_path
    source = os.path.join(cfg.backup_root, relpath)
    final = os.path.join(run.mirror.backup_root, relpath)
    old = state.exported_row(uid)
    replaces = old.zip_path if old is not None and old.zip_path != relpath else None
    check_mirror_space(nearest_existing(os.path.dirname(final)), listed.zip_bytes)
    started = time.monotonic()
    state.begin_write(uid, relpath, replaces, time.time())
    run.progress.start("%s %s" % (label, relpath), listed.zip_bytes)
    try:
        manifest = copy_verified_zip(source, final, uid, Throttle(cfg.max_mbps),
                                     run.progress.advance)
    except SourceZipBad as error:
        state.end_write(relpath)
        if source_row_moved(cfg, listed):
            log.info("%s %s was replaced on BACKUP_ROOT while the mirror read it: the next "
                     "run copies the new one", label, relpath)
            return
        summary.source_bad += 1
        log.error("%s %s on BACKUP_ROOT: %s; the mirror keeps %s", label, relpath, error,
                  "its copy %s" % old.zip_path if old is not None else "nothing of it")
        run.source_issues.add(MIRROR_SOURCE_BAD, uid, "%s; the mirror %s kept %s" % (
            error, run.mirror.backup_root, "its copy" if old is not None else "none"),
            relpath)
        return
    except MirrorCopyBad as error:
        state.end_write(relpath)
        summary.failed += 1
        log.error("%s %s: %s", label, relpath, error)
        run.issues.add(ZIP_BAD, uid, str(error), relpath)
        return
    except OSError as error:
        if not is_disk_full(error):
            raise
        # The .part is gone already; the next run's recovery ends the write record.
        raise DiskSpaceProblem(DISK_FULL, "mirror disk full while copying %s: %s"
                               % (relpath, error)) from None
    finally:
        run.progress.clear()
    zip_bytes = os.path.getsize(final)
    record = export_record(manifest, relpath, zip_bytes, utc_iso(time.time()))
    state.record_export(record, watched_sr_files(manifest), keep_write=replaces is not None)
    run.held[uid] = ListedZip(uid, relpath, zip_bytes, record["exported_at"])
    if replaces is not None:
        remove_replaced_zip(run.mirror, replaces, relpath)
        state.end_write(relpath)
    summary.copied += 1
    summary.replaced += 0 if old is None else 1
    summary.bytes += zip_bytes
    seconds = time.monotonic() - started
    log.info("%s mirrored %s (%s, %.1f s, %.1f MB/s)%s", label, relpath,
             format_bytes(zip_bytes), seconds, zip_bytes / 1e6 / max(seconds, 1e-6),
             "" if old is None else ", replacing %s" % (
                 "the older copy" if replaces is None else replaces))


def read_listed(cfg: Config) -> Dict[str, ListedZip]:
    """BACKUP_ROOT's exported studies, read without writing (it may be read-only)."""
    state = ExportState(cfg.state_path, cfg.busy_timeout, read_only=True)
    try:
        return state.listed_zips()
    except sqlite3.Error as error:
        raise CannotRun("state database %s cannot be read (%s)" % (cfg.state_path, error)) \
            from None
    finally:
        state.close()


def record_in_source(cfg: Config, target: str, now: float, complete: bool,
                     held: Mapping[str, ListedZip]) -> None:
    """BACKUP_ROOT's `mirrors` row and what DIR holds, for its status. A read-only or
    busy BACKUP_ROOT costs a log line: the copies are made all the same."""
    if not os.access(cfg.backup_root, os.W_OK):
        log.warning("%s is read-only: its status will not list this mirror run",
                    cfg.backup_root)
        return
    try:
        state = ExportState(cfg.state_path, cfg.busy_timeout)
        try:
            state.record_mirror_run(target, now, complete, held)
        finally:
            state.close()
    except (CannotRun, sqlite3.Error) as error:
        log.error("cannot record this mirror run in %s: %s", cfg.state_path, error)


def mirror_files(run: MirrorRun, listed: Mapping[str, ListedZip], started: float) -> None:
    """Copy what DIR does not hold alike, oldest export first, until MAX_RUN_SECONDS (at
    least one ZIP per run, so a slow disk still makes progress)."""
    held = run.held
    todo = sorted((row for uid, row in listed.items() if not holds_alike(held.get(uid), row)),
                  key=lambda row: (row.exported_at, row.study_uid))
    if todo:
        log.info("mirror: %s to copy to %s", plural(len(todo), "ZIP"),
                 run.mirror.backup_root)
    for index, row in enumerate(todo):
        if index and over_time(run.cfg, started):
            log.info("mirror: ran for %.0f s (--max-run-seconds %g): %s wait for the next "
                     "run", time.monotonic() - started, run.cfg.max_run_seconds,
                     plural(len(todo) - index, "ZIP"))
            break
        if not safe_zip_path(row.zip_path):
            run.summary.source_bad += 1
            log.error("mirror: BACKUP_ROOT's state lists %r, not a ZIP path the backup "
                      "writes; not copied", row.zip_path)
            run.source_issues.add(MIRROR_SOURCE_BAD, row.study_uid, "not a ZIP path the "
                                  "backup writes", row.zip_path)
            continue
        mirror_one(run, row, "[%d/%d]" % (index + 1, len(todo)))


def locked_mirror(cfg: Config, mirror: Config, summary: MirrorSummary) -> int:
    started, now = time.monotonic(), time.time()
    issues = IssueLog(mirror.issues_path, summary.issue_kinds)
    state = ExportState(mirror.state_path, cfg.busy_timeout)
    run = MirrorRun(cfg=cfg, mirror=mirror, state=state,
                    source_issues=IssueLog(cfg.issues_path, summary.issue_kinds),
                    issues=issues, summary=summary, progress=Progress(sys.stdout), held={})
    complete = held_read = False
    try:
        recover_interrupted_writes(mirror, state, issues)
        clean_tmp_dir(mirror)
        run.held = state.listed_zips()
        held_read = True
        listed = read_listed(cfg)
        mirror_files(run, listed, started)
        summary.left = sum(1 for uid, row in listed.items()
                           if not holds_alike(run.held.get(uid), row)) - summary.source_bad
        complete = summary.left <= 0
        summary.outcome = MIRROR_COMPLETE if complete else MIRROR_INCOMPLETE
        meta = {META_MIRROR_OF: cfg.backup_root}
        if complete:
            meta[META_MIRROR_COMPLETE_AT] = utc_iso(now)
        state.set_meta(meta)
    except DiskSpaceProblem as problem:
        summary.outcome, summary.detail = MIRROR_INCOMPLETE, str(problem)
        log.error("%s: %s; the mirror run stops, the next one continues once there is room",
                  problem.kind, problem)
        issues.add(problem.kind, "", str(problem))
        raise
    except (OSError, sqlite3.OperationalError) as error:
        if not is_disk_full(error):
            summary.detail = str(error)
            raise
        problem = DiskSpaceProblem(DISK_FULL, "mirror disk full: %s" % error)
        summary.outcome, summary.detail = MIRROR_INCOMPLETE, str(problem)
        issues.add(problem.kind, "", str(problem))
        raise problem from None
    finally:
        state.close()
        if held_read:
            record_in_source(cfg, mirror.backup_root, now, complete, run.held)
    seconds = time.monotonic() - started
    log.info("mirror done: %s%s%s; %s",
             "%s copied (%s) in %.1f s (%.1f MB/s)" % (
                 plural(summary.copied, "ZIP"), format_bytes(summary.bytes), seconds,
                 summary.bytes / 1e6 / max(seconds, 1e-6))
             if summary.copied or summary.source_bad or summary.failed or summary.left
             else "nothing to copy",
             ", %d replacing older copies" % summary.replaced if summary.replaced else "",
             "; %s missing or damaged on BACKUP_ROOT (the mirror kept its copies)"
             % plural(summary.source_bad, "ZIP") if summary.source_bad else "",
             "complete: %s holds every ZIP it can" % mirror.backup_root if complete
             else "%s left for the next run" % plural(summary.left, "ZIP"))
    return EXIT_FAILED if summary.source_bad or summary.failed else EXIT_OK


def mirror_command(cfg: Config, target: str, summary: MirrorSummary) -> int:
    """mirror --to DIR: one run; `summary` says what it did, even when it raises. With
    DIR's disk not connected: one line, exit 0, nothing created."""
    target = os.path.abspath(target)
    check_mirror_source(cfg, target)
    missing = mirror_disk_missing(cfg, target)
    if missing:
        log.info("mirror: %s; nothing was done", missing)
        summary.outcome, summary.detail = MIRROR_UNPLUGGED, missing
        return EXIT_OK
    mirror = dataclasses.replace(cfg, backup_root=target)
    open_backup_root(mirror)
    if same_disk(target, cfg.backup_root):
        log.warning("mirror: %s is on the same disk as %s: a disk failure loses both",
                    target, cfg.backup_root)
    with run_lock(mirror.lock_path) as held:
        if not held:
            log.info("another run holds %s; skipping this mirror run", mirror.lock_path)
            summary.outcome = MIRROR_SKIPPED_LOCK
            return EXIT_OK
        return locked_mirror(cfg, mirror, summary)


def mirror_failure_reason(error: BaseException) -> str:
    """Why a mirror run failed, in fixed words: error texts may name a ZIP (a patient)."""
    if isinstance(error, DiskSpaceProblem):
        return "stopped by %s on the mirror's disk (see its issues.csv)" % error.kind
    if isinstance(error, CannotRun):
        return "the mirror could not run (the log and stderr say why)"
    return "unexpected error %s (the log has the details)" % type(error).__name__


def mirror_report(target: str, summary: MirrorSummary,
                  error: Optional[BaseException]) -> RunReport:
    """What alerting makes of a mirror run: complete is its success."""
    kinds = dict(summary.issue_kinds)
    if error is not None:
        if isinstance(error, DiskSpaceProblem):
            kinds[error.kind] = max(1, kinds.get(error.kind, 0))
        status, reason = RUN_FAILED, mirror_failure_reason(error)
    elif summary.outcome == MIRROR_COMPLETE:
        status, reason = RUN_OK, ""
    elif summary.outcome == MIRROR_SKIPPED_LOCK:
        status, reason = RUN_SKIPPED, "skipped: another run holds the lock"
    elif summary.outcome == MIRROR_UNPLUGGED:
        status, reason = RUN_INCOMPLETE, "the mirror's disk was not connected"
    else:
        status, reason = RUN_INCOMPLETE, "%s left to copy" % plural(summary.left, "ZIP")
    free = free_bytes_of(target) if kinds.get(DISK_LOW) or kinds.get(DISK_FULL) else None
    return RunReport(status=status, reason=reason, kinds=kinds, free_bytes=free,
                     mirror=target)


def mirror_with_alerts(cfg: Config, target: str) -> int:
    """One mirror run, then its own alerts (MIRROR_BEHIND ...) and heartbeat."""
    summary = MirrorSummary()
    target = os.path.abspath(target)
    return run_with_alerts(cfg, lambda: mirror_command(cfg, target, summary),
                           lambda error: mirror_report(target, summary, error),
                           mirror_alert_job(target))


# =====================================================================================
# Operator commands: dry run, status, verify, reindex, retry, test-alert, acknowledge
# =====================================================================================
#
# What a person runs by hand. Commands that write wait for a running cycle
# (operator_lock); those that only read never take the lock.


@contextlib.contextmanager
def operator_lock(cfg: Config):
    """Commands that write wait for a running cycle to end (up to LOCK_WAIT_SECONDS)."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    told = False
    while True:
        with run_lock(cfg.lock_path) as held:
            if held:
                yield
                return
        if not told:
            log.info("a backup cycle is running; waiting for it to finish")
            told = True
        if time.monotonic() > deadline:
            raise CannotRun("a backup cycle has held %s for more than %d s; try again later"
                            % (cfg.lock_path, LOCK_WAIT_SECONDS))
        time.sleep(1)


def prepare_backup_root(cfg: Config) -> None:
    """What commands that write need: the sentinels, BACKUP_ROOT/.tmp and the log."""
    check_sentinels(cfg)
    open_backup_root(cfg)


def prepare_backup_alone(cfg: Config, purpose: str) -> int:
    """What reindex and restore --into-horos need: a writable BACKUP_ROOT, its .tmp and
    log, private as a cycle makes them. The PACS volume may be gone (a backup moved to a
    recovery disk): with its sentinel the usual checks apply; without it BACKUP_ROOT must
    already exist, so nothing is ever created on a disk that is not mounted. Returns
    the umask the user had."""
    if os.path.isfile(cfg.sentinel):
        check_sentinels(cfg)
    elif not os.path.isdir(cfg.backup_root):
        raise CannotRun("sentinel %s is missing and %s does not exist: is the PACS volume or "
                        "the backup disk mounted? (check --backup-root; nothing was done)"
                        % (cfg.sentinel, cfg.backup_root))
    if os.path.isdir(cfg.backup_root) and not os.access(cfg.backup_root, os.W_OK):
        raise CannotRun("%s is read-only, and %s records its progress in %s there: copy the "
                        "backup to a writable disk (find and restore --to DIR work on a "
                        "read-only one)" % (cfg.backup_root, purpose, STATE_FILE))
    return open_backup_root(cfg)


def read_state_view(cfg: Config) -> StateView:
    state = ExportState(cfg.state_path, cfg.busy_timeout, read_only=True)
    try:
        return state.view()
    finally:
        state.close()


# The words the dry run prints for what a cycle would do (README: --dry-run).
DRY_RUN_ACTIONS = {Outcome.EXPORTED: "export", Outcome.PARTIAL: "partial",
                   Outcome.DEFERRED: "defer", Outcome.NO_FILES: "fail"}


def dry_run(cfg: Config) -> int:
    """The studies the next cycle would export. Writes nothing: no lock, log, state or
    snapshot; Database.sql is read as the cycle reads it."""
    check_sentinels(cfg)
    now = time.time()
    view = read_state_view(cfg)
    capped = capped_at(cfg, now)
    snapshot = read_horos(cfg, view, now, cfg.database_path, capped)
    selection = snapshot.selection
    print("Dry run (nothing is written): %d studies ready to export, %d not settled, "
          "%d failed and waiting. The next cycle would do:"
          % (selection.pending, selection.unsettled, selection.waiting))
    if not capped:
        print("(outside clinic hours: it keeps exporting until --max-run-seconds %g; the "
              "first %d of the queue:)" % (cfg.max_run_seconds, len(snapshot.plans)))
    used = 0
    for plan in snapshot.plans:
        if capped and used >= cfg.batch_size:
            break
        present, missing, size = stat_files(plan.files)
        outcome = files_decision(len(present), len(missing),
                                 view.failures.get(plan.info.uid), cfg.missing_retries)
        action = DRY_RUN_ACTIONS[outcome]
        if outcome in (Outcome.NO_FILES, Outcome.DEFERRED):
            label = "-"                      # its slot goes to the next study
        else:
            used += 1
            label = "[%d/%d]" % (used, min(cfg.batch_size, len(snapshot.plans)) if capped
                                 else selection.pending)
            if outcome == Outcome.EXPORTED and plan.reason in Reason.REEXPORTS:
                action = "reexport"
        day = plan.info.study_datetime.date().isoformat() if plan.info.study_datetime \
            else UNKNOWN
        print("%-7s %-8s  %s  %s  %s  %s  %s  %s" % (
            label, action, plan.info.uid, plan.info.patient_name or UNKNOWN, day,
            "\\".join(plan.info.modalities) or UNKNOWN, plural(len(present), "file"),
            format_bytes(size)))
        print("%-7s -> %s" % ("", plan.zip_relpath))
        if missing:
            print("%-7s %d of %d files missing, e.g. %s"
                  % ("", len(missing), len(plan.files), missing[0]))
    if not snapshot.plans:
        print("(nothing to export)")
    return EXIT_OK


def gather_status(cfg: Config, now: float) -> dict:
    """Everything `status` shows, as plain values (the JSON of `status --json`).

    Without the PACS sentinel (a backup disk alone, a mirror, a restored offsite copy)
    it shows the backup side: the keys that need Horos are null."""
    horos_side = os.path.isfile(cfg.sentinel)
    if horos_side:
        check_sentinels(cfg)
    elif not os.path.isdir(cfg.backup_root):
        raise CannotRun("sentinel %s is missing and %s does not exist: is the PACS volume or "
                        "the backup disk mounted? (check --backup-root)"
                        % (cfg.sentinel, cfg.backup_root))
    state = ExportState(cfg.state_path, cfg.busy_timeout, read_only=True)
    try:
        view = state.view()
        totals = state.totals()
        exported_by_month = state.exported_by_month()
        runs = state.last_runs(50)
        restores = restore_targets_status(state)
        left_recent, left_total = state.left_counts(now - LEFT_RECENT_DAYS * 86400)
        mirrors = mirrors_status(state)
        mirror_of = state.meta(META_MIRROR_OF)
        mirror_complete_at = state.meta(META_MIRROR_COMPLETE_AT)
    finally:
        state.close()
    if not horos_side:
        status = backup_status(cfg, now, view, totals, exported_by_month, runs)
        return dict(status, restores=restores, mirrors=mirrors, mirror_of=mirror_of,
                    mirror_complete_at=mirror_complete_at,
                    left_horos=left_horos_status(left_recent, left_total, status["alerts"]))
    times = ReadTimes()
    with open_horos_reader(cfg.database_path, cfg.busy_timeout, cfg.horos_chunk_rows,
                           times) as reader:
        library = read_library(reader, view, now)
    studies = library.studies
    selection = plan_selection(studies, view.exported, known_changes(view.changed,
                                                                     library.marks),
                               view.failures, cfg.modalities, cfg.order_by, now,
                               cfg.settle_minutes * 60, limit=0, bases=view.bases)
    in_horos = {study.uid for study in studies}
    eligible_by_month = {month: counts[0] for month, counts in
                         month_completeness(studies, view.exported, cfg.modalities).items()}
    months = []
    for month in sorted(set(eligible_by_month) | set(exported_by_month)):
        months.append({
            "month": month, "eligible": eligible_by_month.get(month, 0),
            "exported": exported_by_month.get(month, 0),
            "done": os.path.exists(os.path.join(cfg.backup_root, month, MONTH_DONE_FILE))})
    exporting_runs = [r for r in runs if r["outcome"] == "ok" and r["studies"]]
    studies_per_run = (sum(r["studies"] for r in exporting_runs) / len(exporting_runs)
                       if exporting_runs else float(cfg.batch_size))
    busy_seconds = sum(r["seconds"] for r in exporting_runs)
    backlog = selection.pending + selection.unsettled
    inside, outside = cycle_capacity(cfg, exporting_runs)
    cycles = cycles_to_drain(backlog, config_schedule(cfg), dt.datetime.fromtimestamp(now), inside,
                             outside, LAUNCHD_INTERVAL_SECONDS)
    held, pid = lock_holder(cfg.lock_path)
    usage = os.statvfs(nearest_existing(cfg.backup_root))
    waiting = sorted((f for f in view.failures.values() if f.next_attempt > now),
                     key=lambda f: (f.next_attempt, f.study_uid))
    alerts = alert_status(cfg)
    return {
        "generated_at": utc_iso(now),
        "backup_root": cfg.backup_root,
        "eligible": selection.eligible,
        "exported": totals.exported,
        "up_to_date": selection.up_to_date,
        "pending": selection.pending,
        "changed": selection.changed,
        "edited": selection.edited,
        "unsettled": selection.unsettled,
        "failed": len(view.failures),
        "waiting": selection.waiting,
        "partial": totals.partial,
        "only_in_backup": sum(1 for uid in view.exported if uid not in in_horos),
        "left_horos": left_horos_status(left_recent, left_total, alerts),
        "bytes": totals.zip_bytes,
        "failures": [{"study_uid": f.study_uid, "kind": f.kind, "attempts": f.attempts,
                      "next_attempt_at": utc_iso(f.next_attempt)} for f in waiting],
        "months": months,
        "last_runs": runs[:10],
        "throughput": {
            "studies_per_run": round(studies_per_run, 2),
            "bytes_per_second": round(sum(r["source_bytes"] for r in exporting_runs)
                                      / busy_seconds) if busy_seconds else None,
        },
        "eta_seconds": int(cycles * LAUNCHD_INTERVAL_SECONDS),
        "clinic": {"hours": cfg.clinic_hours, "days": cfg.clinic_days,
                   "batch_size": cfg.batch_size,
                   "now": capped_at(cfg, now),
                   "studies_per_cycle": round(inside, 2),
                   "studies_per_cycle_outside": round(outside, 2)},
        "lock": {"held": held, "pid": pid},
        "sentinel": {"path": cfg.sentinel, "present": os.path.isfile(cfg.sentinel)},
        "backup_free_bytes": usage.f_bavail * usage.f_frsize,
        "horos_read_seconds": round(times.seconds, 3),
        "horos_longest_seconds": round(times.longest, 4),
        "horos_transactions": times.transactions,
        **preferences_status(cfg),
        "restores": restores,
        "mirrors": mirrors,
        "mirror_of": mirror_of,
        "mirror_complete_at": mirror_complete_at,
        "backup_only": False,
        "alerts": alerts,
    }


def left_horos_status(recent: int, total: int, alerts: Mapping) -> dict:
    """The `left_horos` of `status --json`: counted from the state, so it needs no
    Horos; whether LIBRARY_SHRANK is open comes from the alert bookkeeping."""
    return {"recent": recent, "total": total,
            "library_shrank": LIBRARY_SHRANK in alerts["open_problems"]}


def backup_status(cfg: Config, now: float, view: StateView, totals: StateTotals,
                  exported_by_month: Mapping[str, int], runs: List[Dict[str, object]]
                  ) -> dict:
    """status without the Horos side: every key of gather_status, those that need
    Horos null, `backup_only` true."""
    held, pid = lock_holder(cfg.lock_path)
    usage = os.statvfs(nearest_existing(cfg.backup_root))
    waiting = sorted((f for f in view.failures.values() if f.next_attempt > now),
                     key=lambda f: (f.next_attempt, f.study_uid))
    exporting_runs = [r for r in runs if r["outcome"] == "ok" and r["studies"]]
    busy_seconds = sum(r["seconds"] for r in exporting_runs)
    return {
        "generated_at": utc_iso(now), "backup_root": cfg.backup_root, "eligible": None,
        "exported": totals.exported, "up_to_date": None, "pending": None, "changed": None,
        "edited": None, "unsettled": None, "failed": len(view.failures), "waiting": len(waiting),
        "partial": totals.partial, "only_in_backup": None, "bytes": totals.zip_bytes,
        "failures": [{"study_uid": f.study_uid, "kind": f.kind, "attempts": f.attempts,
                      "next_attempt_at": utc_iso(f.next_attempt)} for f in waiting],
        "months": [{"month": month, "eligible": None, "exported": count,
                    "done": os.path.exists(os.path.join(cfg.backup_root, month,
                                                        MONTH_DONE_FILE))}
                   for month, count in sorted(exported_by_month.items())],
        "last_runs": runs[:10],
        "throughput": {
            "studies_per_run": round(sum(r["studies"] for r in exporting_runs)
                                     / len(exporting_runs), 2) if exporting_runs else None,
            "bytes_per_second": round(sum(r["source_bytes"] for r in exporting_runs)
                                      / busy_seconds) if busy_seconds else None},
        "eta_seconds": None, "clinic": None,
        "lock": {"held": held, "pid": pid},
        "sentinel": {"path": cfg.sentinel, "present": False},
        "backup_free_bytes": usage.f_bavail * usage.f_frsize,
        "horos_read_seconds": None, "horos_longest_seconds": None,
        "horos_transactions": None, "horos_preferences": None, "reserve": None,
        "backup_only": True, "alerts": alert_status(cfg),
    }


def mirrors_status(state: ExportState) -> List[dict]:
    """The `mirrors` of `status --json`: each folder `mirror --to DIR` fed from here."""
    return [{"target": m.target, "studies": m.studies, "behind": m.behind,
             "last_run_at": m.last_run_at, "last_complete_at": m.last_complete_at}
            for m in state.mirrors()]


def preferences_status(cfg: Config) -> dict:
    """The `horos_preferences` and `reserve` entries of `status --json`."""
    prefs = cfg.horos_prefs
    reserve, _free, _total = backup_space(cfg, cfg.backup_root)
    return {
        "horos_preferences": {
            "path": prefs.path, "found": prefs.found, "folder_size": prefs.folder_size,
            "auto_cleaning": prefs.auto_cleaning,
            "auto_cleaning_size": prefs.auto_cleaning_size},
        "reserve": {"bytes": reserve.bytes, "source": reserve.source,
                    "detail": reserve.detail,
                    "horos_threshold_bytes": reserve.horos_threshold},
    }


def restore_targets_status(state: ExportState) -> List[dict]:
    """The `restores` of `status --json`: each library restore --into-horos feeds."""
    return [{"target": t.target, "selection": t.selection, "left": t.left,
             "last_run_at": t.last_run_at, "restored": t.restored,
             "in_progress": t.left > 0}
            for t in state.restore_targets()]


def cycle_capacity(cfg: Config, exporting_runs: Sequence[Mapping]) -> Tuple[float, float]:
    """Studies a cycle exports inside and outside clinic hours, for the ETA.

    From the recent cycles that exported: a capped cycle does what they did (up to
    BATCH_SIZE), an uncapped one what fits in MAX_RUN_SECONDS (at most launchd's
    interval) at their seconds per study. With no history, BATCH_SIZE either way.
    """
    studies = sum(r["studies"] for r in exporting_runs)
    if not studies:
        return float(cfg.batch_size), float(cfg.batch_size)
    inside = (sum(min(r["studies"], cfg.batch_size) for r in exporting_runs)
              / len(exporting_runs))
    per_study = max(sum(r["seconds"] for r in exporting_runs) / studies, 1e-3)
    budget = min(cfg.max_run_seconds or LAUNCHD_INTERVAL_SECONDS, LAUNCHD_INTERVAL_SECONDS)
    # A cycle starts its last study before the limit and always exports one.
    return inside, max(inside, math.floor(budget / per_study) + 1.0)


def format_eta(seconds: int) -> str:
    if seconds <= 0:
        return "nothing left to export"
    if seconds < 2 * 3600:
        return "about %d minutes" % -(-seconds // 60)
    if seconds < 3 * 86400:
        return "about %.0f hours" % (seconds / 3600)
    return "about %.0f days" % (seconds / 86400)


def print_status(status: Mapping) -> None:
    def line(label, text):
        print("  %-16s %s" % (label, text))

    print("Horos backup status, %s" % local_time_text(status["generated_at"]))
    line("backup", status["backup_root"])
    line("PACS sentinel", ("present " if status["sentinel"]["present"] else "MISSING ")
         + status["sentinel"]["path"])
    lock = status["lock"]
    line("lock", "held by a running cycle (pid %s)" % lock["pid"] if lock["held"] else "free")
    line("free space", format_bytes(status["backup_free_bytes"]))
    if status["reserve"]:
        line("reserve", "%s (%s)" % (format_bytes(status["reserve"]["bytes"]),
                                     status["reserve"]["detail"]))
    if status["mirror_of"]:
        line("mirror of", "%s (complete at %s)" % (
            status["mirror_of"], local_time_text(status["mirror_complete_at"])
            if status["mirror_complete_at"] else "never complete yet"))
    if status["backup_only"]:
        print_backup_only_status(status)
        return
    print("Studies")
    line("eligible", "%d CT/MR studies in Horos" % status["eligible"])
    line("exported", "%d (%s of ZIPs)" % (status["exported"], format_bytes(status["bytes"])))
    line("pending", "%d ready to export (%d of them changed since their export, %d of them "
         "edited in Horos)" % (status["pending"], status["changed"], status["edited"]))
    line("not settled", "%d (Horos added to them, or the reader edited them, in the last "
         "minutes)" % status["unsettled"])
    line("failed", "%d (%d waiting for their next attempt)"
         % (status["failed"], status["waiting"]))
    line("partial", "%d (exported without some missing files)" % status["partial"])
    line("only in backup", "%d (no longer in Horos)" % status["only_in_backup"])
    left = status["left_horos"]
    line("left Horos", "%d in the last %d days, %d in all (find --left-horos lists them)"
         % (left["recent"], LEFT_RECENT_DAYS, left["total"]))
    shrank = status["alerts"]["open_problems"].get(LIBRARY_SHRANK)
    line(LIBRARY_SHRANK, "open since %s (%s still gone; if the library really shrank: "
         "acknowledge-shrink)" % (local_time_text(shrank["since"]), shrank["count"])
         if shrank else "not open")
    rate = status["throughput"]["bytes_per_second"]
    clinic = status["clinic"]
    if status["eta_seconds"]:
        line("backlog", "%s at %.1f studies per cycle every %d minutes in clinic hours, "
             "%.0f outside them" % (
                 format_eta(status["eta_seconds"]), clinic["studies_per_cycle"],
                 LAUNCHD_INTERVAL_SECONDS // 60, clinic["studies_per_cycle_outside"]))
    else:
        line("backlog", "none: every settled study is exported")
    line("clinic hours", "%s, %s (now %s: %s)" % (
        clinic["hours"], clinic["days"], "inside" if clinic["now"] else "outside",
        "up to %d studies per cycle" % clinic["batch_size"] if clinic["now"]
        else "exporting until --max-run-seconds"))
    if rate:
        line("throughput", "%.1f MB/s while exporting" % (rate / 1e6))
    last = status["last_runs"][0] if status["last_runs"] else None
    if last and last.get("horos_longest_seconds") is not None:
        line("Horos reads", "last cycle %.2f s in %d transactions, the longest %.1f ms; "
             "this status %.2f s, the longest %.1f ms" % (
                 last["horos_seconds"] or 0.0, last["horos_transactions"] or 0,
                 last["horos_longest_seconds"] * 1000, status["horos_read_seconds"],
                 status["horos_longest_seconds"] * 1000))
    else:
        line("Horos reads", "this status %.2f s in %d transactions, the longest %.1f ms" % (
            status["horos_read_seconds"], status["horos_transactions"],
            status["horos_longest_seconds"] * 1000))
    if status["failures"]:
        print("Failed studies, next attempt")
        for failure in status["failures"]:
            print("  %-44s %-15s %2d attempts  next %s" % (
                failure["study_uid"], failure["kind"], failure["attempts"],
                local_time_text(failure["next_attempt_at"])))
    print("Months")
    print("  %-16s %8s  %8s" % ("", "eligible", "exported"))
    for month in status["months"]:
        print("  %-16s %8d  %8d  %s" % (month["month"], month["eligible"], month["exported"],
                                        "done" if month["done"] else ""))
    print("Last runs")
    for run in status["last_runs"]:
        print("  %s  %-16s %3d studies  %10s  %6.1f s%s" % (
            local_time_text(run["started_at"]), run["outcome"], run["studies"],
            format_bytes(run["zip_bytes"]), run["seconds"],
            "  (%d failed)" % run["failed"] if run["failed"] else ""))
    if not status["last_runs"]:
        print("  (no cycle has run yet)")
    print_status_tail(status)


def print_status_tail(status: Mapping) -> None:
    """The restores, mirrors and alerts that end `status`, with or without Horos."""
    if status["restores"]:
        print("Restores into Horos (restore --into-horos)")
        for feeding in status["restores"]:
            print("  %s: %d studies restored, %s (%s), last run %s" % (
                feeding["target"], feeding["restored"],
                "%d left" % feeding["left"] if feeding["in_progress"] else "done",
                feeding["selection"], local_time_text(feeding["last_run_at"])))
    if status["mirrors"]:
        print("Mirrors (mirror --to DIR)")
        for mirror in status["mirrors"]:
            print("  %s: %s, %s behind, last complete %s, last run %s" % (
                mirror["target"], plural(mirror["studies"], "ZIP"),
                plural(mirror["behind"], "study", "studies"),
                local_time_text(mirror["last_complete_at"]) if mirror["last_complete_at"]
                else "never", local_time_text(mirror["last_run_at"])))
    print_alert_status(status["alerts"])


def print_backup_only_status(status: Mapping) -> None:
    """status of a backup alone: what the state says, no Horos figures."""
    def line(label, text):
        print("  %-16s %s" % (label, text))

    line("Horos", "not read: %s is missing (the backup alone)" % status["sentinel"]["path"])
    print("Studies")
    line("exported", "%d (%s of ZIPs)" % (status["exported"], format_bytes(status["bytes"])))
    line("failed", "%d (%d waiting for their next attempt)"
         % (status["failed"], status["waiting"]))
    line("partial", "%d (exported without some missing files)" % status["partial"])
    left = status["left_horos"]
    line("left Horos", "%d in the last %d days, %d in all, as the last cycle saw Horos "
         "(find --left-horos lists them)" % (left["recent"], LEFT_RECENT_DAYS,
                                             left["total"]))
    print("Months")
    print("  %-16s %8s" % ("", "exported"))
    for month in status["months"]:
        print("  %-16s %8d  %s" % (month["month"], month["exported"],
                                   "done" if month["done"] else ""))
    print("Last runs")
    for run in status["last_runs"]:
        print("  %s  %-16s %3d studies  %10s  %6.1f s" % (
            local_time_text(run["started_at"]), run["outcome"], run["studies"],
            format_bytes(run["zip_bytes"]), run["seconds"]))
    if not status["last_runs"]:
        print("  (no cycle has run here)")
    print_status_tail(status)


def status_command(cfg: Config, as_json: bool) -> int:
    status = gather_status(cfg, time.time())
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print_status(status)
    return EXIT_OK


def verify_command(cfg: Config, verify_all: bool, limit: Optional[int],
                   max_gb: Optional[float]) -> VerifyResult:
    """Re-read ZIPs oldest-verified first, and say which are bad. Needs no PACS volume:
    it works on a backup disk alone, a mirror or a restored offsite copy."""
    prepare_backup_alone(cfg, "verify")
    if not verify_all and limit is None and max_gb is None:
        limit = VERIFY_DEFAULT_LIMIT
    started = time.monotonic()
    with operator_lock(cfg):
        state = ExportState(cfg.state_path, cfg.busy_timeout)
        try:
            result = verify_exported(cfg, state, IssueLog(cfg.issues_path),
                                     None if verify_all else limit,
                                     int(max_gb * GB) if max_gb is not None else None,
                                     time.time(), Progress(sys.stdout))
        finally:
            state.close()
    log.info("verify: %d ZIPs read (%s) in %.1f s: %d good, %d bad",
             result.good + len(result.bad), format_bytes(result.bytes_read),
             time.monotonic() - started, result.good, len(result.bad))
    for relpath, problem in result.bad:
        print("BAD %s: %s" % (relpath, problem))
    return result


def verify_with_alerts(cfg: Config, verify_all: bool, limit: Optional[int],
                       max_gb: Optional[float]) -> int:
    """`verify`; damaged ZIPs alert at once (no heartbeat: this was no cycle). Exit 1 if
    any ZIP is missing or damaged."""
    result = verify_command(cfg, verify_all, limit, max_gb)
    if result.bad and cfg.alerts.channels:
        alert_after_run(cfg, RunReport(status=RUN_COMMAND,
                                       kinds={VERIFY_FAILED: len(result.bad)}),
                        heartbeat=False)
    return EXIT_FAILED if result.bad else EXIT_OK


def reindex_command(cfg: Config) -> int:
    """Rebuild export_state.sqlite from the manifests of the ZIPs on disk.

    The old file is kept as export_state.sqlite.before-reindex. Manifests are read, not
    every member: the rebuilt rows have no verified_at, so `verify` and the cycles'
    re-reads take them first.
    """
    prepare_backup_alone(cfg, "reindex")
    started = time.monotonic()
    issues = IssueLog(cfg.issues_path)
    with operator_lock(cfg):
        rows: Dict[str, dict] = {}
        sr_files: Dict[str, List[WatchedFile]] = {}
        duplicates: List[str] = []
        unreadable = 0
        for month in sorted(os.listdir(cfg.backup_root)):
            folder = os.path.join(cfg.backup_root, month)
            if not MONTH_FOLDER.match(month) or not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if name.endswith(".zip" + PART_SUFFIX):
                    remove_if_present(path)  # we hold the lock: no write is under way
                    log.info("removed partial %s/%s", month, name)
                    continue
                if not name.endswith(".zip"):
                    continue
                relpath = month + "/" + name
                try:
                    with zipfile.ZipFile(path) as archive:
                        manifest = read_manifest(archive)
                        record = export_record(manifest, relpath, os.path.getsize(path), None)
                        watched = watched_sr_files(manifest)
                except ZIP_READ_ERRORS as error:
                    unreadable += 1
                    log.error("reindex: %s has no readable manifest (%s); left out",
                              relpath, error)
                    issues.add(UNREADABLE_ZIP, "", str(error), relpath)
                    continue
                previous = rows.get(record["study_uid"])
                if previous is not None:
                    keep, other = sorted((previous, record),
                                         key=lambda r: r["exported_at"])[::-1]
                    duplicates.append(other["zip_path"])
                    log.warning("reindex: %s and %s hold the same study; keeping the newer",
                                keep["zip_path"], other["zip_path"])
                    if keep is previous:
                        continue
                rows[record["study_uid"]] = record
                sr_files[record["study_uid"]] = watched
        rebuilt = cfg.state_path + ".reindex"
        for leftover in (rebuilt, rebuilt + "-journal"):
            remove_if_present(leftover)
        state = ExportState(rebuilt, cfg.busy_timeout)
        try:
            state.replace_exported(list(rows.values()),
                                   [f for uid in rows for f in sr_files[uid]])
            carry_over_restores(cfg.state_path, state)
        finally:
            state.close()
        if os.path.exists(cfg.state_path):
            # A journal belongs to its database file: they move together.
            for suffix in ("", "-journal"):
                if os.path.exists(cfg.state_path + suffix):
                    os.replace(cfg.state_path + suffix,
                               cfg.state_path + ".before-reindex" + suffix)
        os.replace(rebuilt, cfg.state_path)
        sync_directory(cfg.backup_root)
    log.info("reindex: %d studies from their ZIPs in %.1f s (%d duplicates left in place, "
             "%d unreadable ZIPs left out)", len(rows), time.monotonic() - started,
             len(duplicates), unreadable)
    return EXIT_FAILED if unreadable else EXIT_OK


def carry_over_restores(old_path: str, state: ExportState) -> None:
    """Keep the restore progress of the state reindex replaces: without it, a feeding
    under way would give Horos every study a second time."""
    if not os.path.exists(old_path):
        return
    try:
        old = ExportState(old_path, read_only=True)
    except CannotRun as error:
        log.warning("reindex: the restore progress in the old state is lost: %s", error)
        return
    try:
        state.copy_restores_from(old)
    except sqlite3.Error as error:
        log.warning("reindex: the restore progress in the old state is lost: %s", error)
    finally:
        old.close()


def retry_command(cfg: Config, study_uids: Sequence[str]) -> int:
    """Clear the back-off of failed studies (all of them when none are named)."""
    prepare_backup_root(cfg)
    with operator_lock(cfg):
        state = ExportState(cfg.state_path, cfg.busy_timeout)
        try:
            failures = state.failures()
            cleared = state.retry_now(study_uids or sorted(failures), time.time())
        finally:
            state.close()
    for uid in cleared:
        print("will retry at the next cycle: %s (%s, %s)" % (
            uid, failures[uid].kind, plural(failures[uid].attempts, "attempt")))
    unknown = [uid for uid in study_uids if uid not in cleared]
    for uid in unknown:
        print("horos_backup_export: %s has no failure to retry" % uid, file=sys.stderr)
    if not failures and not study_uids:
        print("no failed studies")
    return EXIT_FAILED if unknown else EXIT_OK


def test_alert_command(cfg: Config) -> int:
    """Send one test message by every configured channel; never the heartbeat."""
    alerts = cfg.alerts
    if alerts is None or not alerts.channels:
        raise CannotRun("no alert channel configured: give --alert-email with --smtp-host, "
                        "or --alert-command")
    host = socket.gethostname()
    subject = "[Horos backup] TEST on %s" % host
    body = "\n".join(["A test of horos_backup_export's alerts: if you read this, alerts "
                      "reach you.", ""] + alert_footer(cfg, host)) + "\n"
    sent, failed = deliver(alerts, subject, body, Deadline(ALERT_BUDGET_SECONDS), 0)
    for channel in sent:
        print("test alert sent by %s%s" % (channel, " to " + ", ".join(alerts.emails)
                                           if channel == "email" else ""))
    for channel, why in failed:
        print("horos_backup_export: test alert by %s failed: %s" % (channel, why),
              file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def acknowledge_shrink_command(cfg: Config) -> int:
    """The library really shrank: close LIBRARY_SHRANK (its RESOLVED goes out now by the
    channels given, or with the next cycle's alerts). Its studies stay in the backup and
    in find --left-horos; exit 1 when no LIBRARY_SHRANK is open."""
    path = alert_book_path()
    book = load_alert_book(path)
    incident = book.problems.get(LIBRARY_SHRANK)
    if incident is None:
        raise CannotRun("no %s is open in %s: nothing to acknowledge"
                        % (LIBRARY_SHRANK, path))
    report = RunReport(status=RUN_COMMAND, acknowledged=(LIBRARY_SHRANK,))
    if cfg.alerts.channels:
        alert_after_run(cfg, report, heartbeat=False)
    else:
        with alert_book_lock(path):
            save_alert_book(path, decide_alerts(load_alert_book(path), report, time.time(),
                                                cfg.alerts.after_hours * 3600).book)
    print("%s (open since %s, %s still gone) acknowledged: the library really shrank. "
          "The backup keeps every study; find --left-horos lists them."
          % (LIBRARY_SHRANK, local_time_text(incident.since),
             plural(incident.count, "study", "studies")))
    return EXIT_OK


# =====================================================================================
# Doctor: a read-only check of the installation, end to end
# =====================================================================================
#
# Meant for the day the script is installed and for any day something looks wrong. It
# writes nothing at all (no folder, log, lock, state or database snapshot), so it is
# safe on a volume that is not mounted and next to a running cycle; Database.sql is
# read in short read transactions of index lookups.

CHECK_OK, CHECK_WARN, CHECK_FAIL, CHECK_SKIP = "ok", "warn", "fail", "skip"
PATH_SAMPLE_SIZE = 200            # image rows whose files the path rule must find
PATH_SAMPLE_GROUP = 50            # sampled rows looked up per read transaction
FOLDER_SIZES_TRIED = (1000, 5000, 10000, 20000, 50000, 100000)
FAT_FILE_SYSTEMS = frozenset({"msdos", "vfat", "fat", "fat12", "fat16", "fat32", "umsdos"})
LAUNCHD_LABEL = "com.horos.backup"
MIN_PYTHON = (3, 8)
LAUNCH_AGENT_PLIST = "~/Library/LaunchAgents/com.horos.backup.plist"

# A successful cycle older than this means launchd is not running the job.
LAST_CYCLE_LATE_SECONDS = 3 * LAUNCHD_INTERVAL_SECONDS + MAX_RUN_SECONDS


@dataclass(frozen=True)
class Check:
    name: str
    status: str                      # CHECK_OK, CHECK_WARN, CHECK_FAIL or CHECK_SKIP
    detail: str


def sample_targets(low: int, high: int, count: int) -> List[int]:
    """Up to count Z_PK values spread evenly from low to high, both included."""
    if high - low + 1 <= count:
        return list(range(low, high + 1))
    return sorted({low + (high - low) * i // (count - 1) for i in range(count)})


def sentinel_checks(cfg: Config) -> List[Check]:
    checks = []
    if os.path.isfile(cfg.sentinel):
        checks.append(Check("pacs_sentinel", CHECK_OK, "%s present" % cfg.sentinel))
    else:
        checks.append(Check("pacs_sentinel", CHECK_FAIL, "%s is missing: mount the PACS "
                            "volume; on a new install create it with `touch %s`"
                            % (cfg.sentinel, cfg.sentinel)))
    parent = os.path.dirname(cfg.backup_root)
    backup_sentinel = os.path.join(parent, BACKUP_SENTINEL_NAME)
    if not os.path.isdir(parent):
        checks.append(Check("backup_sentinel", CHECK_FAIL, "%s does not exist: is the backup "
                            "disk mounted? (a cycle never creates it)" % parent))
    elif same_disk(cfg.backup_root, cfg.pacs_root):
        checks.append(Check("backup_sentinel", CHECK_SKIP, "BACKUP_ROOT is on the PACS "
                            "volume: no %s needed" % BACKUP_SENTINEL_NAME))
    elif os.path.isfile(backup_sentinel):
        checks.append(Check("backup_sentinel", CHECK_OK, "%s present" % backup_sentinel))
    else:
        checks.append(Check("backup_sentinel", CHECK_FAIL, "%s is on another disk than %s "
                            "and %s is missing: mount the backup disk; on a new install "
                            "create it with `touch %s`" % (cfg.backup_root, cfg.pacs_root,
                                                           backup_sentinel, backup_sentinel)))
    return checks


def preferences_check(cfg: Config, prefs: HorosPreferences) -> Check:
    if prefs.problem:
        return Check("horos_preferences", CHECK_FAIL, "%s; fix the file or pass --horos-prefs "
                     "with the preferences of the user who runs Horos" % prefs.problem)
    usage = os.statvfs(nearest_existing(cfg.horos_data))
    threshold = auto_cleaning_threshold(prefs.auto_cleaning_size,
                                        usage.f_blocks * usage.f_frsize)
    cleaning = describe_auto_cleaning(prefs)
    if prefs.auto_cleaning and prefs.auto_cleaning_size < 0:
        cleaning += " (%s on the library's volume)" % format_bytes(threshold)
    settings = "folder size %d, library %s, %s" % (
        prefs.folder_size, horos_data_folder(prefs, os.path.expanduser("~")), cleaning)
    if not prefs.found:
        return Check("horos_preferences", CHECK_WARN, "no Horos preferences at %s: Horos's "
                     "defaults assumed (%s); if Horos runs as another user, pass "
                     "--horos-prefs /Users/<that user>/Library/Preferences/"
                     "org.horosproject.horos.plist" % (prefs.path, settings))
    return Check("horos_preferences", CHECK_OK, "%s: %s" % (prefs.path, settings))


def horos_data_check(cfg: Config, prefs: HorosPreferences) -> Check:
    used = horos_data_folder(prefs, os.path.expanduser("~"))
    if not os.path.isdir(cfg.horos_data):
        hint = (" (Horos's preferences name %s)" % used) if prefs.found else ""
        return Check("horos_data", CHECK_FAIL, "%s does not exist: is the volume mounted, or "
                     "is --horos-data/--pacs-root wrong?%s" % (cfg.horos_data, hint))
    if prefs.found and os.path.normpath(used) != os.path.normpath(cfg.horos_data):
        return Check("horos_data", CHECK_WARN, "this backup reads %s, but Horos's preferences "
                     "name %s: drop --horos-data/--pacs-root to follow Horos, or check "
                     "Horos → Settings → Database" % (cfg.horos_data, used))
    return Check("horos_data", CHECK_OK, "%s%s" % (cfg.horos_data, " (as Horos's preferences "
                                                    "say)" if prefs.found else ""))


def read_path_sample(cfg: Config) -> Tuple[List[ImageRow], str]:
    """(sampled ZIMAGE rows, what the read saw), in short read transactions as a cycle
    reads: the tables and columns, the row ranges, then the sample a group at a time."""
    started = time.monotonic()
    times = ReadTimes()
    with open_horos_reader(cfg.database_path, cfg.busy_timeout, times=times) as reader:
        ranges = reader.table_ranges()
        targets = sample_targets(ranges.first_image, ranges.last_image, PATH_SAMPLE_SIZE) \
            if ranges.first_image is not None else []
        rows = reader.images_at_or_after(targets, PATH_SAMPLE_GROUP)
    seen_text = "readable, with every table and column needed; study rows Z_PK %s to %s, " \
                "image rows %s to %s; read in %.3f s (%d read transactions, the longest " \
                "%.1f ms)" % (ranges.first_study, ranges.last_study, ranges.first_image,
                              ranges.last_image, time.monotonic() - started,
                              times.transactions, times.longest * 1000)
    return rows, seen_text


def unmounted_volume(path: str, exists) -> Optional[str]:
    """/Volumes/X for a path on a macOS volume that is not mounted, else None."""
    parts = path.split("/")
    if len(parts) > 2 and parts[1] == "Volumes" and parts[2]:
        volume = "/Volumes/" + parts[2]
        if not exists(volume):
            return volume
    return None


def missing_files_cause(rows: Sequence[ImageRow], files_dir: str,
                        folder_size: int, exists, prefs_files_dir: Optional[str]) -> str:
    """The likely reason sampled files are not where the path rule puts them."""
    in_place = [r for r in rows
                if as_int(r.path_number) is None and as_text(r.path_string).startswith("/")]
    in_database = [r for r in rows if r not in in_place]
    missing_in_place = [as_text(r.path_string) for r in in_place
                        if not exists(as_text(r.path_string))]

    def found_with(folder: str, size: int) -> int:
        return sum(1 for r in in_database
                   if exists(resolve_image_path(folder, r.path_number, r.path_string, size)
                             or ""))

    missing_in_database = len(in_database) - found_with(files_dir, folder_size)
    if len(missing_in_place) > missing_in_database:
        volumes = sorted({v for v in (unmounted_volume(p, exists) for p in missing_in_place)
                          if v})
        if volumes:
            return ("files added to Horos in place (not copied into the database) are on "
                    "%s, which is not mounted: mount it" % ", ".join(volumes))
        return ("files added to Horos in place (not copied into the database) are missing, "
                "e.g. %s: they were moved or deleted outside Horos" % missing_in_place[0])
    sizes = sorted(set(FOLDER_SIZES_TRIED) | {folder_size})
    found = {size: found_with(files_dir, size) for size in sizes}
    best = max(sizes, key=lambda size: (found[size], size == folder_size))
    if found[best] > found[folder_size]:
        return ("the files are laid out with folder size %d (%d of %d sampled files found "
                "that way) but the preference DefaultFolderSizeForDB says %d: pass "
                "--horos-prefs with the preferences of the user who runs Horos"
                % (best, found[best], len(in_database), folder_size))
    if prefs_files_dir and os.path.normpath(prefs_files_dir) != os.path.normpath(files_dir) \
            and found_with(prefs_files_dir, folder_size) > found[folder_size]:
        return ("the files are in %s, the Horos Data folder Horos's preferences name: drop "
                "--horos-data/--pacs-root or point it there" % os.path.dirname(prefs_files_dir))
    if not exists(files_dir):
        return ("there is no %s: is %s the Horos Data folder Horos uses?"
                % (files_dir, os.path.dirname(files_dir)))
    return ("they are not in %s: is %s the Horos Data folder that belongs to this "
            "Database.sql?" % (files_dir, os.path.dirname(files_dir)))


def path_rule_check(rows: Sequence[ImageRow], files_dir: str,
                    folder_size: int, exists=os.path.exists,
                    prefs_files_dir: Optional[str] = None) -> Check:
    """Whether the files of sampled image rows are where the path rule says."""
    if not rows:
        return Check("path_rule", CHECK_SKIP, "Database.sql holds no image rows yet")
    paths = [resolve_image_path(files_dir, r.path_number, r.path_string, folder_size)
             for r in rows]
    missing = [p or "(no path)" for p in paths if not p or not exists(p)]
    span = "Z_PK %d to %d" % (rows[0].pk, rows[-1].pk)
    if not missing:
        return Check("path_rule", CHECK_OK, "all %d sampled image rows (%s) have their file, "
                     "with folder size %d" % (len(rows), span, folder_size))
    cause = missing_files_cause(rows, files_dir, folder_size, exists, prefs_files_dir)
    if len(missing) * 2 > len(rows):
        return Check("path_rule", CHECK_FAIL, "%d of %d sampled image rows (%s) have no file "
                     "(e.g. %s): nothing would be backed up; %s"
                     % (len(missing), len(rows), span, missing[0], cause))
    return Check("path_rule", CHECK_WARN, "%d of %d sampled image rows (%s) have no file "
                 "(e.g. %s); their studies would be exported without them; %s"
                 % (len(missing), len(rows), span, missing[0], cause))


def horos_checks(cfg: Config, prefs: HorosPreferences) -> List[Check]:
    try:
        rows, seen = read_path_sample(cfg)
    except HorosUnreadable as error:
        return [Check("horos_database", CHECK_FAIL, str(error)),
                Check("path_rule", CHECK_SKIP, "Database.sql could not be read")]
    prefs_files_dir = os.path.join(horos_data_folder(prefs, os.path.expanduser("~")),
                                   HOROS_FILES_DIR) if prefs.found else None
    return [Check("horos_database", CHECK_OK, "%s %s" % (cfg.database_path, seen)),
            path_rule_check(rows, cfg.horos_files_dir, cfg.folder_size,
                            prefs_files_dir=prefs_files_dir)]


def parse_proc_mounts(text: str) -> List[Tuple[str, str]]:
    """(mount point, type) from Linux's /proc/mounts."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            # /proc/mounts writes a space in a mount point as \040.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            mounts.append((point, fields[2]))
    return mounts


def parse_mount_output(text: str) -> List[Tuple[str, str]]:
    """(mount point, type) from macOS's `mount`:
    `/dev/disk4s1 on /Volumes/BACKUP (msdos, local, nodev, nosuid, noowners)`."""
    matches = (re.match(r"^.+? on (.+) \(([^,()]+)", line) for line in text.splitlines())
    return [(m.group(1), m.group(2).strip()) for m in matches if m]


def mount_table() -> List[Tuple[str, str]]:
    """(mount point, file system type) of every mount; empty when unknown."""
    if os.path.isfile("/proc/mounts"):             # Linux; macOS has mount(8) only
        try:
            with open("/proc/mounts", encoding="utf-8", errors="replace") as handle:
                return parse_proc_mounts(handle.read())
        except OSError as error:
            log.debug("cannot read /proc/mounts: %s", error)
            return []
    try:
        output = subprocess.run(["mount"], capture_output=True, text=True, timeout=10,
                                check=False).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.debug("cannot list mounts: %s", error)
        return []
    return parse_mount_output(output)


def file_system_type(path: str, mounts: Sequence[Tuple[str, str]]) -> Optional[str]:
    """The type of the file system holding path, by the longest mount point above it."""
    real = os.path.realpath(nearest_existing(path))
    best: Optional[Tuple[str, str]] = None
    for point, kind in mounts:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, kind)
    return best[1] if best else None


def disk_checks(cfg: Config, now: float) -> List[Check]:
    checks = []
    reserve, free, _total = backup_space(cfg, cfg.backup_root)
    if free < reserve.bytes:
        checks.append(Check("free_space", CHECK_FAIL, "%s free on the backup volume, below the "
                            "%s reserve (%s): cycles stop with DISK_LOW until there is room"
                            % (format_bytes(free), format_bytes(reserve.bytes),
                               reserve.detail)))
    else:
        checks.append(Check("free_space", CHECK_OK, "%s free on the backup volume; reserve "
                            "%s (%s)" % (format_bytes(free), format_bytes(reserve.bytes),
                                         reserve.detail)))
    if same_disk(cfg.backup_root, cfg.horos_data):
        checks.append(Check("same_disk", CHECK_WARN, "%s is on the same disk as the Horos "
                            "library: a disk failure loses both; put the backup on another "
                            "disk (--backup-root /Volumes/BACKUP/Horos)" % cfg.backup_root))
    else:
        checks.append(Check("same_disk", CHECK_OK, "%s is on another disk than the Horos "
                            "library" % cfg.backup_root))
    kind = file_system_type(cfg.backup_root, mount_table())
    if kind is None:
        checks.append(Check("file_system", CHECK_SKIP, "cannot tell the backup volume's file "
                            "system on this system"))
    elif kind.lower() in FAT_FILE_SYSTEMS:
        checks.append(Check("file_system", CHECK_FAIL, "the backup volume is %s (FAT32): no "
                            "file can exceed 4 GiB, and big studies need ZIP64 files; "
                            "reformat it as APFS or Mac OS Extended" % kind))
    else:
        checks.append(Check("file_system", CHECK_OK, "the backup volume is %s" % kind))
    existing = nearest_existing(cfg.backup_root)
    writable = os.access(existing, os.W_OK | os.X_OK)
    where = ("%s" % cfg.backup_root if existing == cfg.backup_root
             else "%s does not exist yet; the first cycle creates it in %s"
             % (cfg.backup_root, existing))
    checks.append(Check("backup_writable", CHECK_OK if writable else CHECK_FAIL,
                        "%s%s" % (where, ": writable" if writable else
                                  ": not writable by this user; fix its owner or "
                                  "permissions")))
    checks.extend(state_checks(cfg, now))
    return checks


def state_checks(cfg: Config, now: float) -> List[Check]:
    if not os.path.exists(cfg.state_path):
        return [Check("state", CHECK_OK, "no %s yet: the first cycle creates it"
                      % cfg.state_path),
                Check("last_cycle", CHECK_WARN, "no cycle has run yet: load the launchd job "
                      "(README: Install on the Mac mini)")]
    try:
        state = ExportState(cfg.state_path, cfg.busy_timeout, read_only=True)
        try:
            exported = len(state.exported_fingerprints())
            runs = state.last_runs(RUNS_KEPT)
        finally:
            state.close()
    except (CannotRun, sqlite3.Error) as error:
        return [Check("state", CHECK_FAIL, str(error)),
                Check("last_cycle", CHECK_SKIP, "the state database could not be read")]
    checks = [Check("state", CHECK_OK, "%s readable: %s exported"
                    % (cfg.state_path, plural(exported, "study", "studies")))]
    good = next((run for run in runs if run["outcome"] == "ok"), None)
    latest = runs[0] if runs else None
    if good is None:
        checks.append(Check("last_cycle", CHECK_WARN, "no successful cycle recorded%s" % (
            "; the last one ended %s: %s" % (latest["outcome"], latest["detail"] or "-")
            if latest else "")))
        return checks
    age = now - parse_utc_iso(good["started_at"])
    text = "last successful cycle %s, %s ago" % (local_time_text(good["started_at"]),
                                                 format_duration(max(age, 0)))
    if latest is not None and latest is not good:
        text += "; the last one ended %s: %s" % (latest["outcome"], latest["detail"] or "-")
    late = age > LAST_CYCLE_LATE_SECONDS
    if late:
        text += ": launchd should run one every %d minutes; is the job loaded?" % (
            LAUNCHD_INTERVAL_SECONDS // 60)
    checks.append(Check("last_cycle", CHECK_WARN if late or latest is not good else CHECK_OK,
                        text))
    return checks


def python_check() -> Check:
    version = "%d.%d.%d" % sys.version_info[:3]
    if sys.version_info < MIN_PYTHON:
        return Check("python", CHECK_FAIL, "Python %s at %s: %d.%d or newer is needed"
                     % ((version, sys.executable) + MIN_PYTHON))
    return Check("python", CHECK_OK, "Python %s at %s" % (version, sys.executable))


def launchd_check() -> Check:
    if sys.platform != "darwin":
        return Check("launchd", CHECK_SKIP, "not macOS: no launchd job to check")
    plist_path = os.path.expanduser(LAUNCH_AGENT_PLIST)
    install = "cp com.horos.backup.plist ~/Library/LaunchAgents/ && launchctl bootstrap " \
              "gui/$(id -u) %s" % plist_path
    try:
        with open(plist_path, "rb") as handle:
            job = plistlib.load(handle)
    except FileNotFoundError:
        return Check("launchd", CHECK_FAIL, "no launchd job at %s: %s" % (plist_path, install))
    except (OSError, ValueError, ExpatError) as error:
        return Check("launchd", CHECK_FAIL, "%s cannot be read (%s)" % (plist_path, error))
    arguments = job.get("ProgramArguments", []) if isinstance(job, dict) else []
    scripts = [a for a in arguments if isinstance(a, str) and a.endswith(".py")]
    this_script = os.path.realpath(os.path.abspath(__file__))
    if not scripts or not os.path.isfile(scripts[0]):
        return Check("launchd", CHECK_FAIL, "%s runs %s, which does not exist: fix its "
                     "ProgramArguments" % (plist_path, scripts[0] if scripts else arguments))
    try:
        result = subprocess.run(["launchctl", "print", "gui/%d/%s" % (os.getuid(),
                                                                     LAUNCHD_LABEL)],
                                capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return Check("launchd", CHECK_FAIL, "cannot ask launchctl whether %s is loaded: %s"
                     % (LAUNCHD_LABEL, error))
    if result.returncode != 0:
        return Check("launchd", CHECK_FAIL, "%s is not loaded: launchctl bootstrap gui/%d %s"
                     % (LAUNCHD_LABEL, os.getuid(), plist_path))
    if os.path.realpath(scripts[0]) != this_script:
        return Check("launchd", CHECK_WARN, "%s is loaded but runs %s, not this copy (%s): "
                     "run doctor from the copy launchd runs" % (LAUNCHD_LABEL, scripts[0],
                                                                this_script))
    return Check("launchd", CHECK_OK, "%s is loaded and runs %s" % (LAUNCHD_LABEL,
                                                                 scripts[0]))


def run_doctor(cfg: Config, now: float) -> List[Check]:
    """Every check, in the order a person would fix them."""
    prefs = cfg.horos_prefs
    checks = [python_check()]
    checks.extend(sentinel_checks(cfg))
    checks.append(preferences_check(cfg, prefs))
    checks.append(horos_data_check(cfg, prefs))
    checks.extend(horos_checks(cfg, prefs))
    checks.extend(disk_checks(cfg, now))
    checks.append(launchd_check())
    return checks


def doctor_command(cfg: Config, as_json: bool) -> int:
    """Check the installation; exit 1 when any check fails (warnings are allowed)."""
    checks = run_doctor(cfg, time.time())
    if as_json:
        print(json.dumps({"checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
    else:
        for check in checks:
            print("%-5s %-18s %s" % (check.status, check.name, check.detail))
        counts = {status: sum(1 for c in checks if c.status == status)
                  for status in (CHECK_OK, CHECK_WARN, CHECK_FAIL, CHECK_SKIP)}
        print("doctor: %d ok, %d warn, %d fail, %d skip: %s" % (
            counts[CHECK_OK], counts[CHECK_WARN], counts[CHECK_FAIL], counts[CHECK_SKIP],
            "fix what failed before relying on the backup" if counts[CHECK_FAIL]
            else "the backup can run here"))
    return EXIT_FAILED if any(c.status == CHECK_FAIL for c in checks) else EXIT_OK


# =====================================================================================
# Find: search the backup alone
# =====================================================================================
#
# The day this is needed the Horos disk may be dead: `find` reads BACKUP_ROOT's state
# and nothing else, with no PACS sentinel and no Database.sql, and never writes there,
# so it works on a read-only recovery disk.


def read_backup_studies(cfg: Config) -> List[BackupStudy]:
    """Every study in BACKUP_ROOT's state, read without writing anything."""
    if not os.path.isdir(cfg.backup_root):
        raise CannotRun("no backup at %s: is the backup disk mounted? (check --backup-root)"
                        % cfg.backup_root)
    if not os.path.isfile(cfg.state_path):
        raise CannotRun("%s has no %s: run `horos_backup_export.py reindex --backup-root %s` "
                        "(on a writable disk) to rebuild it from the ZIPs' manifests"
                        % (cfg.backup_root, STATE_FILE, cfg.backup_root))
    state = ExportState(cfg.state_path, cfg.busy_timeout, read_only=True)
    try:
        return state.backup_studies()
    except sqlite3.Error as error:
        raise CannotRun("state database %s cannot be read (%s); run `reindex` to rebuild it"
                        % (cfg.state_path, error)) from None
    finally:
        state.close()


def search_text(value) -> str:
    """Text as find compares it: accents dropped (strip_accents) and case folded, so
    `joao` finds `JOÃO` and `muller` finds `Müller`."""
    text = as_text(value)
    if text.isascii():
        return text.lower()
    return strip_accents(text).casefold()


def search_terms(texts: Sequence[str]) -> List[str]:
    """The words of find's arguments (`"yamada 2019"` is two terms)."""
    return [search_text(word) for text in texts for word in text.split()]


def study_matches(terms: Sequence[str], study: BackupStudy) -> bool:
    """Every term matches: part of the patient name, ID or accession number, the start
    of the study UID or of the study date, or a whole modality token. Never the inside
    of a UID or a date: `2019` does not find a UID that merely contains 2019."""
    texts = (search_text(study.patient_name), search_text(study.patient_id),
             search_text(study.accession_number))
    uid = study.uid.lower()
    day = study.study_date or ""
    compact_day = day.replace("-", "")
    modalities = {m.lower() for m in study.modalities}
    for term in terms:
        if any(term in text for text in texts) or uid.startswith(term) or term in modalities:
            continue
        date_term = term.replace("_", "-").replace("/", "-")
        if day and (day.startswith(date_term) or compact_day.startswith(date_term)):
            continue
        return False
    return True


def find_studies(studies: Sequence[BackupStudy], terms: Sequence[str]
                 ) -> List[BackupStudy]:
    """The studies every term matches, by patient, then study date, then UID."""
    found = [study for study in studies if study_matches(terms, study)]
    return sorted(found, key=lambda s: (search_text(s.patient_name), s.study_date is None,
                                        s.study_date or "", s.uid))


def find_result(cfg: Config, study: BackupStudy) -> dict:
    """One object of `find --json` (README: find)."""
    return {
        "study_uid": study.uid,
        "zip_path": study.zip_path,
        "zip_file": os.path.join(cfg.backup_root, study.zip_path),
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "birth_date": study.birth_date,
        "study_date": study.study_date,
        "modalities": list(study.modalities),
        "file_count": study.file_count,
        "zip_bytes": study.zip_bytes,
        "left_horos_at": study.left_at,
    }


def find_line(cfg: Config, study: BackupStudy) -> str:
    patient = printable(study.patient_name) or UNKNOWN
    if study.patient_id:
        patient += " (%s)" % printable(study.patient_id)
    left = "  left Horos %s" % local_day(study.left_at) if study.left_at else ""
    return "%-10s  %s  born %s  %s  %s  %s%s  %s" % (
        study.study_date or UNKNOWN, patient, study.birth_date or UNKNOWN,
        "\\".join(study.modalities) or UNKNOWN, plural(study.file_count, "file"),
        format_bytes(study.zip_bytes), left, os.path.join(cfg.backup_root, study.zip_path))


def find_wanted(texts: Sequence[str], left_horos: bool, since: Optional[dt.date]) -> str:
    """What find looked for, for its "no study ..." line."""
    words = "matches %s" % " ".join(texts) if texts else ""
    if not left_horos:
        return words
    left = "left Horos%s" % (" on %s or later" % since.isoformat() if since else "")
    return "%s and %s" % (words, left) if words else left


def say_what_find_lacks(studies: Sequence[BackupStudy]) -> None:
    unread = sum(1 for study in studies if study.patient_id is None)
    if unread:
        print("horos_backup_export: note: %d of %d studies were backed up by an older "
              "version: their patient ID, accession number and birth date are not searched "
              "yet; `reindex` (or the next backup cycles) adds them"
              % (unread, len(studies)), file=sys.stderr)


def find_command(cfg: Config, texts: Sequence[str], as_json: bool, left_horos: bool = False,
                 since: Optional[dt.date] = None) -> int:
    """Studies of the backup that match every term (and, with left_horos, that left
    Horos, on the local day `since` or later); exit 1 when none does."""
    terms = search_terms(texts)
    if not terms and not left_horos:
        raise CannotRun("find needs a word to search for (a name, ID, date or modality), "
                        "or --left-horos")
    studies = read_backup_studies(cfg)
    found = find_studies([study for study in studies if not left_horos
                          or left_since(study.left_at, since)], terms)
    say_what_find_lacks(studies)
    if as_json:
        lines = [json.dumps([find_result(cfg, study) for study in found], indent=1,
                            ensure_ascii=False)]
    else:
        lines = [find_line(cfg, study) for study in found]
    for line in lines:
        print(line)
    if not found:
        print("horos_backup_export: no study of the %d in %s %s"
              % (len(studies), cfg.backup_root, find_wanted(texts, left_horos, since)),
              file=sys.stderr)
        return EXIT_FAILED
    if not as_json:
        print(plural(len(found), "study", "studies"))
    return EXIT_OK


# =====================================================================================
# Restore: studies back into a folder or into Horos, at its pace
# =====================================================================================
#
# Like find, restore needs no PACS sentinel: `restore --to DIR` reads the backup and
# writes only DIR; `restore --into-horos` records in the state which studies went to
# which library, so that none is fed twice, and feeds INCOMING.noindex only as fast as
# Horos empties it.

RESTORE_STAGING_DIR = ".horos-backup-restore"    # next to INCOMING.noindex
RESTORE_STAGING_PREFIX = ".restoring-"           # + pid + "-" + the study folder's name


class RestoreRefused(Exception):
    """A ZIP that cannot be restored safely; nothing of it was written."""


def safe_member_path(name: str) -> List[str]:
    """The parts of a member name, or RestoreRefused if it could escape the target."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name
            or ".." in parts or "" in parts[:-1] or re.match(r"^[A-Za-z]:", name)):
        raise RestoreRefused("unsafe member name %r" % name)
    return parts


def restore_zip(zip_path: str, parent: str, staging_parent: str, on_bytes=None,
                before_rename=None) -> Tuple[str, int]:
    """Extract a study ZIP as a new folder in `parent`; returns (folder, file count).

    The files are written in a staging folder next to it and the folder is renamed
    into place whole, so nobody (Horos included) sees half a study, and nothing that
    exists is overwritten. on_bytes(count) follows the bytes written; before_rename
    (manifest) runs once the study is staged in full.
    """
    folder_name = os.path.basename(zip_path)
    if folder_name.endswith(".zip"):
        folder_name = folder_name[:-len(".zip")]
    target = os.path.join(parent, folder_name)
    if os.path.lexists(target):
        raise RestoreRefused("%s already exists; nothing was overwritten" % target)
    with zipfile.ZipFile(zip_path) as archive:
        manifest = read_manifest(archive)
        sizes = {entry["name"]: entry["size"] for entry in manifest["files"]}
        members = [info for info in archive.infolist()
                   if info.filename != MANIFEST_NAME and not info.is_dir()]
        for info in members:
            safe_member_path(info.filename)
        os.makedirs(staging_parent, exist_ok=True)
        staging = os.path.join(staging_parent, "%s%d-%s" % (RESTORE_STAGING_PREFIX,
                                                             os.getpid(), folder_name))
        os.mkdir(staging)
        try:
            for info in members:
                destination = os.path.join(staging, *safe_member_path(info.filename))
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                with archive.open(info) as src, open(destination, "xb") as dst:
                    while True:                                      # CRC checked at EOF
                        chunk = src.read(COPY_CHUNK_BYTES)
                        if not chunk:
                            break
                        dst.write(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                if os.path.getsize(destination) != sizes.get(info.filename, info.file_size):
                    raise RestoreRefused("%s: size differs from the manifest" % info.filename)
                stamp = time.mktime(info.date_time + (0, 0, -1))
                os.utime(destination, (stamp, stamp))
            if before_rename is not None:
                before_rename(manifest)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging)
            raise
    return target, len(members)


def resolve_zip_argument(cfg: Config, text: str) -> str:
    """A ZIP named as a path, or relative to BACKUP_ROOT (`2019_03/X.zip`)."""
    if os.path.exists(text) or os.path.isabs(text):
        return os.path.abspath(text)
    return os.path.join(cfg.backup_root, text)


@dataclass(frozen=True)
class RestoreItem:
    """One study to restore: its ZIP, and what it holds (for the feeding and the ETA)."""
    study_uid: str
    zip_file: str          # the ZIP's path
    zip_path: str          # as the state names it (or as given)
    files: int
    source_bytes: int
    left_at: Optional[str] = None   # selected by --left-horos: when it was seen gone


def select_studies(studies: Sequence[BackupStudy], select_all: bool,
                   months: Sequence[str], terms: Sequence[str], left_horos: bool = False,
                   since: Optional[dt.date] = None) -> List[BackupStudy]:
    """The studies of --all, --month, --find and --left-horos [--since], newest study
    date first (unknown dates last): the patients a practice sees again come back to
    Horos first."""
    wanted_months = set(months)
    chosen = sorted((s for s in studies if select_all
                     or s.zip_path.split("/")[0] in wanted_months
                     or (terms and study_matches(terms, s))
                     or (left_horos and left_since(s.left_at, since))),
                    key=lambda s: s.zip_path)
    dated = sorted((s for s in chosen if s.study_date), key=lambda s: s.study_date,
                   reverse=True)
    return dated + [s for s in chosen if not s.study_date]


def item_for_zip(cfg: Config, text: str) -> RestoreItem:
    """A ZIP named on the command line, described by its manifest."""
    zip_file = resolve_zip_argument(cfg, text)
    with zipfile.ZipFile(zip_file) as archive:
        manifest = read_manifest(archive)
    return RestoreItem(study_uid=as_text(manifest.get("study", {}).get("study_uid")),
                       zip_file=zip_file, zip_path=text, files=len(manifest["files"]),
                       source_bytes=sum(int(f["size"]) for f in manifest["files"]))


def restore_items(cfg: Config, zips: Sequence[str], select_all: bool,
                  months: Sequence[str], find_texts: Sequence[str], left_horos: bool = False,
                  since: Optional[dt.date] = None) -> Tuple[List[RestoreItem], int]:
    """(the studies to restore, in order, each ZIP once; how many named ZIPs are
    unreadable). Named ZIPs come first, in the order given; then the selection from the
    state."""
    items: List[RestoreItem] = []
    failed = 0
    for text in zips:
        try:
            items.append(item_for_zip(cfg, text))
        except ZIP_READ_ERRORS as error:
            failed += 1
            print("horos_backup_export: restore of %s failed: %s" % (text, error),
                  file=sys.stderr)
    if select_all or months or find_texts or left_horos:
        terms = search_terms(find_texts)
        if find_texts and not terms:
            raise CannotRun("--find needs a word to search for")
        studies = read_backup_studies(cfg)
        chosen = select_studies(studies, select_all, months, terms, left_horos, since)
        if not chosen:
            raise CannotRun("no study of the %d in %s is selected by %s"
                            % (len(studies), cfg.backup_root,
                               describe_selection(select_all, months, find_texts,
                                                  left_horos=left_horos, since=since)))
        items.extend(RestoreItem(study_uid=s.uid,
                                 zip_file=os.path.join(cfg.backup_root, s.zip_path),
                                 zip_path=s.zip_path, files=s.file_count,
                                 source_bytes=s.source_bytes,
                                 left_at=s.left_at if left_horos else None) for s in chosen)
    seen: set = set()
    unique = []
    for item in items:
        if os.path.realpath(item.zip_file) not in seen:
            seen.add(os.path.realpath(item.zip_file))
            unique.append(item)
    return unique, failed


def describe_selection(select_all: bool, months: Sequence[str],
                       find_texts: Sequence[str], zips: Sequence[str] = (),
                       left_horos: bool = False, since: Optional[dt.date] = None) -> str:
    parts = ["--all"] if select_all else []
    parts += ["--month %s" % month for month in months]
    if find_texts:
        parts.append("--find %s" % " ".join(find_texts))
    if left_horos:
        parts.append("--left-horos" + (" --since %s" % since.isoformat() if since else ""))
    if zips:
        parts.append(plural(len(zips), "named ZIP"))
    return " ".join(parts)


def plan_feeding(items: Sequence[RestoreItem], files_in_incoming: int,
                 max_files: int) -> List[RestoreItem]:
    """The head of `items` one run adds to INCOMING.noindex.

    A study is added only while INCOMING holds fewer than max_files files (so a run can
    end up to one study over). A study bigger than max_files goes alone, once INCOMING
    is empty; until then the run stops before it, keeping the order.
    """
    taken: List[RestoreItem] = []
    count = files_in_incoming
    for item in items:
        if count >= max_files:
            break
        if item.files > max_files:
            if count == 0:
                taken.append(item)
            break
        taken.append(item)
        count += item.files
    return taken


class RestoreProgress(Progress):
    """The live line of a long restore: studies, files, MB, MB/s, time left.

    Drawn only on a terminal, like the cycle's Progress.
    """

    def __init__(self, stream, items: Sequence[RestoreItem]):
        super().__init__(stream)
        self.studies, self.files = len(items), sum(i.files for i in items)
        self.total = sum(i.source_bytes for i in items)
        self.studies_done = self.files_done = 0
        self.started = self.drawn = time.monotonic()

    def study_done(self, files: int) -> None:
        self.studies_done += 1
        self.files_done += files
        self.draw()

    def line(self, seconds: float) -> str:
        rate = self.done / seconds
        left = "%s left" % format_duration(max(self.total - self.done, 0) / rate) \
            if rate > 0 and self.done else "time left unknown"
        return "restore %d/%d studies  %d/%d files  %.1f of %.1f MB  %.1f MB/s  %s" % (
            self.studies_done, self.studies, self.files_done, self.files, self.done / 1e6,
            self.total / 1e6, rate / 1e6, left)


def staged_folder_name(entry_name: str) -> Optional[str]:
    """`.restoring-<pid>-<folder>` -> (pid, folder), None for any other name."""
    match = re.match(r"^%s(\d+)-(.+)$" % re.escape(RESTORE_STAGING_PREFIX), entry_name)
    return match.groups() if match else None


def finish_interrupted_restores(state: ExportState, target: str, incoming: str,
                                staging_parent: str) -> None:
    """A restore killed between recording a study and renaming it into INCOMING left
    it complete in its staging folder: it is renamed in now (recorded means staged in
    full). A staging folder with no record is a half-written study: removed."""
    if not os.path.isdir(staging_parent):
        return
    recorded = {os.path.basename(relpath)[:-len(".zip")]
                if relpath.endswith(".zip") else os.path.basename(relpath)
                for relpath in state.restored_zip_paths(target)}
    for entry in sorted(os.listdir(staging_parent)):
        parsed = staged_folder_name(entry)
        if parsed is None:
            continue
        pid, folder = int(parsed[0]), parsed[1]
        if pid != os.getpid() and process_exists(pid):
            continue            # another restore (of another backup) is writing it
        staged = os.path.join(staging_parent, entry)
        destination = os.path.join(incoming, folder)
        if folder in recorded and not os.path.lexists(destination):
            os.rename(staged, destination)
            log.info("restore: moved %s, staged in full by an interrupted run, into %s",
                     folder, incoming)
        else:
            shutil.rmtree(staged)
            log.info("restore: removed %s, left half-written by an interrupted run", staged)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def restore_into_target(state: ExportState, item: RestoreItem, target: str,
                        incoming: str, staging_parent: str, on_bytes
                        ) -> Tuple[str, int]:
    """Restore one study into INCOMING.noindex and record it, crash-safely: the record
    is committed after the study is staged in full and before the rename that makes it
    visible (finish_interrupted_restores completes a run killed in between)."""
    def record(manifest: Mapping) -> None:
        found = as_text(manifest.get("study", {}).get("study_uid"))
        if found != item.study_uid:
            raise RestoreRefused("the ZIP holds study %s, not %s" % (found, item.study_uid))
        state.record_restore(target, item.study_uid, item.zip_path, time.time())

    try:
        return restore_zip(item.zip_file, incoming, staging_parent, on_bytes, record)
    except BaseException:
        state.forget_restore(target, item.study_uid)
        raise


def feed_horos(cfg: Config, zips: Sequence[str], select_all: bool,
               months: Sequence[str], find_texts: Sequence[str], left_horos: bool = False,
               since: Optional[dt.date] = None) -> int:
    """restore … --into-horos: add studies to INCOMING.noindex while it holds fewer
    than --incoming-max-files files, each study once per library (or, with
    --left-horos, once more if it left Horos again after it was restored there); exit
    0 when every ZIP it tried was restored, saying how many studies are left."""
    if not os.path.isdir(cfg.horos_data):
        raise CannotRun("no Horos Data folder at %s (check --horos-data)" % cfg.horos_data)
    if not os.path.isdir(cfg.incoming_dir):
        raise CannotRun("no %s in %s: for a new library create it (mkdir \"%s\"), otherwise "
                        "check --horos-data" % (HOROS_INCOMING_DIR, cfg.horos_data,
                                                cfg.incoming_dir))
    user_umask = prepare_backup_alone(cfg, "restore --into-horos")
    selection = describe_selection(select_all, months, find_texts, zips, left_horos, since)
    target = os.path.realpath(cfg.incoming_dir)
    staging_parent = os.path.join(cfg.horos_data, RESTORE_STAGING_DIR)
    with operator_lock(cfg):
        state = ExportState(cfg.state_path, cfg.busy_timeout)
        try:
            # Into Horos, files get the user's usual modes, as Horos's own files do (the
            # state keeps its own: a journal takes its database file's mode).
            with umask_of(user_umask):
                finish_interrupted_restores(state, target, cfg.incoming_dir, staging_parent)
            items, failed = restore_items(cfg, zips, select_all, months, find_texts,
                                          left_horos, since)
            done = state.restored_uids(target)
            taken: set = set()                      # two ZIPs of one study: the first
            todo = []
            earlier = 0
            for item in items:
                if item.study_uid in taken:
                    continue
                restored_at = done.get(item.study_uid)
                # Fed, imported, then gone again (auto-cleaning runs on): fed once more.
                if restored_at is not None and not (item.left_at
                                                    and item.left_at > restored_at):
                    earlier += 1
                    if item.zip_path in zips:
                        print("skipped %s: its study went to %s on %s (a study is restored "
                              "once per library; --to DIR restores it again)"
                              % (item.zip_path, target, local_time_text(restored_at)))
                    continue
                taken.add(item.study_uid)
                todo.append(item)
            waiting = count_files_up_to(cfg.incoming_dir, cfg.incoming_max_files)
            batch = plan_feeding(todo, waiting, cfg.incoming_max_files)
            progress = RestoreProgress(sys.stdout, batch)
            restored = files = size = 0
            for item in batch:
                try:
                    with umask_of(user_umask):
                        folder, count = restore_into_target(state, item, target,
                                                            cfg.incoming_dir, staging_parent,
                                                            progress.advance)
                except (RestoreRefused, *ZIP_READ_ERRORS) as error:
                    stop_if_disk_full(error, cfg.incoming_dir)
                    failed += 1
                    progress.clear()
                    log.error("restore of %s failed: %s", item.zip_path, error)
                    print("horos_backup_export: restore of %s failed: %s"
                          % (item.zip_path, error), file=sys.stderr)
                    continue
                restored, files, size = restored + 1, files + count, size + item.source_bytes
                progress.study_done(count)
                log.info("restored %s: %s into %s", os.path.basename(item.zip_file),
                         plural(count, "file"), folder)
            progress.clear()
            left = len(todo) - restored
            state.record_restore_target(target, selection, left, time.time())
        finally:
            state.close()
    print(feeding_summary(cfg, restored, files, size, earlier, left, waiting + files))
    return EXIT_FAILED if failed else EXIT_OK


def feeding_summary(cfg: Config, restored: int, files: int, size: int, earlier: int,
                    left: int, in_incoming: int) -> str:
    text = "restored %s (%s, %s) into %s" % (plural(restored, "study", "studies"),
                                             plural(files, "file"), format_bytes(size),
                                             cfg.incoming_dir)
    if earlier:
        text += "; %s restored there before" % plural(earlier, "study was", "studies were")
    if not left:
        return text + "; nothing left: every selected study has gone to this library."
    return text + ("; %s left: %s holds about %d files (--incoming-max-files %d); run this "
                   "again once Horos has imported them"
                   % (plural(left, "study", "studies"), HOROS_INCOMING_DIR, in_incoming,
                      cfg.incoming_max_files))


def restore_to_folder(cfg: Config, zips: Sequence[str], to_dir: str, select_all: bool,
                      months: Sequence[str], find_texts: Sequence[str],
                      left_horos: bool = False, since: Optional[dt.date] = None) -> int:
    """restore … --to DIR: every selected study as a new folder in DIR (not tracked: a
    folder that exists is refused)."""
    items, failed = restore_items(cfg, zips, select_all, months, find_texts, left_horos,
                                  since)
    # A copy outside Horos stays as private as the backup it came from.
    use_backup_umask()
    parent = os.path.abspath(to_dir)
    os.makedirs(parent, exist_ok=True)
    progress = RestoreProgress(sys.stdout, items)
    for item in items:
        try:
            folder, count = restore_zip(item.zip_file, parent, parent, progress.advance)
        except (RestoreRefused, *ZIP_READ_ERRORS) as error:
            stop_if_disk_full(error, parent)
            failed += 1
            progress.clear()
            print("horos_backup_export: restore of %s failed: %s" % (item.zip_path, error),
                  file=sys.stderr)
            continue
        progress.study_done(count)
        progress.clear()
        print("restored %s: %s into %s" % (os.path.basename(item.zip_file),
                                           plural(count, "file"), folder))
    return EXIT_FAILED if failed else EXIT_OK


def stop_if_disk_full(error: BaseException, folder: str) -> None:
    """A full disk fails every study after it: stop at the first (its staging folder is
    gone already)."""
    if is_disk_full(error):
        raise CannotRun("the disk of %s is full (%s): free some space and run restore again; "
                        "it goes on where it stopped" % (folder, error)) from None


def restore_command(cfg: Config, zips: Sequence[str], to_dir: Optional[str],
                    into_horos: bool, select_all: bool = False, months: Sequence[str] = (),
                    find_texts: Sequence[str] = (), left_horos: bool = False,
                    since: Optional[dt.date] = None) -> int:
    """restore [ZIP...] [--all | --month M | --find TEXT | --left-horos [--since DAY]]
    --to DIR | --into-horos; exit 1 if any ZIP was not restored. Needs no PACS sentinel
    (see Find and disaster recovery)."""
    if not (zips or select_all or months or find_texts or left_horos):
        raise CannotRun("restore needs ZIPs, or a selection: --all, --month YYYY_MM, "
                        "--find TEXT or --left-horos")
    if into_horos:
        return feed_horos(cfg, zips, select_all, months, find_texts, left_horos, since)
    return restore_to_folder(cfg, zips, to_dir, select_all, months, find_texts, left_horos,
                             since)


# =====================================================================================
# CLI
# =====================================================================================
#
# One table of commands: what each runs, and its own arguments. The settings are added
# from their declarations (Config and AlertConfig); each command gets those whose Flag
# names it. A setting may stand before the command's name or after it.

@dataclass(frozen=True)
class Argument:
    """An argument of one command besides the settings (argparse's add_argument)."""
    names: Tuple[str, ...]
    options: Mapping[str, object]
    group: str = ""          # arguments of one group exclude each other


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[Config, argparse.Namespace], int]
    arguments: Tuple[Argument, ...] = ()
    required_groups: Tuple[str, ...] = ()    # groups of which one argument must be given


def run_cycle_command(cfg: Config, args: argparse.Namespace) -> int:
    return dry_run(cfg) if args.dry_run else cycle_with_alerts(cfg)


def run_status(cfg: Config, args: argparse.Namespace) -> int:
    return status_command(cfg, args.json)


def run_verify(cfg: Config, args: argparse.Namespace) -> int:
    return verify_with_alerts(cfg, args.all, args.limit, args.max_gb)


def run_restore(cfg: Config, args: argparse.Namespace) -> int:
    since_needs_left_horos(args)
    return restore_command(cfg, args.zips, args.to, args.into_horos, args.all, args.month,
                           args.find, args.left_horos, args.since)


def run_reindex(cfg: Config, args: argparse.Namespace) -> int:
    return reindex_command(cfg)


def run_retry(cfg: Config, args: argparse.Namespace) -> int:
    return retry_command(cfg, args.study_uids)


def run_doctor_command(cfg: Config, args: argparse.Namespace) -> int:
    return doctor_command(cfg, args.json)


def run_find(cfg: Config, args: argparse.Namespace) -> int:
    since_needs_left_horos(args)
    return find_command(cfg, args.texts, args.json, args.left_horos, args.since)


def run_test_alert(cfg: Config, args: argparse.Namespace) -> int:
    return test_alert_command(cfg)


def run_acknowledge_shrink(cfg: Config, args: argparse.Namespace) -> int:
    return acknowledge_shrink_command(cfg)


def since_needs_left_horos(args: argparse.Namespace) -> None:
    if args.since is not None and not args.left_horos:
        usage_error("--since selects by the day a study left Horos: it goes with "
                    "--left-horos")


def run_mirror(cfg: Config, args: argparse.Namespace) -> int:
    return mirror_with_alerts(cfg, args.to)


JSON = Argument(("--json",), dict(action="store_true", help="machine-readable"))
SINCE = Argument(("--since",), dict(type=day_argument, metavar="YYYY-MM-DD",
                                    help="with --left-horos: first seen gone on this local "
                                    "day or later"))

COMMANDS = {command.name: command for command in (
    Command(CYCLE, "Export every CT/MR study of a Horos library to one verified ZIP per "
            "study, in monthly folders. With no command, runs one backup cycle.",
            run_cycle_command, (
                Argument(("--dry-run",), dict(action="store_true", help="list what the next "
                                              "cycle would export; write nothing")),)),
    Command(STATUS, "where the backup stands (--json for scripts)", run_status, (JSON,)),
    Command(VERIFY, "re-read ZIPs and check every member; damaged ones are exported again",
            run_verify, (
                Argument(("--all",), dict(action="store_true", help="every ZIP"), "how_much"),
                Argument(("--limit",), dict(type=positive_int, metavar="N",
                                            help="the N longest-unverified ZIPs (default %d)"
                                            % VERIFY_DEFAULT_LIMIT), "how_much"),
                Argument(("--max-gb",), dict(type=non_negative_float, metavar="X",
                                             help="longest-unverified ZIPs until X GB are "
                                             "read"), "how_much"))),
    Command(RESTORE, "extract study ZIPs into a folder, or back into Horos", run_restore, (
        Argument(("zips",), dict(nargs="*", metavar="ZIP", help="study ZIPs (a path, or "
                                 "relative to BACKUP_ROOT)")),
        Argument(("--all",), dict(action="store_true", help="every study of the backup"),
                 "which"),
        Argument(("--month",), dict(action="append", type=month_argument, default=[],
                                    metavar="YYYY_MM", help="the studies of a month folder "
                                    "(repeatable)"), "which"),
        Argument(("--find",), dict(nargs="+", default=[], metavar="TEXT",
                                   help="the studies `find TEXT...` lists"), "which"),
        Argument(("--left-horos",), dict(action="store_true", help="the studies that left "
                                         "Horos (what `find --left-horos` lists)"), "which"),
        SINCE,
        Argument(("--to",), dict(metavar="DIR", help="a folder (created if needed); each "
                                 "study becomes a new folder in it"), "where"),
        Argument(("--into-horos",), dict(action="store_true", help="into INCOMING.noindex, "
                                         "for Horos to import"), "where")),
        required_groups=("where",)),
    Command(REINDEX, "rebuild export_state.sqlite from the ZIPs' manifests", run_reindex),
    Command(RETRY, "clear the back-off of failed studies", run_retry, (
        Argument(("study_uids",), dict(nargs="*", metavar="STUDY_UID", help="the studies to "
                                       "retry (default: every failed study)")),)),
    Command(DOCTOR, "check the installation end to end; writes nothing (--json for "
            "scripts)", run_doctor_command, (JSON,)),
    Command(FIND, "search the backup alone for studies by patient, ID, date or modality",
            run_find, (
                Argument(("texts",), dict(nargs="*", metavar="TEXT", help="words that must "
                                          "all match: part of the patient name, ID or "
                                          "accession number, the start of the study UID or "
                                          "date (2019, 2019-03), or a modality")),
                Argument(("--left-horos",), dict(action="store_true", help="only studies "
                                                 "that left Horos (only in the backup now)")),
                SINCE, JSON)),
    Command(TEST_ALERT, "send one test message by every configured alert channel",
            run_test_alert),
    Command(ACKNOWLEDGE_SHRINK, "the library really shrank: close the LIBRARY_SHRANK alert "
            "(its studies stay in the backup)", run_acknowledge_shrink),
    Command(MIRROR, "bring a second backup root (another disk) up to date from BACKUP_ROOT: "
            "every ZIP copied, verified and recorded there; never copies a loss",
            run_mirror, (
                Argument(("--to",), dict(required=True, metavar="DIR", help="the second "
                                         "backup root, e.g. /Volumes/MIRROR/Horos (its "
                                         "parent holds .backup_sentinel)")),)),
)}


def default_text(field: dataclasses.Field) -> str:
    """A setting's default as --help shows it."""
    flag = field.metadata["flag"]
    if flag.default_text or flag.switch:
        return flag.default_text
    value = field.default
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return "%g" % value
    return str(value)


def add_settings(parser: argparse.ArgumentParser, command: str) -> None:
    group = parser.add_argument_group("settings (README: Configuration)")
    for field in setting_fields():
        flag = field.metadata["flag"]
        if command not in flag.commands:
            continue
        shown = default_text(field)
        options: Dict[str, object] = dict(
            dest=field.name, help=argparse.SUPPRESS if flag.hidden
            else flag.help + (" (default %s)" % shown if shown else ""),
            # SUPPRESS: a setting given before the command's name is not reset after it.
            default=argparse.SUPPRESS)
        if flag.switch:
            options["action"] = "store_true"
        else:
            options.update(type=flag.type, choices=flag.choices, metavar=flag.metavar
                           or flag.name.lstrip("-").replace("-", "_").upper())
        group.add_argument(flag.name, **options)


def add_command_arguments(parser: argparse.ArgumentParser, command: Command) -> None:
    groups: Dict[str, Any] = {}
    for argument in command.arguments:
        target = parser
        if argument.group:
            if argument.group not in groups:
                groups[argument.group] = parser.add_mutually_exclusive_group(
                    required=argument.group in command.required_groups)
            target = groups[argument.group]
        target.add_argument(*argument.names, **argument.options)


def build_parser() -> argparse.ArgumentParser:
    cycle = COMMANDS[CYCLE]
    parser = argparse.ArgumentParser(prog="horos_backup_export.py", description=cycle.help)
    add_settings(parser, CYCLE)
    add_command_arguments(parser, cycle)
    parser.add_argument("--version", action="version", version="%(prog)s " + TOOL_VERSION)
    subparsers = parser.add_subparsers(dest="command_name", metavar="COMMAND",
                                       title="commands (none: run one backup cycle)")
    for command in COMMANDS.values():
        if command.name == CYCLE:
            continue
        subparser = subparsers.add_parser(command.name, help=command.help,
                                          description=command.help)
        add_settings(subparser, command.name)
        add_command_arguments(subparser, command)
    return parser


def option_names() -> set:
    """Every option string the script takes, from the declarations (not from argparse)."""
    names = {"-h", "--help", "--version"}
    names.update(field.metadata["flag"].name for field in setting_fields())
    names.update(name for command in COMMANDS.values() for argument in command.arguments
                 for name in argument.names if name.startswith("-"))
    return names


def usage_error(message: str) -> None:
    """argparse's exit code, in one line: the usage text would bury the message."""
    print("horos_backup_export.py: error: %s" % message, file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def reject_unknown_options(argv: Sequence[str]) -> None:
    """Name a mistyped flag, one line, exit 2. Left to argparse, `--pacs-rot X` reads X
    as the command and reports "invalid choice: 'X'", which hides the typo."""
    known = option_names()
    for token in argv:
        if token == "--":
            return
        if not re.match(r"--?[A-Za-z]", token):     # values, negative numbers
            continue
        name = token.split("=", 1)[0]
        # argparse takes a unique abbreviation (`--pacs` for --pacs-root).
        if any(option.startswith(name) for option in known if option.startswith("--")) \
                or name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        usage_error("unrecognized option %s%s" % (
            name, " (did you mean %s?)" % close[0] if close else ""))


def drop_settings_of_the_cycle(args: argparse.Namespace, command: str) -> None:
    """Settings before a command's name are the cycle's (copied from the plist, say):
    the command keeps those it takes and ignores the rest. --dry-run there is refused:
    `--dry-run restore ...` must not restore for real."""
    if command == CYCLE:
        return
    if args.dry_run:
        usage_error("--dry-run applies to a backup cycle, not to `%s`" % command)
    for field in setting_fields():
        flag = field.metadata["flag"]
        if hasattr(args, field.name) and command not in flag.commands:
            log.debug("%s ignored: `%s` does not use it", flag.name, command)
            delattr(args, field.name)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    reject_unknown_options(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    drop_settings_of_the_cycle(args, args.command_name or CYCLE)
    if hasattr(args, "clinic_hours") or hasattr(args, "clinic_days"):
        try:
            clinic_schedule(getattr(args, "clinic_hours", CLINIC_HOURS),
                            getattr(args, "clinic_days", CLINIC_DAYS))
        except ValueError as error:
            usage_error(str(error))
    return args


def setting_values(kind, args: argparse.Namespace) -> Dict[str, object]:
    """{field: value} of the settings of Config or AlertConfig: the flag when given,
    else the constant, parsed by the flag's type as the flag's text would be."""
    values = {}
    for field in dataclasses.fields(kind):
        flag = field.metadata.get("flag")
        if flag is None:
            continue
        value = getattr(args, field.name, field.default)
        if isinstance(value, str) and flag.type is not None and not hasattr(args, field.name):
            try:
                value = flag.type(value)
            except argparse.ArgumentTypeError as error:
                raise CannotRun("%s = %r at the top of %s: %s" % (
                    flag.constant, value, os.path.basename(__file__), error)) from None
        values[field.name] = value
    return values


def config_from_args(args: argparse.Namespace) -> Config:
    """Flags over constants. Without --pacs-root the path constants apply as edited at
    the top of this file (but Horos Data follows Horos's preferences when they exist);
    with it, paths derive from it unless given on their own."""
    command = args.command_name or CYCLE
    values = setting_values(Config, args)
    sentinel, pacs_root = SENTINEL, None
    if hasattr(args, "pacs_root"):
        pacs_root = values["pacs_root"] = os.path.abspath(args.pacs_root)
        sentinel = os.path.join(pacs_root, SENTINEL_NAME)
    prefs = HorosPreferences(path="")
    if command in READS_HOROS_DATA:
        prefs = load_horos_preferences(
            os.path.abspath(os.path.expanduser(values["horos_prefs_file"])),
            explicit=hasattr(args, "horos_prefs_file"),
            # restore reads the backup (a recovery Mac may hold a Horos whose settings
            # are damaged); doctor reports the problem as a check.
            tolerant=command in (DOCTOR, RESTORE))
    backup_root, horos_data = default_locations(pacs_root, prefs)
    if not hasattr(args, "backup_root"):
        values["backup_root"] = backup_root
    if not hasattr(args, "horos_data"):
        values["horos_data"] = horos_data
    values["horos_data"] = os.path.abspath(values["horos_data"])
    values["backup_root"] = os.path.abspath(values["backup_root"])
    alerts = AlertConfig(**setting_values(AlertConfig, args))
    if command in ALERTING_COMMANDS:
        alerts = checked_alert_config(alerts)
    return Config(sentinel=sentinel, horos_prefs=prefs, alerts=alerts, **values)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_console_logging(getattr(args, "verbose", False))
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        cfg = config_from_args(args)
        return COMMANDS[args.command_name or CYCLE].run(cfg, args)
    except CannotRun as error:
        log.debug("cannot run: %s", error)
        print("horos_backup_export: error: %s" % error, file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, Terminated):
        print("horos_backup_export: interrupted; partial files are removed next run",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `status | head` closed the pipe: what was wanted is printed. Point stdout at
        # /dev/null so the interpreter's last flush fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as error:  # last resort: the log keeps the traceback, not the terminal
        log.debug("unexpected error", exc_info=True)
        log.error("unexpected error: %s: %s", type(error).__name__, error,
                  exc_info=True)
        print("horos_backup_export: error: unexpected %s: %s (traceback in %s)"
              % (type(error).__name__, error, LOG_FILE), file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
