"""train_gpt.py: the harness of docs/benchmark.md at tiny sizes, on CPU, uncompiled
(TORCH_COMPILE_DISABLE=1)."""

import contextlib
import dataclasses
import datetime
import errno
import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import types
import weakref
import zipfile

import numpy as np
import pytest
import torch
import torch.distributed as dist

import train_gpt as tg
from benchmarks.step import host_syncs_counted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
from shards import write_shard  # noqa: E402
from synthetic import write_synthetic_shards  # noqa: E402

TRAIN_GPT = os.path.join(ROOT, "train_gpt.py")
LEADERBOARD_PATTERN = re.compile(r"step:(\d+)/(\d+)\s+val_loss:([0-9.]+)")
VAL_LINE = re.compile(r"step:(\d+)/(\d+) val_loss:(\d+\.\d{5}) train_time:(\d+\.\d{3})s step_avg:(\d+\.\d{2})ms")
RUNNING_LINE = re.compile(r"Running PyTorch \S+ (?:compiled for CUDA \S+|built without CUDA) on .+ with world_size (\d+)")
STEPS = 12  # the tiny preset validates at 0 and 12 (T); few steps keep the file fast on a busy CPU
TINY_BATCH = tg.TINY.batch_tokens
TORCHRUN_2 = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
PROBE_TOKENS = 2048  # 8 sequences: the test shards are smaller than the default 65536, and the probe is cheap
SMALL_PROBE = ("--probe-tokens", str(PROBE_TOKENS))


def uncompiled_env(threads=None):
    """threads=1 as torchrun gives each of several processes: one process then computes bit for bit what
    two do (CPU kernels split their sums by thread count)."""
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", PYTHONPATH=ROOT)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


# The CPU tests choose the CPU explicitly, so they give the same results on a GPU machine (and gloo).
ON_CPU = ("--device", "cpu")


@contextlib.contextmanager
def own_session(command, **kwargs):
    """subprocess.Popen(command) with text pipes in a session of its own; if it still runs when the block
    ends (a failed assertion, a timeout, pytest-timeout, Ctrl-C), its whole process group is killed,
    torchrun's workers included, so no process outlives the test."""
    with subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kwargs) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def wait_while_running(process, ready, seconds, failure):
    """Polls ready() until it holds; fails with `failure` if the process ends first or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, failure
        time.sleep(0.1)


def run_bounded(command, timeout, **kwargs):
    """subprocess.run(command, capture_output=True, text=True) in its own session (own_session)."""
    with own_session(command, **kwargs) as process:
        stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_trainer(args, cwd, script=TRAIN_GPT, launcher=(), check=True, threads=None):
    result = run_bounded([sys.executable, *launcher, script, *ON_CPU, *args], 600, cwd=cwd,
                         env=uncompiled_env(threads))
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def split_log(text):
    """(code, lines after the code): the code is everything before the first line of 100 '='."""
    lines = text.split("\n")
    cut = lines.index(tg.SEPARATOR)
    return "\n".join(lines[:cut]) + "\n", [line for line in lines[cut:] if line]


def val_records(lines):
    return [(int(m[1]), int(m[2]), float(m[3])) for m in map(VAL_LINE.fullmatch, lines) if m]


def events(lines, kind):
    return [json.loads(line[len(kind) + 1:]) for line in lines if line.startswith(kind + " ")]


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(str(folder), vocab_size=512, train_shards=1, tokens_per_shard=(STEPS + 2) * TINY_BATCH,
                           val_tokens=tg.TINY.val_tokens + 100)
    return ["--train-files", str(folder / "synthetic_train_*.bin"), "--val-files", str(folder / "synthetic_val_*.bin"),
            *SMALL_PROBE]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_args):
    """Two trials of the CPU preset, each saved at its end, on one thread (comparable with two processes).
    Returns (folder, lines after the code, code); the console output is in folder/console.txt."""
    folder = tmp_path_factory.mktemp("tiny_run")
    result = run_trainer(["--tiny", "--steps", str(STEPS), "--trials", "2", "--run-id", "tiny", "--save", "ck.pt",
                          *data_args], cwd=folder, threads=1)
    (folder / "console.txt").write_text(result.stdout)
    code, lines = split_log((folder / "logs" / "tiny.txt").read_text())
    return folder, lines, code


# ---- the log of a tiny run (docs/benchmark.md#log-format) ----

def test_tiny_run_log_follows_the_leaderboard_format(tiny_run):
    _, lines, _ = tiny_run
    assert lines[0] == tg.SEPARATOR and lines[2] == tg.SEPARATOR
    assert RUNNING_LINE.fullmatch(lines[1]) and RUNNING_LINE.fullmatch(lines[1])[1] == "1"
    assert "CUDA None" not in lines[1]
    for line in lines[3:]:
        is_val_line = VAL_LINE.fullmatch(line) is not None
        # The leaderboard's pattern finds exactly the val lines, and nothing else.
        assert is_val_line == (LEADERBOARD_PATTERN.search(line) is not None), line
        if not is_val_line:
            kind, payload = line.split(" ", 1)
            assert kind in ("config", "diag", "done") and isinstance(json.loads(payload), dict), line
    assert lines[3].startswith("config ") and lines[-1].startswith("done ")


def test_console_shows_val_lines_and_one_readable_diag_line_per_validation(tiny_run):
    """The JSON diagnostics stay in the log file; the console gets the record's val lines and a summary."""
    folder, lines, _ = tiny_run
    console = (folder / "console.txt").read_text().splitlines()
    assert not [line for line in console if line.startswith("diag {")]
    def val_lines(text_lines):
        return [line for line in text_lines if VAL_LINE.fullmatch(line)]
    assert val_lines(console) == val_lines(lines) and len(val_lines(lines)) == 4
    summaries = [line for line in console if line.startswith("diag: ")]
    neurons = [d for d in events(lines, "diag") if d["kind"] == "neurons"]
    assert len(summaries) == len(neurons) == 4 and len(events(lines, "diag")) > len(neurons)
    assert summaries[0].startswith(f"diag: dead {100 * neurons[0]['dead_fraction']:.1f}%, nearly dead ")
    assert "leverage cv fc " in summaries[-1] and "fc update norm live " in summaries[-1]
    assert console[-1].startswith("done ")


def test_console_gets_one_readable_config_line_and_the_log_the_json(tiny_run):
    folder, lines, _ = tiny_run
    console = (folder / "console.txt").read_text().splitlines()
    (config,) = events(lines, "config")
    assert config["differs_from_record"] and not [line for line in console if line.startswith("config {")]
    (summary,) = [line for line in console if line.startswith("config")]
    dtypes = ("activations in float32, polar iterations in float32 (this CPU's bf16 matmuls are slow)"
              if tg.bf16_matmuls_are_slow(tg.cpu_flags(), os.environ) else
              "activations in bfloat16, polar iterations in bfloat16")
    assert summary == (f"config: aurora, tiny preset, {STEPS} steps of 16 x 256 tokens, 2 trials, seed 0, cpu, world "
                       f"size 1, not compiled; diagnostics on {PROBE_TOKENS:,}-token probes every 50 steps; {dtypes}; "
                       f"not a record ({len(config['differs_from_record'])} settings differing); the whole config is "
                       f"in logs/tiny.txt")


@pytest.mark.parametrize("flags, diagnostics, record", [
    (["--no-diagnostics"], "no diagnostics", "a record run"),
    (["--probe-every", "250", "--seed", "3"], "diagnostics on 65,536-token probes every 250 steps", "a record run"),
    (["--freeze-mlp-scalars", "--trials", "1"], "diagnostics on 65,536-token probes at every validation",
     "not a record (1 setting differing)"),
])
def test_config_summary_of_full_size_runs(flags, diagnostics, record):
    args = tg.parse_args(flags)
    hp = tg.resolve_hyperparameters(args)
    config = tg.config_record(args, hp, tg.RECIPES["aurora"], 3200, tg.Distributed(0, 8, 0, True),
                              torch.device("cpu"), tg.batch_layout(hp, 8), ["train.bin"], "val.bin", "r")
    assert tg.config_summary(config, "logs/r.txt") == (
        f"config: aurora, full preset, 3200 steps of 512 x 1024 tokens, 1 trial, seed {args.seed}, cpu, world size 8, "
        f"{'compiled' if config['compiled'] else 'not compiled'}; {diagnostics}; activations in bfloat16, polar "
        f"iterations in bfloat16; {record}; the whole config is in logs/r.txt")


@pytest.mark.parametrize("flags, environ, slow", [
    (set(), {}, True),  # AMD Zen 2 and 3, Intel before Cooper Lake
    ({"avx2", "avx512f"}, {}, True),  # AVX512 without bf16 (Skylake, Cascade Lake)
    ({"avx512f", "avx512_bf16"}, {}, False),  # AMD Zen 4, Intel Cooper Lake
    ({"avx512f", "avx512_bf16", "amx_bf16"}, {}, False),  # Intel Sapphire Rapids and later
    ({"avx512f", "avx512_bf16", "amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, True),  # the AVX2 paths forced
    ({"avx512f", "avx512_bf16", "amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}, False),
    ({"avx512f", "avx512_bf16", "amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, False),
])
def test_bf16_matmuls_are_slow_without_the_cpus_bf16_instructions(flags, environ, slow):
    assert tg.bf16_matmuls_are_slow(flags, environ) is slow


@pytest.mark.parametrize("flags, device, slow_cpu_float32", [
    (["--tiny"], "cpu", True), (["--tiny"], "cuda", False), ([], "cpu", False)])
@pytest.mark.parametrize("recipe_name", ["aurora", "soap-muon"])
def test_the_cpu_preset_takes_float32_math_only_where_bf16_is_slow(flags, device, slow_cpu_float32, recipe_name):
    """Only the matrix optimizers' groups change; full size and a GPU keep the records' dtypes; the log's
    config and the console say which dtypes ran."""
    args = tg.parse_args(["--recipe", recipe_name, *flags])
    hp = tg.resolve_hyperparameters(args)
    recipe = tg.RECIPES[recipe_name]
    for cpu, slow in (({"avx512_bf16", "amx_bf16"}, False), (set(), True)):
        dtype = tg.cpu_preset_dtype(args, torch.device(device), cpu, {})
        float32 = slow and slow_cpu_float32
        assert dtype == ("float32" if float32 else "bfloat16")
        ran = tg.cpu_preset_recipe(recipe, dtype)
        assert (ran == recipe) is not float32
        assert tg.polar_dtype(ran) == dtype
        for spec, ours in zip(recipe.optimizers, ran.optimizers):
            for group, our_group in zip(spec.groups, ours.groups):
                changed = {k: v for k, v in our_group.options.items() if group.options.get(k) != v}
                assert changed == ({"polar_dtype": "float32"} if float32 and spec.kind in tg.MATRIX_OPTIMIZERS
                                   else {}), (spec.kind, group.name)
        config = tg.config_record(args, hp, ran, 200, tg.Distributed(0, 1, 0, False), torch.device(device),
                                  tg.batch_layout(hp, 1), ["train.bin"], "val.bin", "r", activation_dtype=dtype)
        assert (config["polar_dtype"], config["activation_dtype"]) == (dtype, dtype)
        assert ("; activations in float32, polar iterations in float32 (this CPU's bf16 matmuls are slow); "
                if float32 else "; activations in bfloat16, polar iterations in bfloat16; ") in \
            tg.config_summary(config, "logs/r.txt")


def test_float32_activations_run_the_whole_forward_in_float32_and_keep_the_weights():
    """The CPU preset's float32 model: every block's input is float32; the parameters (the bf16 embedding too)
    and their init draws are those of the records' bf16 model; its features are that model's within bf16 rounding."""
    config = tg.TINY.model
    models = {}
    for dtype in (torch.bfloat16, torch.float32):
        models[dtype] = tg.GPT(config, dtype)
        tg.init_parameters(models[dtype], torch.Generator().manual_seed(0))
    bf16, fp32 = models[torch.bfloat16], models[torch.float32]
    for (name, a), (_, b) in zip(bf16.named_parameters(), fp32.named_parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with torch.no_grad():  # the init zeroes every proj: give the blocks something to compute
        for model in (bf16, fp32):
            for block in model.blocks:
                block.attn.proj.weight.normal_(std=0.02, generator=torch.Generator().manual_seed(2))
    seen = []
    hooks = [block.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
             for block in fp32.blocks]
    inputs = torch.randint(0, config.vocab_size, (2, config.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features_bf16, features_fp32 = bf16.features(inputs), fp32.features(inputs)
    for hook in hooks:
        hook.remove()
    assert seen == [torch.float32] * config.num_layers
    assert features_bf16.dtype == torch.bfloat16 and features_fp32.dtype == torch.float32
    assert not torch.equal(features_fp32.bfloat16(), features_bf16)
    assert torch.allclose(features_fp32, features_bf16.float(), atol=0.1, rtol=0.05)


def test_diagnostics_summary_reads_the_reports_and_skips_what_it_does_not_know():
    reports = {"neurons": {"dead_fraction": 0.351, "nearly_dead_fraction": 0.402, "dead_fraction_per_layer": [0.3],
                           "sparse_fraction": 0.5},  # a definition the summary has never heard of
               "fate": {"units_per_layer": [512], "ever_dead_fraction": 0.41, "revivals": 7},
               "fc_updates": {"since_step": 0, "matrices": {
                   "blocks.0.mlp.fc.weight": {"dead_update_norm": None, "live_update_norm": 0.04},
                   "blocks.1.mlp.fc.weight": {"dead_update_norm": 0.01, "live_update_norm": 0.02}}},
               "leverage": {"matrices": {"blocks.0.mlp.fc.weight": {"cv": 0.1}, "blocks.1.mlp.fc.weight": {"cv": 0.3},
                                         "blocks.0.mlp.proj.weight": {"cv": 1.5, "max_over_min": None}}},
               "other": {"matrices": "not a dict", "level": 3}}
    assert tg.diagnostics_summary(reports) == (
        "diag: dead 35.1%, nearly dead 40.2%, sparse 50.0% | fate: ever dead 41.0%, 7 revivals | "
        "fc update norm dead 0.01, live 0.03 | leverage cv fc 0.20, proj 1.50")
    reports = {"neurons": {"probe_tokens": 65536, "probe_seconds": 2.04, "dead_fraction": 0.1,
                           "low_power_fraction": 0.2, "train_dead_fraction": 0.05},
               "scalars": {"norm_gain_mean": [0.5, 0.7], "norm_gain_min": [0.1, 0.2], "fc_bias_mean": [-0.3, -0.1],
                           "mlp_input_rms": [0.6, 0.8]}}
    assert tg.diagnostics_summary(reports) == (
        "diag: dead 10.0%, low power 20.0%, train dead 5.0%, probes 2.0s | "
        "mlp scalars, mean over layers: norm gain 0.6, fc bias -0.2, input rms 0.7")
    assert tg.diagnostics_summary({"leverage": {}}) == "diag: "


def test_first_compiled_call_is_announced_and_timed_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tg, "compile_is_active", lambda: True)
    log = tg.RunLog(str(tmp_path / "log.txt"))
    run = types.SimpleNamespace(log=log, first_calls_done=set())
    assert [tg.first_call(run, "training step", lambda: 5) for _ in range(2)] == [5, 5]
    log.close()
    console = capsys.readouterr().out.splitlines()
    assert console[0] == "compiling the training step with torch.compile (on its first call; minutes on a CPU) ..."
    assert re.fullmatch(r"compiled the training step: its first call took \d+\.\ds", console[1])
    assert len(console) == 2 and (tmp_path / "log.txt").read_text() == ""  # the console only
    monkeypatch.setattr(tg, "compile_is_active", lambda: False)
    tg.first_call(types.SimpleNamespace(log=log, first_calls_done=set()), "step", lambda: None)
    assert capsys.readouterr().out == ""


def test_tiny_run_loss_falls_and_trials_restart_at_step_0(tiny_run):
    _, lines, _ = tiny_run
    records = val_records(lines)
    assert [(step, total) for step, total, _ in records] == [(0, STEPS), (STEPS, STEPS)] * 2
    for trial in (records[:2], records[2:]):
        assert trial[0][2] == pytest.approx(math.log(512), abs=1e-4)  # zero head: uniform logits
        assert trial[-1][2] < trial[0][2] - 0.3

def test_each_trial_starts_from_its_own_initialization(tiny_run):
    folder, _, _ = tiny_run
    first, second = (torch.load(folder / f"ck.trial{t}.pt", weights_only=True)["model"] for t in (0, 1))
    assert not torch.equal(first["blocks.0.mlp.fc.weight"], second["blocks.0.mlp.fc.weight"])


def test_config_line_records_the_settings_and_says_it_is_not_a_record(tiny_run):
    _, lines, _ = tiny_run
    (config,) = events(lines, "config")
    assert config["recipe"] == "aurora" and config["steps"] == STEPS and config["trials"] == 2
    assert config["record_step"] == tg.scaled_step(3175, STEPS, 3200)  # #17's reported step at this horizon
    assert config["seed"] == 0 and config["world_size"] == 1 and config["preset"] == "tiny"
    assert config["device"] == "cpu" and config["batch_seqs"] == 16
    matrix = config["recipe_settings"]["optimizers"][1]
    assert matrix["kind"] == "Aurora" and matrix["groups"][0]["lr"] == 0.0375
    assert matrix["options"] == {"weight_decay": 0.0, "momentum": 0.95, "nesterov": True, "pp_iterations": 2,
                                 "pp_beta": 0.5, "contra": 0.4, "uw_floor": 0.35}
    assert config["hyperparameters"]["model"]["vocab_size"] == 512
    assert "--tiny" in config["command"]
    assert config["is_record_recipe"] is False
    assert config["compiled"] is False  # the fixture runs with TORCH_COMPILE_DISABLE=1
    assert any(d.startswith(f"steps={STEPS}") for d in config["differs_from_record"])


def test_diagnostics_at_every_validation(tiny_run):
    _, lines, _ = tiny_run
    diags = events(lines, "diag")
    neurons = [d for d in diags if d["kind"] == "neurons"]
    assert [(d["trial"], d["step"]) for d in neurons] == [(t, s) for t in (0, 1) for s in (0, STEPS)]
    for d in neurons:
        assert d["probe_tokens"] == PROBE_TOKENS and d["probe_seconds"] > 0
        for probe in ("", "train_"):
            assert len(d[f"{probe}dead_fraction_per_layer"]) == tg.TINY.model.num_layers
            assert 0 <= d[f"{probe}dead_fraction"] <= d[f"{probe}nearly_dead_fraction"] <= 1
            assert 0 <= d[f"{probe}low_power_fraction"] <= 1
    scalars = [d for d in diags if d["kind"] == "scalars"]
    assert [(d["trial"], d["step"]) for d in scalars] == [(t, s) for t in (0, 1) for s in (0, STEPS)]
    assert scalars[0]["norm_gain_mean"] == [1.0] * 4 and scalars[0]["fc_bias_min"] == [0.0] * 4
    assert scalars[1]["norm_gain_mean"] != [1.0] * 4 and all(r > 0 for r in scalars[1]["mlp_input_rms"])
    fates = [d for d in diags if d["kind"] == "fate"]
    assert [(d["trial"], d["step"]) for d in fates] == [(t, s) for t in (0, 1) for s in (0, STEPS)]
    assert all(d["units_per_layer"] == [4 * tg.TINY.model.model_dim] * tg.TINY.model.num_layers for d in fates)
    updates = [d for d in diags if d["kind"] == "fc_updates"]
    # From the second probe of each trial on: what each fc received since the previous one.
    assert [(d["trial"], d["step"], d["since_step"]) for d in updates] == [(0, STEPS, 0), (1, STEPS, 0)]
    for d in updates:
        assert set(d["matrices"]) == {f"blocks.{i}.mlp.fc.weight" for i in range(tg.TINY.model.num_layers)}
        assert all(m["live_update_norm"] > 0 for m in d["matrices"].values())
    leverage = [d for d in diags if d["kind"] == "leverage"]
    # No update before the first step; afterwards every non-square block matrix (fc tall, proj wide).
    assert [(d["trial"], d["step"]) for d in leverage] == [(0, STEPS), (1, STEPS)]
    expected = {f"blocks.{i}.mlp.{name}.weight" for i in range(tg.TINY.model.num_layers) for name in ("fc", "proj")}
    for d in leverage:
        assert set(d["matrices"]) == expected
        for stats in d["matrices"].values():
            assert stats["cv"] >= 0 and stats["max_over_min"] >= 1 and 0 <= stats["starved_fraction"] <= 1


def test_records_tools_read_the_trainers_log(tiny_run):
    """records/stats.py finds the runs, the recipe and every diagnostic series in a real log."""
    folder, lines, _ = tiny_run
    sys.path.insert(0, os.path.join(ROOT, "records"))
    import stats
    result = stats.load_result_set([str(folder / "logs" / "tiny.txt")], "a")
    assert result.n == 2 and stats.recipe_of(result) == "aurora"
    summary = stats.summarize_diagnostics([result])["aurora"]
    # (The dead-row series need a dead unit, which 12 steps may not make.)
    assert set(summary) >= {"dead_fraction", "nearly_dead_fraction", "leverage_cv", "leverage_max_over_min",
                            "leverage_starved_fraction", "ever_dead_fraction", "permanent_fraction",
                            "revived_fraction", "fc_live_update_norm_per_step", "fc_live_preact_change_per_step"}
    logged = [d["dead_fraction"] for d in events(lines, "diag") if d["kind"] == "neurons" and d["step"] == STEPS]
    assert summary["dead_fraction"][STEPS].mean == pytest.approx(sum(logged) / 2)


def test_per_unit_records_beside_the_log_give_the_logged_fractions(tiny_run):
    """The units file round-trips through records/stats.py: its per-unit values give back every definition
    of every neurons line, for both probes and both trials."""
    folder, lines, _ = tiny_run
    sys.path.insert(0, os.path.join(ROOT, "records"))
    import stats
    records = stats.load_unit_records(str(folder / "logs" / "tiny.txt"))
    assert records["probe_tokens"] == PROBE_TOKENS and set(records) == {"probe_tokens", 0, 1}
    hidden = 4 * tg.TINY.model.model_dim
    for d in events(lines, "diag"):
        if d["kind"] != "neurons":
            continue
        trial = records[d["trial"]]
        (index,) = [i for i, step in enumerate(trial["steps"]) if step == d["step"]]
        for probe, prefix in (("val", ""), ("train", "train_")):
            assert trial[f"{probe}_firing_rate"].shape[1:] == (tg.TINY.model.num_layers, hidden)
            got = stats.unit_fractions(trial[f"{probe}_firing_rate"][index],
                                       trial[f"{probe}_power_over_layer_mean"][index])
            for name, value in got.items():
                assert value == pytest.approx(d[prefix + name], abs=1e-6), (probe, name)
    assert (folder / "logs" / "tiny.units.npz").stat().st_size < 100_000


def test_saved_checkpoint_holds_the_final_model(tiny_run, data_args):
    folder, lines, _ = tiny_run
    checkpoint = torch.load(folder / "ck.trial0.pt", weights_only=True)
    assert checkpoint["step"] == STEPS and checkpoint["recipe"] == "aurora" and len(checkpoint["optimizers"]) == 2
    adam, aurora = checkpoint["optimizers"]  # each optimizer's own state
    assert len(adam["param_groups"]) == 3 and set(adam["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert len(aurora["param_groups"]) == 1 and set(aurora["state"][0]) == {"momentum_buffer"}
    assert len(aurora["state"]) == 6 * tg.TINY.model.num_layers  # q, k, v, proj, fc, mlp proj per block
    (config,) = events(lines, "config")  # the run's activations: float32 where this CPU's bf16 matmuls are slow
    model = tg.GPT(tg.TINY.model, getattr(torch, config["activation_dtype"]))
    path = str(folder / "ck.trial0.pt")
    tg.load_model_state(model, tg.model_state_of(tg.read_checkpoint(path), path), path)
    val_path = data_args[3].replace("*", "000000")
    val_buffer = tg.val_slice(tg.load_shard(val_path, 512), tg.TINY.val_tokens, 0, 1)
    layout = tg.batch_layout(tg.TINY, 1)
    loss = tg.evaluate(model, val_buffer, layout, tg.TINY.model.seq_len, tg.TINY.val_tokens)
    assert f"{loss:.5f}" == f"{val_records(lines)[1][2]:.5f}"


# ---- the code in the log is one script that reproduces the run ----

def test_log_code_is_train_gpt_with_the_optimizers_inlined(tiny_run):
    _, _, code = tiny_run
    with open(TRAIN_GPT) as f:
        before, after = f.read().split("\n" + tg.OPTIMIZERS_IMPORT + "\n")
    # (Compared piecewise: optimizers.py may be edited by now; the cut-out run below checks the whole.)
    assert code.startswith(before + "\n") and code.endswith("\n" + after)
    inlined = code[len(before) + 1:len(code) - len(after) - 1]
    assert "class Aurora(" in inlined and "class NorMuon(" in inlined and "class Muon(" in inlined
    assert tg.OPTIMIZERS_IMPORT not in code.splitlines()


@pytest.mark.slow
def test_code_cut_from_the_log_reruns_alone_with_the_same_losses(tiny_run, data_args, tmp_path):
    _, lines, code = tiny_run
    (tmp_path / "run.py").write_text(code)
    result = subprocess.run([sys.executable, "run.py", *ON_CPU, "--tiny", "--steps", str(STEPS), "--run-id",
                             "cut", "--no-diagnostics", *data_args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={k: v for k, v in uncompiled_env(threads=1).items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["logs", "run.py"]
    cut_code, cut_lines = split_log((tmp_path / "logs" / "cut.txt").read_text())
    assert val_records(cut_lines) == val_records(lines)[:2]
    assert cut_code == code  # a cut script logs itself unchanged
    assert not events(cut_lines, "diag")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_compute_what_one_does(tiny_run, data_args, tmp_path):
    """Measured: two processes (one thread each, as torchrun sets) and one process on one thread give
    bit-identical weights and val losses, so nothing is allowed to differ. (One process on two threads
    differs by ~3e-5 in val loss after 20 steps: its CPU kernels split sums differently.)"""
    folder, lines, _ = tiny_run
    run_trainer(["--tiny", "--steps", str(STEPS), "--trials", "2", "--run-id", "two", "--save", "ck.pt",
                 *data_args], cwd=tmp_path, launcher=TORCHRUN_2)
    _, two_lines = split_log((tmp_path / "logs" / "two.txt").read_text())
    assert RUNNING_LINE.fullmatch(two_lines[1])[1] == "2"
    assert val_records(two_lines) == val_records(lines)  # 4 val lines, both trials
    assert len(val_records(lines)) == 4
    for trial in (0, 1):
        name = f"ck.trial{trial}.pt"
        assert_identical(torch.load(folder / name, weights_only=True)["model"],
                         torch.load(tmp_path / name, weights_only=True)["model"])


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_in_a_world_of_one_computes_what_the_plain_process_does(tiny_run, data_args, tmp_path):
    """--ddp under torchrun with one gloo process: DistributedDataParallel (summing hook, no_sync) and the
    matrix optimizers' all-gather path run, as on 8 GPUs, and give trial 0 of the plain run bit for bit."""
    folder, lines, _ = tiny_run
    run_trainer(["--tiny", "--steps", str(STEPS), "--run-id", "ddp1", "--save", "ck.pt", "--ddp",
                 "--no-diagnostics", *data_args], cwd=tmp_path, launcher=TORCHRUN_2[:-1] + ("--nproc_per_node=1",),
                threads=1)
    _, ddp_lines = split_log((tmp_path / "logs" / "ddp1.txt").read_text())
    config = events(ddp_lines, "config")[0]
    assert config["ddp"] and config["world_size"] == 1
    assert val_records(ddp_lines) == val_records(lines)[:2]
    assert_identical(torch.load(folder / "ck.trial0.pt", weights_only=True)["model"],
                     torch.load(tmp_path / "ck.pt", weights_only=True)["model"])


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "adam"], "error: argument --recipe: invalid choice: 'adam' (choose from "),
    (["--steps", "ten"], "error: argument --steps: invalid int value: 'ten'"),
    (["--seed"], "error: argument --seed: expected one argument"),
    (["--bogus"], "error: unrecognized arguments: --bogus"),
    (["--rec", "muon"], "error: unrecognized arguments: --rec muon"),  # an abbreviation would slip past run.sh
    (["--steps", "0"], "error: --steps must be at least 1, got 0"),
    (["--save", "ck.pt", "--keep-last", "3"], "error: --keep-last keeps the newest checkpoints of --save-every; give "
                                              "--save-every K too, or leave it out"),
    (["--stop-at", "5", "--save", "x.pt"], "error: --stop-at ends a run before its schedule does; leave out --save"),
    (["--save-every", "5"], "error: --save-every needs --save PATH"),
    (["--resume", "a.pt", "--init-from", "b.pt"], "error: --resume restores the weights itself; leave out --init-from"),
])
def test_an_argument_error_is_one_error_line(capsys, argv, message):
    """argparse's own errors too (not its usage text first)."""
    with pytest.raises(SystemExit) as refused:
        tg.parse_args(argv)
    error = capsys.readouterr().err
    assert refused.value.code == 2 and error.startswith(message) and error.count("\n") == 1, error


@pytest.mark.parametrize("argv, message", [
    (["--steps", "12", "--stop-at", "13"], "--stop-at 13: after the last step 12; give a step up to --steps"),
    (["--probe-tokens", "100"], "--probe-tokens 100: not a multiple of the sequence length 256"),
])
def test_settings_that_contradict_the_preset_are_refused_by_check_args(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert tg.main(["--tiny", "--check-args", *argv]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_val_shard_shorter_than_validation_is_refused(data_args, tmp_path, capsys):
    short = tmp_path / "short_val_000000.bin"
    write_tokens(short, tg.TINY.val_tokens)  # one token short: the targets need val_tokens + 1
    assert tg.main(["--tiny", "--steps", "2", "--train-files", data_args[1], "--val-files", str(short)]) == 2
    assert capsys.readouterr().err == (f"error: {short}: fewer than the {tg.TINY.val_tokens + 1} tokens validation "
                                       f"needs\n")


def test_a_log_that_cannot_be_created_is_a_setup_error():
    with pytest.raises(tg.SetupError, match=r"^the log /sys/x.txt: cannot be created \(Permission denied\); run from"):
        tg.RunLog("/sys/x.txt")


def test_save_every_that_would_save_no_periodic_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tg.main(["--tiny", "--steps", "10", "--save", "ck.pt", "--save-every", "10", "--check-args"]) == 2
    assert capsys.readouterr().err == ("error: --save-every 10: no periodic checkpoint before the last step 10 (the "
                                       "final one is saved anyway); give K below it, or leave it out\n")
    assert tg.main(["--tiny", "--steps", "10", "--save", "ck.pt", "--save-every", "9", "--check-args"]) == 0


@pytest.mark.parametrize("run_id", ["", "a/b", "../up", ".hidden", "x" * 241, "tab\there"])
def test_a_run_id_that_is_not_a_plain_file_name_is_refused(capsys, run_id):
    with pytest.raises(SystemExit) as refused:
        tg.parse_args(["--run-id", run_id])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (f"error: --run-id {run_id!r}: give a plain file name of up to 240 bytes, "
                                       f"without '/' and not starting with '.' (the log is logs/RUN_ID.txt)\n")


@pytest.mark.parametrize("save, problem", [
    ("logs/same.txt", "is this run's log; give another file path"),
    ("logs/same.units.npz", "is this run's per-unit records file; give another file path"),
    ("c" * 240 + ".pt", "its checkpoints' names (up to 'cccc"),
])
def test_a_save_path_the_run_could_not_write_in_the_end_is_refused_before_any_work(tmp_path, monkeypatch, capsys,
                                                                                   save, problem):
    monkeypatch.chdir(tmp_path)
    assert tg.main(["--tiny", "--run-id", "same", "--save", save, "--save-every", "5", "--trials", "2",
                    "--check-args"]) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: --save {save}: {problem}") and message.count("\n") == 1, message


def test_a_model_too_large_for_the_device_memory_is_refused_before_any_work(capsys):
    ratio = 10_000_000  # a 1.28e9-unit MLP per layer: about 21 TB of weights, gradients and moments
    assert tg.main(["--tiny", "--device", "cpu", "--mlp-ratio", str(ratio), "--check-args"]) == 2
    message = capsys.readouterr().err
    assert re.fullmatch(rf"error: --mlp-ratio {ratio}: the model's weights, gradients and optimizer moments need "
                        r"about \d+ GB, more than the \d+ GB of cpu memory; give a smaller --mlp-ratio\n", message)


def test_ddp_without_torchrun_is_refused(capsys):
    with pytest.raises(SystemExit):
        tg.parse_args(["--ddp"])
    assert "--ddp needs a process group: start under torchrun" in capsys.readouterr().err


# ---- failures ----

def sigint_as_at_a_terminal():
    """preexec_fn of a child that a test stops with SIGINT, as Ctrl-C would. A shell starts a background
    job (`pytest &`, a CI runner's step) with SIGINT ignored, children inherit that, and Python then
    installs no KeyboardInterrupt handler: the SIGINT would be ignored and the run go on to the end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_interrupt_leaves_a_complete_log_and_the_last_checkpoint(data_args, tmp_path):
    with own_session([sys.executable, TRAIN_GPT, *ON_CPU, "--tiny", "--steps", str(STEPS), "--run-id", "stop",
                      "--save", "every.pt", "--save-every", "1", *data_args], cwd=tmp_path, env=uncompiled_env(),
                     preexec_fn=sigint_as_at_a_terminal) as process:
        # Saved after step 1; a loaded 2-core machine took over 300 s to get there.
        wait_while_running(process, lambda: list(tmp_path.glob("every.step*.pt")), 600,
                           "no checkpoint in 600 s or before the run ended")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    _, lines = split_log((tmp_path / "logs" / "stop.txt").read_text())
    assert val_records(lines)[0][:2] == (0, STEPS)
    (interrupted,) = events(lines, "interrupted")
    assert lines[-1].startswith("interrupted ") and interrupted["trial"] == 0 and 1 <= interrupted["step"] < STEPS
    periodic = tg.periodic_checkpoints(str(tmp_path / "every.pt"))
    assert 1 <= len(periodic) <= 2 and not list(tmp_path.glob("*.tmp"))  # --keep-last 2 by default
    assert 1 <= torch.load(periodic[-1], weights_only=True)["step"] <= interrupted["step"]


def test_sigterm_ends_the_log_like_ctrl_c_with_status_143(tmp_path):
    """SIGTERM is what timeout, torchrun and schedulers send: the log still gets its end line."""
    steps = 200
    write_synthetic_shards(str(tmp_path), vocab_size=512, train_shards=1, tokens_per_shard=(steps + 2) * TINY_BATCH,
                           val_tokens=tg.TINY.val_tokens + 100)
    data = ["--train-files", str(tmp_path / "synthetic_train_*.bin"), "--val-files", str(tmp_path / "synthetic_val_*.bin")]
    log = tmp_path / "logs" / "term.txt"
    with own_session([sys.executable, TRAIN_GPT, *ON_CPU, "--tiny", "--steps", str(steps), "--no-diagnostics",
                      "--run-id", "term", *data], cwd=tmp_path, env=uncompiled_env()) as process:
        wait_while_running(process, lambda: log.exists() and f"step:0/{steps} val_loss" in log.read_text(), 600,
                           "no step 0 in 600 s or the run ended before it")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    _, lines = split_log(log.read_text())
    (interrupted,) = events(lines, "interrupted")
    assert lines[-1].startswith("interrupted ") and interrupted["note"].startswith("SIGTERM")
    assert interrupted["trial"] == 0 and 0 <= interrupted["step"] < steps


def test_nan_weights_stop_the_run_at_step_0(data_args, tmp_path):
    model = tg.GPT(tg.TINY.model)
    with torch.no_grad():
        model.embed.weight.fill_(float("nan"))
    torch.save({"model": model.state_dict()}, tmp_path / "nan.pt")
    result = run_trainer(["--tiny", "--steps", str(STEPS), "--run-id", "nan", "--init-from", "nan.pt", *data_args],
                         cwd=tmp_path, check=False)
    assert result.returncode == 3
    assert "step 0" in result.stderr
    _, lines = split_log((tmp_path / "logs" / "nan.txt").read_text())
    (error,) = events(lines, "error")
    assert error["step"] == 0 and "val loss is nan at step 0" in error["message"]


def write_tokens(path, count):
    write_shard(str(path), np.arange(count) % 512)


@pytest.mark.parametrize("flag", ["--train-files", "--val-files"])
@pytest.mark.parametrize("check_args", [[], ["--check-args"]])
@pytest.mark.parametrize("pattern", ["nowhere_*.bin", ""])
def test_a_glob_given_that_matches_nothing_is_named_as_such(data_args, tmp_path, capsys, flag, check_args, pattern):
    """--check-args answers it too: it globs the patterns given (not the preset's: run.sh writes those after)."""
    pattern = pattern and str(tmp_path / pattern)
    files = {"--train-files": data_args[1], "--val-files": data_args[3], flag: pattern}
    assert tg.main(["--tiny", "--steps", "2", *check_args, *(item for pair in files.items() for item in pair)]) == 2
    assert capsys.readouterr().err == (f"error: {flag} {pattern!r}: the glob matches no file (in {os.getcwd()}); "
                                       "check the path\n")


def test_missing_default_shards_say_how_to_get_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tg.main(["--tiny"]) == 2
    message = capsys.readouterr().err
    assert "'data/synthetic/synthetic_train_*.bin'" in message and "python data/synthetic.py --train-shards 1" in message
    with pytest.raises(tg.SetupError, match=r"python data/cached_fineweb10B.py 17"):
        tg.find_shards(tg.FULL.train_files, tg.FULL, 3200, "train")


def test_check_args_checks_without_data_and_creates_nothing(data_args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save = str(tmp_path / "new" / "folder" / "ck.pt")
    assert tg.main(["--tiny", "--check-args", "--save", save]) == 0  # no data here: not read
    assert tg.main(["--tiny", "--check-args", "--init-from", "missing.pt"]) == 2
    assert capsys.readouterr().err == "error: missing.pt: no such file\n"
    with pytest.raises(SystemExit) as refused:
        tg.main(["--tiny", "--check-args", "--recipe", "adam"])
    assert refused.value.code == 2 and "invalid choice: 'adam'" in capsys.readouterr().err
    # A run refused after its --save path was checked leaves no folder behind.
    assert tg.main(["--tiny", "--steps", "2", "--save", save, "--train-files", data_args[1],
                    "--val-files", "nowhere_val_*.bin"]) == 2
    assert "--val-files 'nowhere_val_*.bin'" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_too_few_train_shards_fail_before_training(data_args, tmp_path, capsys):
    assert tg.main(["--tiny", "--steps", "500", "--run-id", "short", *data_args]) == 2
    message = capsys.readouterr().err
    # One shard of (STEPS + 2) batches holds STEPS + 1 steps; 500 steps need ceil(500 / 13) = 39 like it.
    assert f"hold {STEPS + 1} steps" in message and "python data/synthetic.py --train-shards 39" in message
    assert not os.path.exists("logs/short.txt")


def test_full_size_stream_arithmetic():
    full = [100_000_000] * 103
    assert tg.steps_in_shard(100_000_000, tg.FULL.batch_tokens) == 190
    assert tg.shards_read(full, 3200, tg.FULL.batch_tokens) == 17
    assert tg.shards_read(full, 3300, tg.FULL.batch_tokens) == 18
    assert tg.shards_read(full[:17], 3300, tg.FULL.batch_tokens) is None


def test_too_few_fineweb_shards_print_the_download_command(tmp_path):
    batch = tg.FULL.batch_tokens
    for i in (1, 2):
        write_tokens(tmp_path / f"fineweb_train_00000{i}.bin", 2 * batch + 2)  # 2 steps each
    paths = sorted(str(p) for p in tmp_path.glob("*.bin"))
    assert tg.check_train_shards(paths, 3, tg.FULL) == paths
    assert tg.check_train_shards(paths, 2, tg.FULL) == paths[:1]
    with pytest.raises(tg.SetupError, match=r"hold 4 steps.*7 steps need 4 shards.*cached_fineweb10B.py 4"):
        tg.check_train_shards(paths, 7, tg.FULL)


@pytest.mark.parametrize("corruption, problem", [
    (lambda header, body: (header[:1] + [7] + header[2:], body), "version 7"),
    (lambda header, body: ([123] + header[1:], body), "magic number 123"),
    (lambda header, body: (header, body[:-10]), "truncated"),
    (lambda header, body: (header[:10], b""), "40 bytes, shorter than the 1024-byte shard header"),
])
def test_corrupt_shard_is_refused_with_its_name(data_args, tmp_path, capsys, corruption, problem):
    header, body = [20240520, 1, 40000] + [0] * 253, np.arange(40000, dtype="<u2").tobytes()
    header, body = corruption(header, body)
    bad = tmp_path / "bad_train_000001.bin"
    bad.write_bytes(np.array(header, dtype="<i4").tobytes() + body)
    assert tg.main(["--tiny", "--steps", "2", "--train-files", str(bad), "--val-files", data_args[3]]) == 2
    message = capsys.readouterr().err
    assert str(bad) in message and problem in message


@pytest.mark.parametrize("flag", ["--train-files", "--val-files"])
def test_a_glob_matching_a_folder_is_one_error_line_naming_it(data_args, tmp_path, capsys, flag):
    files = {"--train-files": data_args[1], "--val-files": data_args[3], flag: str(tmp_path)}
    assert tg.main(["--tiny", "--steps", "2", *(item for pair in files.items() for item in pair)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: cannot be read as a shard (Is a directory)\n"


@pytest.mark.parametrize("which", ["train", "val"])
def test_token_id_outside_the_vocabulary_is_one_error_line_naming_the_shard(data_args, tmp_path, which):
    """A shard with a valid header but ids from another tokenizer never reaches the forward."""
    bad = tmp_path / f"other_{which}_000001.bin"
    tokens = np.arange(4 * TINY_BATCH if which == "train" else tg.TINY.val_tokens + 1) % 512
    tokens[100] = 600
    write_shard(str(bad), tokens)
    files = {"train": data_args[1], "val": data_args[3], which: str(bad)}
    # --no-diagnostics: the fixture's val shard is shorter than the default 65,536-token probe.
    result = run_trainer(["--tiny", "--steps", "2", "--no-diagnostics", "--train-files", files["train"],
                          "--val-files", files["val"]], cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {bad}: holds token id 600, but the model's vocabulary has 512 ids")
    assert result.stderr.count("\n") == 1 and "python data/synthetic.py" in result.stderr, result.stderr
    assert "step:" not in result.stdout and not (tmp_path / "logs").exists()  # refused before the log is opened


def test_a_bad_token_id_in_a_later_train_shard_ends_the_run_with_one_line_and_the_log(data_args, tmp_path,
                                                                                    monkeypatch, capsys):
    """Shards after the first are read when the stream reaches them (reading every shard first would cost a
    full-size run minutes): the run stops there, its log ending with the error."""
    monkeypatch.chdir(tmp_path)
    write_tokens(tmp_path / "two_train_000001.bin", 2 * TINY_BATCH + 2)  # 2 steps
    bad = np.arange(2 * TINY_BATCH + 2) % 512
    bad[5] = 600
    write_shard(str(tmp_path / "two_train_000002.bin"), bad)
    with torch._dynamo.config.patch(disable=True):
        assert tg.main(["--tiny", "--steps", "3", "--no-diagnostics", "--run-id", "later", "--train-files",
                        str(tmp_path / "two_train_*.bin"), "--val-files", data_args[3]]) == 3
    message = capsys.readouterr().err
    assert message.startswith(f"error: {tmp_path / 'two_train_000002.bin'}: holds token id 600") and \
        message.count("\n") == 1
    _, lines = split_log((tmp_path / "logs" / "later.txt").read_text())
    (error,) = events(lines, "error")
    assert lines[-1].startswith("error ") and error["step"] == 2 and "holds token id 600" in error["message"]


def test_token_ids_are_checked_up_to_the_last_id_of_the_vocabulary(tmp_path):
    path = str(tmp_path / "edge.bin")
    tokens = np.arange(1000) % 512
    tokens[7] = 511
    write_shard(path, tokens)
    assert int(tg.load_shard(path, 512).long().max()) == 511
    tokens[7] = 512
    write_shard(path, tokens)
    with pytest.raises(tg.SetupError, match="holds token id 512, but the model's vocabulary has 512 ids"):
        tg.load_shard(path, 512)


@pytest.mark.parametrize("data_seed", [None, 3])
def test_main_reads_each_shard_once_keeps_no_val_shard_and_probes_where_validation_starts(tmp_path, monkeypatch,
                                                                                       data_seed):
    """Through main, one step: the val shard and the first train shard are read once each (the train probe
    is sliced from the shard the stream then takes), the val shard is not kept for the run, and the val probe
    starts where validation starts, also where --data-seed moves it."""
    monkeypatch.chdir(tmp_path)
    seq_len = tg.TINY.model.seq_len
    val_path, train_path = write_synthetic_shards(str(tmp_path), vocab_size=512, train_shards=1,
                                                  tokens_per_shard=3 * TINY_BATCH,
                                                  val_tokens=tg.TINY.val_tokens + 8 * seq_len)
    val_start = tg.data_offset(data_seed, tg.TINY.val_tokens + 8 * seq_len, tg.TINY.val_tokens + 1, seq_len)
    assert (val_start > 0) == (data_seed is not None)
    loads, seen = [], {}
    load_shard = tg.load_shard

    def load_shard_kept_track_of(path, *args, **kwargs):
        tokens = load_shard(path, *args, **kwargs)
        loads.append((path, weakref.ref(tokens)))
        return tokens

    def first_trial(run):
        gc.collect()
        seen["shards alive"] = [path for path, tokens in loads if tokens() is not None]
        seen["val"], seen["probe"] = run.val_buffer.clone(), run.probe.clone()
        train_trial(run)

    train_trial = tg.train_trial
    monkeypatch.setattr(tg, "load_shard", load_shard_kept_track_of)
    monkeypatch.setattr(tg, "train_trial", first_trial)
    seed = [] if data_seed is None else ["--data-seed", str(data_seed)]
    with torch._dynamo.config.patch(disable=True):
        assert tg.main(["--tiny", "--steps", "1", "--train-files", train_path, "--val-files", val_path, *seed,
                        *SMALL_PROBE]) == 0
    assert [path for path, _ in loads] == [val_path, train_path]
    assert seen["shards alive"] == [train_path]  # the first train shard, for the stream; not the val shard
    shard = tg.load_shard(val_path, 512)
    assert torch.equal(seen["val"], shard[val_start:val_start + tg.TINY.val_tokens + 1].long())
    assert torch.equal(seen["probe"].flatten(), shard[val_start:val_start + PROBE_TOKENS].long())


def test_train_stream_slices_ranks_and_moves_to_the_next_shard(tmp_path):
    batch = 8
    write_shard(str(tmp_path / "a.bin"), np.arange(30))  # pos 0, 8, 16 fit (16 + 9 < 30); pos 24 does not
    write_shard(str(tmp_path / "b.bin"), np.arange(100, 120))  # pos 0, 8
    paths = [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]
    assert [tg.steps_in_shard(n, batch) for n in (30, 20)] == [3, 2]
    one = tg.TrainStream(paths, batch, 0, 1, 512)
    ranks = [tg.TrainStream(paths, batch, r, 2, 512) for r in (0, 1)]
    starts = [0, 8, 16, 100, 108]
    for start in starts:
        whole = one.next_batch()
        assert whole.tolist() == list(range(start, start + batch + 1))
        halves = [stream.next_batch() for stream in ranks]
        assert halves[0].tolist() == whole[:5].tolist() and halves[1].tolist() == whole[4:].tolist()
    with pytest.raises(tg.SetupError):
        one.next_batch()
    assert tg.shards_read([30, 20], len(starts), batch) == 2


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_validation_slices_per_rank(tmp_path, world_size):
    """Rank r gets tokens [r*V/W, (r+1)*V/W + 1) of the first V + 1: like one train step of size V."""
    write_shard(str(tmp_path / "val.bin"), np.arange(50))
    val_tokens = 32
    shard = tg.load_shard(str(tmp_path / "val.bin"), 512)
    slices = [tg.val_slice(shard, val_tokens, r, world_size) for r in range(world_size)]
    share = val_tokens // world_size
    for rank, tokens in enumerate(slices):
        assert tokens.dtype == torch.int64
        assert tokens.tolist() == list(range(rank * share, (rank + 1) * share + 1))
    # Together the inputs cover tokens 0..V-1 once and the targets 1..V once.
    assert sorted(t for s in slices for t in s[:-1].tolist()) == list(range(val_tokens))
    assert sorted(t for s in slices for t in s[1:].tolist()) == list(range(1, val_tokens + 1))


def test_world_size_must_divide_the_sequences_of_a_step(data_args, monkeypatch, capsys):
    for world_size in (1, 2, 4, 8, 16):
        layout = tg.batch_layout(tg.FULL, world_size)
        assert layout.rank_seqs * world_size == 512 and layout.rank_seqs % layout.micro_seqs == 0
    assert tg.batch_layout(tg.FULL, 1).micro_seqs == 64 and tg.batch_layout(tg.FULL, 16).micro_seqs == 32
    with pytest.raises(tg.SetupError, match="world size 3 does not divide the 512 sequences"):
        tg.batch_layout(tg.FULL, 3)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert tg.main(["--tiny", "--steps", "2", *data_args]) == 2
    message = capsys.readouterr().err
    assert "world size 3 does not divide the 16 sequences" in message
    assert "run on 1, 2, 4 or 8 processes" in message and "GPU" not in message  # this is a CPU run
    # Any other rank stops quietly, with status 0, and leaves the report to rank 0.
    monkeypatch.setenv("RANK", "1")
    assert tg.main(["--tiny", "--steps", "2", *data_args]) == 0
    assert capsys.readouterr().err == ""
    with pytest.raises(tg.SetupError, match="run on 1, 2, 4 or 8 GPUs"):
        tg.batch_layout(tg.FULL, 6, "GPUs")


@pytest.mark.parametrize("environment, problem", [
    ({"RANK": "zero", "WORLD_SIZE": "2"}, "RANK='zero' in the environment is not a whole number"),
    ({"RANK": "0"}, "WORLD_SIZE=None in the environment is not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' in the environment is not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "x"},
     "LOCAL_WORLD_SIZE='x' in the environment is not a whole number"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 in the environment is not below WORLD_SIZE=2"),
    # It passed --check-args, then init_process_group failed with a traceback.
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": None},
     "MASTER_ADDR is not set in the environment (RANK is: a process group needs its address)"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": None}, "MASTER_PORT=None in the environment is not a whole number "
                                                           "from 0 to 65535"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "65536"}, "MASTER_PORT='65536' in the environment is not a whole "
                                                              "number from 0 to 65535"),
])
def test_a_launch_environment_torchrun_did_not_set_is_one_error_line(monkeypatch, capsys, environment, problem):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", **environment}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert tg.main(["--tiny", "--check-args"]) == 2
    assert capsys.readouterr().err == (f"error: {problem}; start under torchrun, which sets RANK, WORLD_SIZE, "
                                       f"LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, or unset them\n")


def test_world_size_error_under_torchrun_is_printed_once(data_args, tmp_path):
    result = run_trainer(["--tiny", "--steps", "2", *data_args], cwd=tmp_path, check=False,
                         launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"))
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1, output[-3000:]
    assert "world size 3 does not divide" in errors[0] and "processes" in errors[0]
    # torchrun reports rank 0's failure its own way; nothing in the trainer raised.
    assert 'train_gpt.py", line' not in output


def test_batch_seqs_sets_the_step_size_and_flags_the_run():
    def config_of(argv):
        args = tg.parse_args(argv)
        hp = tg.resolve_hyperparameters(args)
        layout = tg.batch_layout(hp, 1)
        config = tg.config_record(args, hp, tg.RECIPES["aurora"], 3200, tg.Distributed(0, 1, 0, False),
                                  torch.device("cpu"), layout, ["train.bin"], "val.bin", "run")
        return hp, layout, config

    hp, layout, config = config_of([])
    assert hp == tg.FULL and config["batch_seqs"] == 512 and config["is_record_recipe"]
    hp, layout, config = config_of(["--batch-seqs", "128"])
    assert hp.batch_tokens == 128 * 1024 and (layout.rank_seqs, layout.micro_seqs) == (128, 64)
    assert config["batch_seqs"] == 128 and not config["is_record_recipe"]
    assert config["differs_from_record"] == ["batch_tokens=131072 (record: 524288)"]
    # --tiny: sequences of 256 tokens, micro-batches of 8.
    hp, layout, config = config_of(["--tiny", "--batch-seqs", "8"])
    assert hp.batch_tokens == 8 * 256 and (layout.rank_seqs, layout.micro_seqs) == (8, 8)
    assert "batch_tokens=2048 (record: 524288)" in config["differs_from_record"]


def test_batch_seqs_that_do_not_split_evenly_are_refused(data_args, monkeypatch, capsys):
    assert tg.main(["--tiny", "--batch-seqs", "12", *data_args]) == 2
    assert capsys.readouterr().err == ("error: --batch-seqs 12: the 12 sequences of a step must be a whole number "
                                       "of micro-batches of 8 sequences\n")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert tg.main(["--batch-seqs", "128"]) == 2
    assert "--batch-seqs 128: world size 3 does not divide the 128 sequences" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # 96 sequences per rank: not whole micro-batches of 64
    assert tg.main(["--batch-seqs", "192"]) == 2
    assert "--batch-seqs 192: world size 2 does not divide the 192 sequences" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tg.parse_args(["--batch-seqs", "0"])
    assert "--batch-seqs must be at least 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="only a machine without a GPU refuses --device cuda")
def test_device_cuda_without_a_gpu_is_a_one_line_error(data_args, capsys):
    assert tg.resolve_device("auto", 0) == tg.resolve_device("cpu", 0) == torch.device("cpu")
    assert tg.main(["--tiny", "--device", "cuda", "--steps", "2", "--run-id", "nogpu", *data_args]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: --device cuda: torch ") and "--device cpu" in message
    assert message.count("\n") == 1 and not os.path.exists("logs/nogpu.txt")


# ---- model, initialization, schedule, recipes ----

def small_full_vocab_model():
    config = tg.ModelConfig(vocab_size=50304, num_layers=2, model_dim=64, head_dim=16, seq_len=32)
    model = tg.GPT(config)
    tg.init_parameters(model, torch.Generator().manual_seed(0))
    return model


def test_step_0_loss_is_log_vocab_and_fc_gradients_are_zero(tmp_path):
    model = small_full_vocab_model()
    write_shard(str(tmp_path / "val.bin"), np.random.default_rng(0).integers(0, 50257, 4 * 32 + 1))
    hp = tg.Hyperparameters(model=model.config, batch_tokens=4 * 32, micro_batch_seqs=2, val_tokens=4 * 32)
    buffer = tg.val_slice(tg.load_shard(str(tmp_path / "val.bin"), 50304), hp.val_tokens, 0, 1)
    val_loss = tg.evaluate(model, buffer, tg.batch_layout(hp, 1), 32, hp.val_tokens)
    assert val_loss == pytest.approx(math.log(50304), abs=1e-5)
    for inputs, targets in tg.micro_batches(buffer, 32, 2):
        model(inputs, targets).backward()
    fc_grads = [block.mlp.fc.weight.grad for block in model.blocks] + [block.mlp.fc.bias.grad for block in model.blocks]
    assert all(torch.count_nonzero(grad) == 0 for grad in fc_grads)
    assert torch.count_nonzero(model.proj.bias.grad) > 0  # the head does learn at step 0


def test_initialization_follows_the_name_rules():
    model = small_full_vocab_model()
    params = dict(model.named_parameters())
    for name, param in params.items():
        if name.endswith("gains"):
            assert torch.all(param == 1), name
        elif name.endswith("bias") or "proj" in name:
            assert torch.all(param == 0), name
    assert {"proj.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.proj.weight"} <= set(params)
    assert params["embed.weight"].dtype == torch.bfloat16
    assert params["embed.weight"].float().std().item() == pytest.approx(1.0, rel=0.01)
    for name in ("blocks.0.attn.q.weight", "blocks.1.mlp.fc.weight"):
        assert params[name].std().item() == pytest.approx(math.sqrt(0.33 / 64), rel=0.05)
    assert all(p.dtype == torch.float32 for n, p in params.items() if n != "embed.weight")


@pytest.mark.parametrize("env, compiled", [({}, True), ({"TORCHDYNAMO_DISABLE": "1"}, False)])
def test_compiled_flag_follows_what_torch_does(env, compiled):
    """TORCH_COMPILE_DISABLE=1 is covered by the tiny run's config line."""
    clean = {k: v for k, v in uncompiled_env().items() if k not in ("TORCH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE")}
    result = subprocess.run([sys.executable, "-c", "import train_gpt; print(train_gpt.compile_is_active())"],
                            cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == str(compiled), result.stderr[-2000:]


def test_a_forced_cpu_capability_compiles_into_a_cache_of_its_own():
    """Inductor's cache does not key on ATEN_CPU_CAPABILITY (see separate_compile_cache_per_cpu_capability):
    each forced capability gets its own folder, never torch's default one; a folder the user gives is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    folders = {}
    for capability in ("avx2", "avx512"):
        environ = {"ATEN_CPU_CAPABILITY": capability}
        tg.separate_compile_cache_per_cpu_capability(environ)
        folders[capability] = environ["TORCHINDUCTOR_CACHE_DIR"]
    assert len(set(folders.values()) | {default_cache_dir()}) == 3
    given = {"ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": "elsewhere"}
    tg.separate_compile_cache_per_cpu_capability(given)
    assert given["TORCHINDUCTOR_CACHE_DIR"] == "elsewhere"
    native = {}
    tg.separate_compile_cache_per_cpu_capability(native)
    assert native == {}
    # This suite's processes (conftest.py): where the capability is forced, as .ci/run's second pass does.
    if "ATEN_CPU_CAPABILITY" in os.environ:
        forced = {"ATEN_CPU_CAPABILITY": os.environ["ATEN_CPU_CAPABILITY"]}
        tg.separate_compile_cache_per_cpu_capability(forced)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == forced["TORCHINDUCTOR_CACHE_DIR"]


def test_running_line_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert tg.running_line(torch.device("cpu"), 2) == (f"Running PyTorch {torch.__version__} built without CUDA "
                                                       f"on cpu with world_size 2")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert RUNNING_LINE.fullmatch(tg.running_line(torch.device("cpu"), 1))
    assert "compiled for CUDA 13.0 on cpu" in tg.running_line(torch.device("cpu"), 1)


def test_half_truncated_rotary_tables():
    cos, sin = tg.rotary_tables(head_dim=16, seq_len=5)
    assert cos.shape == (5, 8)
    assert torch.all(cos[:, 4:] == 1) and torch.all(sin[:, 4:] == 0)  # the second half does not rotate
    assert torch.allclose(sin[:, 0], torch.sin(torch.arange(5.0)))  # f_0 = 1
    assert torch.allclose(sin[:, 3], torch.sin(torch.arange(5.0) / 1024))  # f_{d/4-1} = 1/1024
    # At full size the exponents are the record's linspace(0, 1, 32); arange/31 differs in 4 of them.
    cos, sin = tg.rotary_tables(head_dim=128, seq_len=2)
    freqs = (1 / 1024) ** torch.linspace(0, 1, 32, dtype=torch.float32)
    assert torch.equal(sin[1, :32], freqs.sin()) and torch.equal(cos[1, :32], freqs.cos())


def test_logits_are_soft_capped_with_rsqrt_as_in_the_record():
    z = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 30
    capped = tg.soft_cap(z)
    assert torch.equal(capped, 15 * z * torch.rsqrt(z.square() + 225))
    assert not torch.equal(capped, 15 * z / torch.sqrt(z.square() + 225))  # the other rounding differs
    assert capped.abs().max() < 15
    model = small_full_vocab_model()
    inputs, targets = torch.randint(0, 50304, (2, 1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = tg.soft_cap(model.proj(model.norm_b(model.features(inputs))).float())
        expected = torch.nn.functional.cross_entropy(logits.view(-1, 50304), targets.view(-1), reduction="sum")
        assert torch.equal(model(inputs, targets), expected)


def test_lr_schedule_and_validation_schedule():
    assert tg.lr_multiplier(0, 3200) == 1 and tg.lr_multiplier(959, 3200) == 1
    assert tg.lr_multiplier(960, 3200) == pytest.approx(1.0) and tg.lr_multiplier(2240, 3200) == pytest.approx(3 / 7)
    assert tg.lr_multiplier(3199, 3200) == pytest.approx(1 / 3200 / 0.7)
    steps = [s for s in range(3201) if tg.is_validation_step(s, 3200, 125, 25)]
    assert steps[:3] == [0, 125, 250] and 2875 in steps and 2880 not in steps
    assert steps[-4:] == [3125, 3150, 3175, 3200] and 2900 in steps


@pytest.mark.parametrize("name, adam_lrs, adam_wd, matrix_class, matrix_lr, matrix_wd", [
    ("aurora", [0.3, 1 / 320, 0.01], 0.0, "Aurora", 0.0375, 0.0),
    ("normuon", [0.3, 1 / 320, 0.01], 0.0, "NorMuon", 0.035, 0.025),
    ("muon", [0.7, 0.004, 0.015], 0.001, "Muon", 0.025, 0.05),
])
def test_recipes_build_the_spec_optimizer_groups(name, adam_lrs, adam_wd, matrix_class, matrix_lr, matrix_wd):
    model = tg.GPT(tg.ModelConfig(vocab_size=64, num_layers=2, model_dim=32, head_dim=8, seq_len=16))
    adam, matrix = tg.build_optimizers(model, tg.RECIPES[name])
    assert isinstance(adam, torch.optim.AdamW) and type(matrix).__name__ == matrix_class
    assert [g["lr"] for g in adam.param_groups] == adam_lrs
    assert [g["initial_lr"] for g in adam.param_groups + matrix.param_groups] == adam_lrs + [matrix_lr]
    for group in adam.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-10 and group["weight_decay"] == adam_wd
    assert adam.param_groups[0]["params"] == [model.embed.weight]
    assert adam.param_groups[1]["params"] == [model.proj.weight]
    assert any(p is model.proj.bias for p in adam.param_groups[2]["params"])
    assert all(p.ndim < 2 for p in adam.param_groups[2]["params"])
    assert matrix.param_groups[0]["lr"] == matrix_lr and matrix.param_groups[0]["weight_decay"] == matrix_wd
    owned = [p for opt in (adam, matrix) for g in opt.param_groups for p in g["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in matrix.param_groups[0]["params"])


# ---- diagnostics ----

def test_dead_neuron_fractions_count_dead_and_nearly_dead():
    preacts = -torch.ones(2000, 4)
    preacts[0, 1] = 1.0  # active on 1 of 2000 tokens: 0.05% < 0.1%, nearly dead
    preacts[:2, 2] = 1.0  # 2 of 2000: exactly 0.1%, alive
    preacts[:, 3] = 0.5
    dead, nearly_dead = tg.dead_neuron_fractions(preacts.view(2, 1000, 4))
    assert dead == 0.25 and nearly_dead == 0.5


def test_neuron_report_on_hand_set_fc_rows():
    model = fate_model()
    with torch.no_grad():
        model.blocks[0].mlp.fc.bias[:16] = -1.0  # 16 of 64 units of layer 0 never fire
        model.blocks[1].mlp.fc.bias[:8] = 0.0  # pre-activation exactly 0: relu^2 is 0, dead too
    tokens = torch.randint(0, 64, (2, 8))
    report = tg.neuron_report(tg.probe_mlps(model, tokens))
    assert report["dead_fraction_per_layer"] == [0.25, 0.125] and report["nearly_dead_fraction_per_layer"] == [0.25, 0.125]
    assert report["dead_fraction"] == pytest.approx(0.1875)
    assert not model.blocks[0].mlp.fc._forward_hooks  # the hooks are removed afterwards


def test_leverage_stats_on_a_hand_made_vector():
    stats = tg.leverage_stats(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.05, 1.95]))
    assert stats["cv"] == pytest.approx(math.sqrt((0.95 ** 2 + 0.95 ** 2) / 6))
    assert stats["max_over_min"] == pytest.approx(39.0)
    assert stats["starved_fraction"] == pytest.approx(1 / 6)
    assert tg.leverage_stats(torch.tensor([0.0, 2.0]))["max_over_min"] is None


# ---- the training step: no host sync, non-finite steps refused on the device, overlapped all-reduce ----

STEP_CONFIG = tg.ModelConfig(vocab_size=64, num_layers=2, model_dim=32, head_dim=8, seq_len=16)


def step_setup(recipe, compiled):
    """A small model, its recipe's optimizers and one step's tokens (2 micro-batches of 2 sequences)."""
    model = tg.GPT(STEP_CONFIG)
    tg.init_parameters(model, torch.Generator().manual_seed(0))
    optimizers = tg.build_optimizers(model, tg.RECIPES[recipe])
    buffer = torch.randint(0, STEP_CONFIG.vocab_size, (4 * STEP_CONFIG.seq_len + 1,),
                           generator=torch.Generator().manual_seed(1))
    runnable = torch.compile(model, dynamic=False) if compiled else model
    return model, runnable, optimizers, buffer


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
@pytest.mark.parametrize("recipe", sorted(tg.RECIPES))
def test_train_step_makes_no_host_sync(recipe, compiled):
    with torch._dynamo.config.patch(disable=not compiled):
        model, runnable, optimizers, buffer = step_setup(recipe, compiled)
        params = list(model.parameters())
        found_inf = torch.zeros(())
        for _ in range(2):  # compiles; after two steps every weight gets a gradient (zero-initialized projections)
            tg.train_step(runnable, optimizers, params, buffer, STEP_CONFIG.seq_len, 2, found_inf)
        before = [p.detach().clone() for p in params]
        with host_syncs_counted() as calls:
            loss = tg.train_step(runnable, optimizers, params, buffer, STEP_CONFIG.seq_len, 2, found_inf)
        assert calls == []
    # The counter does see a sync, and the step did train.
    with host_syncs_counted() as calls:
        float(loss)
    assert calls == ["__float__"]
    assert found_inf.item() == 0 and all(not torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("recipe", sorted(tg.RECIPES))
def test_non_finite_step_leaves_the_weights_of_the_last_finite_step(recipe):
    with torch._dynamo.config.patch(disable=True):
        model, runnable, optimizers, buffer = step_setup(recipe, False)
        params = list(model.parameters())
        found_inf = torch.zeros(())
        for _ in range(2):
            tg.train_step(runnable, optimizers, params, buffer, STEP_CONFIG.seq_len, 2, found_inf)
        last_finite = [p.detach().clone() for p in params]
        adam = optimizers[0]
        adam_state = {p: {k: v.clone() for k, v in s.items()} for p, s in adam.state.items()}
        poison = model.blocks[1].mlp.fc.weight.register_hook(lambda grad: grad * float("nan"))
        tg.train_step(runnable, optimizers, params, buffer, STEP_CONFIG.seq_len, 2, found_inf)
        poison.remove()
        assert found_inf.item() == 1
        tg.train_step(runnable, optimizers, params, buffer, STEP_CONFIG.seq_len, 2, found_inf)  # finite again
    assert found_inf.item() == 1  # sticky: nothing moves after the first bad step
    for before, after in zip(last_finite, params):
        assert torch.equal(before, after)
    for p, state in adam_state.items():  # fused AdamW honoured found_inf: its state did not move either
        for name, value in state.items():
            assert torch.equal(adam.state[p][name], value), name


def test_first_non_finite_step_is_named_at_the_next_validation(data_args, tmp_path, monkeypatch, capsys):
    bad_step = 5
    per_step = TINY_BATCH // (tg.TINY.micro_batch_seqs * tg.TINY.model.seq_len)
    forward, training_calls = tg.GPT.forward, []

    def diverging_forward(self, inputs, targets):
        loss = forward(self, inputs, targets)
        if torch.is_grad_enabled():
            training_calls.append(1)
            if len(training_calls) > bad_step * per_step:
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(tg.GPT, "forward", diverging_forward)
    monkeypatch.chdir(tmp_path)
    with torch._dynamo.config.patch(disable=True):
        code = tg.main(["--tiny", "--steps", str(STEPS), "--run-id", "diverged", "--no-diagnostics", *data_args])
    assert code == 3
    assert f"not finite at step {bad_step} (trial 0)" in capsys.readouterr().err
    _, lines = split_log((tmp_path / "logs" / "diverged.txt").read_text())
    (error,) = events(lines, "error")
    assert error["step"] == STEPS and f"at step {bad_step}" in error["message"]
    assert [step for step, _, _ in val_records(lines)] == [0]


def overlap_worker(rank, world_size, store_path, out_dir, recipe):
    torch._dynamo.config.disable = True
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    finished = False
    try:
        model, _, optimizers, _ = step_setup(recipe, False)
        buffers = [torch.randint(0, STEP_CONFIG.vocab_size, (4 * STEP_CONFIG.seq_len + 1,),
                                 generator=torch.Generator().manual_seed(10 + r)) for r in range(world_size)]
        # Each rank's own gradient, accumulated over its micro-batches as train_step does, on a plain copy.
        local = tg.GPT(STEP_CONFIG)
        local.load_state_dict(model.state_dict())
        expected = None
        for buffer in buffers:
            for inputs, targets in tg.micro_batches(buffer, STEP_CONFIG.seq_len, 2):
                local(inputs, targets).backward()
            grads = [p.grad.clone() for p in local.parameters()]
            expected = grads if expected is None else [e + g for e, g in zip(expected, grads)]
            local.zero_grad(set_to_none=True)
        events = []
        summing = tg.sum_gradients
        tg.sum_gradients = lambda group, bucket: events.append("all_reduce") or summing(group, bucket)
        ddp = tg.distributed_model(model, torch.device("cpu"), bucket_cap_mb=0.05)  # several buckets
        model.embed.weight.register_post_accumulate_grad_hook(lambda p: events.append("embedding gradient"))
        summed = []
        adam = optimizers[0]
        adam_step = adam.step
        adam.step = lambda: summed.extend(p.grad.clone() for p in model.parameters()) or adam_step()
        tg.train_step(ddp, optimizers, list(model.parameters()), buffers[rank], STEP_CONFIG.seq_len, 2,
                      torch.zeros(()))
        torch.save({"events": events, "summed": summed, "expected": expected}, os.path.join(out_dir, f"rank{rank}.pt"))
        finished = True
    finally:
        tg.leave_process_group(finished)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("recipe", sorted(tg.RECIPES))
def test_gradient_buckets_are_summed_during_the_last_backward(tmp_path, recipe):
    """DDP with train_gpt's hook, every recipe: no all-reduce in the first micro-batch's backward (no_sync);
    in the last one the first buckets' all-reduces start before the embedding (the first layer, so the end
    of the backward) has its gradient; the result is the plain sum of the ranks' gradients, to the bit."""
    torch.multiprocessing.spawn(overlap_worker, args=(2, str(tmp_path / "store"), str(tmp_path), recipe), nprocs=2,
                                join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        events = result["events"]
        first, last = [i for i, event in enumerate(events) if event == "embedding gradient"]
        assert "all_reduce" not in events[:first]
        assert "all_reduce" in events[first + 1:last] and events[-1] == "all_reduce"
        for summed, expected in zip(result["summed"], result["expected"]):
            assert torch.equal(summed, expected)


# ---- neuron fate and what dead units receive (docs/diagnostics.md) ----

def fate_model(mlp_ratio=4):
    """Two layers of 16 x mlp_ratio units, every fc row zero with bias +1: each unit fires on every token."""
    config = tg.ModelConfig(vocab_size=64, num_layers=2, model_dim=16, head_dim=8, seq_len=8, mlp_ratio=mlp_ratio)
    model = tg.GPT(config)
    tg.init_parameters(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc.weight.zero_()
            block.mlp.fc.bias.fill_(1.0)
    return model


def diagnostics_run(model, tmp_path, probe):
    """The parts of a Run that write_diagnostics reads."""
    return type("DiagnosticsRun", (), dict(raw_model=model, probe=probe, train_probe=None, probe_micro_seqs=None,
                                           units=None, log=tg.RunLog(str(tmp_path / "diag.txt")),
                                           trial=0, step=0, diagnostics=None))()


def logged_diags(tmp_path, kind):
    lines = (tmp_path / "diag.txt").read_text().splitlines()
    return [d for d in events(lines, "diag") if d["kind"] == kind]


def test_fate_counts_a_unit_dead_while_its_row_says_so_and_one_revival_when_reset(tmp_path):
    model = fate_model()
    run = diagnostics_run(model, tmp_path, torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1)))
    fc = model.blocks[1].mlp.fc
    weight_before = fc.weight[5].clone()
    # (step, what is done to unit 5 of layer 1 before the probe)
    for step, row in [(0, None), (10, "kill"), (20, None), (30, "reset"), (40, None), (50, "kill")]:
        with torch.no_grad():
            if row == "kill":  # a row whose pre-activation is negative on every token
                fc.weight[5] = -weight_before.abs() - 0.5
                fc.bias[5] = -3.0
            elif row == "reset":
                fc.weight[5] = weight_before
                fc.bias[5] = 1.0
        run.step = step
        tg.write_diagnostics(run, [])
    fates = logged_diags(tmp_path, "fate")
    assert [d["step"] for d in fates] == [0, 10, 20, 30, 40, 50] and fates[0]["units_per_layer"] == [64, 64]
    per_step = {d["step"]: {k: d[f"{k}_per_layer"][1] for k in ("ever_dead", "permanent", "revived", "revivals",
                                                              "newly_dead")} for d in fates}
    assert per_step[0] == dict(ever_dead=0, permanent=0, revived=0, revivals=0, newly_dead=0)
    assert per_step[10] == dict(ever_dead=1, permanent=1, revived=0, revivals=0, newly_dead=1)
    assert per_step[20] == dict(ever_dead=1, permanent=1, revived=0, revivals=0, newly_dead=0)
    assert per_step[30] == dict(ever_dead=1, permanent=0, revived=1, revivals=1, newly_dead=0)
    assert per_step[40] == per_step[30]
    # Dead again, but not permanently: it came back once.
    assert per_step[50] == dict(ever_dead=1, permanent=0, revived=0, revivals=1, newly_dead=0)
    assert all(d["ever_dead_per_layer"][0] == 0 for d in fates)
    assert fates[1]["permanent_fraction"] == pytest.approx(1 / 128, abs=1e-6) and fates[-1]["revivals"] == 1
    assert [d["dead_fraction_per_layer"][1] for d in logged_diags(tmp_path, "neurons")] == [0, 1 / 64, 1 / 64, 0, 0,
                                                                                          1 / 64]
    assert tg.fate_report([run.diagnostics.fates[1]], 50)["units_per_layer"] == [64]
    # The state is one (3, units) tensor per layer; a new trial starts it afresh.
    assert [tuple(f.shape) for f in run.diagnostics.fates] == [(3, 64), (3, 64)]
    run.trial, run.step = 1, 0
    tg.write_diagnostics(run, [])
    assert logged_diags(tmp_path, "fate")[-1]["ever_dead_per_layer"] == [0, 1]  # dead from its first probe
    assert logged_diags(tmp_path, "fate")[-1]["newly_dead_per_layer"] == [0, 1]


def fc_input_mean(model, tokens, layer):
    """The fc input of `layer`, averaged over the tokens, computed by hand from the blocks' pieces."""
    with torch.no_grad():
        x = model.norm_a(model.embed(tokens))
        for block in model.blocks[:layer]:
            x = block(x)
        block = model.blocks[layer]
        x = x + block.attn(block.norm1(x))
        return block.norm2(x).float().reshape(-1, x.size(-1)).mean(dim=0)


@pytest.mark.parametrize("recipe", sorted(tg.RECIPES))
def test_dead_and_live_update_norms_match_a_hand_computation_on_one_step(recipe, tmp_path):
    with torch._dynamo.config.patch(disable=True):
        model = fate_model()
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for block in model.blocks:  # live random rows, and output weights so that gradients flow
                block.mlp.fc.weight.copy_(torch.randn(block.mlp.fc.weight.shape, generator=generator) * 0.3)
                block.mlp.fc.bias.zero_()
                block.mlp.proj.weight.copy_(torch.randn(block.mlp.proj.weight.shape, generator=generator) * 0.1)
            model.proj.weight.copy_(torch.randn(model.proj.weight.shape, generator=generator) * 0.1)
            model.blocks[0].mlp.fc.bias[:12] = -50.0  # 12 of 64 units of layer 0 never fire: dead
        probe = torch.randint(0, 64, (2, 8), generator=generator)
        run = diagnostics_run(model, tmp_path, probe)
        optimizers = tg.build_optimizers(model, tg.RECIPES[recipe])
        tg.write_diagnostics(run, optimizers)
        fc = model.blocks[0].mlp.fc
        weight_before, bias_before = fc.weight.detach().clone(), fc.bias.detach().clone()
        tokens = torch.randint(0, 64, (4, 9), generator=generator)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        for optimizer in optimizers:
            optimizer.step()
        run.step = 1
        tg.write_diagnostics(run, optimizers)
    (line,) = logged_diags(tmp_path, "fc_updates")
    assert line["step"] == 1 and line["since_step"] == 0
    assert set(line["matrices"]) == {"blocks.0.mlp.fc.weight", "blocks.1.mlp.fc.weight"}
    got = line["matrices"]["blocks.0.mlp.fc.weight"]
    dead = torch.arange(64) < 12
    delta = (fc.weight - weight_before).detach().double()
    norms = delta.norm(dim=1)
    preact = delta @ fc_input_mean(model, probe, 0).double() + (fc.bias - bias_before).detach().double()
    assert got["dead_rows"] == 12 and got["live_rows"] == 52
    assert got["dead_update_norm"] == pytest.approx(norms[dead].mean().item(), rel=1e-4, abs=1e-7)
    assert got["live_update_norm"] == pytest.approx(norms[~dead].mean().item(), rel=1e-4)
    assert got["live_update_norm"] > 0
    assert got["dead_preact_change"] == pytest.approx(preact[dead].mean().item(), rel=1e-3, abs=1e-6)
    assert got["live_preact_change"] == pytest.approx(preact[~dead].mean().item(), rel=1e-3, abs=1e-6)
    # Layer 1 has no dead unit: its dead-row means are null.
    assert line["matrices"]["blocks.1.mlp.fc.weight"]["dead_update_norm"] is None


def test_mlp_ratio_sets_the_hidden_width_and_is_not_a_record():
    args = tg.parse_args(["--mlp-ratio", "8"])
    hp = tg.resolve_hyperparameters(args)
    assert hp.model.mlp_ratio == 8 and tg.resolve_hyperparameters(tg.parse_args([])).model.mlp_ratio == 4
    model = fate_model(mlp_ratio=8)
    assert model.blocks[0].mlp.fc.weight.shape == (128, 16) and model.blocks[0].mlp.proj.weight.shape == (16, 128)
    differences = tg.record_differences(hp, tg.RECIPES["aurora"], 3200, None)
    assert len(differences) == 1 and "mlp_ratio=8" in differences[0]
    assert tg.record_differences(tg.FULL, tg.RECIPES["aurora"], 3200, None) == []
    with pytest.raises(SystemExit):
        tg.parse_args(["--mlp-ratio", "0"])


def test_three_definitions_on_hand_set_units():
    """Layer 0: 16 units with a negative bias never fire (and so output nothing); 8 live units whose proj column
    is zero output nothing but fire. Layer 1: every unit fires, one proj column is tiny."""
    model = fate_model()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.proj.weight.fill_(0.1)
        model.blocks[0].mlp.fc.bias[:16] = -1.0
        model.blocks[0].mlp.proj.weight[:, 16:24] = 0.0
        model.blocks[1].mlp.proj.weight[:, 0] = 0.009  # power 0.0081 of the others': low
        model.blocks[1].mlp.proj.weight[:, 1] = 0.011  # 0.0121: not low
    report = tg.neuron_report(tg.probe_mlps(model, torch.randint(0, 64, (4, 8))))
    assert report["dead_fraction_per_layer"] == [0.25, 0.0] and report["nearly_dead_fraction_per_layer"] == [0.25, 0.0]
    assert report["low_power_fraction_per_layer"] == [24 / 64, 1 / 64]
    assert report["low_power_fraction"] == pytest.approx((24 / 64 + 1 / 64) / 2)


def test_probe_in_micro_batches_covers_exactly_its_tokens_and_sums_like_one_pass():
    model = fate_model()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc.weight.copy_(torch.randn(block.mlp.fc.weight.shape, generator=generator))
            block.mlp.fc.bias.zero_()
            block.mlp.proj.weight.copy_(torch.randn(block.mlp.proj.weight.shape, generator=generator))
    inputs = torch.randint(0, 64, (5, 8), generator=generator)
    whole, split = tg.probe_mlps(model, inputs), tg.probe_mlps(model, inputs, micro_seqs=2)
    for a, b in zip(whole, split):
        assert a.tokens == b.tokens == 40 and torch.equal(a.active, b.active)
        assert 0 < int(a.active.min()) and int(a.active.max()) <= 40
        assert torch.allclose(a.output_power, b.output_power) and a.input_rms == pytest.approx(b.input_rms)


def test_probe_sequences_take_exactly_n_tokens_from_the_offset():
    probe = tg.probe_sequences(torch.arange(100, dtype=torch.int32), 48, 8, start=16)
    assert probe.shape == (6, 8) and probe.dtype == torch.int64
    assert probe.flatten().tolist() == list(range(16, 64))


def test_the_tiny_preset_probes_its_validation_tokens_every_50_steps_and_full_size_65536_at_every_validation():
    """The CPU preset's 11 probes of 65,536 tokens took 87% as long as its training (README: the measured share
    of the smaller ones); the studies give their own --probe-tokens and --probe-every."""
    tiny = tg.parse_args(["--tiny"])
    assert (tiny.probe_tokens, tiny.probe_every) == (tg.TINY.val_tokens, 50) and tg.TINY.val_tokens == 16_384
    full = tg.parse_args([])
    assert (full.probe_tokens, full.probe_every) == (65_536, None)
    study = tg.parse_args(["--tiny", "--probe-tokens", "65536", "--probe-every", "100"])
    assert (study.probe_tokens, study.probe_every) == (65_536, 100)


def test_a_probe_longer_than_the_val_shard_is_refused_before_any_work(data_args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    too_many = (tg.TINY.val_tokens // 256 + 1) * 256  # the val shard holds val_tokens + 100
    assert tg.main(["--tiny", "--steps", "2", *data_args, "--probe-tokens", str(too_many)]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1
    assert "synthetic_val_000000.bin" in message and f"fewer than --probe-tokens {too_many}" in message
    assert list(tmp_path.iterdir()) == []


def test_swiglu_keeps_the_parameter_count_and_computes_silu_gating():
    assert tg.swiglu_hidden_width(768, 3072) == 2048 and tg.swiglu_hidden_width(128, 512) == 341
    for dim, ratio in ((768, 4), (128, 4)):
        relu2, swiglu = tg.MLP(dim, ratio), tg.MLP(dim, ratio, "swiglu")
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert abs(count(swiglu) - count(relu2)) / count(relu2) < 0.002
    torch.manual_seed(0)
    mlp = tg.MLP(6, 2, "swiglu").double()
    assert [name for name, _ in mlp.named_parameters()] == ["fc.weight", "fc.bias", "up.weight", "up.bias",
                                                             "proj.weight", "proj.bias"]
    for p in mlp.parameters():
        p.data.normal_()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    gate, up = x @ mlp.fc.weight.T + mlp.fc.bias, x @ mlp.up.weight.T + mlp.up.bias
    expected = (gate * torch.sigmoid(gate) * up) @ mlp.proj.weight.T + mlp.proj.bias
    assert torch.allclose(mlp(x), expected)
    assert torch.autograd.gradcheck(mlp, (x,))


def test_aurora_treats_both_tall_swiglu_matrices():
    config = tg.ModelConfig(vocab_size=64, num_layers=1, model_dim=16, head_dim=8, seq_len=8, mlp="swiglu")
    model = tg.GPT(config)
    tg.init_parameters(model, torch.Generator().manual_seed(0))
    _, aurora = tg.build_optimizers(model, tg.RECIPES["aurora"])
    tokens = torch.randint(0, 64, (2, 9))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    aurora.step()
    tall = {name for name, p in model.named_parameters() if p in aurora.leverage()}
    assert {"blocks.0.mlp.fc.weight", "blocks.0.mlp.up.weight"} <= tall


def test_freeze_mlp_scalars_trains_everything_else():
    model = fate_model()
    for param in tg.mlp_scalars(model):
        param.requires_grad_(False)
    frozen = {id(p) for p in tg.mlp_scalars(model)}
    assert len(frozen) == 4  # norm2.gains and fc.bias of both blocks
    adam, matrix = tg.build_optimizers(model, tg.RECIPES["aurora"])
    trained = [p for group in adam.param_groups + matrix.param_groups for p in group["params"]]
    assert not frozen & {id(p) for p in trained}
    assert len(trained) == len(list(model.parameters())) - 4
    with torch.no_grad():  # every weight nonzero, so that every trained parameter gets a gradient
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(std=0.3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens = torch.randint(0, 64, (2, 9))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    adam.step()
    matrix.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    frozen_names = {f"blocks.{i}.{name}" for i in (0, 1) for name in ("norm2.gains", "mlp.fc.bias")}
    assert changed == set(before) - frozen_names


def test_aux_from_takes_only_the_adamw_groups_of_the_other_recipe():
    muon, aurora = tg.RECIPES["muon"], tg.RECIPES["aurora"]
    mixed = tg.with_aux_from(muon, aurora)
    assert mixed.optimizers == (aurora.optimizers[0], muon.optimizers[1])
    for f in dataclasses.fields(tg.Recipe):
        if f.name != "optimizers":
            assert getattr(mixed, f.name) == getattr(muon, f.name), f.name
    assert tg.RECIPES["muon"].group("scalars").lr == 0.015  # the record recipe itself is untouched
    for name in ("aurora-ema-ref", "soap-muon"):  # their own optimizers and schedules: refused either way
        with pytest.raises(tg.SetupError, match="only the benchmark-schedule recipes"):
            tg.with_aux_from(muon, tg.RECIPES[name])
        with pytest.raises(tg.SetupError, match="only the benchmark-schedule recipes"):
            tg.with_aux_from(tg.RECIPES[name], muon)


def test_data_seed_permutes_the_batches_of_a_shard_and_moves_the_val_slice(tmp_path):
    write_tokens(tmp_path / "train.bin", 8 * 10 + 2)
    paths = [str(tmp_path / "train.bin")]
    plain = tg.TrainStream(paths, 8, 0, 1, 512)
    seeded = [tg.TrainStream(paths, 8, 0, 1, 512, data_seed=seed) for seed in (1, 2)]
    in_order = [plain.next_batch().tolist() for _ in range(10)]
    assert in_order == [list(range(8 * k, 8 * k + 9)) for k in range(10)]
    orders = [[stream.next_batch().tolist() for _ in range(10)] for stream in seeded]
    for order in orders:
        assert sorted(order) == in_order and order != in_order
    assert orders[0] != orders[1]
    assert tg.data_offset(None, 1000, 100, 8) == 0
    offsets = {tg.data_offset(seed, 1000, 100, 8) for seed in range(20)}
    assert len(offsets) > 5 and all(o % 8 == 0 and o + 100 <= 1000 for o in offsets)


@pytest.mark.parametrize("flag, value", [("--seed", 2 ** 64), ("--seed", -1), ("--data-seed", 2 ** 64 // 1_000_003),
                                         ("--data-seed", -1)])
def test_a_seed_torch_cannot_take_is_refused_with_the_arguments(data_args, tmp_path, monkeypatch, capsys, flag,
                                                                 value):
    """It crashed with a traceback after the log was opened."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused, torch._dynamo.config.patch(disable=True):
        tg.main(["--tiny", flag, str(value), "--steps", "2", "--no-diagnostics", *data_args])
    assert refused.value.code == 2 and os.listdir(tmp_path) == []
    assert f"{flag} must be a whole number from 0 to " in capsys.readouterr().err


def test_the_largest_seeds_accepted_seed_torch():
    tg.parse_args(["--seed", str(2 ** 64 - 1), "--data-seed", str(tg.DATA_SEED_MAX)])
    torch.Generator().manual_seed(2 ** 64 - 1)
    assert tg.data_offset(tg.DATA_SEED_MAX, 1000, 100, 8) % 8 == 0
    assert sorted(tg.batch_order(5, tg.DATA_SEED_MAX, tg.DATA_SEED_STRIDE - 1)) == list(range(5))


def test_data_seed_gives_each_shard_its_own_batch_order(tmp_path):
    """Two shards of 10 batches each, streamed with a data seed: each shard's batches come in an order of its own."""
    batch, batches = 8, 10
    paths = []
    for index in range(2):
        paths.append(str(tmp_path / f"train_{index}.bin"))
        write_shard(paths[-1], 1000 * index + np.arange(batch * batches + 2))
    stream = tg.TrainStream(paths, batch, 0, 1, 4096, data_seed=5)
    starts = [int(stream.next_batch()[0]) for _ in range(2 * batches)]
    orders = [[(start - 1000 * index) // batch for start in starts[index * batches:(index + 1) * batches]]
              for index in range(2)]
    assert [sorted(order) for order in orders] == [list(range(batches))] * 2
    assert orders[0] != orders[1] and list(range(batches)) not in orders


def test_data_offset_draws_every_whole_sequence_that_leaves_room_and_no_other():
    """Shards from exactly as long as needed to two sequences more: every allowed offset is drawn over the
    seeds, and none that would overrun the shard."""
    seq_len, needed = 8, 100
    for shard_tokens, offsets in ((100, [0]), (107, [0]), (108, [0, 8]), (115, [0, 8]), (116, [0, 8, 16])):
        drawn = {tg.data_offset(seed, shard_tokens, needed, seq_len) for seed in range(200)}
        assert sorted(drawn) == offsets, shard_tokens


def test_each_knob_is_flagged_and_none_by_default():
    assert tg.knob_differences(tg.parse_args([])) == []
    for flags, name in ((["--freeze-mlp-scalars"], "freeze_mlp_scalars"), (["--aux-from", "aurora"], "aux_from"),
                        (["--data-seed", "0"], "data_seed"), (["--stop-at", "5"], "stop_at")):
        (difference,) = tg.knob_differences(tg.parse_args(flags))
        assert difference.startswith(f"{name}=")
    hp = tg.resolve_hyperparameters(tg.parse_args(["--mlp", "swiglu"]))
    (difference,) = tg.record_differences(hp, tg.RECIPES["aurora"], 3200, None)
    assert "mlp='swiglu'" in difference
    assert tg.resolve_hyperparameters(tg.parse_args([])) == tg.FULL
    with pytest.raises(SystemExit):
        tg.parse_args(["--stop-at", "5", "--save", "x.pt"])


def test_stop_at_follows_the_long_schedule_and_ends_early(data_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with torch._dynamo.config.patch(disable=True):
        assert tg.main(["--tiny", "--device", "cpu", "--steps", "3200", "--stop-at", "3", "--run-id", "stop",
                        "--no-diagnostics", "--freeze-mlp-scalars", *data_args]) == 0
    _, lines = split_log((tmp_path / "logs" / "stop.txt").read_text())
    assert [(s, t) for s, t, _ in val_records(lines)] == [(0, 3200), (3, 3200)]
    (config,) = events(lines, "config")
    assert any(d.startswith("stop_at=3") for d in config["differs_from_record"])


# ---- checkpoints: --resume, --save-every, --init-from, --save ----

RESUME_STEPS = 8  # validates at 0 and 8; periodic checkpoints at 2, 4 and 6


@pytest.fixture(scope="module")
def long_data_args(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic_long")
    write_synthetic_shards(str(folder), vocab_size=512, train_shards=1,
                           tokens_per_shard=(RESUME_STEPS + 2) * TINY_BATCH, val_tokens=tg.TINY.val_tokens + 100)
    return ["--train-files", str(folder / "synthetic_train_*.bin"), "--val-files", str(folder / "synthetic_val_*.bin"),
            *SMALL_PROBE]


def assert_identical(a, b, where="checkpoint"):
    """Two checkpoints hold the same entries, every tensor bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def straight_and_resumed(data_args, folder, launcher=(), compiled=False, threads=None):
    """RESUME_STEPS steps straight (saving every 2, keeping 2), then the same run resumed from its step-4
    checkpoint. Returns (straight checkpoint, resumed checkpoint, straight lines, resumed lines)."""
    env = uncompiled_env(threads)
    if compiled:
        del env["TORCH_COMPILE_DISABLE"]
    common = ["--tiny", "--steps", str(RESUME_STEPS), "--no-diagnostics", *data_args]

    def run(args):
        result = run_bounded([sys.executable, *launcher, TRAIN_GPT, *common, *args], 900, cwd=folder, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run(["--run-id", "straight", "--save", "s.pt", "--save-every", "2", "--keep-last", "2"])
    # --keep-last 2: of the periodic checkpoints at 2, 4 and 6 the newest two stay; the final one is s.pt.
    assert sorted(p.name for p in folder.glob("s*.pt")) == ["s.pt", "s.step4.pt", "s.step6.pt"]
    assert not list(folder.glob("*.tmp"))
    run(["--run-id", "resumed", "--resume", "s.step4.pt", "--save", "r.pt"])
    lines = [split_log((folder / "logs" / f"{name}.txt").read_text())[1] for name in ("straight", "resumed")]
    return (torch.load(folder / "s.pt", weights_only=True), torch.load(folder / "r.pt", weights_only=True), *lines)


@pytest.mark.slow
def test_resume_is_bit_identical_when_compiled_on_one_thread(long_data_args, tmp_path):
    """On one thread, as torchrun runs each process. On several, a compiled CPU run does not repeat itself
    bit for bit, resumed or not: inductor's kernel for the embedding's gradient adds each token's row
    with atomic adds in an OpenMP loop split across the threads, so the order of the additions into a row
    that tokens of two threads share follows the threads' timing (measured on a compiled bfloat16 embedding
    alone, one input 2000 times: the gradient differed from the first in 1670 repeats on 2 threads, in
    none on 1). Uncompiled runs resume bit for bit in test_resume_with_two_processes_and_at_another_world_size."""
    straight, resumed, straight_lines, resumed_lines = straight_and_resumed(long_data_args, tmp_path, compiled=True,
                                                                            threads=1)
    assert_identical(straight, resumed)  # model, both optimizers' states, step, data position, RNG
    assert straight["step"] == RESUME_STEPS and straight["stream"]["pos"] == RESUME_STEPS * TINY_BATCH
    assert set(straight["optimizers"][1]["state"][0]) == {"momentum_buffer"}  # Aurora's state, not AdamW's
    assert "exp_avg" in straight["optimizers"][0]["state"][0]
    assert val_records(resumed_lines) == val_records(straight_lines)[-1:]  # the resumed log has only the last validation
    assert events(resumed_lines, "config")[0]["resume"] == "s.step4.pt"
    assert events(straight_lines, "config")[0]["compiled"]


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_with_two_processes_and_at_another_world_size(long_data_args, tmp_path):
    straight, resumed, straight_lines, _ = straight_and_resumed(long_data_args, tmp_path, launcher=TORCHRUN_2)
    assert_identical(straight, resumed)
    assert RUNNING_LINE.fullmatch(straight_lines[1])[1] == "2"
    # The parameters and optimizer states are replicated, so rank 0's checkpoint resumes in one process;
    # on one thread that process computes what the two did (test_two_gloo_processes_compute_what_one_does).
    run_trainer(["--tiny", "--steps", str(RESUME_STEPS), "--no-diagnostics", "--run-id", "one", "--resume",
                 "s.step4.pt", "--save", "one.pt", *long_data_args], cwd=tmp_path, threads=1)
    assert_identical(straight, torch.load(tmp_path / "one.pt", weights_only=True))


def worker_of_rank(launcher_pid, rank):
    """The pid of torchrun's worker process with that RANK."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        children = f.read().split()
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(pid)
    raise AssertionError(f"torchrun {launcher_pid} has no worker of rank {rank} among {children}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_a_dead_rank_ends_the_run_within_a_minute_naming_it(tmp_path):
    """Rank 1 killed (SIGKILL) once step 0 is validated, in a 200-step run: rank 0, which waits for it in
    the next collective, does not wait for the process group's timeout; torchrun stops it and exits
    non-zero naming rank 1."""
    steps = 200
    write_synthetic_shards(str(tmp_path), vocab_size=512, train_shards=1, tokens_per_shard=(steps + 2) * TINY_BATCH,
                           val_tokens=tg.TINY.val_tokens + 100)
    data = ["--train-files", str(tmp_path / "synthetic_train_*.bin"), "--val-files", str(tmp_path / "synthetic_val_*.bin")]
    log = tmp_path / "logs" / "dies.txt"
    with own_session([sys.executable, *TORCHRUN_2, TRAIN_GPT, *ON_CPU, "--tiny", "--steps", str(steps),
                      "--no-diagnostics", "--run-id", "dies", *data], cwd=tmp_path, env=uncompiled_env()) as torchrun:
        wait_while_running(torchrun, lambda: log.exists() and f"step:0/{steps} val_loss" in log.read_text(), 600,
                           "no step 0 in 600 s or the run ended before it")
        os.kill(worker_of_rank(torchrun.pid, 1), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = torchrun.communicate(timeout=120)
        ended_after = time.monotonic() - killed
    assert torchrun.returncode != 0 and ended_after < 60, (torchrun.returncode, ended_after)
    assert re.search(r"rank\s*:\s*1 ", stderr) and "SIGKILL" in stderr, stderr[-3000:]
    assert f"step:{steps}/{steps}" not in log.read_text()


def write_checkpoint_like(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    return str(path)


def tiny_checkpoint(tiny_run):
    """The tiny run's first checkpoint, to edit: without its checksum, as a checkpoint edited on purpose must be
    (an edited one that keeps it is refused as damaged)."""
    folder, _, _ = tiny_run
    checkpoint = torch.load(folder / "ck.trial0.pt", weights_only=True)
    del checkpoint[tg.CHECKSUM]
    return checkpoint


@pytest.mark.parametrize("name, make, problem", [
    ("random.pt", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a readable checkpoint"),
    ("empty.pt", lambda p: p.write_bytes(b""), "empty file"),
    ("folder.pt", lambda p: p.mkdir(), "is a directory"),
    ("tensor.pt", lambda p: torch.save(torch.zeros(3), p), "holds a Tensor"),
    ("missing.pt", lambda p: None, "no such file"),
])
@pytest.mark.parametrize("flag", ["--init-from", "--resume"])
def test_unreadable_checkpoint_is_one_line_naming_the_file(data_args, tmp_path, capsys, name, make, problem,
                                                           flag):
    path = write_checkpoint_like(tmp_path, name, make)
    assert tg.main(["--tiny", "--steps", "2", flag, path, "--run-id", f"bad-{name}", *data_args]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith(f"error: {path}: ") and problem in message, message
    assert "weights_only" not in message  # torch's own text for random bytes suggests unsafe loading
    assert not os.path.exists(f"logs/bad-{name}.txt")  # refused before the run started


def test_corrupt_checkpoint_exits_with_one_line_and_no_traceback(data_args, tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    result = run_trainer(["--tiny", "--steps", "2", "--init-from", "random.pt", *data_args], cwd=tmp_path,
                         check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "random.pt: not a readable checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr


def test_truncated_checkpoint_is_one_line_naming_the_file(tiny_run, data_args, tmp_path, capsys):
    folder, _, _ = tiny_run
    whole = (folder / "ck.trial0.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:len(whole) // 2])
    path = str(tmp_path / "cut.pt")
    assert tg.main(["--tiny", "--steps", "2", "--init-from", path, *data_args]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and f"{path}: not a readable checkpoint" in message


@pytest.mark.parametrize("change, problem", [
    (lambda ck: ck["model"].pop("blocks.1.mlp.fc.bias"), 'Missing key(s) in state_dict: "blocks.1.mlp.fc.bias"'),
    (lambda ck: ck["model"].__setitem__("extra.weight", torch.zeros(2)), 'Unexpected key(s) in state_dict: "extra.weight"'),
    (lambda ck: ck["model"].__setitem__("proj.bias", torch.zeros(7)), "size mismatch for proj.bias"),
    (lambda ck: ck.__setitem__("recipe", "muon"), "recipe 'muon' (this run: 'aurora')"),
    (lambda ck: ck.__setitem__("steps", 99), f"steps 99 (this run: {STEPS})"),
    (lambda ck: ck["model_config"].__setitem__("model_dim", 64), "'model_dim': 64"),
    (lambda ck: ck.__setitem__("batch_tokens", 8), f"batch_tokens 8 (this run: {TINY_BATCH})"),
    (lambda ck: ck.pop("stream"), "holds weights only"),
    (lambda ck: ck.__setitem__("trial", 1), "saved in trial 1, but this run has --trials 1"),
])
def test_mismatched_checkpoint_is_refused_naming_what_differs(tiny_run, data_args, tmp_path, capsys, change,
                                                                problem):
    checkpoint = tiny_checkpoint(tiny_run)
    change(checkpoint)
    torch.save(checkpoint, tmp_path / "ck.pt")
    path = str(tmp_path / "ck.pt")
    assert tg.main(["--tiny", "--steps", str(STEPS), "--resume", path, *data_args]) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: {path}: ") and problem in message and message.count("\n") == 1, message


@pytest.mark.parametrize("flags, problem", [
    (["--seed", "1"], "seed 0 (this run: 1)"),
    (["--data-seed", "3"], "data_seed None (this run: 3)"),
    (["--aux-from", "muon"], "aux_from None (this run: 'muon')"),
    (["--freeze-mlp-scalars"], "freeze_mlp_scalars False (this run: True)"),
    (["--aurora", "tall"], "aurora None (this run: 'tall')"),  # other param groups: the state would not fit
    (["--without", "contra"], "without [] (this run: ['contra'])"),
    (["--set", "uw_floor=0.3"], "set [] (this run: ['uw_floor=0.3'])"),
])
def test_resume_refuses_a_flag_that_contradicts_the_checkpoint(tiny_run, data_args, tmp_path, monkeypatch, capsys,
                                                               flags, problem):
    """Such a flag was either ignored (the checkpoint won) while the config line claimed it, or the run was not
    the saved run's continuation. (--trials 2: the checkpoint ends trial 0, trial 1 is left to run.)"""
    folder, _, _ = tiny_run
    path = str(folder / "ck.trial0.pt")
    monkeypatch.chdir(tmp_path)
    for run in (["--check-args"], ["--no-diagnostics", *data_args]):
        assert tg.main(["--tiny", "--steps", str(STEPS), "--trials", "2", "--resume", path, *flags, *run]) == 2
        assert capsys.readouterr().err == (f"error: {path}: saved by a different run: {problem}; resume with the "
                                           f"saved run's settings\n")
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_saved_before_the_settings_were_recorded_resumes_and_the_log_says_so(tiny_run, data_args,
                                                                                         tmp_path, monkeypatch):
    """Its seed, data seed, --aux-from, --freeze-mlp-scalars and --aurora are unknown: taken from the command line,
    listed as unchecked in the config line."""
    monkeypatch.chdir(tmp_path)
    checkpoint = tiny_checkpoint(tiny_run)
    unchecked = ["seed", "data_seed", "aux_from", "freeze_mlp_scalars", "aurora", "aurora_form"]
    for name in unchecked:
        del checkpoint[name]
    torch.save(checkpoint, tmp_path / "old.pt")
    with torch._dynamo.config.patch(disable=True):
        assert tg.main(["--tiny", "--steps", str(STEPS), "--trials", "2", "--resume", "old.pt", "--seed", "1",
                        "--run-id", "old", "--no-diagnostics", *data_args]) == 0
    _, lines = split_log((tmp_path / "logs" / "old.txt").read_text())
    assert events(lines, "config")[0]["resume_unchecked"] == unchecked
    assert [step for step, _, _ in val_records(lines)] == [STEPS, 0, STEPS]  # trial 0 resumed at its end, trial 1


def test_stop_at_at_or_before_the_resumed_step_is_refused(tiny_run, tmp_path, monkeypatch, capsys):
    """It ended with `done` and no training."""
    monkeypatch.chdir(tmp_path)
    checkpoint = tiny_checkpoint(tiny_run)
    checkpoint["step"] = 5  # as a periodic checkpoint of step 5
    torch.save(checkpoint, tmp_path / "ck.pt")
    for stop_at in (3, 5):
        assert tg.main(["--tiny", "--steps", str(STEPS), "--trials", "2", "--resume", "ck.pt", "--stop-at",
                        str(stop_at), "--check-args"]) == 2
        assert capsys.readouterr().err == (f"error: --stop-at {stop_at}: the checkpoint ck.pt is at step 5 already, "
                                           f"so nothing would be trained; give a later step (up to --steps {STEPS})\n")
    assert tg.main(["--tiny", "--steps", str(STEPS), "--trials", "2", "--resume", "ck.pt", "--stop-at", "6",
                    "--check-args"]) == 0


def test_resuming_the_end_of_the_last_trial_is_refused(tiny_run, capsys):
    folder, _, _ = tiny_run
    path = str(folder / "ck.trial1.pt")
    assert tg.main(["--tiny", "--steps", str(STEPS), "--trials", "2", "--resume", path, "--check-args"]) == 2
    assert capsys.readouterr().err == (f"error: --resume {path}: the saved run ended there (step {STEPS} of its last "
                                       f"trial), so nothing would be trained; give a checkpoint from before its end\n")


def test_init_from_a_dict_without_weights_is_refused(tmp_path, capsys):
    torch.save({"model": {"step": 3}}, tmp_path / "odd.pt")
    path = str(tmp_path / "odd.pt")
    assert tg.main(["--tiny", "--init-from", path, "--check-args"]) == 2
    assert capsys.readouterr().err == (f"error: {path}: holds no model state dict (a dict of tensors, or one under "
                                       f"'model')\n")


def test_init_from_loads_strictly(tiny_run, data_args, tmp_path, capsys):
    weights = tiny_checkpoint(tiny_run)["model"]
    del weights["norm_b.gains"]
    torch.save(weights, tmp_path / "bare.pt")  # a bare state dict is accepted when it fits
    assert tg.main(["--tiny", "--steps", "2", "--init-from", str(tmp_path / "bare.pt"), *data_args]) == 2
    assert 'Missing key(s) in state_dict: "norm_b.gains"' in capsys.readouterr().err


@pytest.mark.parametrize("change, problem", [
    (lambda states: states.__setitem__(1, states[0]), "its Aurora state does not fit"),  # AdamW's state as Aurora's
    (lambda states: states.pop(), "holds 1 optimizer states, this run has 2"),
])
def test_optimizer_state_that_does_not_fit_is_refused(tiny_run, data_args, tmp_path, monkeypatch, capsys, change,
                                                      problem):
    monkeypatch.chdir(tmp_path)
    checkpoint = tiny_checkpoint(tiny_run)
    change(checkpoint["optimizers"])
    torch.save(checkpoint, tmp_path / "ck.pt")
    # (--trials 2: the checkpoint ends trial 0, so trial 1 is left to run.)
    assert tg.main(["--tiny", "--steps", str(STEPS), "--trials", "2", "--resume", str(tmp_path / "ck.pt"),
                    "--run-id", "opt", *data_args]) == 3
    assert problem in capsys.readouterr().err


@pytest.mark.parametrize("target, problem", [
    (lambda tmp: tmp, "names a folder"),
    (lambda tmp: tmp / "afile" / "ck.pt", "is a file, not a folder"),
    (lambda tmp: "/proc/ck.pt", "cannot write in /proc"),
])
def test_unwritable_save_path_is_refused_before_training(data_args, tmp_path, target, problem):
    (tmp_path / "afile").write_text("x")
    path = str(target(tmp_path))
    result = run_trainer(["--tiny", "--steps", "2", "--save", path, "--run-id", "save", *data_args], cwd=tmp_path,
                         check=False)
    assert result.returncode == 2 and problem in result.stderr and path in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "step:" not in result.stdout and not (tmp_path / "logs").exists()  # no step ran, nothing compiled
    assert not list(tmp_path.glob("**/*.tmp"))


@pytest.mark.parametrize("path", ["ckpts/", "ckpts/..", "."])
def test_a_save_path_naming_a_folder_is_refused_before_any_work(data_args, tmp_path, monkeypatch, capsys, path):
    """`--save DIR/` once trained to the end and then lost the weights (`invalid file name: DIR/.tmp`)."""
    monkeypatch.chdir(tmp_path)
    for run in (["--check-args"], ["--steps", "2", "--no-diagnostics", *data_args]):
        assert tg.main(["--tiny", "--save", path, *run]) == 2
        message = capsys.readouterr().err
        assert message.startswith(f"error: --save {path}: ") and message.count("\n") == 1, message
        assert "a file path such as" in message and os.listdir(tmp_path) == []


def on_a_full_disk(monkeypatch, folder, free=2 ** 20):
    """shutil.disk_usage as if the disk holding `folder` had `free` bytes left, other disks as they are."""
    real = shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        inside = os.path.realpath(path) + os.sep
        return usage._replace(free=free) if inside.startswith(os.path.realpath(folder) + os.sep) else usage
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_a_save_folder_without_room_for_a_checkpoint_is_refused_before_any_work(tiny_run, data_args, tmp_path,
                                                                               monkeypatch, capsys):
    folder, _, _ = tiny_run
    saved = (folder / "ck.trial0.pt").stat().st_size
    estimate = tg.estimated_checkpoint_bytes(tg.TINY.model, tg.RECIPES["aurora"])
    assert saved <= estimate <= 2 * saved  # about one checkpoint, never less
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").mkdir()
    on_a_full_disk(monkeypatch, tmp_path / "full")
    for run in (["--check-args"], ["--steps", "2", "--no-diagnostics", *data_args]):
        assert tg.main(["--tiny", "--save", "full/ck.pt", *run]) == 2
        assert capsys.readouterr().err == (f"error: --save full/ck.pt: {tmp_path / 'full'} has 1 MB free, it needs about "
                                           f"{estimate // 2 ** 20} MB; free space there or save elsewhere\n")
        assert os.listdir(tmp_path) == ["full"] and os.listdir(tmp_path / "full") == []


@pytest.mark.parametrize("failure", ["OSError ENOSPC", "torch's zip writer"])
def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint_and_the_log(data_args, tmp_path, monkeypatch,
                                                                                capsys, failure):
    """The room was there before training, then the disk filled up: the final save fails with one line, the
    earlier checkpoints and the log stay."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck.pt").write_bytes(b"previous")  # this run's own, say, or another's it may replace (--overwrite)
    save = torch.save

    def save_on_a_full_disk(obj, path):
        if not str(path).endswith("ck.pt.tmp"):  # the periodic checkpoint of step 1 still fits
            return save(obj, path)
        with open(path, "wb") as f:
            f.write(b"partial")
        if failure == "OSError ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        on_a_full_disk(monkeypatch, tmp_path, free=4096)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4096")
    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with torch._dynamo.config.patch(disable=True):
        code = tg.main(["--tiny", "--steps", "2", "--save", "ck.pt", "--save-every", "1", "--run-id", "full",
                        "--overwrite", "--no-diagnostics", *data_args])
    assert code == 3
    needed = r"about \d+ MB"
    assert re.fullmatch(rf"error: no space left on device: ck.pt needs {needed}; the file there before is kept\. "
                        r"Free space, then --resume the newest checkpoint\n", capsys.readouterr().err)
    assert (tmp_path / "ck.pt").read_bytes() == b"previous" and not list(tmp_path.glob("*.tmp"))
    assert torch.load(tmp_path / "ck.step1.pt", weights_only=True)["step"] == 1
    _, lines = split_log((tmp_path / "logs" / "full.txt").read_text())
    assert [step for step, _, _ in val_records(lines)] == [0, 2] and lines[-1].startswith("error ")
    assert "no space left on device: ck.pt" in events(lines, "error")[0]["message"]


def test_failed_save_leaves_no_tmp_file(tmp_path, monkeypatch):
    def failing_save(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", failing_save)
    (tmp_path / "ck.pt").write_bytes(b"previous")
    with pytest.raises(tg.WriteError, match="ck.pt: the checkpoint could not be written .disk full.; the file there "
                                           "before is kept"):
        tg.save_checkpoint(str(tmp_path / "ck.pt"), {"step": 1})
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"] and (tmp_path / "ck.pt").read_bytes() == b"previous"


def test_a_run_id_whose_log_exists_is_refused_unless_overwrite(data_args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "again.txt").write_text("the earlier run\n")
    for run in (["--check-args"], ["--steps", "2", "--no-diagnostics", *data_args]):
        assert tg.main(["--tiny", "--run-id", "again", *run]) == 2
        assert capsys.readouterr().err == ("error: --run-id again: logs/again.txt exists (an earlier run's log); give "
                                           "another --run-id, or --overwrite to replace it\n")
    assert (tmp_path / "logs" / "again.txt").read_text() == "the earlier run\n"
    assert tg.main(["--tiny", "--run-id", "again", "--overwrite", "--check-args"]) == 0
    with torch._dynamo.config.patch(disable=True):
        assert tg.main(["--tiny", "--run-id", "again", "--overwrite", "--steps", "2", "--no-diagnostics",
                        *data_args]) == 0
    _, lines = split_log((tmp_path / "logs" / "again.txt").read_text())
    assert lines[-1].startswith("done ")


def test_of_twins_started_at_once_the_second_stops_and_the_first_keeps_its_log(data_args, tmp_path, monkeypatch,
                                                                            capsys):
    """Both pass the check for an existing log; the log is created exclusively, so the one that comes second
    stops with one line instead of writing into the other's log."""
    monkeypatch.chdir(tmp_path)
    check_data = tg.check_data

    def twin_creates_the_log_meanwhile(*args):
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "twin.txt").write_text("the twin's log\n")
        return check_data(*args)
    monkeypatch.setattr(tg, "check_data", twin_creates_the_log_meanwhile)
    with torch._dynamo.config.patch(disable=True):
        assert tg.main(["--tiny", "--run-id", "twin", "--steps", "2", "--no-diagnostics", *data_args]) == 2
    assert capsys.readouterr().err == ("error: --run-id twin: logs/twin.txt exists (an earlier run's log); give "
                                       "another --run-id, or --overwrite to replace it\n")
    assert os.listdir(tmp_path / "logs") == ["twin.txt"]
    assert (tmp_path / "logs" / "twin.txt").read_text() == "the twin's log\n"


@pytest.mark.parametrize("problem", ["read-only", "full"])
def test_a_logs_folder_that_cannot_take_the_log_is_refused_before_any_work(data_args, tmp_path, monkeypatch, capsys,
                                                                         problem):
    monkeypatch.chdir(tmp_path)
    if problem == "read-only":
        os.symlink("/sys", tmp_path / "logs")  # not writable, even for root
        expected = f"cannot write in {tmp_path / 'logs'} (Permission denied); run from a folder whose logs/ can take it"
    else:
        on_a_full_disk(monkeypatch, tmp_path)
        expected = f"{tmp_path} has 1 MB free, it needs about 16 MB; free space there or run from a folder whose logs/ " \
                   f"can take it"
    for run in (["--check-args"], ["--steps", "2", "--no-diagnostics", *data_args]):
        assert tg.main(["--tiny", "--run-id", "x", *run]) == 2
        assert capsys.readouterr().err == f"error: the log logs/x.txt: {expected}\n"
        assert os.listdir(tmp_path) == (["logs"] if problem == "read-only" else [])


@pytest.mark.parametrize("full", ["log", "per-unit records"])
def test_a_log_on_a_full_disk_ends_the_run_with_one_line(data_args, tmp_path, monkeypatch, capsys, full):
    """/dev/full answers every write with ENOSPC, as a disk that filled up during the run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    os.symlink("/dev/full", tmp_path / "logs" / ("full.txt" if full == "log" else "full.units.npz.tmp"))
    with torch._dynamo.config.patch(disable=True):
        code = tg.main(["--tiny", "--steps", "2", "--run-id", "full", "--overwrite", *data_args])
    assert code == 3
    message = capsys.readouterr().err
    if full == "log":
        assert message == ("error: no space left on device: logs/full.txt could not be written; it keeps every line "
                           "written before\n")
    else:
        assert message == ("error: no space left on device: logs/full.units.npz could not be written; the records of "
                           "the earlier probes are kept\n")
        _, lines = split_log((tmp_path / "logs" / "full.txt").read_text())
        assert lines[-1].startswith("error ") and "full.units.npz could not be written" in lines[-1]
        assert os.listdir(tmp_path / "logs") == ["full.txt"]


def test_train_stream_position_round_trips(tmp_path):
    write_shard(str(tmp_path / "a.bin"), np.arange(30))
    write_shard(str(tmp_path / "b.bin"), np.arange(100, 120))
    paths = [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]
    stream = tg.TrainStream(paths, 8, 0, 1, 512)
    for _ in range(4):  # into the second shard
        stream.next_batch()
    resumed = tg.TrainStream(paths, 8, 1, 2, 512)  # another rank and world size: the position is global
    resumed.load_state_dict(stream.state_dict())
    assert stream.state_dict() == {"shard_index": 1, "pos": 8}
    assert resumed.next_batch().tolist() == stream.next_batch()[4:].tolist()
    with pytest.raises(tg.SetupError, match="train shard 3"):
        resumed.load_state_dict({"shard_index": 2, "pos": 0})


# ---- a run's files: its locks, earlier runs' checkpoints, checksums ----

def quick_run(*args, code=0):
    """main() in this process, uncompiled, without diagnostics: a couple of tiny steps."""
    with torch._dynamo.config.patch(disable=True):
        assert tg.main(["--tiny", "--no-diagnostics", *args]) == code


def test_a_twin_with_overwrite_is_refused_while_the_first_writes_its_log(data_args, tmp_path, monkeypatch, capsys):
    """Two runs with one --run-id and --overwrite at once wrote one interleaved log: the second now stops with one
    line before any work, and the first's log is as it wrote it."""
    monkeypatch.chdir(tmp_path)
    first = tg.RunLog("logs/twin.txt", overwrite=True)
    first.write("the first run's line", echo=False)
    try:
        quick_run("--run-id", "twin", "--overwrite", "--steps", "2", *data_args, code=2)
        assert capsys.readouterr().err == (f"error: the log logs/twin.txt: another run (process {os.getpid()}) is "
                                           f"writing it now; give another --run-id, or wait for that run to end\n")
        first.write("its next line", echo=False)
    finally:
        first.close()
    assert (tmp_path / "logs" / "twin.txt").read_text() == "the first run's line\nits next line\n"
    assert os.listdir(tmp_path / "logs") == ["twin.txt"]  # the lock went with the first run's close


@pytest.mark.parametrize("spelling", ["ck.pt", "./ck.pt", "absolute"])
def test_a_second_run_saving_to_the_same_path_is_refused_while_the_first_runs(data_args, tmp_path, monkeypatch,
                                                                             capsys, spelling):
    """Two runs saving to one path at once: one's checkpoint was lost (each renamed or removed the other's .tmp).
    The second now stops before any work, however it spells the path, and leaves nothing behind."""
    monkeypatch.chdir(tmp_path)
    save = str(tmp_path / "ck.pt") if spelling == "absolute" else spelling
    first = tg.RunLog("logs/first.txt", save="ck.pt")
    try:
        quick_run("--run-id", "second", "--save", save, "--save-every", "1", "--steps", "2", *data_args, code=2)
        assert capsys.readouterr().err == (f"error: --save {save}: another run (process {os.getpid()}) is writing it "
                                           f"now; give another --save path, or wait for that run to end\n")
    finally:
        first.close()
    assert sorted(os.listdir(tmp_path)) == ["logs"] and os.listdir(tmp_path / "logs") == ["first.txt"]


def test_a_run_that_died_holding_its_locks_leaves_none_behind(data_args, tmp_path, monkeypatch):
    """A killed run cannot let go of its locks itself: the kernel drops them with the process, and the next run
    with the same names takes them over (and removes the files they leave)."""
    holder = ("import sys, train_gpt as tg\nlog = tg.RunLog('logs/gone.txt', save='ck.pt')\nprint('holding', "
              "flush=True)\nsys.stdin.read()\n")
    with own_session([sys.executable, "-c", holder], cwd=tmp_path, env=uncompiled_env(),
                     stdin=subprocess.PIPE) as child:
        assert child.stdout.readline() == "holding\n", child.stderr.read()
        child.kill()
        child.wait(timeout=60)
    assert sorted(os.listdir(tmp_path)) == ["ck.pt.lock", "logs"]  # what the killed run left
    monkeypatch.chdir(tmp_path)
    quick_run("--run-id", "gone", "--overwrite", "--save", "ck.pt", "--steps", "2", *data_args)
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "logs"] and os.listdir(tmp_path / "logs") == ["gone.txt"]


def test_a_save_path_with_an_earlier_runs_checkpoints_needs_overwrite(tiny_run, data_args, tmp_path, monkeypatch,
                                                                    capsys):
    """--save silently replaced another run's checkpoints: like a log, they are kept unless --overwrite, or unless
    this run resumes one of them (a run continuing itself)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck.pt").write_bytes(b"another run's")
    (tmp_path / "ck.step4.pt").write_bytes(b"another run's periodic one")
    run = ["--steps", "2", "--save", "ck.pt", *data_args]
    for check in (["--check-args"], []):
        quick_run("--run-id", "new", *run, *check, code=2)
        assert capsys.readouterr().err == ("error: --save ck.pt: an earlier run's checkpoints are there (ck.pt, "
                                           "ck.step4.pt); give another --save path, or --overwrite to replace them\n")
    assert not (tmp_path / "logs").exists() and (tmp_path / "ck.pt").read_bytes() == b"another run's"
    quick_run("--run-id", "new", "--overwrite", *run)
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["step"] == 2
    assert (tmp_path / "ck.step4.pt").read_bytes() == b"another run's periodic one"  # not this run's: left alone
    # A run resuming one of the checkpoints at its --save path continues their run; another path is refused.
    folder, _, _ = tiny_run
    monkeypatch.chdir(folder)
    resume = ["--tiny", "--steps", str(STEPS), "--trials", "2", "--resume", "ck.trial0.pt", "--check-args"]
    assert tg.main([*resume, "--save", "ck.pt"]) == 0
    (tmp_path / "other.trial1.pt").write_bytes(b"another run's second trial")
    assert tg.main([*resume, "--save", str(tmp_path / "other.pt")]) == 2
    assert capsys.readouterr().err == (f"error: --save {tmp_path / 'other.pt'}: an earlier run's checkpoints are there "
                                       f"({tmp_path / 'other.trial1.pt'}); give another --save path, or --overwrite to "
                                       f"replace them\n")


def test_keep_last_prunes_only_this_runs_periodic_checkpoints(data_args, tmp_path, monkeypatch):
    """--keep-last 2 deleted this run's new periodic checkpoints and kept an older run's later steps beside them."""
    monkeypatch.chdir(tmp_path)
    for step in (100, 200):
        (tmp_path / f"ck.step{step}.pt").write_bytes(b"an older run's")
    quick_run("--run-id", "k", "--overwrite", "--steps", "4", "--save", "ck.pt", "--save-every", "1",
              "--keep-last", "2", *data_args)
    assert sorted(p.name for p in tmp_path.glob("ck*")) == ["ck.pt", "ck.step100.pt", "ck.step2.pt", "ck.step200.pt",
                                                           "ck.step3.pt"]
    assert torch.load(tmp_path / "ck.step3.pt", weights_only=True)["step"] == 3


def flip_a_weight_byte(path):
    """Flips one byte in the middle of the checkpoint's largest tensor (torch.load does not check the zip's CRCs)."""
    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    header = largest.header_offset
    name_length, extra_length = struct.unpack("<HH", data[header + 26:header + 30])
    data[header + 30 + name_length + extra_length + largest.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_checkpoint_whose_bytes_changed_is_refused_by_check_args_and_resume(tiny_run, data_args, tmp_path, capsys):
    """A checkpoint with flipped bytes passed --check-args and the resume, then failed as "gradient or update is
    not finite at step 4": the checksum written with it finds the change first."""
    folder, _, _ = tiny_run
    shutil.copy(folder / "ck.trial0.pt", tmp_path / "ck.pt")
    flip_a_weight_byte(tmp_path / "ck.pt")
    torch.load(tmp_path / "ck.pt", weights_only=True)  # still loads
    path = str(tmp_path / "ck.pt")
    for check in (["--check-args"], ["--run-id", "flipped", *data_args]):
        assert tg.main(["--tiny", "--steps", str(STEPS), "--trials", "2", "--resume", path, *check]) == 2
        assert capsys.readouterr().err == (f"error: {path}: its contents do not match the checksum saved with them (the "
                                           f"file changed after it was written: damaged on disk or in a copy); use "
                                           f"another checkpoint, or copy it again\n")
    assert tg.main(["--tiny", "--init-from", path, "--check-args"]) == 2
    assert "do not match the checksum" in capsys.readouterr().err
    assert tg.main(["--tiny", "--steps", str(STEPS), "--trials", "2", "--check-args", "--resume",
                    str(folder / "ck.trial0.pt")]) == 0  # the file as written


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("rank, missing", [(0, "rank 1"), (1, "rank 0, which hosts the rendezvous,")])
def test_a_rank_whose_peers_never_join_stops_within_the_join_timeout_naming_them(data_args, tmp_path, monkeypatch,
                                                                                capsys, rank, missing):
    """RANK=0 WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... outside torchrun waited silently for a rank that never
    came (torch's 30 minutes); now JOIN_TIMEOUT bounds the wait, and each rank that gives up says who is missing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tg, "JOIN_TIMEOUT", datetime.timedelta(seconds=2))
    port = free_port()
    for name, value in {"RANK": rank, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items():
        monkeypatch.setenv(name, str(value))
    start = time.monotonic()
    quick_run("--run-id", "alone", "--steps", "2", *data_args, code=2)
    assert time.monotonic() - start < 60
    assert capsys.readouterr().err == (f"error: {missing} did not join the process group at 127.0.0.1:{port} "
                                       f"(MASTER_ADDR:MASTER_PORT) within 2 s; start all 2 ranks together (torchrun "
                                       f"--nproc_per_node=2 train_gpt.py ...), or unset RANK and WORLD_SIZE to train "
                                       f"in one process\n")
    assert not dist.is_initialized() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("link", ["logs", "out"])
def test_a_dangling_link_where_a_folder_should_be_is_named_before_any_work(data_args, tmp_path, monkeypatch, capsys,
                                                                          link):
    """A dangling `logs` link made the run claim "logs/X.txt exists (an earlier run's log)"."""
    monkeypatch.chdir(tmp_path)
    os.symlink("gone", link)
    flag = ["--save", "out/ck.pt"] if link == "out" else []
    what = "--save out/ck.pt" if link == "out" else "the log logs/x.txt"
    fix = "save elsewhere" if link == "out" else "run from a folder whose logs/ can take it"
    for check in (["--check-args"], ["--steps", "2", *data_args]):
        quick_run("--run-id", "x", *flag, *check, code=2)
        assert capsys.readouterr().err == (f"error: {what}: {tmp_path / link} is a symbolic link to gone, which does "
                                           f"not exist; make that folder, or {fix}\n")
    assert os.listdir(tmp_path) == [link]
