"""A mistyped flag is named, in one line, and nothing runs."""

import os

import pytest

from conftest import backup_root, run_cycle, run_script


@pytest.mark.parametrize("args, message", [
    (["--pacs-rot", "X"],
     "unrecognized option --pacs-rot (did you mean --pacs-root?)"),
    (["status", "--jsn"], "unrecognized option --jsn (did you mean --json?)"),
    (["--batchsize=3"], "unrecognized option --batchsize (did you mean --batch-size?)"),
    (["verify", "--limt", "3"], "unrecognized option --limt (did you mean --limit?)"),
    (["--qqqqqqqq"], "unrecognized option --qqqqqqqq"),
])
def test_an_unknown_option_is_named_in_one_line(library, args, message):
    result = run_cycle(library, *args)
    assert result.returncode == 2
    assert result.stderr == "horos_backup_export.py: error: %s\n" % message
    assert result.stdout == ""
    assert not os.path.exists(backup_root(library))       # nothing ran


def test_the_typo_is_named_wherever_it_stands(library):
    result = run_script("--pacs-rot", library.pacs_root, "status")
    assert result.returncode == 2
    assert "unrecognized option --pacs-rot" in result.stderr
    assert "invalid choice" not in result.stderr


def test_values_and_known_flags_still_parse_as_before(library):
    # A negative number is a value (and argparse's own message), not an unknown flag.
    result = run_cycle(library, "--batch-size", "-1")
    assert result.returncode == 2 and "--batch-size: must be 1 or more" in result.stderr
    # A unique abbreviation is still the flag it abbreviates; `--` ends the flags.
    result = run_script("--pacs-ro", library.pacs_root, "--dry-run")
    assert result.returncode == 0, result.stderr
    result = run_cycle(library, "retry", "--", "--not-a-flag")
    assert result.returncode == 1 and "--not-a-flag has no failure" in result.stderr


def test_status_piped_into_head_ends_without_a_traceback(library):
    """`status --json | head -1`: the reader goes away early; no traceback."""
    import datetime as dt
    import subprocess
    import sys

    from conftest import SCRIPT, TEST_TZ
    # 1,200 months of JSON (about 100 KB) outgrow the pipe's buffer, so the script is
    # still writing when head exits.
    for i in range(1200):
        library.add_simple_study("1.2.130.%d" % i, "CT", images=1,
                                 study_date=dt.datetime(1900 + i // 12, 1 + i % 12, 1))
    library.finish()
    env = dict(os.environ, TZ=TEST_TZ)
    pipeline = subprocess.run(
        "%s %s --pacs-root '%s' status --json | head -1; exit ${PIPESTATUS[0]}"
        % (sys.executable, SCRIPT, library.pacs_root), shell=True, executable="/bin/bash",
        capture_output=True, text=True, env=env, timeout=120)
    assert pipeline.stdout == "{\n"
    assert pipeline.stderr == ""
    assert pipeline.returncode == 0
