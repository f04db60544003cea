"""The README's promises: its offline usage example runs and prints what it says, its commands exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_offline_example_runs_and_prints_its_comment(tmp_path):
    code = BLOCKS[1]
    script = tmp_path / "example.py"  # a real file: nnsight reads the source of the trace block
    script.write_text(code)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    expected = re.search(r"print\(.*\)\s+# (.*)", code).group(1)
    assert res.stdout.strip().splitlines()[-1] == expected


def test_online_example_names_real_api():
    """The Hub example cannot run here (no network); every name it imports and calls must exist."""
    from dictionaries import (  # noqa: F401
        attach,
        load_dictionary,  # noqa: F401
        wrap_model,
    )
    from dictionaries.attachment import Attachment

    for method in ("ablate", "splice", "steer", "features"):
        assert hasattr(Attachment, method)


def test_every_documented_command_exists():
    helptext = subprocess.run([sys.executable, "-m", "dictionaries.cli", "--help"], capture_output=True,
                              text=True, timeout=60).stdout
    for command in set(re.findall(r"^dictctl (\w+)", README, flags=re.M)):
        assert re.search(rf"│ {command}\s", helptext), command
