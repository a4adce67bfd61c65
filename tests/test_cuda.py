"""The CUDA path on one GPU, at full size (docs/benchmark.md#model): `python -m pytest -m cuda`.

Every test here is marked `cuda` and skipped where torch sees no GPU (tests/conftest.py). The tests
share one compiled full-size model and use the trainer's shapes (micro-batches of 64x1024), so the
model's train and eval graphs and each recipe's optimizer math compile once; the torchrun test runs
last and finds them in torch.compile's on-disk cache. Target: the whole file in under 5 minutes on
one H100, most of it compiling.
"""

import copy
import gc
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
from shards import write_shard  # noqa: E402
from synthetic import write_synthetic_shards  # noqa: E402

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
CONFIG = tg.FULL.model
SEQ_LEN = CONFIG.seq_len
MICRO_SEQS = tg.FULL.micro_batch_seqs  # 64
GPT2_VOCAB = 50257  # token ids of real (and full-vocabulary synthetic) shards lie below this
# Tolerances of the bf16 comparisons, each a few times what the same comparison measured on the CPU
# (see the tests' docstrings); a wrong computation is off by O(1).
LOSS_TOLERANCE = 2e-3  # nats per token, compiled bf16 model vs float32 (measured on the CPU: 2.2e-4)
GRAD_TOLERANCE = 0.08  # relative, worst parameter gradient (measured: 0.025, median 0.013)
OPT_TOLERANCE = 0.05  # relative, worst matrix move after two optimizer steps (measured: 0.011)
# The torchrun child's limits: compiling the train and eval graphs and the optimizer's shapes on a cold
# compile cache (generous: a slow compile is not what this test looks for), and the rest (NCCL start,
# one step, two validations of 10.5M tokens: seconds on an H100).
TORCHRUN_COMPILE_LIMIT_S = 900
TORCHRUN_RUN_LIMIT_S = 120
FUSED_ATTENTION = ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention",
                   "aten::_scaled_dot_product_efficient_attention")


def report(capsys, text):
    """Print past pytest's capture: these numbers are what a first GPU run is for."""
    with capsys.disabled():
        print(f"\n  [cuda] {text}", flush=True)


def random_full_size_model(device, seed=0):
    """The full-size GPT with every weight random. The benchmark's initialization zeroes the head and
    every proj, which makes the logits exactly 0 and the blocks' outputs vanish: a comparison on those
    weights would pass whatever the blocks compute."""
    model = tg.GPT(CONFIG)
    generator = torch.Generator().manual_seed(seed)
    tg.init_parameters(model, generator)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * math.sqrt(0.33 / param.size(1)))
    return model.to(device)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(scope="module")
def full_model():
    """(raw model, compiled model) on the GPU, compiled as train_gpt compiles it."""
    model = random_full_size_model(CUDA)
    return model, torch.compile(model, dynamic=False)


@pytest.fixture(scope="module")
def step_tokens():
    """One full step of random GPT-2-range tokens (512 sequences of 1024, +1 for the targets) on the GPU."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, GPT2_VOCAB, (tg.FULL.batch_tokens + 1,), generator=generator).to(CUDA)


def test_device_choice_on_a_gpu_machine():
    assert tg.resolve_device("auto", 0) == CUDA
    assert tg.resolve_device("cuda", 0) == CUDA
    assert tg.resolve_device("cpu", 0) == CPU
    count = torch.cuda.device_count()
    with pytest.raises(tg.SetupError, match=f"{count + 1} processes on this node need {count + 1} GPUs"):
        tg.resolve_device("cuda", 0, count + 1)
    with pytest.raises(tg.SetupError, match=f"{count + 1} processes on this node need"):
        tg.resolve_device("cuda", count)


def test_train_stream_pins_uint16_tokens_and_copies_them_without_blocking(tmp_path):
    write_shard(str(tmp_path / "train.bin"), np.arange(4000) % GPT2_VOCAB + 40000)  # ids past int16's range
    stream = tg.TrainStream([str(tmp_path / "train.bin")], 1024, 0, 1, tg.FULL.model.vocab_size,
                            pin_memory=True)
    batch = stream.next_batch()
    assert batch.dtype == torch.uint16 and batch.is_pinned()
    on_gpu = batch.to(CUDA, dtype=torch.int64, non_blocking=True)  # as train_trial copies it
    assert on_gpu.device == CUDA and torch.equal(on_gpu.cpu(), torch.arange(40000, 41025))


def test_sdpa_runs_a_fused_kernel_for_the_trainers_attention(capsys):
    """Which kernel F.scaled_dot_product_attention dispatches to for the trainer's inputs (bf16, head
    dim 128, causal, scale 0.12), read from the profiler's aten op names, forward and backward. The
    choice is made from the same inputs when torch.compile traces the model, so eager shows it."""
    attention = tg.Attention(CONFIG).to(CUDA)
    x = torch.randn(8, SEQ_LEN, CONFIG.model_dim, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        attention(x).float().square().sum().backward()
    ops = {event.key for event in profile.key_averages() if event.key.startswith("aten::_scaled_dot_product_")}
    forward = sorted(op for op in ops if not op.endswith("_backward"))
    heads = CONFIG.model_dim // CONFIG.head_dim
    report(capsys, f"SDPA on bf16 q, k, v of shape (8, {heads}, {SEQ_LEN}, {CONFIG.head_dim}), causal: "
                   f"{', '.join(sorted(ops))}")
    assert len(forward) == 1 and forward[0] in FUSED_ATTENTION, ops  # not the unfused math fallback
    assert f"{forward[0]}_backward" in ops


def test_compiled_full_size_forward_and_backward_match_float32(full_model, step_tokens, capsys):
    """The compiled model in the trainer's dtypes (bf16 embedding, so bf16 activations and matmuls;
    fp32 weights, logits and loss) against an eager float32 copy of the same weights, on one
    micro-batch of 64x1024: the loss of the train graph and of the eval (no-grad) graph, and every
    parameter's gradient.

    Tolerances. bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2%); each block rounds the
    inputs and outputs of about ten matmuls, norms and the attention, forward and again backward, and
    these independent roundings add up like a random walk: sqrt(12 blocks * ~20) * 0.2% = 3% relative
    error on a gradient, and less on the loss, where the per-token errors average out over 65,536
    tokens. The same comparison on the CPU (eager, 2 sequences; CPU bf16 matmuls also accumulate in
    fp32) measured a mean-loss difference of 2.2e-4 nats and gradient errors of 1.3% (median) to 2.5%
    (the last blocks' q and k); the tolerances are 2e-3 and 8%. A wrong graph (a dropped term, a wrong
    transpose or scale) is off by O(1) instead."""
    raw, compiled = full_model
    inputs, targets = next(tg.micro_batches(step_tokens[:MICRO_SEQS * SEQ_LEN + 1], SEQ_LEN, MICRO_SEQS))
    tokens = inputs.numel()
    raw.zero_grad(set_to_none=True)
    loss = compiled(inputs, targets)
    loss.backward()
    with torch.no_grad():
        eval_loss = compiled(inputs, targets)
    grads = {name: param.grad for name, param in raw.named_parameters()}
    raw.zero_grad(set_to_none=True)

    reference = copy.deepcopy(raw).float()  # the bf16 embedding values are exact in fp32: the same weights
    reference_loss = 0.0
    for chunk_inputs, chunk_targets in zip(inputs.split(8), targets.split(8)):  # fp32 activations of 64 would
        chunk_loss = reference(chunk_inputs, chunk_targets)                     # take ~90 GB; the loss is a sum
        chunk_loss.backward()
        reference_loss += chunk_loss.item()
    errors = {name: relative_error(grads[name], param.grad) for name, param in reference.named_parameters()}
    worst = max(errors, key=errors.get)
    report(capsys, f"compiled bf16 vs fp32: mean loss {loss.item() / tokens:.6f} vs {reference_loss / tokens:.6f} "
                   f"(eval graph {eval_loss.item() / tokens:.6f}); worst gradient error {errors[worst]:.2e} ({worst})")
    assert math.isfinite(loss.item()) and reference_loss / tokens > 10  # random head: well above 0
    assert loss.item() / tokens == pytest.approx(reference_loss / tokens, abs=LOSS_TOLERANCE)
    assert eval_loss.item() / tokens == pytest.approx(reference_loss / tokens, abs=LOSS_TOLERANCE)
    assert errors[worst] < GRAD_TOLERANCE, errors


@pytest.mark.parametrize("recipe", ["aurora", "normuon", "muon"])
def test_compiled_optimizer_steps_on_cuda_match_the_cpu(recipe, capsys):
    """Two steps of the recipe's optimizers (train_gpt.build_optimizers: fused AdamW + the matrix
    optimizer, compiled) on the full-size model on the GPU, against the same two steps on the CPU run
    eagerly, from the same weights and gradients. Compared: each parameter's total move.

    Tolerances. AdamW is fp32 math on both devices (the bf16 embedding's moves round alike but for
    the rare tie): 1e-3. The matrix optimizers run 12 (Aurora: 2 x 12) bf16 Newton-Schulz iterations;
    the two devices round each product differently (accumulation order, and inductor fuses
    `b * A + c * A @ A` where eager rounds every op), and the iteration does not amplify such errors
    (its derivative at singular value 1 is 0), so the moves differ by a few bf16 roundings. The CPU
    alone, compiled against eager on one block's full-size matrices, measured 0.6% to 1.1% for all
    three recipes; the tolerance is 5%. A bug (a lost state, a wrong scale, a transposed update)
    moves a matrix by an O(1) different amount."""
    cpu_model = random_full_size_model(CPU)
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    generator = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=generator).to(p.dtype) for p in cpu_model.parameters()]
             for _ in range(2)]
    moves = {}
    for model, stance in ((cpu_model, "force_eager"), (cuda_model, "default")):
        start = [p.detach().clone() for p in model.parameters()]
        optimizers = tg.build_optimizers(model, tg.RECIPES[recipe])
        with torch.compiler.set_stance(stance):
            for step_grads in grads:
                for param, grad in zip(model.parameters(), step_grads):
                    param.grad = grad.to(param.device)
                for optimizer in optimizers:
                    optimizer.step()
        moves[model] = [(p.detach() - s).cpu() for p, s in zip(model.parameters(), start)]
    adam, matrix = tg.build_optimizers(cpu_model, tg.RECIPES[recipe])  # which optimizer owns which parameter
    in_matrix = {id(p) for group in matrix.param_groups for p in group["params"]}
    errors = {"adam": 0.0, "matrix": 0.0}
    for (name, param), on_cpu, on_cuda in zip(cpu_model.named_parameters(), moves[cpu_model], moves[cuda_model]):
        assert torch.isfinite(on_cuda).all() and on_cpu.norm() > 0, name
        kind = "matrix" if id(param) in in_matrix else "adam"
        errors[kind] = max(errors[kind], relative_error(on_cuda, on_cpu))
    report(capsys, f"{recipe}: CUDA compiled vs CPU eager, worst relative error of a parameter's move: "
                   f"AdamW {errors['adam']:.2e}, {tg.RECIPES[recipe].matrix_spec().kind} {errors['matrix']:.2e}")
    assert errors["adam"] < 1e-3 and errors["matrix"] < OPT_TOLERANCE, errors


def test_full_size_step_with_8_micro_batches_fits_in_60_gib(full_model, step_tokens, capsys):
    """One aurora training step as train_gpt takes it on one GPU: 8 micro-batches of 64x1024, then the
    optimizers. The peak is measured on the second step (the first compiles and creates the state)."""
    raw, compiled = full_model
    optimizers = tg.build_optimizers(raw, tg.RECIPES["aurora"])
    params = list(raw.parameters())
    layout = tg.batch_layout(tg.FULL, 1)
    assert layout.rank_seqs // layout.micro_seqs == 8
    found_inf = torch.zeros((), device="cuda")
    tg.train_step(compiled, optimizers, params, step_tokens, SEQ_LEN, layout.micro_seqs, found_inf)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = tg.train_step(compiled, optimizers, params, step_tokens, SEQ_LEN, layout.micro_seqs, found_inf)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    report(capsys, f"full-size aurora step (8 x 64x1024 tokens) on {torch.cuda.get_device_name()}: peak "
                   f"{peak / 2 ** 30:.2f} GiB allocated of {total / 2 ** 30:.0f} GiB")
    assert math.isfinite(loss.item()) and found_inf.item() == 0
    assert peak < 60 * 2 ** 30
    del optimizers


def test_one_full_size_step_under_torchrun_with_nccl(tmp_path, capsys):
    """train_gpt.py end to end on one GPU through torchrun: NCCL process group, pinned uint16 shards
    copied without blocking, the full validation (20 x 524,288 tokens) summed by an NCCL all-reduce,
    diagnostics, on full-vocabulary synthetic shards."""
    gc.collect()
    torch.cuda.empty_cache()  # the child needs the memory this process cached in the tests above
    data = tmp_path / "data"
    write_synthetic_shards(str(data), vocab_size=GPT2_VOCAB, train_shards=1,
                           tokens_per_shard=tg.FULL.batch_tokens + 2, val_tokens=tg.FULL.val_tokens + 1)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCH_COMPILE_DISABLE")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               os.path.join(ROOT, "train_gpt.py"), "--device", "cuda", "--steps", "1", "--run-id", "nccl",
               "--train-files", str(data / "synthetic_train_*.bin"), "--val-files", str(data / "synthetic_val_*.bin")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TORCHRUN_COMPILE_LIMIT_S + TORCHRUN_RUN_LIMIT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    log = (tmp_path / "logs" / "nccl.txt").read_text().splitlines()
    lines = log[log.index(tg.SEPARATOR) + 1:]  # after the code: the running line, separator, config, ...
    assert lines[0].endswith(f"on {torch.cuda.get_device_name(0)} with world_size 1")
    config = json.loads(next(line for line in lines if line.startswith("config "))[len("config "):])
    assert config["device"] == "cuda:0" and config["world_size"] == 1 and config["compiled"]
    val_losses = [float(line.split("val_loss:")[1].split()[0]) for line in lines if " val_loss:" in line]
    done = json.loads(lines[-1][len("done "):])
    report(capsys, f"torchrun + NCCL, one full-size step: val loss {val_losses}, peak {done['peak_memory_mib']} MiB")
    assert len(val_losses) == 2
    assert val_losses[0] == pytest.approx(math.log(CONFIG.vocab_size), abs=1e-4)  # zero head: uniform logits
    assert val_losses[1] < val_losses[0]
    assert lines[-1].startswith("done ") and 0 < done["peak_memory_mib"] < 60 * 1024
    assert any(line.startswith("diag ") for line in lines)
