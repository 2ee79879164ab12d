"""Alerts: a real SMTP server (aiosmtpd), a real HTTP server for the heartbeat, and the
script as a subprocess with HOME in a temporary folder.

The decision of what to send (once per problem per day, resolved once, new incidents) is
a pure function, tested with an injected clock at the end of this file.
"""

import datetime as dt
import email
import email.policy
import fcntl
import http.server
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from aiosmtpd.controller import Controller

import horos_backup_export as hbe
from conftest import (PINNED_SCHEDULE, SCRIPT, TESTS, TEST_TZ, backup_root, issues_rows,
                      run_script, script_env, zips_on_disk)
from fake_horos import FakeHorosLibrary, build_sample_library

FAULTS = os.path.join(TESTS, "faults.py")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CollectingHandler:
    def __init__(self):
        self.messages = []          # (mail_from, rcpt_tos, raw bytes)

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content or envelope.content))
        return "250 OK"


@pytest.fixture
def smtp_server():
    handler = CollectingHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    controller.received = handler.messages
    yield controller
    controller.stop()


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.paths.append(self.path)
        body = b"OK"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def heartbeat():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    server.paths = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = "http://127.0.0.1:%d/ping/3f1c" % server.server_address[1]
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def tarpit():
    """A server that answers one byte every half second, for ever: every read returns
    well within a socket timeout, so only a deadline on the whole exchange stops it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def trickle(conn):
        with conn:
            while not stop.is_set():
                try:
                    conn.sendall(b"2")
                except OSError:
                    return
                stop.wait(0.5)

    def serve():
        while not stop.is_set():
            try:
                conn, _addr = listener.accept()
            except OSError:
                return
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return str(path)


def book_path(home):
    return os.path.join(home, "Library", "Application Support", "horos_backup_export",
                        "alerts.json")


def email_flags(smtp):
    return ["--alert-email", "pacs-admin@example.org,it@example.org",
            "--smtp-host", "127.0.0.1", "--smtp-port", smtp.port]


def run_with_home(home, *args, **kwargs):
    return run_script(*args, env={"HOME": home}, **kwargs)


def cycle(lib, home, *args):
    return run_with_home(home, "--pacs-root", lib.pacs_root, *PINNED_SCHEDULE, *args)


def small_library(root, studies=2):
    lib = FakeHorosLibrary(root)
    for i in range(studies):
        lib.add_simple_study("1.2.80.%d" % i, "CT", images=2, patient="KOBAYASHI^HANA%d" % i,
                             patient_id="PID-80%d" % i, birth=dt.date(1961, 4, 1 + i),
                             study_date=dt.datetime(2019, 6, 1 + i, 9, 0))
    lib.finish()
    return lib


def parsed(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


def flat(text):
    """Text with its line wrapping undone."""
    return " ".join(text.split())


def subjects(smtp):
    return [parsed(raw)["Subject"] for _from, _to, raw in smtp.received]


# -- Done when: a healthy cycle sends nothing and pings the heartbeat -------------------

def test_healthy_cycle_sends_nothing_and_pings_the_heartbeat(tmp_path, home, smtp_server,
                                                             heartbeat):
    lib = small_library(str(tmp_path / "PACS"))
    flags = email_flags(smtp_server) + ["--heartbeat-url", heartbeat.url]
    for _ in range(2):
        result = cycle(lib, home, *flags)
        assert result.returncode == 0, result.stderr
    assert len(zips_on_disk(backup_root(lib))) == 2
    assert smtp_server.received == []
    assert heartbeat.paths == ["/ping/3f1c", "/ping/3f1c"]
    book = json.load(open(book_path(home)))
    assert book["problems"] == {} and book["last_success"]


# -- Done when: three failing cycles, one email and /fail; the repair, one resolved -----

def test_three_failing_cycles_send_one_email_and_the_repair_one_resolved(
        tmp_path, home, smtp_server, heartbeat):
    lib = small_library(str(tmp_path / "PACS"))
    flags = email_flags(smtp_server) + ["--heartbeat-url", heartbeat.url]
    for _ in range(3):
        result = cycle(lib, home, *flags, "--min-free-gb", "1000000")
        assert result.returncode == 1 and "backup volume low" in result.stderr
    assert [r["kind"] for r in issues_rows(backup_root(lib))] == ["DISK_LOW"] * 3
    assert len(smtp_server.received) == 1
    mail_from, rcpt_tos, raw = smtp_server.received[0]
    assert rcpt_tos == ["pacs-admin@example.org", "it@example.org"]
    message = parsed(raw)
    assert message["To"] == "pacs-admin@example.org, it@example.org"
    assert message["Subject"].startswith("[Horos backup] PROBLEM on %s: DISK_LOW"
                                         % socket.gethostname())
    body = message.get_content()
    assert "PROBLEM DISK_LOW" in body and "Free space on the backup volume now" in flat(body)
    for path in (backup_root(lib), os.path.join(backup_root(lib), "issues.csv"),
                 os.path.join(backup_root(lib), "logs", "horos_backup.log")):
        assert path in body
    assert heartbeat.paths == ["/ping/3f1c/fail"] * 3

    result = cycle(lib, home, *flags, "--min-free-gb", "0")
    assert result.returncode == 0, result.stderr
    assert len(zips_on_disk(backup_root(lib))) == 2
    assert len(smtp_server.received) == 2
    resolved = parsed(smtp_server.received[1][2])
    assert resolved["Subject"] == "[Horos backup] RESOLVED on %s: DISK_LOW" % (
        socket.gethostname())
    assert "RESOLVED DISK_LOW" in resolved.get_content()
    assert heartbeat.paths[-1] == "/ping/3f1c"
    # Healthy again: nothing more is sent.
    assert cycle(lib, home, *flags).returncode == 0
    assert len(smtp_server.received) == 2


# -- Done when: a missing PACS sentinel alerts ------------------------------------------

def test_missing_sentinel_alerts_with_alert_after_hours_0(tmp_path, home, smtp_server,
                                                          heartbeat):
    lib = small_library(str(tmp_path / "PACS"))
    sentinel = os.path.join(lib.pacs_root, ".pacs_sentinel")
    os.remove(sentinel)
    flags = email_flags(smtp_server) + ["--heartbeat-url", heartbeat.url,
                                        "--alert-after-hours", "0"]
    for _ in range(2):
        result = cycle(lib, home, *flags)
        assert result.returncode == 1 and "sentinel" in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert not os.path.exists(backup_root(lib))          # the volume is never written
    assert len(smtp_server.received) == 1
    message = parsed(smtp_server.received[0][2])
    assert "NO_SUCCESSFUL_CYCLE" in message.get_content()
    assert "no successful backup cycle" in message["Subject"]
    assert sentinel in message.get_content()
    assert heartbeat.paths == ["/ping/3f1c/fail"] * 2
    open(sentinel, "w").close()
    assert cycle(lib, home, *flags).returncode == 0
    assert len(smtp_server.received) == 2
    assert "RESOLVED" in parsed(smtp_server.received[1][2])["Subject"]
    assert heartbeat.paths[-1] == "/ping/3f1c"


def test_no_successful_cycle_waits_for_alert_after_hours(tmp_path, home, smtp_server):
    lib = small_library(str(tmp_path / "PACS"))
    assert cycle(lib, home, *email_flags(smtp_server)).returncode == 0
    os.remove(os.path.join(lib.pacs_root, ".pacs_sentinel"))
    assert cycle(lib, home, *email_flags(smtp_server)).returncode == 1
    assert smtp_server.received == []                   # 24 h have not passed
    # Time passes: the last success was 25 hours ago (the bookkeeping is documented).
    path = book_path(home)
    book = json.load(open(path))
    book["last_success"] = hbe.utc_iso(time.time() - 25 * 3600)
    json.dump(book, open(path, "w"))
    assert cycle(lib, home, *email_flags(smtp_server)).returncode == 1
    assert len(smtp_server.received) == 1
    message = parsed(smtp_server.received[0][2])
    assert "no successful backup cycle since" in message["Subject"]
    assert "25.0 h ago" in flat(message.get_content())



def test_alert_after_hours_counts_hours(tmp_path, home, smtp_server):
    lib = small_library(str(tmp_path / "PACS"))
    flags = email_flags(smtp_server) + ["--alert-after-hours", "2"]
    assert cycle(lib, home, *flags).returncode == 0
    os.remove(os.path.join(lib.pacs_root, ".pacs_sentinel"))
    path = book_path(home)
    # The last success was 90 minutes, then 1 h 55, then 2 h 05 ago.
    for minutes, emails in ((90, 0), (115, 0), (125, 1)):
        book = json.load(open(path))
        book["last_success"] = hbe.utc_iso(time.time() - minutes * 60)
        json.dump(book, open(path, "w"))
        assert cycle(lib, home, *flags).returncode == 1
        assert len(smtp_server.received) == emails, minutes
    message = parsed(smtp_server.received[0][2])
    assert "no successful backup cycle since" in message["Subject"]
    assert "(2.1 h ago)" in flat(message.get_content())


def test_skipped_cycles_ping_the_heartbeat_but_are_no_success(tmp_path, home, smtp_server,
                                                             heartbeat):
    lib = small_library(str(tmp_path / "PACS"))
    flags = email_flags(smtp_server) + ["--heartbeat-url", heartbeat.url]
    assert cycle(lib, home, *flags, "--min-free-gb", "1000000").returncode == 1
    assert len(smtp_server.received) == 1                        # DISK_LOW
    # Lock held by a long cycle, then Horos busy importing: both skip on purpose.
    with open(os.path.join(backup_root(lib), ".tmp", ".run.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cycle(lib, home, *flags)
    assert result.returncode == 0 and "another run holds" in result.stdout
    for i in range(3):
        open(os.path.join(lib.incoming_dir, "f%d.dcm" % i), "w").close()
    assert cycle(lib, home, *flags, "--incoming-max-files", "2").returncode == 0
    assert heartbeat.paths == ["/ping/3f1c/fail", "/ping/3f1c", "/ping/3f1c"]
    book = json.load(open(book_path(home)))
    assert book["last_success"] is None and book["failed_cycles"] == 1
    assert list(book["problems"]) == ["DISK_LOW"]                # not resolved by a skip
    assert len(smtp_server.received) == 1
    assert cycle(lib, home, *flags).returncode == 0
    assert "RESOLVED" in subjects(smtp_server)[1]
    assert json.load(open(book_path(home)))["last_success"] is not None


def test_studies_failing_for_a_week_get_a_daily_digest(tmp_path, home, smtp_server):
    lib = small_library(str(tmp_path / "PACS"))
    for uid in ("1.2.81.1", "1.2.81.2"):          # files gone: NO_FILES, retried daily
        pk = lib.add_study(uid, "GONE^FILES", study_date=dt.datetime(2018, 1, 1))
        lib.add_image(lib.add_series(pk, "CT", "Axial", 1), create_file=False)
    lib.finish()
    assert cycle(lib, home, *email_flags(smtp_server)).returncode == 0
    assert smtp_server.received == []
    # A week passes (the state is a documented format): 1.2.81.1 is still retried, the
    # other was last tried 3 days ago (Horos deleted it, so it is no longer tried).
    conn = sqlite3.connect(os.path.join(backup_root(lib), "export_state.sqlite"))
    conn.execute("UPDATE failures SET first_failed_at = ?, last_failed_at = ?",
                 (hbe.utc_iso(time.time() - 8 * 86400), hbe.utc_iso(time.time() - 3600)))
    conn.execute("UPDATE failures SET last_failed_at = ? WHERE study_uid = '1.2.81.2'",
                 (hbe.utc_iso(time.time() - 3 * 86400),))
    conn.commit()
    conn.close()
    assert cycle(lib, home, *email_flags(smtp_server)).returncode == 0
    assert cycle(lib, home, *email_flags(smtp_server)).returncode == 0
    assert len(smtp_server.received) == 1
    message = parsed(smtp_server.received[0][2])
    assert message["Subject"].endswith(": studies failing for a week")
    assert ("1 study failing to export for 7 days or more, and still retried: "
            "NO_FILES 1.") in flat(message.get_content())

# -- Done when: test-alert --------------------------------------------------------------

def test_test_alert_sends_by_email_and_command_and_never_pings(tmp_path, home, smtp_server,
                                                               heartbeat):
    out = tmp_path / "alert.txt"
    command = 'cat > "%s"; printf "%%s" "$HOROS_BACKUP_ALERT_SUBJECT" > "%s.subject"' % (
        out, out)
    result = run_with_home(home, "test-alert", "--pacs-root", tmp_path / "nowhere",
                           *email_flags(smtp_server), "--alert-command", command,
                           "--heartbeat-url", heartbeat.url)
    assert result.returncode == 0, result.stderr
    assert "test alert sent by email to pacs-admin@example.org, it@example.org" in result.stdout
    assert "test alert sent by command" in result.stdout
    assert subjects(smtp_server) == ["[Horos backup] TEST on %s" % socket.gethostname()]
    assert open(str(out) + ".subject").read() == subjects(smtp_server)[0]
    assert "if you read this, alerts reach you" in out.read_text()
    assert heartbeat.paths == []
    assert not os.path.exists(book_path(home))


def test_test_alert_exits_1_naming_an_unreachable_server(tmp_path, home):
    out = tmp_path / "alert.txt"
    closed = free_port()
    result = run_with_home(home, "test-alert", "--alert-email", "a@example.org",
                           "--smtp-host", "127.0.0.1", "--smtp-port", closed,
                           "--alert-command", 'cat > "%s"' % out)
    assert result.returncode == 1
    assert "test alert by email failed: to a@example.org via 127.0.0.1:%d" % closed \
        in result.stderr
    assert "test alert sent by command" in result.stdout
    assert "Traceback" not in result.stderr


def test_test_alert_with_nothing_configured_is_one_line(home):
    result = run_with_home(home, "test-alert")
    assert result.returncode == 1
    assert result.stderr == ("horos_backup_export: error: no alert channel configured: give "
                             "--alert-email with --smtp-host, or --alert-command\n")


# -- Done when: no email carries patient data -------------------------------------------

def patient_strings(lib):
    """Every name (and its parts), ID, birth date, study UID and ZIP name of the library."""
    found = set()
    for name, patient_id, birth, uid in lib.conn.execute(
            "SELECT ZNAME, ZPATIENTID, ZDATEOFBIRTH, ZSTUDYINSTANCEUID FROM ZSTUDY"):
        found.update({name, hbe.sanitize_part(name), patient_id, uid})
        found.update(part for part in name.replace("^", " ").split() if len(part) >= 4)
        if birth is not None:
            day = hbe.coredata_to_local_date(birth)
            found.update({day.isoformat(), day.strftime("%Y%m%d")})
    return found


def test_no_alert_carries_patient_data(tmp_path, home, smtp_server):
    lib = build_sample_library(str(tmp_path / "PACS"))
    root = backup_root(lib)
    out = tmp_path / "command.txt"
    flags = email_flags(smtp_server) + ["--alert-after-hours", "0",
                                        "--alert-command", 'cat >> "%s"' % out]
    env = dict(os.environ, TZ=TEST_TZ, HOME=home)

    def with_fault(fault):
        return subprocess.run([sys.executable, FAULTS, fault, "--pacs-root", lib.pacs_root]
                              + [str(f) for f in flags], capture_output=True, text=True,
                              env=env, timeout=180)
    # DISK_FULL: the error names the ZIP being written (patient name and birth date).
    assert with_fault("enospc=3000").returncode == 1
    # ZIP_BAD: every ZIP fails verification.
    assert with_fault("corrupt-zip").returncode == 0
    assert run_with_home(home, "retry", "--pacs-root", lib.pacs_root).returncode == 0
    assert cycle(lib, home, *flags).returncode == 0
    # VERIFY_FAILED, found by the `verify` command.
    victim = sorted(zips_on_disk(root))[0]
    with open(os.path.join(root, victim), "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff\xfe")
    assert run_with_home(home, "verify", "--all", "--pacs-root", lib.pacs_root,
                         *flags).returncode == 1
    details = " ".join(r["detail"] + r["extra"] for r in issues_rows(root))
    assert victim.split("/")[1] in details            # the details do name the patient
    kinds = {k for s in subjects(smtp_server) for k in hbe.PROBLEM_ORDER if k in s}
    assert {"DISK_FULL", "ZIP_BAD", "VERIFY_FAILED", "NO_SUCCESSFUL_CYCLE"} <= kinds
    secrets = patient_strings(lib) | {os.path.basename(p) for p in zips_on_disk(root)}
    texts = [out.read_text()]
    for _from, _to, raw in smtp_server.received:
        message = parsed(raw)
        texts += [raw.decode("utf-8", "replace"), message.get_content(), message["Subject"]]
    for secret in sorted(secrets):
        for text in texts:
            assert secret not in text, secret



def test_a_cycle_dying_on_an_unexpected_error_alerts_without_its_text(tmp_path, home,
                                                                      smtp_server):
    lib = small_library(str(tmp_path / "PACS"))
    out = tmp_path / "command.txt"
    flags = email_flags(smtp_server) + ["--alert-after-hours", "0",
                                        "--alert-command", 'cat >> "%s"' % out]
    # The backup disk fails as the first ZIP is written: an OSError (EIO) whose text
    # names the ZIP, that is the patient's name and birth date.
    result = subprocess.run([sys.executable, FAULTS, "eio", "--pacs-root", lib.pacs_root]
                            + list(PINNED_SCHEDULE) + [str(f) for f in flags],
                            capture_output=True, text=True, timeout=180,
                            env=dict(os.environ, TZ=TEST_TZ, HOME=home))
    assert result.returncode == 1
    assert "unexpected OSError: [Errno 5]" in result.stderr      # on the Mac: named
    assert "KOBAYASHI_HANA0" in result.stderr and ".zip.part" in result.stderr
    assert zips_on_disk(backup_root(lib)) == {}
    assert len(smtp_server.received) == 1
    message = parsed(smtp_server.received[0][2])
    body = message.get_content()
    assert "NO_SUCCESSFUL_CYCLE" in body
    assert flat(out.read_text()) == flat(body)              # the command got it too
    # Nothing of the error's text: no patient, no UID, no ZIP name, no errno text.
    zip_name = result.stderr.split("'")[1]
    assert zip_name.endswith(".zip.part")
    secrets = patient_strings(lib) | {os.path.basename(zip_name),
                                      os.path.basename(zip_name)[:-len(".part")],
                                      "Input/output error"}
    for text in (message["Subject"], body, smtp_server.received[0][2].decode("utf-8"),
                 out.read_text()):
        for secret in sorted(secrets):
            assert secret not in text, secret
    assert "Last cycle: unexpected error OSError (the log has the details)." in flat(body)


# -- Done when: an unreachable server never fails or slows a cycle ----------------------

def test_unreachable_smtp_and_heartbeat_cost_at_most_the_budget(tmp_path, home, tarpit,
                                                                smtp_server):
    lib = small_library(str(tmp_path / "PACS"))
    silent = ["--alert-email", "a@example.org", "--smtp-host", "127.0.0.1",
              "--smtp-port", tarpit, "--alert-after-hours", "0",
              "--heartbeat-url", "http://127.0.0.1:%d/ping" % tarpit]
    os.remove(os.path.join(lib.pacs_root, ".pacs_sentinel"))
    started = time.monotonic()
    result = run_with_home(home, "--pacs-root", lib.pacs_root, *silent, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1 and "sentinel" in result.stderr
    assert "alert by email not sent" in result.stdout
    assert "heartbeat http://127.0.0.1:%d/ping/fail not reached" % tarpit \
        in result.stdout
    assert elapsed < hbe.ALERT_BUDGET_SECONDS + 8, elapsed   # the budget, plus start-up
    # The sentinel is back and the server too: a healthy cycle is not held up, and the
    # alert that could not go out goes with the next one.
    open(os.path.join(lib.pacs_root, ".pacs_sentinel"), "w").close()
    result = cycle(lib, home, "--alert-email", "a@example.org", "--smtp-host",
                   "127.0.0.1", "--smtp-port", tarpit)
    assert result.returncode == 0 and len(zips_on_disk(backup_root(lib))) == 2
    os.remove(os.path.join(lib.pacs_root, ".pacs_sentinel"))
    result = cycle(lib, home, *email_flags(smtp_server), "--alert-after-hours", "0")
    assert result.returncode == 1
    assert len(smtp_server.received) == 1
    assert "NO_SUCCESSFUL_CYCLE" in parsed(smtp_server.received[0][2]).get_content()


def test_unwritable_bookkeeping_does_not_break_the_cycle(tmp_path, smtp_server):
    lib = small_library(str(tmp_path / "PACS"))
    home = tmp_path / "home"
    home.mkdir()
    (home / "Library").mkdir()
    (home / "Library" / "Application Support").write_text("a file where a folder should be")
    result = cycle(lib, str(home), *email_flags(smtp_server), "--min-free-gb", "1000000")
    assert result.returncode == 1 and "backup volume low" in result.stderr
    assert "cannot write alert bookkeeping" in result.stdout
    assert len(smtp_server.received) == 1                # noisy beats silent
    assert cycle(lib, str(home), *email_flags(smtp_server)).returncode == 0



@pytest.mark.parametrize("content", ["{", "[]", '{"version": 1, "problems": "x"}',
                                     '{"version": 1, "problems": {"DISK_LOW": 3}}',
                                     '{"version": 99}'])
def test_damaged_bookkeeping_starts_afresh(tmp_path, home, smtp_server, content):
    lib = small_library(str(tmp_path / "PACS"))
    os.makedirs(os.path.dirname(book_path(home)))
    with open(book_path(home), "w") as handle:
        handle.write(content)
    result = cycle(lib, home, *email_flags(smtp_server), "--min-free-gb", "1000000")
    assert result.returncode == 1 and "backup volume low" in result.stderr
    assert "starting it afresh" in result.stdout and "Traceback" not in result.stdout
    assert len(smtp_server.received) == 1
    assert list(json.load(open(book_path(home)))["problems"]) == ["DISK_LOW"]

# -- configuration -----------------------------------------------------------------------

def test_password_file_readable_by_others_is_refused(tmp_path, home, smtp_server):
    lib = small_library(str(tmp_path / "PACS"))
    password = tmp_path / "smtp-password"
    password.write_text("s3cret-Pa55\n")
    os.chmod(password, 0o640)
    flags = email_flags(smtp_server) + ["--smtp-user", "backup@example.org",
                                        "--smtp-password-file", password]
    result = cycle(lib, home, *flags)
    assert result.returncode == 1
    assert result.stderr == ("horos_backup_export: error: --smtp-password-file %s is "
                             "readable by others (mode 640); run: chmod 600 '%s'\n"
                             % (password, password))
    assert not os.path.exists(backup_root(lib))
    os.chmod(password, 0o600)
    result = cycle(lib, home, *flags)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--alert-email", "a@example.org"], "--alert-email needs --smtp-host"),
    (["--smtp-user", "u"], "--smtp-user and --smtp-password-file go together"),
    (["--heartbeat-url", "ftp://x/y"], "is not an http:// or https:// URL"),
    (["--smtp-user", "u", "--smtp-password-file", "/nonexistent/pw"], "cannot be read"),
])
def test_alert_flag_mistakes_are_one_line(home, flags, message):
    result = run_with_home(home, "test-alert", *flags)
    assert result.returncode == 1 and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_bad_address_is_a_usage_error(home):
    result = run_with_home(home, "test-alert", "--alert-email", "not-an-address")
    assert result.returncode == 2 and "is not an email address" in result.stderr


# -- SMTP: STARTTLS when offered, log in only over TLS ----------------------------------

@pytest.fixture
def tls_files(tmp_path):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                    "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


class Accounts:
    def __init__(self, user, password):
        self.user, self.password, self.seen = user.encode(), password.encode(), []

    def __call__(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult
        self.seen.append((mechanism, auth_data.login, session.ssl is not None))
        return AuthResult(success=(auth_data.login, auth_data.password)
                          == (self.user, self.password))


def test_starttls_then_login(tmp_path, home, tls_files):
    import ssl
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    accounts = Accounts("backup@example.org", "s3cret-Pa55")
    handler = CollectingHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context,
                            require_starttls=True, authenticator=accounts,
                            auth_require_tls=True)
    controller.start()
    try:
        password = tmp_path / "pw"
        password.write_text("s3cret-Pa55\n")
        os.chmod(password, 0o600)
        result = run_script("test-alert", "--alert-email", "a@example.org", "--smtp-host",
                            "127.0.0.1", "--smtp-port", port, "--smtp-user",
                            "backup@example.org", "--smtp-password-file", password,
                            env={"HOME": home, "SSL_CERT_FILE": cert})
    finally:
        controller.stop()
    assert result.returncode == 0, result.stderr
    assert [(login, tls) for _m, login, tls in accounts.seen] == [(b"backup@example.org",
                                                                    True)]
    assert len(handler.messages) == 1
    assert parsed(handler.messages[0][2])["From"] == "backup@example.org"


def test_no_password_in_clear_and_a_relay_needs_no_user(tmp_path, home, smtp_server):
    password = tmp_path / "pw"
    password.write_text("s3cret-Pa55\n")
    os.chmod(password, 0o600)
    result = run_with_home(home, "test-alert", *email_flags(smtp_server), "--smtp-user",
                           "backup@example.org", "--smtp-password-file", password)
    assert result.returncode == 1
    assert "offers no STARTTLS: the password is not sent in clear" in result.stderr
    assert smtp_server.received == []
    result = run_with_home(home, "test-alert", *email_flags(smtp_server))
    assert result.returncode == 0, result.stderr
    assert len(smtp_server.received) == 1


SUBMISSION_PORT = 587      # the default --smtp-port: STARTTLS, unlike 465 (TLS at once)


@pytest.fixture
def submission_port():
    """127.0.0.1:587 for the test's server (the test machines run as root)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", SUBMISSION_PORT))
        except OSError as error:
            pytest.skip("cannot listen on 127.0.0.1:%d: %s" % (SUBMISSION_PORT, error))
    return SUBMISSION_PORT


def test_on_port_587_the_password_goes_only_after_starttls(tmp_path, home, tls_files,
                                                           submission_port):
    import ssl
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    password = tmp_path / "pw"
    password.write_text("s3cret-Pa55\n")
    os.chmod(password, 0o600)
    flags = ["--alert-email", "a@example.org", "--smtp-host", "127.0.0.1", "--smtp-port",
             submission_port, "--smtp-user", "backup@example.org", "--smtp-password-file",
             password]

    def serve_and_send(**server):
        # A server that would take the password in clear (auth_require_tls=False): only
        # the client can keep it from going out before STARTTLS.
        accounts = Accounts("backup@example.org", "s3cret-Pa55")
        handler = CollectingHandler()
        controller = Controller(handler, hostname="127.0.0.1", port=submission_port,
                                authenticator=accounts, auth_require_tls=False, **server)
        controller.start()
        try:
            result = run_script("test-alert", *flags,
                                env={"HOME": home, "SSL_CERT_FILE": cert})
        finally:
            controller.stop()
        return result, accounts.seen, handler.messages

    # STARTTLS offered: plain SMTP first, then TLS, then the password.
    result, logins, messages = serve_and_send(tls_context=context)
    assert result.returncode == 0, result.stderr
    assert [(login, tls) for _m, login, tls in logins] == [(b"backup@example.org", True)]
    assert len(messages) == 1
    # No STARTTLS offered: the password is never sent, nor the message.
    result, logins, messages = serve_and_send()
    assert result.returncode == 1
    assert ("127.0.0.1:587 offers no STARTTLS: the password is not sent in clear"
            in result.stderr)
    assert logins == [] and messages == []


# -- the command channel -----------------------------------------------------------------

def test_alert_command_gets_the_body_on_stdin_and_the_subject_in_env(tmp_path, home):
    lib = small_library(str(tmp_path / "PACS"))
    out = tmp_path / "alert.txt"
    command = ('cat > "%s"; printf "%%s" "$HOROS_BACKUP_ALERT_SUBJECT" > "%s.subject"'
               % (out, out))
    result = cycle(lib, home, "--alert-command", command, "--min-free-gb", "1000000")
    assert result.returncode == 1
    subject = open(str(out) + ".subject").read()
    assert subject.startswith("[Horos backup] PROBLEM on %s: DISK_LOW" % socket.gethostname())
    body = out.read_text()
    assert body.startswith("PROBLEM DISK_LOW, since ")
    assert "BACKUP_ROOT:  %s" % backup_root(lib) in body
    assert "alert sent by command" in result.stdout


def test_a_failing_command_is_logged_and_retried_next_cycle(tmp_path, home):
    lib = small_library(str(tmp_path / "PACS"))
    out = tmp_path / "alert.txt"
    result = cycle(lib, home, "--alert-command", "echo no notifier here >&2; exit 3",
                   "--min-free-gb", "1000000")
    assert result.returncode == 1
    assert "alert by command not sent: exit status 3 no notifier here" in result.stdout
    result = cycle(lib, home, "--alert-command", 'cat > "%s"' % out,
                   "--min-free-gb", "1000000")
    assert "PROBLEM DISK_LOW" in out.read_text()


# -- status -------------------------------------------------------------------------------

def test_status_shows_the_alert_configuration_and_the_last_alert(tmp_path, home,
                                                                 smtp_server):
    lib = small_library(str(tmp_path / "PACS"))
    password = tmp_path / "pw"
    password.write_text("s3cret-Pa55\n")
    os.chmod(password, 0o600)
    flags = email_flags(smtp_server) + ["--heartbeat-url", "http://127.0.0.1:9/p",
                                        "--alert-after-hours", "6"]
    assert cycle(lib, home, *flags, "--min-free-gb", "1000000").returncode == 1
    result = run_with_home(home, "status", "--json", "--pacs-root", lib.pacs_root, *flags,
                           "--smtp-user", "u@example.org", "--smtp-password-file", password)
    assert result.returncode == 0, result.stderr
    alerts = json.loads(result.stdout)["alerts"]
    assert alerts["email"] == ["pacs-admin@example.org", "it@example.org"]
    assert (alerts["smtp_host"], alerts["smtp_port"], alerts["smtp_user"]) == (
        "127.0.0.1", smtp_server.port, "u@example.org")
    assert alerts["smtp_password_file"] == str(password)
    assert alerts["heartbeat_url"] == "http://127.0.0.1:9/p"
    assert alerts["alert_after_hours"] == 6 and alerts["command"] is None
    assert alerts["bookkeeping"] == book_path(home)
    assert list(alerts["open_problems"]) == ["DISK_LOW"]
    assert alerts["last_alert"]["channels"] == ["email"]
    assert alerts["last_alert"]["problems"] == ["DISK_LOW"]
    assert alerts["last_alert"]["subject"] == subjects(smtp_server)[0]
    assert "s3cret" not in result.stdout
    text = run_with_home(home, "status", "--pacs-root", lib.pacs_root, *flags)
    assert "email to pacs-admin@example.org, it@example.org via 127.0.0.1" in text.stdout
    assert "open problem     DISK_LOW" in text.stdout
    assert "last alert" in text.stdout and "by email: [Horos backup] PROBLEM" in text.stdout


# -- the decision, pure, with an injected clock -----------------------------------------

HOUR = 3600.0
T0 = 1_800_000_000.0


def failed(**kinds):
    return hbe.RunReport(status=hbe.RUN_FAILED, reason="stopped", kinds=kinds)


def ok(**kinds):
    return hbe.RunReport(status=hbe.RUN_OK, kinds=kinds, zip_bad_waiting=0, failing_week={})


def run_sequence(reports, start=T0, step=600.0, after_hours=24.0, delivered=True):
    """Feed reports every `step` seconds; returns [(due, resolved)] and the last book,
    as alerts.json holds it."""
    book, seen = hbe.AlertBook(), []
    for index, report in enumerate(reports):
        now = start + index * step
        plan = hbe.decide_alerts(book, report, now, after_hours * HOUR)
        seen.append((plan.due, plan.resolved))
        book = plan.book
        if (plan.due or plan.resolved) and delivered:
            book = hbe.record_delivery(plan, now, "s", ["email"])
    return seen, book.to_json()


def test_one_problem_alerts_once_a_day_while_it_lasts_then_resolves_once():
    reports = [failed(DISK_LOW=1)] * (2 * 144 + 1) + [ok(), ok()]
    seen, book = run_sequence(reports, after_hours=1000)     # DISK_LOW alone
    alerts = [i for i, (due, _res) in enumerate(seen) if due]
    assert alerts == [0, 144, 288]                    # at 0 h, 24 h and 48 h
    assert all(due == ["DISK_LOW"] for due, _r in (seen[i] for i in alerts))
    assert [i for i, (_due, res) in enumerate(seen) if res] == [289]
    assert seen[289] == ([], ["DISK_LOW"]) and seen[290] == ([], [])
    assert book["problems"] == {} and book["unsent_resolved"] == {}


def test_a_problem_that_clears_and_returns_is_a_new_incident():
    seen, _book = run_sequence([failed(DISK_LOW=1), ok(), failed(DISK_LOW=1)])
    assert seen == [(["DISK_LOW"], []), ([], ["DISK_LOW"]), (["DISK_LOW"], [])]


def test_an_undelivered_alert_is_tried_again_at_each_run():
    seen, book = run_sequence([failed(DISK_FULL=1)] * 3, delivered=False)
    assert [due for due, _r in seen] == [["DISK_FULL"]] * 3
    assert book["problems"]["DISK_FULL"]["last_alert"] is None


def test_a_problem_never_alerted_clears_without_a_resolved_message():
    seen, _book = run_sequence([failed(DISK_LOW=1), ok()], delivered=False)
    assert seen[1] == ([], [])


def test_no_successful_cycle_counts_from_the_last_success():
    reports = [ok()] + [hbe.RunReport(status=hbe.RUN_FAILED, reason="sentinel")] * 200
    seen, book = run_sequence(reports, step=HOUR / 6)
    first = [i for i, (due, _r) in enumerate(seen) if due][0]
    assert first == 144 and seen[first][0] == [hbe.NO_SUCCESSFUL_CYCLE]   # 24 h later
    assert book["failed_cycles"] == 200
    text = book["problems"][hbe.NO_SUCCESSFUL_CYCLE]["text"]
    assert "Last cycle: sentinel. Failed cycles since: 200." in text


def test_no_successful_cycle_ever_counts_from_the_first_failure_and_0_is_at_once():
    failing = [hbe.RunReport(status=hbe.RUN_FAILED, reason="x")] * 10
    seen, _book = run_sequence(failing, step=3 * HOUR, after_hours=24)
    assert [i for i, (due, _r) in enumerate(seen) if due] == [8]            # 24 h
    seen, _book = run_sequence(failing, after_hours=0)
    assert seen[0] == ([hbe.NO_SUCCESSFUL_CYCLE], [])


def test_skipped_cycles_neither_succeed_nor_fail_but_cannot_hide_a_long_outage():
    skipped = hbe.RunReport(status=hbe.RUN_SKIPPED, reason="skipped")
    seen, book = run_sequence([ok()] + [skipped] * 150)
    assert [i for i, (due, _r) in enumerate(seen) if due] == [144]
    assert book["failed_cycles"] == 0
    # With 0 hours, a skip (the lock held by a long cycle) is no failure.
    seen, _book = run_sequence([ok(), skipped, skipped], after_hours=0)
    assert seen[1:] == [([], []), ([], [])]
    # A skip leaves an open incident open; only a good cycle resolves it.
    seen, _book = run_sequence([failed(DISK_LOW=1), skipped, ok()])
    assert seen == [(["DISK_LOW"], []), ([], []), ([], ["DISK_LOW"])]


def test_zip_bad_lasts_while_studies_wait_with_it_and_the_week_digest_is_daily():
    reports = [hbe.RunReport(status=hbe.RUN_OK, kinds={"ZIP_BAD": 1}, zip_bad_waiting=1,
                             failing_week={}),
               hbe.RunReport(status=hbe.RUN_OK, zip_bad_waiting=1, failing_week={}),
               hbe.RunReport(status=hbe.RUN_OK, zip_bad_waiting=0, failing_week={})]
    seen, _book = run_sequence(reports)
    assert seen == [(["ZIP_BAD"], []), ([], []), ([], ["ZIP_BAD"])]
    week = hbe.RunReport(status=hbe.RUN_OK, zip_bad_waiting=0,
                         failing_week={"NO_FILES": 2, "FILE_CHANGED": 1})
    seen, book = run_sequence([week] * 145)
    assert [i for i, (due, _r) in enumerate(seen) if due] == [0, 144]
    assert book["problems"][hbe.STUDIES_FAILING]["text"] == (
        "3 studies failing to export for 7 days or more, and still retried: "
        "FILE_CHANGED 1, NO_FILES 2.")


def test_a_command_run_only_reports_what_it_saw():
    command = hbe.RunReport(status=hbe.RUN_COMMAND, kinds={"VERIFY_FAILED": 2})
    seen, book = run_sequence([failed(DISK_LOW=1), command, command])
    assert seen == [(["DISK_LOW"], []), (["VERIFY_FAILED"], []), ([], [])]
    assert book["failed_cycles"] == 1 and book["last_success"] is None


def test_the_message_names_kinds_counts_and_paths_only():
    cfg = hbe.Config(pacs_root="/Volumes/PACS", sentinel="/Volumes/PACS/.pacs_sentinel",
                     horos_data="/Volumes/PACS/Database/Horos Data",
                     backup_root="/Volumes/PACS/Backup")
    report = hbe.RunReport(status=hbe.RUN_OK, kinds={"VERIFY_FAILED": 2}, zip_bad_waiting=3,
                           failing_week={})
    plan = hbe.decide_alerts(hbe.AlertBook(), report, T0, 24 * HOUR)
    subject, body = hbe.compose_alert(cfg, plan, "mini.local")
    assert subject == ("[Horos backup] 2 PROBLEMS on mini.local: VERIFY_FAILED (damaged or "
                       "missing ZIPs); ZIP_BAD (ZIPs failing verification as they are "
                       "written)")
    assert "2 ZIPs were missing or damaged" in flat(body)
    assert "3 studies could not be" in flat(body)
    assert "Details:      /Volumes/PACS/Backup/issues.csv" in body
    assert "Log:          /Volumes/PACS/Backup/logs/horos_backup.log" in body


def test_the_heartbeat_fail_url_keeps_a_query():
    assert hbe.heartbeat_target("https://hc-ping.com/abc", True) == \
        "https://hc-ping.com/abc/fail"
    assert hbe.heartbeat_target("https://hc-ping.com/abc/", True) == \
        "https://hc-ping.com/abc/fail"
    assert hbe.heartbeat_target("https://x/ping/k?create=1", True) == \
        "https://x/ping/k/fail?create=1"
    assert hbe.heartbeat_target("https://x/abc", False) == "https://x/abc"


def test_the_deadline_keeps_time_for_the_channels_still_to_come():
    clock = [0.0]
    deadline = hbe.Deadline(10.0, clock=lambda: clock[0])
    assert deadline.timeout(6.0, 2) == 6.0
    clock[0] = 6.0
    assert deadline.timeout(5.0, 1) == 2.0
    clock[0] = 8.5
    assert deadline.timeout(3.0, 0) == 1.5
    clock[0] = 11.0
    assert deadline.timeout(3.0, 0) == 0.0



def test_rows_written_across_an_issues_csv_rotation_still_alert(tmp_path, monkeypatch):
    """issues.csv rotates mid-run: every row the run added, before and after the
    rotation, is in what alerting reads (the run's IssueLog), and on disk."""
    monkeypatch.setattr(hbe, "ISSUES_MAX_BYTES", 400)
    path = str(tmp_path / "issues.csv")
    earlier = hbe.IssueLog(path)
    for _ in range(3):
        earlier.add("INCOMING_OVER_LIMIT", "", "x" * 40)
    issues = hbe.IssueLog(path)
    issues.add("DISK_LOW", "", "y" * 200)                    # goes into the old file
    assert not os.path.exists(path + ".1")
    issues.add("ZIP_BAD", "1.2.3", "z")                      # rotates first
    assert os.path.exists(path + ".1")
    assert issues.written == {"DISK_LOW": 1, "ZIP_BAD": 1}
    assert [row["kind"] for row in issues_rows(str(tmp_path))] == ["ZIP_BAD"]


# -- two runs that alert at once keep both their updates ------------------------------

def test_a_verify_alerting_while_a_cycle_alerts_loses_nothing_of_either(tmp_path, home):
    """A cycle stopped between reading alerts.json and saving it (a real process, held
    by a fault) and a `verify` that finds a damaged ZIP meanwhile: the verify waits for
    the bookkeeping's lock, and alerts.json ends with the cycle's success and verify's
    open VERIFY_FAILED both."""
    lib = small_library(str(tmp_path / "PACS"))
    root = backup_root(lib)
    out = tmp_path / "alerts.txt"
    flags = ["--alert-command", 'cat >> "%s"' % out]
    assert cycle(lib, home, *flags).returncode == 0
    victim = sorted(zips_on_disk(root))[0]
    with open(os.path.join(root, victim), "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff\xfe")
    env = script_env({"HOME": home})
    stopped = subprocess.Popen(
        [sys.executable, FAULTS, "stop-after-alert-book-load", "--pacs-root", lib.pacs_root,
         *PINNED_SCHEDULE, "--verify-per-run", "0", *flags], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            with open("/proc/%d/stat" % stopped.pid) as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "T":
                    break
            assert stopped.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        verify = subprocess.Popen(
            [sys.executable, SCRIPT, "verify", "--all", "--pacs-root", lib.pacs_root,
             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(1.5)
        assert verify.poll() is None            # waiting for the cycle's bookkeeping
    finally:
        stopped.send_signal(signal.SIGCONT)
    assert stopped.wait(timeout=60) == 0
    assert verify.wait(timeout=60) == 1
    book = json.load(open(book_path(home)))
    assert list(book["problems"]) == ["VERIFY_FAILED"]
    assert book["problems"]["VERIFY_FAILED"]["last_alert"]
    assert book["last_success"]
    assert out.read_text().count("PROBLEM VERIFY_FAILED") == 1
