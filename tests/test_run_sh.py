"""run.sh: its own arguments are checked before anything is installed or run; --setup on a machine
whose python3 is a virtualenv that already holds torch (as on the GPU machine), with pip unable to
reach any package index, reuses that torch and installs nothing; when that python3 lacks the optional
packages (matplotlib, pytest), setup names them with the command to add them and still succeeds."""

import json
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
    (["--seeds", "2", "--seed", "5"], "run.sh: --seeds 2 runs seeds 0 to 1; give --seeds or --seed, not both"),
    (["--seed=5", "--seeds", "1"], "run.sh: --seeds 1 runs seeds 0 to 0; give --seeds or --seed, not both"),
    (["--seeds", "3", "--run-id", "x"], "run.sh: --run-id names one run and --seeds 3 makes 3; leave out --run-id "
                                        "(each run gets a log of its own)"),
    (["--save=ck.pt", "--seeds", "3"], "run.sh: --save names one run and --seeds 3 makes 3; leave out --save "
                                       "(each run would overwrite the checkpoint of the one before)"),
    (["--setup", "--recipe", "muon"], "run.sh: --setup only installs; leave out the other arguments (--recipe muon)"),
    (["--recipes", "aurora,soap-muon", "--recipe", "muon"], "run.sh: give --recipe NAME or --recipes A,B,..., not both"),
    (["--recipes", "aurora soap-muon"], "run.sh: --recipes takes recipe names separated by commas, got 'aurora soap-muon'"),
    (["--recipes", "aurora,muon", "--save", "ck.pt"], "run.sh: --save names one run and --recipes makes one per "
                                                      "recipe and seed; leave it out"),
    # The = spelling slipped past: muon trained into a log named aurora.
    (["--recipes", "aurora", "--recipe=muon"], "run.sh: give --recipe NAME or --recipes A,B,..., not both"),
    (["--recipes=aurora,muon", "--recipe", "muon"], "run.sh: give --recipe NAME or --recipes A,B,..., not both"),
    (["--seeds=two"], "run.sh: --seeds takes a whole number of runs (1 or more), got 'two'"),
    # A recipe given twice trained once, then failed on the second log.
    (["--recipes", "muon,aurora,muon"], "run.sh: --recipes names muon twice; give each recipe once"),
    # Seed 1 was refused only after seed 0 had trained.
    (["--seeds", "2", "--resume", "ck.pt"], "run.sh: --resume names one run and --seeds 2 makes 2; leave out --resume "
                                            "(a checkpoint continues the one run that saved it)"),
    (["--resume=ck.pt", "--recipes", "aurora,muon"], "run.sh: --resume names one run and --recipes makes one per "
                                                     "recipe and seed; leave it out"),
])
def test_its_own_arguments_are_refused_with_one_line_before_setup(args, message):
    done = subprocess.run(["bash", RUN_SH, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [message]


def project_copy(folder):
    """run.sh with what it runs, in `folder`, using this environment as its .venv (nothing to install)."""
    for name in ("run.sh", "requirements.txt", "requirements-test.txt", "train_gpt.py", "optimizers.py"):
        shutil.copy(os.path.join(ROOT, name), folder / name)
    for name in ("data", "records"):
        shutil.copytree(os.path.join(ROOT, name), folder / name,
                        ignore=shutil.ignore_patterns("synthetic", "fineweb10B", "__pycache__", "20*"))
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), folder / ".venv")


@pytest.mark.parametrize("args, message", [
    (["--tiny", "--recipe", "adam"], "argument --recipe: invalid choice: 'adam'"),
    (["--train-files", "nowhere_*.bin"], "error: --train-files 'nowhere_*.bin': the glob matches no file"),
    (["--recipes", "aurora,adam"], "argument --recipe: invalid choice: 'adam'"),
])
def test_arguments_train_gpt_refuses_are_refused_before_any_data_is_written(tmp_path, args, message):
    """train_gpt.py --check-args decides (no copy of its choices in bash), after setup, before data/synthetic.py."""
    project_copy(tmp_path)
    done = subprocess.run(["bash", "run.sh", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "data" / "synthetic").exists()
    assert not (tmp_path / "logs").exists()


def test_check_args_checks_every_run_and_tabulates_nothing(tmp_path):
    """`--recipes muon --check-args` checked the runs, then ended in records/stats.py's error on logs that no run
    wrote."""
    project_copy(tmp_path)
    done = subprocess.run(["bash", "run.sh", "--recipes", "muon,aurora", "--seeds", "2", "--check-args"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.splitlines()[-1] == ("run.sh: --check-args: the runs were only checked, so there is nothing to "
                                            "tabulate")
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_cpu_runs_tabulate_recipes_and_keep_valid_synthetic_shards(tmp_path):
    """bash run.sh --recipes A,B --seeds 2 trains every seed of each recipe (runs named by recipe and seed) and
    then runs records/stats.py on each recipe's, writing data/synthetic/ first. Later CPU runs keep the shards
    when data/shards.py --tiny finds them valid and enough (run.sh wrote them again on every CPU run) and
    write them again when they are not. Uncompiled; one step a run, and --check-args for the later runs
    (run.sh decides about the data before it starts the trainer), to keep the test short."""
    project_copy(tmp_path)
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    shards = tmp_path / "data" / "synthetic"

    def run_sh(*args):
        done = subprocess.run(["bash", "run.sh", "--tiny", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    tables = run_sh("--recipes", "aurora,aurora-ema-ref", "--seeds", "2", "--steps", "1", "--no-diagnostics")
    assert "wrote 3 shards" in tables
    logs = sorted(path.name for path in (tmp_path / "logs").iterdir())
    assert [name.split("-", 3)[-1] for name in logs] == ["aurora-ema-ref-seed0.txt", "aurora-ema-ref-seed1.txt",
                                                         "aurora-seed0.txt", "aurora-seed1.txt"]
    assert "== aurora (n=2): 2 run(s) from 2 log(s)" in tables
    assert "== aurora-ema-ref (n=2): 2 run(s) from 2 log(s)" in tables
    seeds = {name: events_of(tmp_path / "logs" / name)["seed"] for name in logs}
    assert sorted(seeds.values()) == [0, 0, 1, 1] and all(name.endswith(f"seed{s}.txt") for name, s in seeds.items())
    written = {path.name: path.stat().st_mtime_ns for path in shards.iterdir()}
    assert "run.sh: data/synthetic/ holds valid shards for the CPU preset: kept" in run_sh("--check-args")
    assert {path.name: path.stat().st_mtime_ns for path in shards.iterdir()} == written
    val = shards / "synthetic_val_000000.bin"
    val.write_bytes(val.read_bytes()[:-100])  # truncated
    assert "wrote 3 shards" in run_sh("--check-args")
    assert val.stat().st_size == 1024 + 2 * 1_000_000


def events_of(log):
    """The config record of a run's log."""
    line = next(line for line in log.read_text().splitlines() if line.startswith("config "))
    return json.loads(line[len("config "):])


def offline_setup(clone, python3_bin):
    """`bash run.sh --setup` in a copy of the project, with python3 from python3_bin first on PATH and pip
    cut off from every index, local wheel folder and config file, so any install attempt fails."""
    for name in ("run.sh", "requirements.txt", "requirements-test.txt"):
        shutil.copy(os.path.join(ROOT, name), clone / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PATH=str(python3_bin) + os.pathsep + env["PATH"], PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    return subprocess.run(["bash", "run.sh", "--setup"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=300)


def test_setup_reuses_the_torch_of_a_virtualenv_python3_offline(tmp_path):
    # python3 is this interpreter (a virtualenv holding torch and the requirements in CI).
    result = offline_setup(tmp_path, os.path.dirname(sys.executable))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    python3 = shutil.which("python3", path=os.path.dirname(sys.executable))
    assert result.stdout.splitlines() == [f"run.sh: .venv uses the torch of python3 ({python3}): {torch.__version__}"]
    venv_python = str(tmp_path / ".venv" / "bin" / "python")
    where = subprocess.run([venv_python, "-c", "import sysconfig, torch, pytest, tiktoken; "
                            "print(sysconfig.get_path('purelib')); print(torch.__file__)"],
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    own_packages, torch_file = where.stdout.split()
    assert "python3-site-packages.pth" in os.listdir(own_packages)
    assert "torch" not in os.listdir(own_packages)  # not installed a second time
    assert torch_file == torch.__file__  # the very torch python3 imports


OPTIONAL = ("matplotlib", "mpl_toolkits", "pylab", "pytest", "_pytest", "py.py")


def test_setup_without_matplotlib_and_pytest_offline_names_them_and_succeeds(tmp_path):
    """python3 a virtualenv that sees this interpreter's packages but matplotlib and pytest (as a GPU
    machine's python3 may be): setup cannot get them offline, says which and how, and exits 0."""
    machine = tmp_path / "machine"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(machine)], check=True, timeout=120)
    own = subprocess.run([str(machine / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    ours = os.path.dirname(os.path.dirname(torch.__file__))
    visible = tmp_path / "visible"  # every package of ours (and its metadata) but the optional ones
    visible.mkdir()
    for entry in os.listdir(ours):
        if not entry.startswith(OPTIONAL):
            os.symlink(os.path.join(ours, entry), visible / entry)
    with open(os.path.join(own, "visible.pth"), "w") as f:
        f.write(str(visible) + "\n")
    clone = tmp_path / "clone"
    clone.mkdir()
    result = offline_setup(clone, machine / "bin")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("run.sh: .venv uses the torch of python3 (") and lines[0].endswith(torch.__version__)
    wanted = "matplotlib pytest pytest-timeout"  # pytest-timeout cannot import without pytest
    assert lines[1:] == [f"run.sh: installing into .venv (optional: plots, tests): {wanted}",
                         f"run.sh: could not install {wanted} (no package index reachable?); training does "
                         f"not need them. Add them later with: .venv/bin/python -m pip install {wanted}"]
    trains = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c", "import torch, numpy, tiktoken, "
                             "huggingface_hub, tqdm; import train_gpt"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert trains.returncode == 0, trains.stderr
