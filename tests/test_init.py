"""`import tml` stays light (no torch, no Lightning) and still offers tml.load, imported on first use."""

import subprocess
import sys

from tests.conftest import REPO_ROOT

PROBE = """
import sys, tml, tml.config
assert "load" in dir(tml), dir(tml)
heavy = [name for name in ("torch", "lightning") if name in sys.modules]
assert not heavy, heavy
tml.load
assert "tml.pretrained" in sys.modules and "torch" in sys.modules
"""


def test_importing_tml_leaves_torch_for_the_first_use_of_tml_load():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
