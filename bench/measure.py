"""One script run as its own process, measured: wall time, CPU time and peak memory."""

import json
import subprocess
import sys

# The child's figures are read by a fresh parent: ru_maxrss of RUSAGE_CHILDREN is the
# largest child so far, not the last one.
MEASURING_PARENT = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True)\n"
    "w = time.perf_counter() - t\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps([w, r.ru_utime + r.ru_stime, r.ru_maxrss, p.returncode, "
    "p.stdout.decode(), p.stderr.decode()]))\n")


def run_measured(script, args):
    """(wall s, CPU s, peak RSS MB, stdout, stderr) of `python script args`."""
    out = subprocess.run([sys.executable, "-c", MEASURING_PARENT, sys.executable, script]
                         + list(args), capture_output=True, check=True, text=True).stdout
    wall, cpu, maxrss, code, stdout, stderr = json.loads(out)
    if code != 0:
        raise RuntimeError("%s %s failed: %s" % (script, args, stderr))
    peak_mb = maxrss / 1024 if sys.platform != "darwin" else maxrss / 1e6
    return wall, cpu, peak_mb, stdout, stderr
