"""The package's warnings: one clean line each (`warning: <text>`), shown every time, in the
CLI and in notebooks; other libraries' warnings untouched (issue 30, items 4 and 5)."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from scalebio_core import messages
from scalebio_core.messages import ScaleBiOWarning

PACKAGE = Path(messages.__file__).parent


def test_a_package_warning_is_one_clean_line_and_others_keep_their_format():
    text = "source 'a': dropped 2 of 40 records\n  (max_length = 64)"
    ours = warnings.formatwarning(text, ScaleBiOWarning, "/x/build.py", 328, "code()")
    assert ours == "warning: source 'a': dropped 2 of 40 records (max_length = 64)\n"
    other = warnings.formatwarning("theirs", UserWarning, "/x/lib.py", 7, "code()")
    assert "/x/lib.py:7: UserWarning: theirs" in other and "code()" in other
    with pytest.warns(UserWarning, match="dropped") as seen:  # tests and users filter them
        messages.warn("dropped 2 records")
    assert seen[0].category is ScaleBiOWarning


def test_a_process_shows_each_package_warning_every_time_as_one_line(tmp_path):
    """A notebook cell run twice says its warning twice: not once per place in the code."""
    code = (
        "import warnings\n"
        "from scalebio_core import messages\n"
        "for _ in range(2):\n"
        "    messages.warn('resampling repeats records')\n"
        "warnings.warn('a library warning')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = done.stderr.splitlines()
    assert lines[:2] == ["warning: resampling repeats records"] * 2
    assert "UserWarning: a library warning" in lines[2]
    quiet = [sys.executable, "-W", "ignore::UserWarning", "-c", code]
    assert subprocess.run(quiet, capture_output=True, text=True, check=True).stderr == ""


def test_every_warning_of_the_package_goes_through_messages():
    """No `warnings.warn` outside messages.py: each would print a path and a code line."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "messages.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "warn"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "warnings"
            ):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, f"use messages.warn(text) instead of warnings.warn at {found}"
