"""run.sh: its own arguments are checked before anything is installed or run; --setup on a machine
whose python3 is a virtualenv that already holds torch (as on the GPU machine), with pip unable to
reach any package index, reuses that torch and installs nothing."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "run.sh")


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


def test_setup_reuses_the_torch_of_a_virtualenv_python3_offline(tmp_path):
    for name in ("run.sh", "requirements.txt", "requirements-test.txt"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    # python3 is this interpreter (a virtualenv holding torch and the requirements in CI); pip is cut
    # off from every index, local wheel folder and config file, so any install attempt would fail.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"], PIP_NO_INDEX="1",
               PIP_CONFIG_FILE=os.devnull)
    result = subprocess.run(["bash", "run.sh", "--setup"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    venv_python = str(tmp_path / ".venv" / "bin" / "python")
    where = subprocess.run([venv_python, "-c", "import sysconfig, torch, pytest, tiktoken; "
                            "print(sysconfig.get_path('purelib')); print(torch.__file__)"],
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    own_packages, torch_file = where.stdout.split()
    assert "python3-site-packages.pth" in os.listdir(own_packages)
    assert "torch" not in os.listdir(own_packages)  # not installed a second time
    assert torch_file == torch.__file__  # the very torch python3 imports
