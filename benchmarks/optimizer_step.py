"""Times one optimizer step of Muon, NorMuon and Aurora (record settings, docs/recipes.md) over the 72 hidden
matrices of the 124M model (docs/benchmark.md#model): per block q, k, v, o (d x d), fc (4d x d, tall) and proj
(d x 4d, wide), 12 blocks. Each optimizer runs batched (one param group: same-shape matrices share
one stacked polar) and one matrix at a time (one param group per matrix, so every polar call sees a
single matrix), and the table gives the median milliseconds per step.

    python benchmarks/optimizer_step.py                     # full size on CUDA, --scale 0.25 on CPU
    python benchmarks/optimizer_step.py --scale 0.5 --steps 5 --eager

Compiled by default (the first steps, untimed, compile); --eager (or TORCH_COMPILE_DISABLE=1) runs
the update math uncompiled, which is what to use on a small CPU box where compiling costs minutes.
"""
import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402  (the repo root must be on sys.path first)

# The benchmark's fixed model (docs/benchmark.md#model): its width and depth give the 72 hidden matrices.
MODEL = train_gpt.ModelConfig()


def record_optimizer(name, groups, **options):
    """The matrix optimizer of recipe `name` with the record's settings (train_gpt.RECIPES), one param group
    of those settings per list of parameters in `groups`."""
    spec = train_gpt.RECIPES[name].matrix_spec()
    group = spec.groups[0]
    return train_gpt.MATRIX_OPTIMIZERS[spec.kind]([dict(params=list(params), **group.options) for params in groups],
                                                  lr=group.lr, **spec.options, **options)


def hidden_matrix_shapes(width, blocks):
    """The 2-D weights inside the blocks, in model order: 48 square, 12 tall, 12 wide at 124M."""
    per_block = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    return per_block * blocks


def make_params(shapes, device, seed=0):
    """Random weights at the scale of docs/benchmark.md#initialization, with random gradients attached."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for rows, cols in shapes:
        p = torch.nn.Parameter(torch.randn(rows, cols, generator=gen, device=device) * (0.33 / cols) ** 0.5)
        p.grad = torch.randn(rows, cols, generator=gen, device=device)
        params.append(p)
    return params


def timed(device, fn):
    """Seconds that fn() takes, the device's queued work included."""
    train_gpt.synchronize(device)
    start = time.perf_counter()
    fn()
    train_gpt.synchronize(device)
    return time.perf_counter() - start


def median_step_ms(optimizer, device, warmup, steps):
    for _ in range(warmup):
        optimizer.step()
    return statistics.median(1000 * timed(device, optimizer.step) for _ in range(steps))


def memory_bytes(device):
    """What memory the device has: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "CPU"
    return f"{model} ({torch.get_num_threads()} threads)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=None,
                        help="multiplies the model width 768 (default 1 on CUDA, 0.25 on CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--eager", action="store_true", help="run the update math uncompiled")
    parser.add_argument("--device", choices=train_gpt.DEVICE_CHOICES, default="auto",
                        help="auto (default): CUDA when torch sees a GPU, else the CPU")
    parser.add_argument("--riemannian", action="store_true",
                        help="also time Aurora(variant='riemannian') (docs/recipes.md#variants), batched only")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.scale is not None and not 0 < args.scale < math.inf:
        parser.error(f"--scale must be a positive number, got {args.scale}")
    try:
        device = train_gpt.resolve_device(args.device, 0)
    except train_gpt.SetupError as e:
        parser.error(str(e))
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 0.25)
    width = max(8, round(MODEL.model_dim * scale))
    shapes = hidden_matrix_shapes(width, MODEL.num_layers)
    # fp32 weights and gradients, what make_params allocates first: a lower bound of what the benchmark holds.
    needed = 2 * 4 * sum(rows * cols for rows, cols in shapes)
    if needed > memory_bytes(device):
        parser.error(f"--scale {scale:g}: the {len(shapes)} matrices and their gradients alone take "
                     f"{needed / 1e9:,.0f} GB, more than the {memory_bytes(device) / 1e9:,.0f} GB of {device.type} "
                     f"memory; lower --scale")
    if args.eager:
        torch._dynamo.config.disable = True
    compiled = train_gpt.compile_is_active()

    print(f"device: {device_name(device)}; torch {torch.__version__}; "
          f"{'compiled' if compiled else 'eager'}; width {width} (scale {scale:g}): "
          f"{len(shapes)} matrices ({width}x{width} x48, {4 * width}x{width} x12, {width}x{4 * width} x12); "
          f"median of {args.steps} steps after {args.warmup} warmup")
    print(f"{'optimizer':<10} {'batched ms':>11} {'one-at-a-time ms':>17} {'batched speedup':>16}")
    batched_ms = {}
    for name in ("muon", "normuon", "aurora"):
        params = make_params(shapes, device)
        batched = median_step_ms(record_optimizer(name, [params]), device, args.warmup, args.steps)
        params = make_params(shapes, device)
        one_at_a_time = record_optimizer(name, [[p] for p in params])
        single = median_step_ms(one_at_a_time, device, args.warmup, args.steps)
        batched_ms[name] = batched
        print(f"{name:<10} {batched:>11.2f} {single:>17.2f} {single / batched:>15.2f}x")
    if args.riemannian:
        optimizer = record_optimizer("aurora", [make_params(shapes, device)], variant="riemannian")
        batched = median_step_ms(optimizer, device, args.warmup, args.steps)
        print(f"{'aurora-riemannian':<10} {batched:>11.2f} {'-':>17} {'-':>16}  "
              f"({batched / batched_ms['aurora']:.1f}x vanilla aurora)")
    print(f"aurora / muon (batched): {batched_ms['aurora'] / batched_ms['muon']:.2f}x; "
          f"normuon / muon: {batched_ms['normuon'] / batched_ms['muon']:.2f}x")


if __name__ == "__main__":
    main()
