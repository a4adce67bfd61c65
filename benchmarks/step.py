"""Step time, tokens/s, peak memory and MFU of the record recipes, measured side by side.

    python benchmarks/step.py                  # full size (docs/benchmark.md#model, #training-loop) on the GPU
    python benchmarks/step.py --tiny           # train_gpt's CPU preset sizes, seconds on a CPU
    python benchmarks/step.py --tiny --device cpu   # --device auto|cpu|cuda (auto: CUDA when there is a GPU)
    python benchmarks/step.py --json --iters 20 --warmup 3 --recipes aurora,muon
    python benchmarks/step.py --plan-only                  # (c)'s plan on 1, 2, 4 and 8 ranks only, any machine

For every recipe of train_gpt.RECIPES, in one process, it times:
  (a) the optimizer step alone, with fixed random gradients: the matrix optimizer (optimizers.MuonChain
      in the recipe's configuration) over the model's hidden matrices, and the recipe's whole optimizer
      set (the Adams + the matrix optimizer). The learning rates are set to 0 for (a), which does the
      same work but leaves the weights to (b);
  (b) a full training step on one device: forward and backward over every micro-batch of one step
      (8 micro-batches of 64x1024 tokens at full size), then the optimizers' steps;
  (c) per-step counts: the host syncs of one training step as timed in (b); the collectives and the
      bytes one rank of --world-size N sends in a step, counted in an uncompiled step of rank 0 under
      torch's fake process group (no other process, no data moved) with that rank's micro-batch count
      but one sequence per micro-batch (what is sent depends on the parameters, not on the batch; an
      eager full-size micro-batch would keep ~80 GiB for backward); and each of the N ranks' matrix
      FLOPs from the matrix optimizer's owner plan, with max/mean (1.00: balanced).
--plan-only prints, for world sizes 1, 2, 4 and 8 (or --world-size N), each rank's matrix FLOPs and
optimizer-state bytes from the plans alone.
Recipes run round-robin (aurora, normuon, muon, aurora, ...) so drift on a shared machine hits them
alike; warmup iterations (compilation) are excluded; the numbers are medians. The data are uniform
random tokens, the same for every recipe. MFU is the full step's model FLOP/s (flops_per_token below)
over the bf16 matmul rate this process measures on the same device.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import optimizers  # noqa: E402  (the repo root must be on sys.path first)
import train_gpt  # noqa: E402
from benchmarks.optimizer_step import device_name, timed  # noqa: E402

BASELINE = "muon"
# bf16 matmul rate: (size, products per timing). 8192^3 takes ~1.5 ms on an H100, 2048^3 ~0.1 s on 2 CPU cores.
MATMUL_SHAPES = {"cuda": (8192, 20), "cpu": (2048, 1)}


# ---------------------------------------------------------------------------------------------------
# Model FLOPs per token (forward + backward), the numerator of MFU


def matmul_params(config):
    """Weights that multiply activations: per block q, k, v, attention proj (4 d^2) and the MLP's fc
    and proj (8 d^2), plus the head (d V). The embedding is a lookup, not a matmul."""
    d = config.model_dim
    return 12 * config.num_layers * d * d + d * config.vocab_size


def causal_attention_flops_per_token(config):
    """Forward + backward FLOPs of QK^T and AV per token. A query at position t (1-based) sees t keys:
    QK^T and AV each take 2 * head_dim * t FLOPs per head, so 4 * d * t over the heads (heads * head_dim
    = d). Averaged over t = 1..T that is 4 * d * (T + 1) / 2 = 2 * d * (T + 1) forward; backward is
    twice the forward (two matmuls per forward matmul), so 6 * d * (T + 1) per layer."""
    return 6 * config.num_layers * config.model_dim * (config.seq_len + 1)


def flops_per_token(config):
    """Model FLOPs of one training token: 6 * matmul_params (2 forward + 4 backward per weight) plus
    causal attention. Not counted: biases, norms, rotary, relu^2, soft-cap, softmax and cross-entropy
    (elementwise, a fraction of a percent), attention recomputation in the backward kernel, and the
    masked half of the attention matrix. The nanoGPT/PaLM convention 6N + 12 * L * d * T counts the
    full (non-causal) T x T attention instead; it is reported alongside for comparison."""
    matmul = 6 * matmul_params(config)
    attention = causal_attention_flops_per_token(config)
    return {"matmul_params": matmul_params(config), "matmul": matmul, "attention": attention,
            "total": matmul + attention,
            "noncausal_convention_total": matmul + 12 * config.num_layers * config.model_dim * config.seq_len}


def describe_flops(config, flops):
    L, d, T, V = config.num_layers, config.model_dim, config.seq_len, config.vocab_size
    return (f"FLOPs per token = 6 * N_matmul + 6 * L * d * (T + 1) = 6 * {flops['matmul_params']:,} + "
            f"6 * {L} * {d} * {T + 1} = {flops['total']:,}\n"
            f"  N_matmul = 12 * L * d^2 + d * V (blocks' q, k, v, attention proj, MLP fc/proj, and the head; "
            f"L={L}, d={d}, V={V}); fwd 2 + bwd 4 FLOPs per weight per token\n"
            f"  causal attention: a query at position t sees t keys (mean (T + 1) / 2); QK^T + AV fwd = "
            f"4 * d * (T + 1) / 2 per layer, bwd = 2 x fwd; not counted: elementwise ops, the embedding "
            f"lookup, flash-attention recomputation\n"
            f"  (the nanoGPT/PaLM convention 6N + 12 * L * d * T, non-causal, gives "
            f"{flops['noncausal_convention_total']:,})")


# ---------------------------------------------------------------------------------------------------
# Measurements: timing, the device's bf16 matmul rate, memory


def matmul_rate(device, size, per_sample):
    """FLOP/s of size^3 bf16 matmuls on `device`, timed over `per_sample` back-to-back products (enough
    that launch and sync overhead do not count), after one untimed product."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def products():
        for _ in range(per_sample):
            a @ b

    timed(device, lambda: a @ b)
    return 2 * size ** 3 * per_sample / timed(device, products)


def peak_rss_bytes():
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def tensor_bytes(tensors, device):
    """Bytes of the distinct storages on `device` behind `tensors`."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device == device:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def resident_bytes(model, optimizers, device):
    """What a recipe keeps on `device` between steps: weights, buffers, optimizer state (grads are None)."""
    state = [v for opt in optimizers for s in opt.state.values() for v in s.values()]
    return tensor_bytes(list(model.parameters()) + list(model.buffers()) + state, device)


# ---------------------------------------------------------------------------------------------------
# Per-step counts (c): host syncs, collectives, matrix FLOPs per rank

# What makes the host wait for a CUDA device when called from Python: reading values, truth tests,
# copies to the host, data-dependent shapes. (On a CPU nothing waits; the calls are counted all the same.)
SYNCING_TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                          "nonzero")
SYNCING_TORCH_FUNCTIONS = ("equal", "allclose", "is_nonzero", "nonzero", "unique", "masked_select")
COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor",
               "broadcast")


@contextlib.contextmanager
def calls_recorded(targets, record):
    """Within the block, every call of owner.name for (owner, name) in targets first runs record(name, args)."""
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets if hasattr(owner, name)]

    def wrapped(name, original):
        def call(*args, **kwargs):
            record(name, args)
            return original(*args, **kwargs)
        return call
    for owner, name, original in originals:
        setattr(owner, name, wrapped(name, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


@contextlib.contextmanager
def host_syncs_counted():
    """Yields the list of syncing calls (their names) made within the block."""
    calls = []
    targets = [(torch.Tensor, name) for name in SYNCING_TENSOR_METHODS] + \
              [(torch, name) for name in SYNCING_TORCH_FUNCTIONS]
    with calls_recorded(targets, lambda name, args: calls.append(name)):
        yield calls


def collective_payload_bytes(name, args):
    """Bytes this rank puts into a collective: the tensor of all_reduce/broadcast, the input of a gather."""
    tensor = args[1] if name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_tensor") else args[0]
    tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
    return sum(t.numel() * t.element_size() for t in tensors)


def flops_balance(flops):
    return {"per_rank": flops, "max_over_mean": max(flops) / (sum(flops) / len(flops)) if sum(flops) else 1.0}


def matrix_flops_per_rank(matrix_optimizer, world_size):
    """The matrix optimizer's FLOPs on each of world_size ranks, from its owner plan (no process needed)."""
    return flops_balance(matrix_optimizer.flops_per_rank(world_size))


def state_report(model, recipe, optimizer_set, world_size):
    """Optimizer-state bytes per rank (matrix optimizer, Adam, lookahead and readout) against what one
    process keeps, and the matrix optimizer's largest all-gather buffer (one bucket, transient)."""
    matrix = next(opt for opt in optimizer_set if isinstance(opt, tuple(train_gpt.MATRIX_OPTIMIZERS.values())))
    per_rank = train_gpt.state_bytes_per_rank(model, recipe, optimizer_set, world_size)
    totals = [sum(parts) for parts in zip(*per_rank.values())]
    one_process = sum(part[0] for part in train_gpt.state_bytes_per_rank(model, recipe, optimizer_set, 1).values())
    return {"per_rank": per_rank, "total_per_rank": totals, "max_over_mean": max(totals) / (sum(totals) / len(totals)),
            "one_process": one_process, "bucket": matrix.gather_bytes(world_size)}


def round_robin_flops(model, matrix, world_size):
    """Records #42 and #46's split, for comparison: their matrices in model order, sorted by shape (largest
    first, stable), matrix k updated by rank k mod W; each rank's FLOPs under it."""
    matrices = matrix.matrices()
    position = {id(p): k for k, p in enumerate(model.parameters())}
    in_model_order = sorted(range(len(matrices)), key=lambda i: position[id(matrices[i][1])])
    order = sorted(in_model_order, key=lambda i: tuple(matrices[i][1].shape), reverse=True)
    totals = [0] * world_size
    for k, i in enumerate(order):
        group, p = matrices[i]
        totals[k % world_size] += matrix.matrix_flops(tuple(p.shape), group)
    return flops_balance(totals)


def plan_report(recipe_names, tiny, world_sizes):
    """(c)'s matrix FLOPs and optimizer-state bytes per rank alone, on each of world_sizes, for a model built
    on the meta device: the plans need only the shapes, so this runs at full size on any machine in seconds."""
    hp = train_gpt.TINY if tiny else train_gpt.FULL
    recipes = {}
    for name in recipe_names:
        recipe = train_gpt.RECIPES[name]
        with torch.device("meta"):
            model = train_gpt.GPT(dataclasses.replace(hp.model, **recipe.model))
        optimizer_set = train_gpt.build_optimizers(model, recipe)
        matrix = next(opt for opt in optimizer_set if isinstance(opt, optimizers.MuonChain))
        plans = []
        for world_size in world_sizes:
            plan = {"world_size": world_size, "matrix_flops": matrix_flops_per_rank(matrix, world_size),
                    "state_bytes": state_report(model, recipe, optimizer_set, world_size)}
            if recipe.matrix_spec().kind == "MuonChain":
                plan["record_round_robin"] = round_robin_flops(model, matrix, world_size)
            plans.append(plan)
        recipes[name] = {"plans": plans}
    return {"size": "tiny" if tiny else "full", "model": dataclasses.asdict(hp.model), "plan_only": True,
            "world_sizes": list(world_sizes), "recipes": recipes}


def format_plan(result):
    """The plan-only table: per recipe and world size, matrix FLOPs and optimizer-state bytes per rank."""
    lines = [f"plan on {', '.join(map(str, result['world_sizes']))} ranks, {result['size']} size: matrix FLOPs per "
             f"step and optimizer-state MiB per rank (matrix optimizer + Adam + lookahead/readout), max/mean; 'one "
             f"process' is the state a single process keeps, 'bucket' the matrix optimizer's largest all-gather "
             f"buffer (transient)",
             "'record RR': the FLOPs max/mean of records #42/#46's own round-robin split of the same matrices",
             f"{'recipe':<15} {'N':>2} {'GFLOP/rank max':>15} {'FLOPs max/mean':>15} {'record RR':>10} "
             f"{'state MiB/rank max':>19} {'matrix':>9} {'adam':>8} {'averages':>9} {'state max/mean':>15} "
             f"{'one process':>12} {'bucket':>8}"]
    mib = 2 ** 20
    for name, r in result["recipes"].items():
        for plan in r["plans"]:
            flops, state, world_size = plan["matrix_flops"], plan["state_bytes"], plan["world_size"]
            top = max(range(world_size), key=lambda k: state["total_per_rank"][k])
            round_robin = plan.get("record_round_robin")
            round_robin = f"{round_robin['max_over_mean']:.3f}" if round_robin else "-"
            lines.append(
                f"{name:<15} {world_size:>2} {max(flops['per_rank']) / 1e9:>15,.1f} {flops['max_over_mean']:>15.3f} "
                f"{round_robin:>10} {state['total_per_rank'][top] / mib:>19,.1f} "
                f"{state['per_rank']['matrix'][top] / mib:>9,.1f} {state['per_rank']['adam'][top] / mib:>8,.1f} "
                f"{state['per_rank']['weight_averages'][top] / mib:>9,.1f} {state['max_over_mean']:>15.3f} "
                f"{state['one_process'] / mib:>12,.1f} {state['bucket'] / mib:>8,.1f}")
    return "\n".join(lines)


def collectives_of_one_rank(raw_model, optimizers, hp, world_size, device):
    """{"collectives": {name: count}, "bytes": total} of rank 0 of world_size in one uncompiled training
    step, through train_gpt's own DDP wrapping and the optimizers' all-gathers, under torch's fake
    process group (one process; nothing is sent, so this step's numbers are garbage and it is the
    last thing done with the model). The step has as many micro-batches as rank 0 of world_size
    (no_sync on all but the last) of one sequence each: gradient buckets and optimizer gathers are
    shaped by the parameters alone, and a small batch keeps this eager step's memory small. None when
    a real process group already exists."""
    if dist.is_initialized():
        return None
    layout = train_gpt.batch_layout(hp, world_size)
    seq_len = hp.model.seq_len
    buffer = torch.zeros(layout.rank_seqs // layout.micro_seqs * seq_len + 1, dtype=torch.int64, device=device)
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    counts, payload = {}, []

    def record(name, args):
        counts[name] = counts.get(name, 0) + 1
        payload.append(collective_payload_bytes(name, args))
    try:
        with torch._dynamo.config.patch(disable=True):
            model = train_gpt.distributed_model(raw_model, device)
            found_inf = torch.zeros((), device=device)
            with calls_recorded([(dist, name) for name in COLLECTIVES], record):
                train_gpt.train_step(model, optimizers, list(raw_model.parameters()), buffer, seq_len, 1, found_inf)
    finally:
        dist.destroy_process_group()
    return {"collectives": counts, "bytes": sum(payload)}


# ---------------------------------------------------------------------------------------------------
# One recipe: its own model and optimizers


class RecipeBench:
    """A recipe's model (compiled as train_gpt compiles it) and optimizer set (train_gpt.build_optimizers),
    with the three timed operations."""

    def __init__(self, recipe, hp, device, seed):
        self.recipe = recipe
        self.device = device
        self.raw_model = train_gpt.GPT(dataclasses.replace(hp.model, **recipe.model)).to(device)
        generator = torch.Generator().manual_seed(seed)
        train_gpt.initialize(self.raw_model, recipe, generator, generator, seed)
        self.model = torch.compile(self.raw_model, dynamic=False)
        self.optimizers = train_gpt.build_optimizers(self.raw_model, recipe)
        self.matrix_optimizer = next(opt for opt in self.optimizers if isinstance(opt, optimizers.MuonChain))
        self.hidden_matrices = sum(len(group["params"]) for group in self.matrix_optimizer.param_groups)

    def set_gradients(self, grads):
        for param, grad in zip(self.raw_model.parameters(), grads):
            param.grad = grad

    def optimizer_steps(self, optimizers, grads):
        """(a): steps with the given gradients and lr 0 (the same work, the weights stay as they are)."""
        self.set_gradients(grads)
        scale_lrs(self.optimizers, 0.0)
        return timed(self.device, lambda: [opt.step() for opt in optimizers])

    def train_step(self, buffer, seq_len, micro_seqs):
        """(b): one full training step at the recipe's initial learning rates; returns (seconds, loss)."""
        self.raw_model.zero_grad(set_to_none=True)
        scale_lrs(self.optimizers, 1.0)
        params = list(self.raw_model.parameters())
        found_inf = torch.zeros((), device=self.device)
        losses = []
        seconds = timed(self.device, lambda: losses.append(train_gpt.train_step(
            self.model, self.optimizers, params, buffer, seq_len, micro_seqs, found_inf)))
        return seconds, float(losses[0])

    def host_syncs(self, buffer, seq_len, micro_seqs):
        """(c): the syncing calls one training step (b) makes."""
        params = list(self.raw_model.parameters())
        found_inf = torch.zeros((), device=self.device)
        with host_syncs_counted() as calls:
            train_gpt.train_step(self.model, self.optimizers, params, buffer, seq_len, micro_seqs, found_inf)
        return calls


def scale_lrs(optimizer_set, scale):
    """Every group's lr at `scale` times its initial value (0: the same work, the weights unchanged)."""
    for optimizer in optimizer_set:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * scale


def random_gradients(model, generator):
    """One fixed N(0, 1) gradient per parameter (its dtype), shared by every recipe's step (a)."""
    return [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in model.parameters()]


# ---------------------------------------------------------------------------------------------------
# The benchmark


def ratios_vs_baseline(recipes, keys, baseline=BASELINE):
    """{"aurora/muon": {key: aurora[key] / muon[key]}, ...} for every recipe but the baseline."""
    if baseline not in recipes:
        return {}
    return {f"{name}/{baseline}": {key: numbers[key] / recipes[baseline][key] for key in keys}
            for name, numbers in recipes.items() if name != baseline}


RATIO_KEYS = ("matrix_step_ms", "optimizer_set_ms", "train_step_ms")


def run_benchmark(recipe_names, tiny, iters, warmup, device, seed=0, world_size=8):
    hp = train_gpt.TINY if tiny else train_gpt.FULL
    layout = train_gpt.batch_layout(hp, 1)
    seq_len = hp.model.seq_len
    tokens_per_step = layout.rank_seqs * seq_len
    flops = flops_per_token(hp.model)
    matmul_size, per_sample = MATMUL_SHAPES[device.type]
    # Sampled before the recipes and after every round; the fastest sample is the device's rate (the
    # others were slowed by whatever else shared the machine at the time).
    rates = [matmul_rate(device, matmul_size, per_sample)]

    benches = {name: RecipeBench(train_gpt.RECIPES[name], hp, device, seed) for name in recipe_names}
    generator = torch.Generator().manual_seed(seed)
    grads = random_gradients(next(iter(benches.values())).raw_model, generator)
    buffer = torch.randint(0, hp.model.vocab_size, (tokens_per_step + 1,), generator=generator).to(device)

    times = {name: {key: [] for key in RATIO_KEYS} for name in recipe_names}
    peaks = {name: 0 for name in recipe_names}
    for iteration in range(warmup + iters):
        for name, bench in benches.items():  # round-robin: every recipe once per iteration
            matrix_s = bench.optimizer_steps([bench.matrix_optimizer], grads)
            set_s = bench.optimizer_steps(bench.optimizers, grads)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                others = torch.cuda.memory_allocated(device) - resident_bytes(bench.raw_model, bench.optimizers,
                                                                              device)
            train_s, loss = bench.train_step(buffer, seq_len, layout.micro_seqs)
            if not math.isfinite(loss):
                raise FloatingPointError(f"benchmarks/step.py: recipe {name}: loss {loss} at iteration {iteration}")
            if iteration < warmup:
                continue
            for key, seconds in zip(RATIO_KEYS, (matrix_s, set_s, train_s)):
                times[name][key].append(1000 * seconds)
            # CUDA: this step's peak less what the other recipes (and the shared data) hold, i.e. this
            # recipe's weights + optimizer state + the step's transient peak. CPU: the process's peak RSS.
            peak = torch.cuda.max_memory_allocated(device) - others if device.type == "cuda" else peak_rss_bytes()
            peaks[name] = max(peaks[name], peak)
        rates.append(matmul_rate(device, matmul_size, per_sample))
    rate = max(rates)

    recipes = {}
    for name in recipe_names:
        bench = benches[name]
        per_step = {"world_size": world_size,
                    "host_syncs": len(bench.host_syncs(buffer, seq_len, layout.micro_seqs)),
                    "matrix_flops": matrix_flops_per_rank(bench.matrix_optimizer, world_size)}
        per_step.update(collectives_of_one_rank(bench.raw_model, bench.optimizers, hp, world_size, device) or {})
        numbers = {key: statistics.median(values) for key, values in times[name].items()}
        numbers["samples_ms"] = times[name]
        tokens_per_s = tokens_per_step / (numbers["train_step_ms"] / 1000)
        numbers.update(tokens_per_s=tokens_per_s, mfu=tokens_per_s * flops["total"] / rate,
                       peak_memory_mib=peaks[name] / 2 ** 20, hidden_matrices=bench.hidden_matrices,
                       per_step=per_step)
        recipes[name] = numbers
    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "compiled": train_gpt.compile_is_active(),
        "size": "tiny" if tiny else "full", "model": dataclasses.asdict(hp.model),
        "tokens_per_step": tokens_per_step, "micro_batches": layout.rank_seqs // layout.micro_seqs,
        "micro_batch": [layout.micro_seqs, seq_len], "data": "uniform random tokens, the same for every recipe",
        "iters": iters, "warmup": warmup,
        "matmul_rate_flops": rate, "matmul_size": matmul_size, "matmul_rate_samples": len(rates),
        "flops_per_token": flops,
        "peak_memory_kind": ("torch.cuda.max_memory_allocated during the full step, less the other recipes' "
                             "resident state" if device.type == "cuda" else
                             "process peak RSS (resource.getrusage; the whole process, all recipes)"),
        "optimizer_set": "AdamW (embedding, head, <2-D params) + the matrix optimizer",
        "recipes": recipes, "ratios": ratios_vs_baseline(recipes, RATIO_KEYS),
    }


def format_report(result):
    model = result["model"]
    lines = [
        f"device: {result['device']}   torch {result['torch']}   "
        f"{'compiled' if result['compiled'] else 'uncompiled'}",
        f"size: {result['size']} ({model['num_layers']} layers, width {model['model_dim']}, head dim "
        f"{model['head_dim']}, vocab {model['vocab_size']}); {result['tokens_per_step']:,} tokens per step = "
        f"{result['micro_batches']} micro-batches of {result['micro_batch'][0]}x{result['micro_batch'][1]}; "
        f"data: {result['data']}",
        f"timing: median of {result['iters']} iteration(s) after {result['warmup']} warmup, recipes round-robin",
        f"bf16 matmul rate: {result['matmul_rate_flops'] / 1e12:.3f} TFLOP/s "
        f"(the fastest of {result['matmul_rate_samples']} timings of {result['matmul_size']}^3 products, "
        f"one before the recipes and one after each round)",
        describe_flops(train_gpt.ModelConfig(**model), result["flops_per_token"]),
        f"(a) matrix step: the matrix optimizer over the hidden matrices; optimizer set: {result['optimizer_set']}; "
        f"random N(0,1) gradients, lr 0",
        f"(b) train step: forward + backward over all micro-batches + every optimizer's step; "
        f"MFU = tokens/s * FLOPs per token / bf16 matmul rate",
        f"peak memory: {result['peak_memory_kind']}",
        "",
        f"{'recipe':<15} {'matrices':>8} {'(a) matrix ms':>14} {'(a) opt set ms':>15} {'(b) step ms':>12} "
        f"{'tokens/s':>11} {'MFU':>7} {'peak MiB':>9}",
    ]
    for name, r in result["recipes"].items():
        lines.append(f"{name:<15} {r['hidden_matrices']:>8} {r['matrix_step_ms']:>14.2f} {r['optimizer_set_ms']:>15.2f} "
                     f"{r['train_step_ms']:>12.2f} {r['tokens_per_s']:>11,.0f} {100 * r['mfu']:>6.2f}% "
                     f"{r['peak_memory_mib']:>9,.0f}")
    lines.append("")
    lines.append("(c) per step: host syncs of (b); collectives and bytes sent by one of N ranks (fake process "
                 "group); matrix FLOPs per rank from the owner plan, max/mean")
    for name, r in result["recipes"].items():
        c = r["per_step"]
        flops = c["matrix_flops"]
        collectives = ", ".join(f"{count} {kind}" for kind, count in c.get("collectives", {}).items()) or "n/a"
        lines.append(f"{name:<15} N={c['world_size']}  host syncs {c['host_syncs']}  collectives: {collectives}  "
                     f"{c.get('bytes', 0) / 2 ** 20:,.1f} MiB  matrix FLOPs max/mean {flops['max_over_mean']:.3f}")
    for pair, ratios in result["ratios"].items():
        lines.append(f"{pair:<20} (a) matrix {ratios['matrix_step_ms']:.3f}x   (a) opt set "
                     f"{ratios['optimizer_set_ms']:.3f}x   (b) train step {ratios['train_step_ms']:.3f}x")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="train_gpt's CPU preset sizes (TINY) instead of full size")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per recipe (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation)")
    parser.add_argument("--recipes", default=",".join(train_gpt.RECIPES),
                        help=f"comma-separated, of {', '.join(train_gpt.RECIPES)}; ratios are vs {BASELINE}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=train_gpt.DEVICE_CHOICES, default="auto",
                        help="auto (default): CUDA when torch sees a GPU, else the CPU")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks N for the per-step counts (c): collectives, bytes, matrix FLOPs per rank "
                             "(default 8; --plan-only: 1, 2, 4 and 8)")
    parser.add_argument("--plan-only", action="store_true",
                        help="only (c)'s matrix FLOPs and state bytes per rank from the plan: no timing, any size "
                             "on any device")
    args = parser.parse_args(argv)
    args.recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
    unknown = [name for name in args.recipes if name not in train_gpt.RECIPES]
    if unknown or not args.recipes or len(set(args.recipes)) != len(args.recipes):
        parser.error(f"--recipes {','.join(args.recipes)}: give distinct names from "
                     f"{', '.join(train_gpt.RECIPES)} (unknown: {', '.join(unknown) or 'none'})")
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if not 0 <= args.seed < 2 ** 64:
        parser.error(f"--seed must be in [0, 2^64 - 1] (a torch generator seed), got {args.seed}")
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size must be >= 1, got {args.world_size}")
    args.world_sizes = [args.world_size] if args.world_size else [1, 2, 4, 8] if args.plan_only else [8]
    for world_size in args.world_sizes:
        try:
            train_gpt.batch_layout(train_gpt.TINY if args.tiny else train_gpt.FULL, world_size)
        except train_gpt.SetupError as e:
            parser.error(f"--world-size {world_size}: {e}")
    try:
        args.device = train_gpt.resolve_device(args.device, 0)
    except train_gpt.SetupError as e:
        parser.error(str(e))
    if not args.tiny and args.device.type != "cuda" and not args.plan_only:
        parser.error("full size needs a CUDA GPU (a step holds ~13 GiB of fp32 logits per micro-batch); "
                     "on the CPU run with --tiny, or --plan-only for the per-rank FLOPs")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plan_only:
        result = plan_report(args.recipes, args.tiny, args.world_sizes)
        print(json.dumps(result) if args.json else format_plan(result))
        return 0
    result = run_benchmark(args.recipes, args.tiny, args.iters, args.warmup, args.device, args.seed,
                           args.world_sizes[0])
    print(json.dumps(result) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
