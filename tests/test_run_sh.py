"""run.sh: its own arguments are checked before anything is installed or run."""

import os
import subprocess

import pytest

RUN_SH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run.sh")


@pytest.mark.parametrize("args, message", [
    (["--seeds"], "run.sh: --seeds needs a value, e.g. --seeds 20"),
    (["--seeds", "--tiny"], "run.sh: --seeds needs a value, e.g. --seeds 20"),
    (["--seeds", "three"], "run.sh: --seeds takes a whole number of runs (1 or more), got 'three'"),
    (["--seeds", "0"], "run.sh: --seeds takes a whole number of runs (1 or more), got '0'"),
    (["--tiny", "--recipe"], "run.sh: --recipe needs a value, e.g. --recipe aurora"),
    (["--steps"], "run.sh: --steps needs a value, e.g. --steps 500"),
])
def test_a_flag_without_its_value_is_one_clear_error(args, message):
    done = subprocess.run(["bash", RUN_SH, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [message]
