"""Run horos_backup_export.py with one real fault injected at a precise point.

    python3 tests/faults.py FAULT[=ARG] [script flags...]

Each fault acts for real on the files the unmodified code is handling; only the moment
is chosen here:

  enospc=N           the ZIP being written gets ENOSPC once N bytes are in it
  shrink=NAME        a study file named NAME is cut to half after its first chunk is read
  rewrite=NAME       a study file named NAME is rewritten in place after its first chunk
                     is read: the same size, other bytes, a new mtime (Horos saving ROIs)
  vanish=NAME        a study file named NAME is deleted right after it was found present
  corrupt-zip        every written .part ZIP gets one byte flipped before it is verified
  kill-after-rename  the process is SIGKILLed right after a ZIP is renamed into place
  eio                every write to the ZIP being written fails with EIO (an I/O error
                     naming the file), as on a failing disk
  kill-before-restore-record  restore --into-horos is SIGKILLed once a study is staged
                     in full, before it is recorded in the state
  kill-after-restore-record   ... right after the record is committed, before the
                     rename that moves the study into INCOMING.noindex
  locked-after-chunks=N  Database.sql stays locked past the busy timeout once the scan
                     of the library has read N chunks of ZSTUDY rows (Horos importing)
  stop-mid-part=N    the process stops itself (SIGSTOP) once N bytes are in a ZIP it writes
                     (a cycle's `.zip.part` or a mirror's copy), until the test sends
                     SIGCONT
  stop-after-rename  ... stops itself right after a ZIP (or a mirror's copy) is renamed
                     into place and its folder synced, before the state records it
  stop-after-alert-book-load  ... stops itself right after it read its alert
                     bookkeeping, before it saves it
  report-throttle    every Throttle the run makes says on stderr its cap and how many
                     bytes went through it (the caps work as usual)
"""

import builtins
import errno
import os
import signal
import sqlite3
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import horos_backup_export as hbe  # noqa: E402


class WrappedFile:
    """A real file object, with some of its methods replaced below."""

    def __init__(self, handle):
        self._handle = handle

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


class FillingDisk(WrappedFile):
    """A file that, like a disk with `room` bytes left, refuses the byte after."""

    def __init__(self, handle, room):
        super().__init__(handle)
        self._room = room

    def write(self, data):
        if len(data) > self._room:
            self._handle.write(bytes(data[:self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._handle.write(data)


class FailingDisk(WrappedFile):
    """A file on a disk that fails: every write is an I/O error naming the file."""

    def __init__(self, handle, path):
        super().__init__(handle)
        self._path = path

    def write(self, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO), self._path)


STOPPED = []      # the stop-* faults pause a run once: it then goes on to its end


def stop_once():
    if not STOPPED:
        STOPPED.append(True)
        os.kill(os.getpid(), signal.SIGSTOP)


class StoppingFile(WrappedFile):
    """A file being written whose writer is paused (SIGSTOP) once `after` bytes are in it,
    as a snapshot tool would find it."""

    def __init__(self, handle, after):
        super().__init__(handle)
        self._left = after

    def write(self, data):
        count = self._handle.write(data)
        self._left -= len(data)
        if self._left <= 0:
            self._handle.flush()
            stop_once()
        return count


class ShrinkingFile(WrappedFile):
    """A file that another process cuts to half while it is being read."""

    def __init__(self, handle, path):
        super().__init__(handle)
        self._path = path
        self._cut = False

    def readinto(self, buffer):
        count = self._handle.readinto(buffer)
        if not self._cut:
            self._cut = True
            os.truncate(self._path, os.path.getsize(self._path) // 2)
        return count


class RewrittenFile(WrappedFile):
    """A file another process rewrites in place (same size) while it is being read."""

    def __init__(self, handle, path):
        super().__init__(handle)
        self._path = path
        self._done = False

    def readinto(self, buffer):
        count = self._handle.readinto(buffer)
        if not self._done:
            self._done = True
            st = os.stat(self._path)
            with open(self._path, "r+b") as target:
                data = target.read()
                target.seek(0)
                target.write(bytes(b ^ 0x5A for b in data))
            os.utime(self._path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000000))
        return count


def inject(fault, arg):
    if fault == "enospc":
        def open_filling(path, mode="r", *args, **kwargs):
            handle = builtins.open(path, mode, *args, **kwargs)
            if str(path).endswith(".zip" + hbe.PART_SUFFIX) and "w" in mode:
                return FillingDisk(handle, int(arg))
            return handle
        hbe.open = open_filling  # module global: shadows the builtin for the script only
    elif fault == "eio":
        def open_failing(path, mode="r", *args, **kwargs):
            handle = builtins.open(path, mode, *args, **kwargs)
            if str(path).endswith(".zip" + hbe.PART_SUFFIX) and "w" in mode:
                return FailingDisk(handle, str(path))
            return handle
        hbe.open = open_failing
    elif fault == "shrink":
        real_open_source = hbe.open_source

        def open_then_shrink(path):
            handle = real_open_source(path)
            return ShrinkingFile(handle, path) if os.path.basename(path) == arg else handle
        hbe.open_source = open_then_shrink
    elif fault == "rewrite":
        real_open_source = hbe.open_source

        def open_then_rewrite(path):
            handle = real_open_source(path)
            return RewrittenFile(handle, path) if os.path.basename(path) == arg else handle
        hbe.open_source = open_then_rewrite
    elif fault == "vanish":
        real_stat_files = hbe.stat_files

        def stat_then_delete(files):
            present, missing, total = real_stat_files(files)
            for source in present:
                if os.path.basename(source.path) == arg:
                    os.remove(source.path)
            return present, missing, total
        hbe.stat_files = stat_then_delete
    elif fault == "corrupt-zip":
        real_write_zip = hbe.write_zip

        def write_then_corrupt(part_path, *args, **kwargs):
            manifest = real_write_zip(part_path, *args, **kwargs)
            with open(part_path, "r+b") as handle:
                handle.seek(200)  # inside the first member's data
                byte = handle.read(1)
                handle.seek(200)
                handle.write(bytes([byte[0] ^ 0xFF]))
            return manifest
        hbe.write_zip = write_then_corrupt
    elif fault == "kill-after-rename":
        real_sync_directory = hbe.sync_directory

        def sync_then_die(path):
            real_sync_directory(path)
            os.kill(os.getpid(), signal.SIGKILL)
        hbe.sync_directory = sync_then_die
    elif fault in ("kill-before-restore-record", "kill-after-restore-record"):
        real_restore_zip = hbe.restore_zip

        def restore_then_die(zip_path, parent, staging_parent, on_bytes=None,
                             before_rename=None):
            if before_rename is None:            # restore --to DIR: nothing to record
                return real_restore_zip(zip_path, parent, staging_parent, on_bytes)

            def record_and_die(manifest):
                if fault == "kill-after-restore-record":
                    before_rename(manifest)      # the record, committed
                os.kill(os.getpid(), signal.SIGKILL)
            return real_restore_zip(zip_path, parent, staging_parent, on_bytes,
                                    record_and_die)
        hbe.restore_zip = restore_then_die
    elif fault == "locked-after-chunks":
        real_chunks = hbe.HorosReader.candidate_chunks

        def chunks_then_locked(reader):
            for number, chunk in enumerate(real_chunks(reader)):
                if number == int(arg):
                    raise sqlite3.OperationalError("database is locked")
                yield chunk
        hbe.HorosReader.candidate_chunks = chunks_then_locked
    elif fault == "stop-mid-part":
        def open_stopping(path, mode="r", *args, **kwargs):
            handle = builtins.open(path, mode, *args, **kwargs)
            if str(path).endswith((".zip", ".zip" + hbe.PART_SUFFIX)) and "w" in mode:
                return StoppingFile(handle, int(arg))
            return handle
        hbe.open = open_stopping
    elif fault == "stop-after-rename":
        real_sync_directory = hbe.sync_directory

        def sync_then_stop(path):
            real_sync_directory(path)
            stop_once()
        hbe.sync_directory = sync_then_stop
    elif fault == "report-throttle":
        class ReportingThrottle(hbe.Throttle):
            def __call__(self, count):
                super().__call__(count)
                sys.stderr.write("throttle %g MB/s: %d bytes\n"
                                 % (self.bytes_per_second / 1e6, count))
        hbe.Throttle = ReportingThrottle
    elif fault == "stop-after-alert-book-load":
        real_load = hbe.load_alert_book

        def load_then_stop(path):
            book = real_load(path)
            stop_once()
            return book
        hbe.load_alert_book = load_then_stop
    else:
        raise SystemExit("unknown fault %r" % fault)


if __name__ == "__main__":
    fault, _, arg = sys.argv[1].partition("=")
    inject(fault, arg)
    sys.exit(hbe.main(sys.argv[2:]))
