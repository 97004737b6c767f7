"""``interneg --help`` answers at once: no command's heavy imports happen to parse the arguments.

Checked by what is imported, not by the clock (a loaded CI machine would make a time flaky):
torch and open_clip alone take seconds, kafka and faiss a good part of one.
"""
import subprocess
import sys

import pytest

HEAVY = ("torch", "open_clip", "kafka", "faiss")


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["score-worker", "--help"], ["local-run", "--help"]])
def test_help_imports_nothing_heavy(argv):
    code = (
        "import sys; from workers.cli import main; status = main(%r); "
        "print(status, sorted(m for m in %r if m in sys.modules))" % (argv, HEAVY)
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "0 []"
