"""The script's layout and its settings: what a reader (and the next change) relies on.

- Sections are layers: a section uses only what is defined in it or above it.
- Only the Horos reader and the state store touch a database.
- Each setting is declared once; its constant, its flag and the README's row agree.
- Each command's --help lists the flags it uses, and no other.
"""

import ast
import re

import pytest

import horos_backup_export as hbe
from conftest import ROOT, SCRIPT, run_cycle, run_script

RULE = "# " + "=" * 85


def sections():
    """[(first line, title)] of the three-line banners (rule, `# Title`, rule)."""
    with open(SCRIPT, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    return [(i + 2, lines[i + 1][2:]) for i in range(len(lines) - 2)
            if lines[i] == RULE and lines[i + 2] == RULE and lines[i + 1].startswith("# ")
            and not lines[i + 1].startswith("# ===")]


def section_of(line, banners):
    return max((k for k, (first, _title) in enumerate(banners) if first <= line), default=-1)


def top_level_names(node):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [name.id for target in node.targets for name in ast.walk(target)
                if isinstance(name, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


@pytest.fixture(scope="module")
def tree():
    with open(SCRIPT, encoding="utf-8") as handle:
        return ast.parse(handle.read())


def test_each_section_uses_only_what_is_above_it(tree):
    banners = sections()
    defined = {}
    for node in tree.body:
        for name in top_level_names(node):
            defined.setdefault(name, section_of(node.lineno, banners))
    later = []
    for node in tree.body:
        here = section_of(node.lineno, banners)
        for sub in ast.walk(node):
            # A name loaded in code or in an annotation; a string annotation is no use.
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) \
                    and defined.get(sub.id, -1) > here:
                later.append("%s (line %d, %s) uses %s (%s)" % (
                    top_level_names(node) or "code", sub.lineno, banners[here][1],
                    sub.id, banners[defined[sub.id]][1]))
    assert later == []


def test_the_docstring_lists_the_sections_in_their_order():
    listed = re.search(r"Sections, in the order data flows[^\n]*\n(.*?)\n\n|\"\"\"",
                       hbe.__doc__ + "\n\n", re.S).group(1)
    names = [" ".join(part.split()).replace(" (pure)", "").lower()
             for part in " ".join(listed.split()).split(" - ")]
    titles = [title.split(":")[0].lower() for _line, title in sections()]
    assert names == titles


def test_only_the_horos_reader_and_the_state_store_touch_a_database(tree):
    banners = sections()
    allowed = {k for k, (_line, title) in enumerate(banners)
               if title.startswith(("Horos reader", "State store"))}
    assert len(allowed) == 2
    touching = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) \
                and node.attr in ("execute", "executemany", "executescript", "conn") \
                and section_of(node.lineno, banners) not in allowed:
            touching.append("line %d: .%s" % (node.lineno, node.attr))
    assert touching == []


# -- settings: declared once, and the README agrees ------------------------------------

def readme_setting_rows():
    """{(constant or "—", flag): (default cell, heading above the table)} of the README's
    setting tables: rows whose first cell is a constant or — and whose second a flag."""
    with open(ROOT + "/README.md", encoding="utf-8") as handle:
        text = handle.read()
    rows, heading = {}, ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ").strip()
        match = re.match(r"^\| (`([A-Z_]+)`|—) \| `(--[a-z-]+)[^|]*\| ([^|]*)\|", line)
        if match:
            rows[(match.group(2) or "—", match.group(3))] = (match.group(4).strip(), heading)
    return rows


def readme_default(value):
    """How the README's Default column writes a setting's default."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return "%g" % value
    if isinstance(value, tuple):
        return "`%s`" % ",".join(value)
    return "`%s`" % value if value else "none"


def test_every_setting_has_its_constant_its_flag_and_a_readme_row():
    rows = readme_setting_rows()
    settings = hbe.setting_fields()
    assert len(settings) >= 29
    for field in settings:
        flag = field.metadata["flag"]
        if flag.constant:
            assert getattr(hbe, flag.constant) == field.default, flag.constant
        row = rows.get((flag.constant or "—", flag.name))
        assert row is not None, "no README row for %s %s" % (flag.constant, flag.name)
        default, heading = row
        if flag.hidden:
            assert heading == "For tests and benchmarks only", flag.name
        if not flag.default_text:
            assert default.startswith(readme_default(field.default)), (flag.name, default)
        assert set(flag.commands) <= set(hbe.COMMANDS), flag.name
    declared = {(f.metadata["flag"].constant or "—", f.metadata["flag"].name)
                for f in settings}
    assert set(rows) - declared == set()          # no README row for a flag that is gone


# -- each command takes the flags it uses ----------------------------------------------

def flags_in_help(*command):
    result = run_script(*command, "--help")
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", result.stdout))


def test_find_status_and_restore_list_only_the_flags_they_use():
    cycle_only = {"--compression", "--compress-level", "--batch-size", "--use-db-copy",
                  "--verify-per-run", "--missing-retries", "--order-by", "--dry-run"}
    alerting = {"--alert-email", "--smtp-host", "--smtp-port", "--smtp-user",
                "--smtp-password-file", "--alert-command", "--heartbeat-url",
                "--alert-after-hours"}
    find = flags_in_help("find")
    assert find == {"--help", "--pacs-root", "--backup-root", "--busy-timeout", "--verbose",
                    "--json", "--left-horos", "--since"}
    status = flags_in_help("status")
    assert status & (cycle_only - {"--batch-size"}) == set()
    assert alerting <= status                      # it shows the alert settings
    restore = flags_in_help("restore")
    assert restore & (cycle_only | alerting | {"--clinic-hours", "--max-mbps"}) == set()
    assert {"--to", "--into-horos", "--incoming-max-files", "--horos-data"} <= restore
    # mirror reads BACKUP_ROOT alone: no Horos flag, no cycle flag but its two limits
    mirror = flags_in_help("mirror")
    assert mirror == {"--help", "--pacs-root", "--backup-root", "--busy-timeout", "--verbose",
                      "--to", "--max-mbps", "--max-run-seconds"} | alerting


def test_the_cycle_help_lists_every_cycle_flag():
    expected = {f.metadata["flag"].name for f in hbe.setting_fields()
                if hbe.CYCLE in f.metadata["flag"].commands and not f.metadata["flag"].hidden}
    assert len(expected) >= 28
    assert expected | {"--dry-run", "--version"} <= flags_in_help()


def test_a_cycle_setting_before_a_command_is_kept_only_where_it_is_used(library):
    assert run_cycle(library).returncode == 0
    # The plist's flags copied in front of a command: it uses what it takes.
    result = run_script("--pacs-root", library.pacs_root, "--compression", "stored",
                        "--clinic-hours", "00-24", "find", "NOBODY")
    assert result.returncode == 1 and "no study of the" in result.stderr
    # After the command's name only its own flags are accepted.
    result = run_script("find", "--pacs-root", library.pacs_root, "--compression", "stored",
                        "NOBODY")
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr
    # --dry-run in front of a command would be a real run: refused.
    result = run_script("--pacs-root", library.pacs_root, "--dry-run", "retry")
    assert result.returncode == 2
    assert result.stderr == ("horos_backup_export.py: error: --dry-run applies to a backup "
                             "cycle, not to `retry`\n")
