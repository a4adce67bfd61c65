"""benchmarks/versus_record.py on a small stand-in record log the test writes: a script with a record's
habits (data under data/fineweb10B/, a step-count constant, trials from its last argument, torchrun,
the leaderboard's val lines), small enough for the CPU. Unlike a record it falls back to the CPU when
torch sees no GPU, so that it runs here; versus_record never edits the device either way."""

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "versus_record.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import versus_record  # noqa: E402
from versus_record import RecordError, set_step_count, trials_of  # noqa: E402

STAND_IN = '''import glob, os, sys, time
import numpy as np
import torch
import torch.distributed as dist

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

def shard(pattern, count):
    path = sorted(glob.glob(pattern))[0]
    assert np.fromfile(path, dtype=np.int32, count=3)[2] > count, "a record loader wants one token more"
    return torch.from_numpy(np.fromfile(path, dtype=np.uint16, offset=1024, count=count).astype(np.int64))

val = shard("data/fineweb10B/fineweb_val_*.bin", 16385)
num_trials = int(sys.argv[-1]) if len(sys.argv) > 1 else 1
for _ in range(num_trials):
    train_steps = 1000
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(512, 32), torch.nn.Linear(32, 512)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train = shard("data/fineweb10B/fineweb_train_*.bin", train_steps * 4096 + 1)
    loss_of = lambda x: torch.nn.functional.cross_entropy(model(x[:-1].to(device)), x[1:].to(device))
    training_time, t0 = 0.0, time.perf_counter()
    for step in range(train_steps + 1):
        if step == 0 or step == train_steps:
            training_time += time.perf_counter() - t0
            with torch.no_grad():
                val_loss = loss_of(val).item()
            print(f"step:{step}/{train_steps} val_loss:{val_loss:.5f} train_time:{training_time:.3f}s step_avg:0.00ms")
            t0 = time.perf_counter()
        if step == train_steps:
            break
        loss_of(train[step * 4096:(step + 1) * 4096 + 1]).backward()
        opt.step()
        opt.zero_grad()
dist.destroy_process_group()
'''


def stand_in_log(path):
    path.write_text(STAND_IN + "=" * 100 + "\nRunning PyTorch 2.10.0 on a stand-in with world_size 1\n" + "=" * 100 +
                    "\nstep:0/1000 val_loss:6.23832 train_time:0.000s step_avg:nanms\n")
    return path


def test_versus_record_runs_both_sides_on_a_stand_in_log(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, SCRIPT, "--record-log", str(stand_in_log(tmp_path / "log.txt")),
                           "--steps", "3", "--tiny", "--device", "cpu", "--work", str(tmp_path / "work")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "edited: line 17 'train_steps = 1000' -> 'train_steps = 3'; nothing else changed" in lines[0]
    code = (tmp_path / "work" / "record.py").read_text()
    assert code == STAND_IN.replace("train_steps = 1000", "train_steps = 3")  # the only change
    assert os.path.islink(tmp_path / "work" / "data" / "fineweb10B" / "fineweb_train_000001.bin")
    trials = [re.fullmatch(r"(record|ours \(aurora\)) +trial (\d): +([0-9.]+) ms/step \((compile included|"
                           r"compile-free)\)   val loss step 0 ([0-9.]+), step 3 ([0-9.]+)", line) for line in lines[2:6]]
    assert all(trials), lines
    assert [(m[1], m[2]) for m in trials] == [("record", "1"), ("record", "2"), ("ours (aurora)", "1"),
                                              ("ours (aurora)", "2")]
    for m in trials:
        assert float(m[3]) > 0 and float(m[6]) < float(m[5])  # time measured, loss falls
    assert all(float(m[5]) == 6.23833 for m in trials[2:])  # ours: the zero head gives ln 512 at step 0
    ratio = re.fullmatch(r"ms/step, compile-free trial: record ([0-9.]+), ours ([0-9.]+), ours/record ([0-9.]+)x",
                         lines[6])
    assert ratio and float(ratio[3]) == pytest.approx(float(ratio[2]) / float(ratio[1]), rel=0.01)


def test_step_constant_must_be_unique():
    with pytest.raises(RecordError, match="found 0 step-count constants"):
        set_step_count("steps = compute()\n", 5, "log.txt")
    with pytest.raises(RecordError, match="found 2 step-count constants"):
        set_step_count("train_steps = 1\nif x:\n    train_steps = 2\n", 5, "log.txt")
    assert set_step_count("  num_iterations = 1750  # the record\n", 50, "l")[0] == "  num_iterations = 50\n"


def test_help_and_a_log_without_code(tmp_path):
    assert subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, timeout=120).returncode == 0
    (tmp_path / "log.txt").write_text("step:0/10 val_loss:1.0\n")
    done = subprocess.run([sys.executable, SCRIPT, "--record-log", str(tmp_path / "log.txt"), "--work",
                           str(tmp_path / "w"), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no line of 100 '='" in done.stderr


def record_log(path, code):
    path.write_text(code + "=" * 100 + "\nstep:0/1000 val_loss:6.23832 train_time:0.000s step_avg:nanms\n")
    return str(path)


@pytest.fixture
def temp_folder(tmp_path, monkeypatch):
    """Where tempfile makes the default work folder, so that a test sees what is left there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_code_that_does_not_parse_is_refused_before_any_work(tmp_path, temp_folder, capsys):
    log = record_log(tmp_path / "log.txt", "train_steps = 1000\nif train_steps\n    print(train_steps)\n")
    assert versus_record.main(["--record-log", log, "--work", str(tmp_path / "work"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {log}: its code does not parse (line 2: ") and err.count("\n") == 1, err
    assert not (tmp_path / "work").exists() and os.listdir(temp_folder) == []


@pytest.mark.parametrize("argv, message", [
    (["--timeout", "-1"], "error: --timeout must be at least 1 second, got -1"),
    (["--timeout", "0"], "error: --timeout must be at least 1 second, got 0"),
    (["--steps", "0"], "error: --steps must be at least 1, got 0"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, temp_folder, capsys, argv, message):
    log = record_log(tmp_path / "log.txt", "train_steps = 1000\n")
    with pytest.raises(SystemExit) as refused:
        versus_record.main(["--record-log", log, *argv])
    assert refused.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)
    assert os.listdir(temp_folder) == []


def test_no_work_folder_is_left_after_a_refusal_or_a_failure(tmp_path, temp_folder, capsys):
    """The default work folder is made after every check and removed at the end, even when a side fails."""
    no_code = tmp_path / "no_code.txt"
    no_code.write_text("step:0/10 val_loss:1.0\n")
    assert versus_record.main(["--record-log", str(no_code), "--device", "cpu"]) == 2
    assert "no line of 100 '='" in capsys.readouterr().err and os.listdir(temp_folder) == []
    failing = record_log(tmp_path / "log.txt", "train_steps = 1000\nraise SystemExit(3)\n")
    assert versus_record.main(["--record-log", failing, "--steps", "1", "--tiny", "--device", "cpu"]) == 1
    assert "error: the record failed (exit " in capsys.readouterr().err
    assert os.listdir(temp_folder) == []


def test_every_flag_is_checked_before_any_work(tmp_path, temp_folder, capsys):
    log = record_log(tmp_path / "log.txt", "train_steps = 1000\n")
    (tmp_path / "file").write_text("x")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"# caf\xe9\ntrain_steps = 1000\n" + b"=" * 100 + b"\n")
    cases = [
        (["--record-log", str(tmp_path)], f"error: --record-log {tmp_path} is a folder, not a log file"),
        (["--record-log", log, "--steps", "4096"],
         "error: --steps 4096 needs 2,147,483,650 train tokens in one shard, more than a shard holds (2,147,483,647)"),
        (["--record-log", log, "--work", str(tmp_path / "file")],
         f"error: --work {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder; choose another --work"),
    ]
    if not torch.cuda.is_available():  # the default device: ours would fail after the record's run
        cases.append((["--record-log", log], "error: --device cuda: torch "))
    for argv, message in cases:
        with pytest.raises(SystemExit) as refused:
            versus_record.main(argv)
        assert refused.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]
    assert versus_record.main(["--record-log", str(latin1), "--work", str(tmp_path / "w"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {latin1}: cannot read it as UTF-8 text")
    assert sorted(os.listdir(tmp_path)) == ["file", "latin1.txt", "log.txt", "tmp"] and os.listdir(temp_folder) == []


def test_trials_are_read_with_the_readout_loss_where_a_line_has_one():
    """#46-style lines (ours for such recipes too) put the readout's val_ema_loss between val_loss and train_time."""
    trial = ("step:0/4 val_loss:6.00000 val_ema_loss:6.00000 train_time:0.000s step_avg:nanms\n"
             "step:4/4 val_loss:5.00000 val_avg_loss:5.00000 val_ema_loss:4.90000 train_time:0.400s step_avg:100.00ms\n")
    assert trials_of("noise\n" + trial + "step:1/4 train_time:0.1s\n" + trial) == [(0, 6.0, 4.9, 100.0)] * 2
    with pytest.raises(RecordError, match="no train_time"):
        trials_of("step:0/4 val_loss:6.0\nstep:4/4 val_loss:5.0\n")
