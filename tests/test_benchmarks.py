import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

import train_gpt
from benchmarks import optimizer_step
from benchmarks.step import (causal_attention_flops_per_token, flops_per_token, matmul_params, parse_args,
                              ratios_vs_baseline)

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
                           "--warmup", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["size"] == "tiny" and result["device_type"] == "cpu" and not result["compiled"]
    assert list(result["recipes"]) == ["aurora", "normuon", "muon"]
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
    assert set(result["ratios"]) == {"aurora/muon", "normuon/muon"}
    for pair, ratios in result["ratios"].items():
        name = pair.split("/")[0]
        assert set(ratios) == {"matrix_step_ms", "optimizer_set_ms", "train_step_ms"}
        for key, ratio in ratios.items():
            assert math.isclose(ratio, result["recipes"][name][key] / result["recipes"]["muon"][key])


def test_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--recipes", "aurora,adam"])
    assert "adam" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--iters", "0"])
    assert parse_args(["--tiny", "--recipes", "muon, aurora"]).recipes == ["muon", "aurora"]


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
