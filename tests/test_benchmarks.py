import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

import train_gpt
from benchmarks import optimizer_step, step
from benchmarks.step import (causal_attention_flops_per_token, flops_per_token, host_syncs_counted, matmul_params,
                              parse_args, ratios_vs_baseline)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = train_gpt.ModelConfig(vocab_size=16, num_layers=2, model_dim=8, head_dim=4, seq_len=4)


def test_flops_per_token_by_hand():
    # N_matmul = 12 * 2 * 8^2 (q, k, v, attention proj, fc, proj in 2 blocks) + 8 * 16 (head) = 1664.
    # Causal attention, per layer: query t sees t keys; QK^T + AV = 2 * 2 * 8 * t FLOPs over the heads,
    # summed over t = 1..4: 32 * 10 = 320 for 4 tokens = 80 per token; fwd + bwd = 3 * 80 = 240; 2 layers.
    flops = flops_per_token(SMALL)
    assert flops["matmul_params"] == 1664
    assert flops["matmul"] == 6 * 1664 == 9984
    assert flops["attention"] == 480
    assert flops["total"] == 9984 + 480
    assert flops["noncausal_convention_total"] == 9984 + 12 * 2 * 8 * 4


def test_causal_attention_flops_sum_over_query_positions():
    config = train_gpt.ModelConfig(vocab_size=16, num_layers=3, model_dim=12, head_dim=4, seq_len=7)
    heads = config.model_dim // config.head_dim
    forward = sum(heads * 2 * (2 * config.head_dim * t) for t in range(1, config.seq_len + 1))
    assert causal_attention_flops_per_token(config) * config.seq_len == config.num_layers * 3 * forward


def test_gpt2_small_flops_per_token():
    flops = flops_per_token(train_gpt.FULL.model)
    assert flops["matmul_params"] == 12 * 12 * 768 ** 2 + 768 * 50304 == 123_568_128
    assert flops["total"] == 6 * 123_568_128 + 6 * 12 * 768 * 1025 == 798_087_168


def test_matmul_params_are_the_models_linear_weights():
    with torch.device("meta"):
        model = train_gpt.GPT(train_gpt.TINY.model)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(train_gpt.TINY.model) == linear_weights


def test_ratios_vs_baseline():
    recipes = {"aurora": {"x": 3.0}, "muon": {"x": 2.0}}
    assert ratios_vs_baseline(recipes, ["x"]) == {"aurora/muon": {"x": 1.5}}
    assert ratios_vs_baseline({"aurora": {"x": 3.0}}, ["x"]) == {}


def test_tiny_benchmark_json_cpu():
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1")
    done = subprocess.run([sys.executable, "benchmarks/step.py", "--tiny", "--device", "cpu", "--json", "--iters", "1",
                           "--warmup", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["size"] == "tiny" and result["device_type"] == "cpu" and not result["compiled"]
    assert list(result["recipes"]) == list(train_gpt.RECIPES)
    assert result["flops_per_token"] == flops_per_token(train_gpt.TINY.model)
    assert result["tokens_per_step"] == train_gpt.TINY.batch_tokens
    assert math.isfinite(result["matmul_rate_flops"]) and result["matmul_rate_flops"] > 0
    for name, numbers in result["recipes"].items():
        for key in ("matrix_step_ms", "optimizer_set_ms", "train_step_ms", "tokens_per_s", "mfu", "peak_memory_mib"):
            assert math.isfinite(numbers[key]) and numbers[key] > 0, (name, key, numbers[key])
        assert numbers["hidden_matrices"] == 6 * train_gpt.TINY.model.num_layers
        for key, samples in numbers["samples_ms"].items():
            assert len(samples) == 1 and numbers[key] == statistics.median(samples)
        assert math.isclose(numbers["tokens_per_s"], result["tokens_per_step"] / (numbers["train_step_ms"] / 1000))
        assert math.isclose(numbers["mfu"], numbers["tokens_per_s"] * result["flops_per_token"]["total"]
                            / result["matmul_rate_flops"])
        per_step = numbers["per_step"]
        assert per_step["world_size"] == 8 and per_step["host_syncs"] == 0
        # One summed all-reduce per DDP gradient bucket and one all-gather per bucket (squares; fc with
        # proj^T), each carrying this rank's matrices; every recipe, the two new ones too.
        assert per_step["collectives"]["all_gather_single"] == 2 and per_step["collectives"]["all_reduce"] >= 1
        grad_bytes = sum(p.numel() * p.element_size() for p in train_gpt.GPT(train_gpt.TINY.model).parameters())
        assert per_step["bytes"] > grad_bytes
        # The benchmark recipes' 24 matrices of two costs split evenly; #42's costs vary by group.
        assert per_step["matrix_flops"]["max_over_mean"] == 1.0 or name == "aurora-ema-ref"
        assert per_step["matrix_flops"]["max_over_mean"] <= 1.1
    assert set(result["ratios"]) == {f"{name}/muon" for name in train_gpt.RECIPES if name != "muon"}
    for pair, ratios in result["ratios"].items():
        name = pair.split("/")[0]
        assert set(ratios) == {"matrix_step_ms", "optimizer_set_ms", "train_step_ms"}
        for key, ratio in ratios.items():
            assert math.isclose(ratio, result["recipes"][name][key] / result["recipes"]["muon"][key])


def test_the_plan_balances_the_full_size_matrices_on_1_2_4_and_8_ranks(capsys):
    """`benchmarks/step.py --plan-only --json`: the full-size model's per-rank matrix FLOPs from the owner
    plan on 1, 2, 4 and 8 ranks (a meta-device model, so it runs on the CPU)."""
    assert step.main(["--plan-only", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["size"] == "full" and result["model"]["model_dim"] == 768 and result["world_sizes"] == [1, 2, 4, 8]
    for name, recipe in result["recipes"].items():
        assert [plan["world_size"] for plan in recipe["plans"]] == [1, 2, 4, 8]
        for plan in recipe["plans"]:
            flops = plan["matrix_flops"]
            if name in ("aurora", "normuon", "muon", "soap-muon"):  # matrices of two costs per shape: even
                assert flops["max_over_mean"] == 1.0 and len(set(flops["per_rank"])) == 1, (name, plan["world_size"])
            assert 1.0 <= flops["max_over_mean"] <= 1.005, (name, plan["world_size"])
            if name in ("aurora-ema-ref", "soap-muon"):  # never worse than the records' own split
                assert flops["max_over_mean"] <= plan["record_round_robin"]["max_over_mean"]


def test_plan_keeps_the_state_in_about_one_in_w_per_rank(capsys):
    """Optimizer-state bytes per rank at full size on 8 ranks: the matrix optimizer's state on owner ranks,
    the lookahead's and readouts' in 1/W pieces; only AdamW's (as in the records) is whole on every rank."""
    assert step.main(["--plan-only", "--world-size", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for recipe in train_gpt.RECIPES:
        [plan] = result["recipes"][recipe]["plans"]
        state = plan["state_bytes"]
        [alone] = step.plan_report([recipe], False, [1])["recipes"][recipe]["plans"]
        one_process = alone["state_bytes"]["per_rank"]
        for part in ("matrix", "weight_averages"):
            whole = one_process[part][0]
            assert sum(state["per_rank"][part]) == whole  # every byte kept once, on one rank
            assert max(state["per_rank"][part]) <= 1.25 * whole / 8
        assert state["per_rank"]["adam"] == [one_process["adam"][0]] * 8
        assert state["bucket"] > 0


def test_host_syncs_counted_sees_python_level_syncs():
    x = torch.ones(3)
    with host_syncs_counted() as calls:
        x.sum().item()
        bool(x.any())
        torch.equal(x, x)
        x + 1
    assert calls == ["item", "__bool__", "equal"]
    assert torch.Tensor.item is not None and x.sum().item() == 3.0  # restored afterwards


def test_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--recipes", "aurora,adam"])
    assert "adam" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--iters", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--world-size", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--world-size", "3"])  # the 16 sequences of a tiny step do not split over 3
    assert "--world-size 3: world size 3 does not divide" in capsys.readouterr().err
    assert parse_args(["--tiny", "--recipes", "muon, aurora"]).recipes == ["muon", "aurora"]
    for seed in ("-1", str(2 ** 64)):
        with pytest.raises(SystemExit):
            parse_args(["--tiny", "--seed", seed])
        assert capsys.readouterr().err.splitlines()[-1].endswith(
            f"error: --seed must be in [0, 2^64 - 1] (a torch generator seed), got {seed}")


def test_full_size_on_the_cpu_points_to_tiny(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu"])
    assert "full size needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="only a machine without a GPU refuses --device cuda")
def test_device_cuda_without_a_gpu_is_refused_by_both_benchmarks(capsys):
    assert parse_args(["--tiny"]).device == torch.device("cpu")  # auto
    for main in (parse_args, optimizer_step.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--tiny", "--device", "cuda"] if main is parse_args else ["--device", "cuda"])
        assert exit_info.value.code == 2
        assert "--device cuda: torch " in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "-2"], "--steps must be at least 1, got -2"),
    (["--warmup", "-1"], "--warmup must be 0 or more, got -1"),
    (["--scale", "0"], "--scale must be a positive number, got 0.0"),
    (["--scale", "nan"], "--scale must be a positive number, got nan"),
    (["--scale", "inf"], "--scale must be a positive number, got inf"),
])
def test_optimizer_step_refuses_bad_counts_before_timing(capsys, argv, message):
    # A tiny width, so that a benchmark that went ahead would finish in a second (and then fail the test).
    with pytest.raises(SystemExit) as refused:
        optimizer_step.main(["--scale", "0.02", "--eager", "--device", "cpu", *argv])
    assert refused.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")


def test_optimizer_step_times_every_optimizer_on_a_good_input(capsys):
    """The issue's good input (width 38, one step, no warm-up) runs to its table: each optimizer batched and one
    matrix at a time, in milliseconds measured, and the ratios (it once crashed building its per-matrix groups)."""
    with torch._dynamo.config.patch(disable=torch._dynamo.config.disable):  # --eager sets it; this puts it back
        assert optimizer_step.main(["--device", "cpu", "--eager", "--scale", "0.05", "--steps", "1", "--warmup", "0"]) \
            in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert "72 matrices (38x38 x48, 152x38 x12, 38x152 x12); median of 1 steps after 0 warmup" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:5]}
    assert list(rows) == ["muon", "normuon", "aurora"]
    for batched, single, speedup in rows.values():
        assert float(batched) > 0 and float(single) > 0 and speedup.endswith("x")
        assert math.isclose(float(speedup[:-1]), float(single) / float(batched), abs_tol=0.01)
    assert lines[-1].startswith("aurora / muon (batched): ")


def test_optimizer_step_refuses_a_scale_whose_matrices_cannot_fit(capsys):
    with pytest.raises(SystemExit) as refused:
        optimizer_step.main(["--scale", "1000", "--eager", "--device", "cpu"])
    line = capsys.readouterr().err.splitlines()[-1]
    # 72 matrices of width 768,000: 144 * 768000^2 fp32 weights and as many gradients, 679,477 GB.
    assert refused.value.code == 2 and ("error: --scale 1000: the 72 matrices and their gradients alone take "
                                        "679,477 GB, more than the ") in line and line.endswith("; lower --scale")
