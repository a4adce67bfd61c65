"""Tests of optimizers.py: the polar factors against float64 SVD references, each optimizer against
an independent one-matrix-at-a-time transcription of docs/recipes.md, sharding over gloo ranks, state_dict
resume, compilation. Everything runs on the CPU and eagerly (torch's TORCH_COMPILE_DISABLE switch,
set through torch._dynamo.config.disable) except the tests that check compilation itself."""
import io
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import optimizers
import train_gpt
from optimizers import Aurora, Muon, NorMuon, aurora_polar, polar, polar_express, riemannian_aurora_polar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_SETTINGS = {  # docs/recipes.md hyperparameters of the three matrix optimizers
    "muon": (Muon, dict(lr=0.025, weight_decay=0.05)),
    "normuon": (NorMuon, dict(lr=0.035, weight_decay=0.025)),
    "aurora": (Aurora, dict(lr=0.0375, contra=0.4, uw_floor=0.35)),
}
SHAPES = [(48, 16), (16, 48), (24, 24)]


@pytest.fixture(autouse=True)
def eager():
    """What TORCH_COMPILE_DISABLE=1 sets; the compilation test switches it back off."""
    with torch._dynamo.config.patch(disable=True):
        yield


# ----------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------

def svd_polar(X):
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return U @ Vh


def orthogonality_error(P):
    """max |P^T P - I| in the tall orientation."""
    P = P.double()
    P = P if P.size(0) >= P.size(1) else P.T
    return (P.T @ P - torch.eye(P.size(1), dtype=torch.float64)).abs().max().item()


def row_norm_deviations(P):
    """||P_i|| / sqrt(n/m) - 1 over the rows of the tall orientation (float64)."""
    P = P.double()
    P = P if P.size(0) >= P.size(1) else P.T
    m, n = P.shape
    return P.norm(dim=1) / math.sqrt(n / m) - 1


def row_norm_deviation(P):
    return row_norm_deviations(P).abs().max().item()


def rms_row_norm_deviation(P):
    return row_norm_deviations(P).square().mean().sqrt().item()


def well_conditioned(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rows_of_different_scales(shape, seed):
    return well_conditioned(shape, seed) * torch.logspace(-1, 1, shape[0]).unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# polar, polar_express, aurora_polar, riemannian_aurora_polar
# ----------------------------------------------------------------------------------------------

# docs/recipes.md#polar-factor, written out here rather than read from optimizers.py: X / (||X||_F + 1e-7)
# on the wide orientation, then 12 times A = X X^T, X = 2X + (-1.5A + 0.5A^2) X.
RECORD_POLAR_SCHEDULE = ((2.0, -1.5, 0.5),) * 12
# Polar Express as the modded-nanogpt speedrun uses it: the per-iteration minimax quintics of Amsel,
# Persson, Musco and Gower, "The Polar Express" (arXiv:2505.16932, Algorithm 1 and Appendix G), recomputed
# by the speedrun for 5 iterations with a 2% safety margin; input scaled by 1 / (1.02 ||X||_F). The paper's
# own Algorithm 1 table (8 iterations, 1.01 margin) starts (8.28721201814563, -23.595886519098837,
# 17.300387312530933); these rows are the speedrun's, which is the variant docs/recipes.md#variants names.
POLAR_EXPRESS_SCHEDULE = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def quintic_schedule_float64(X, schedule, safety=1.0):
    """The odd quintic iteration of docs/recipes.md#polar-factor in float64, one matrix."""
    X = X.double()
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X
    X = X / (X.norm() * safety + 1e-7)
    for a, b, c in schedule:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def with_singular_values(shape, singular_values, seed):
    """A float32 matrix U diag(s) V^T with random orthonormal U, V."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(shape[0], len(singular_values), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], len(singular_values), generator=gen, dtype=torch.float64))
    return ((U * singular_values) @ V.T).float()


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_runs_the_record_schedule(shape):
    """In float32, on singular values from 1 down to 1e-4 of the largest: after 12 iterations the smallest
    are still on their way to 1 (1e-4 -> 0.39), so every iteration and coefficient shows. Measured error
    against the float64 transcription: 6e-6 to 1.1e-5; 10 instead of 12 iterations moves entries by >= 0.12,
    (2, -1.45, 0.45) instead of (2, -1.5, 0.5) by >= 1.5e-3. Tolerance 5e-5: 4.5x the rounding, 30x below
    the smallest of those changes."""
    X = with_singular_values(shape, torch.logspace(0, -4, min(shape), dtype=torch.float64), seed=20)
    expected = quintic_schedule_float64(X, RECORD_POLAR_SCHEDULE)
    assert (polar(X, dtype=torch.float32).double() - expected).abs().max() < 5e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_is_the_svd_polar_factor_in_bf16(shape):
    """bf16 (the record's dtype) on well-conditioned input, where 12 iterations converge: measured 2.8e-3 to
    5.3e-3 from both the float64 transcription and the SVD polar factor; tolerance 1e-2 (2x margin)."""
    X = well_conditioned(shape, 0)
    P = polar(X)
    assert P.dtype == torch.bfloat16 and P.shape == X.shape
    assert (P.double() - quintic_schedule_float64(X, RECORD_POLAR_SCHEDULE)).abs().max() < 1e-2
    assert (P.double() - svd_polar(X)).abs().max() < 1e-2
    assert orthogonality_error(P) < 0.03


def test_polar_express_coefficients_are_the_speedruns():
    assert optimizers.POLAR_EXPRESS_COEFFICIENTS == POLAR_EXPRESS_SCHEDULE
    assert optimizers.POLAR_EXPRESS_SAFETY == 1.02


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_express_runs_its_schedule(shape):
    """The module's iteration with the Polar Express table, in float32, against the float64 transcription
    on singular values 1 .. 1e-3 (the paper's design range): measured error 1.9e-6 to 3.2e-6; tolerance 2e-5
    (6x). Changing one row's first coefficient by 0.003 fails it."""
    X = with_singular_values(shape, torch.logspace(0, -3, min(shape), dtype=torch.float64), seed=21)
    expected = quintic_schedule_float64(X, POLAR_EXPRESS_SCHEDULE, safety=1.02)
    P = optimizers.odd_quintic_polar(X, optimizers.POLAR_EXPRESS_COEFFICIENTS, optimizers.POLAR_EXPRESS_SAFETY,
                                     torch.float32)
    assert (P.double() - expected).abs().max() < 2e-5
    torch.testing.assert_close(polar_express(X), optimizers.odd_quintic_polar(
        X, POLAR_EXPRESS_SCHEDULE, 1.02, torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("orientation", ["none", "non_square"])
@pytest.mark.parametrize("backend", sorted(optimizers.POLAR_BACKENDS))
def test_polar_dtype_is_the_dtype_of_every_polar_backends_iterations(backend, orientation):
    """A group's polar_dtype reaches every backend, Aurora's balanced forms included: bfloat16 (the records')
    or float32 (for CPUs whose bf16 matmuls are slow), which lands nearer the exact polar factor."""
    u = well_conditioned((48, 16), 3)
    factors = {}
    for dtype in ("bfloat16", "float32"):
        group = dict(optimizers.CHAIN_OPTIONS, polar_backend=backend, polar_dtype=dtype, orientation=orientation)
        factors[dtype] = optimizers.polar_stage(u, optimizers.static_options(group))
        assert factors[dtype].dtype == optimizers.POLAR_DTYPES[dtype]
    if backend in ("polar", "schatten") and orientation == "none":
        exact = svd_polar(u)
        assert orthogonality_error(factors["float32"]) < orthogonality_error(factors["bfloat16"]) / 10
        assert (factors["float32"].double() - exact).norm() < (factors["bfloat16"].double() - exact).norm()


def test_polar_is_batched_over_leading_dims():
    X = torch.stack([well_conditioned((48, 16), s) for s in range(3)]).reshape(3, 1, 48, 16)
    batched = polar(X)
    for i in range(3):
        torch.testing.assert_close(batched[i, 0], polar(X[i, 0]), rtol=0, atol=0)


def test_polar_of_zero_is_zero():
    assert torch.equal(polar(torch.zeros(48, 16)), torch.zeros(48, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_express_singular_values_are_near_one(shape):
    X = well_conditioned(shape, 1)
    P = polar_express(X)
    singular_values = torch.linalg.svdvals(P.double())
    # 5 minimax steps leave a small band around 1 by design (no exact convergence).
    assert singular_values.min() > 0.7 and singular_values.max() < 1.25
    assert (P.double() - svd_polar(X)).abs().max() < 0.25


def aurora_polar_float64(G, pp_iterations=2, pp_beta=0.5):
    """docs/recipes.md#aurora step 2 in float64 with the exact (SVD) polar factor; tall G only."""
    U = G.double()
    m, n = U.shape
    D = 1 / U.norm(dim=1, keepdim=True).clamp_min(1e-7)
    for k in range(1, pp_iterations + 1):
        P = svd_polar(D * U)
        if k < pp_iterations:
            D = D * ((n / m) / P.square().sum(1, keepdim=True).clamp_min(1e-14)) ** pp_beta
    return P


@pytest.mark.parametrize("shape", [(48, 16), (64, 16), (96, 24)])
def test_aurora_polar_tall_is_orthogonal_with_uniform_row_norms(shape):
    G = rows_of_different_scales(shape, 2)
    P = aurora_polar(G)
    reference = aurora_polar_float64(G)
    assert orthogonality_error(P) < 0.03
    assert orthogonality_error(reference) < 1e-10
    assert (P.double() - reference).abs().max() < 0.02
    # Within a few percent of sqrt(n/m) (RMS over rows; the worst row within 15%), as the
    # float64 reference, while plain polar is off by ~65%.
    assert rms_row_norm_deviation(P) < 0.04 and row_norm_deviation(P) < 0.15
    assert abs(row_norm_deviation(P) - row_norm_deviation(reference)) < 0.01
    assert rms_row_norm_deviation(polar(G)) > 0.5


def test_aurora_polar_more_iterations_equalize_rows_further():
    G = rows_of_different_scales((48, 16), 3)
    deviations = [row_norm_deviation(aurora_polar(G, pp_iterations=k)) for k in (1, 2, 4, 6)]
    assert deviations == sorted(deviations, reverse=True) and deviations[-1] < 0.02


def test_aurora_polar_square_is_exactly_polar():
    G = well_conditioned((24, 24), 4)
    assert torch.equal(aurora_polar(G), polar(G))


def test_aurora_polar_wide_is_transpose_of_tall():
    """Both Auroras balance a wide matrix's columns, as the transpose of the tall case. The two layouts reach
    the bf16 matmuls (Riemannian Aurora's start included) in different memory orders, which some kernels
    round differently. Measured, relative: this case is bit-identical for vanilla Aurora on an AVX512 CPU,
    4.9e-3 apart with the AVX2 paths forced (Riemannian: 5e-7 and 2.3e-3); over 160 cases (4 shapes, 40
    seeds; Riemannian: 20) at most 6.5e-3 (7.2e-3) on either. Bound 2^-6: balancing the wide matrix's own
    rows instead lands 0.74 away (either Aurora)."""
    G = rows_of_different_scales((48, 16), 5)
    for aurora in (aurora_polar, riemannian_aurora_polar):
        wide, tall = aurora(G.T.contiguous()).float(), aurora(G).T.float()
        assert (wide - tall).norm() <= 2 ** -6 * tall.norm(), aurora.__name__


@pytest.mark.parametrize("shape", [(48, 16), (64, 16), (64, 32)])
def test_riemannian_aurora_satisfies_both_constraints_more_tightly_than_vanilla(shape):
    G = rows_of_different_scales(shape, 6)
    vanilla, riemannian = aurora_polar(G), riemannian_aurora_polar(G)
    assert orthogonality_error(riemannian) < orthogonality_error(vanilla) / 100
    assert row_norm_deviation(riemannian) < row_norm_deviation(vanilla) / 10
    # It is an ascent on <G, P>: better aligned with G than vanilla Aurora.
    assert (G * riemannian).sum() > (G.double() * vanilla.double()).sum()


def test_row_multipliers_solve_the_system_and_stay_put_after_converging():
    G = rows_of_different_scales((96, 24), 3)
    P = optimizers.retract_uniform_leverage(polar(G).float(), 6)
    q = (optimizers.stiefel_tangent(P, G) * P).sum(-1)
    for iterations in (10, 40):  # 40: long past convergence, where unguarded CG diverges
        lam = optimizers.row_multipliers(P, q, iterations)
        residual = P.square().sum(-1) * lam - optimizers.row_gram_square_times(P, lam) - q
        assert residual.norm() / q.norm() < 1e-4


def test_riemannian_aurora_square_is_polar():
    G = well_conditioned((24, 24), 7)
    assert torch.equal(riemannian_aurora_polar(G), polar(G))


# ----------------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------------

def test_top_singular_value_by_power_iteration():
    U, _ = torch.linalg.qr(well_conditioned((48, 16), 8))
    V, _ = torch.linalg.qr(well_conditioned((16, 16), 9))
    s = torch.linspace(1, 0.1, 16)
    s[0] = 3.0
    X = (U * s) @ V.T
    sigma = optimizers.top_singular_value(X)
    assert sigma.shape == (1, 1)
    assert abs(sigma.item() - 3.0) < 1e-4
    assert torch.equal(optimizers.top_singular_value(torch.zeros(48, 16)), torch.zeros(1, 1))
    assert torch.equal(optimizers.contra_direction(torch.zeros(16, 48)), torch.zeros(16, 48))


def test_contra_mix_rescales_to_the_bf16_rounded_norm_of_the_polar_factor():
    """As in record #17: f = ||P||_F of the bf16 P is itself bf16, so Q lands on the rounded norm."""
    u = rows_of_different_scales((48, 16), 14)
    P = aurora_polar(u)
    Q = optimizers.contra_mix(P, optimizers.contra_direction(u), 0.4)
    assert P.dtype == torch.bfloat16 and Q.dtype == torch.float32
    rounded, exact = P.norm().float(), P.float().norm()
    assert rounded != exact  # the two choices differ on this input
    torch.testing.assert_close(Q.norm(), rounded, rtol=1e-6, atol=0)


def test_uw_floor_raises_small_updates_to_the_floor_only():
    W = well_conditioned((24, 24), 10)
    small, large = 0.01 * W, 2 * W
    raised = optimizers.uw_floor(small, W, 0.35)
    assert abs(raised.norm() / W.norm() - 0.35) < 1e-6
    assert torch.equal(optimizers.uw_floor(large, W, 0.35), large)
    assert torch.equal(optimizers.uw_floor(small, torch.zeros(24, 24), 0.35), small)
    assert torch.equal(optimizers.uw_floor(torch.zeros(24, 24), W, 0.35), torch.zeros(24, 24))


@pytest.mark.parametrize("shape, v_shape", [((48, 16), (48, 1)), ((16, 48), (1, 48)), ((24, 24), (24, 1))])
def test_normuon_normalize_keeps_the_norm_and_uses_row_or_column_moments(shape, v_shape):
    O = polar(rows_of_different_scales(shape, 11))
    normalized, v = optimizers.normuon_normalize(O, torch.zeros(v_shape), 0.95)
    assert v.shape == v_shape and v.dtype == torch.float32
    assert normalized.dtype == torch.bfloat16  # record #10 returns the bf16 update
    dim = 1 if shape[0] >= shape[1] else 0
    # The mean squares are those of the bf16 tensor, bf16-rounded, as in record #10.
    torch.testing.assert_close(v, (1 - 0.95) * (O * O).mean(dim=dim, keepdim=True).float(), rtol=0, atol=0)
    # The norm is kept up to the bf16 rounding of the record's bf16 rescale (f and the ratio are bf16).
    torch.testing.assert_close(normalized.float().norm(), O.float().norm(), rtol=2 ** -7, atol=0)
    # From v = 0, every row (column) gets the same RMS, up to the record's bf16 rounding of the scale
    # (2^-8 relative, so up to 2^-6 between two rows' mean squares) and of each entry.
    rms = normalized.float().square().mean(dim=dim)
    assert (rms.max() - rms.min()) / rms.mean() < 2 ** -5


def test_u_normuon_tall_rows_have_norm_sqrt_n_over_m():
    P = optimizers.u_normuon_tall(polar(rows_of_different_scales((48, 16), 12)))
    torch.testing.assert_close(P.norm(dim=1), torch.full((48,), math.sqrt(16 / 48)))


# ----------------------------------------------------------------------------------------------
# The optimizers against an independent transcription of docs/recipes.md (one matrix at a time)
# ----------------------------------------------------------------------------------------------

def make_problem(seed=0, steps=2):
    """Weights and per-step grads: tall, wide and square matrices with rows of very different
    scales, one whose gradient is always zero and one whose weight is zero. Over 2 ranks the
    shape groups split unevenly (3 -> 2 + 1 and padding) and the lone (32, 24) leaves rank 1 idle."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(48, 16), (48, 16), (48, 16), (16, 48), (16, 48), (24, 24), (24, 24), (24, 24), (32, 24)]
    row_scales = [torch.logspace(-3, 1, s[0])[torch.randperm(s[0], generator=gen)].unsqueeze(1)
                  for s in shapes]
    weights = [0.1 * torch.randn(*s, generator=gen) for s in shapes]
    weights[3] = torch.zeros(16, 48)
    grads = [[torch.randn(*s, generator=gen) * scale for s, scale in zip(shapes, row_scales)]
             for _ in range(steps)]
    for step_grads in grads:
        step_grads[1] = torch.zeros(48, 16)
    return weights, grads


def take_steps(opt, params, grads):
    """One opt.step() per step of gradients (each step's list set on params)."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def run_optimizer(cls, settings, weights, grads):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = cls(params, **settings)
    take_steps(opt, params, grads)
    return params, opt


def spec_polar_factor(recipe, u, settings, polar_fn):
    """The orthogonal factor each recipe starts from (Aurora: docs/recipes.md#aurora step 2)."""
    rows, cols = u.shape
    if recipe != "aurora" or rows == cols:
        return polar_fn(u)
    tall = u.T if rows < cols else u
    m, n = tall.shape
    x = tall.float()
    D = 1 / torch.clamp(x.norm(dim=1, keepdim=True), min=1e-7)
    K = settings.get("pp_iterations", 2)
    for k in range(1, K + 1):
        P = polar_fn(D * x)
        if k < K:
            row_sq = P.float().pow(2).sum(dim=1, keepdim=True)
            D = D * ((n / m) / torch.clamp(row_sq, min=1e-14)) ** settings.get("pp_beta", 0.5)
    return P.T if rows < cols else P


def spec_run(recipe, settings, weights, grads, polar_fn=polar, dtype=torch.float32):
    """docs/recipes.md transcribed literally, one matrix at a time; returns weights and NorMuon's v."""
    lr, wd = settings["lr"], settings.get("weight_decay", 0.0)
    mu, beta2 = 0.95, settings.get("beta2", 0.95)
    W = [w.to(dtype) for w in weights]
    m = [torch.zeros_like(w) for w in W]
    v = [None] * len(W)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            g = g.to(dtype)
            rows, cols = g.shape
            aspect = math.sqrt(max(1, rows / cols))
            W[i] = W[i] * (1 - lr * wd)
            m[i] = torch.lerp(m[i], g, 1 - mu)
            u = torch.lerp(g, m[i], mu)
            P = spec_polar_factor(recipe, u, settings, polar_fn)
            if recipe == "muon":
                update = P * aspect
            elif recipe == "normuon":
                # Record #10 keeps the scaled polar factor O in its own dtype (bf16) throughout: f, the
                # mean squares, the rsqrt scale and the rescaled update are bf16-rounded; only the
                # second moment v is float32 (float64 in the float64 reference).
                O = P * aspect
                f = O.norm()
                r = (O * O).mean(dim=1, keepdim=True) if rows >= cols else (O * O).mean(dim=0, keepdim=True)
                v_dtype = torch.float64 if dtype == torch.float64 else torch.float32
                r = r.to(v_dtype)
                v[i] = torch.lerp(v[i] if v[i] is not None else torch.zeros_like(r), r, 1 - beta2)
                O = O * torch.rsqrt(torch.clamp(v[i], min=1e-10)).to(O.dtype)
                update = O * (f / torch.clamp(O.norm(), min=1e-10))
            else:
                c, floor = settings.get("contra", 0.0), settings.get("uw_floor", 0.0)
                x = u.to(torch.float64 if dtype == torch.float64 else torch.float32)
                vec = torch.ones(cols, dtype=x.dtype)
                vec = vec / torch.clamp(vec.norm(), min=1e-10)
                for _ in range(5):
                    vec = x.T @ (x @ vec)
                    vec = vec / torch.clamp(vec.norm(), min=1e-10)
                sigma = (x @ vec).norm()
                contra_g = x / torch.clamp(sigma, min=1e-10)
                f = P.norm()  # in P's dtype: bf16-rounded for the bf16 polar factor, as in the record
                Q = P.to(x.dtype) - (c / 2) * contra_g
                Q = Q * f / torch.clamp(Q.norm(), min=1e-10)
                Q = Q * aspect
                w_norm = torch.clamp(W[i].norm(), min=1e-8)
                q_norm = torch.clamp(Q.norm(), min=1e-8)
                if q_norm / w_norm < floor:
                    Q = Q * (floor * w_norm / q_norm)  # the record forms the scale first
                update = Q
            W[i] = W[i] - lr * update.to(dtype)
    return W, v


@pytest.mark.parametrize("recipe", ["muon", "normuon", "aurora"])
def test_two_steps_match_spec_transcription(recipe):
    cls, settings = RECORD_SETTINGS[recipe]
    weights, grads = make_problem()
    params, opt = run_optimizer(cls, settings, weights, grads)
    expected, v = spec_run(recipe, settings, weights, grads)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=2e-7)
        assert torch.isfinite(p).all()
    if recipe == "normuon":
        for p, e in zip(params, v):
            torch.testing.assert_close(opt.state[p]["second_moment"], e, rtol=1e-6, atol=0)
    # The zero-gradient matrix moved only by weight decay; the zero weight got a finite update.
    decay = (1 - settings["lr"] * settings.get("weight_decay", 0.0)) ** 2
    torch.testing.assert_close(params[1].detach(), weights[1] * decay, rtol=1e-6, atol=0)
    assert params[3].detach().abs().max() > 0


@pytest.mark.parametrize("recipe", ["muon", "normuon", "aurora"])
def test_two_steps_match_float64_math_with_exact_polar(recipe):
    """The bf16 record math against docs/recipes.md in float64 with the SVD polar factor: on
    well-conditioned gradients the steps agree to bf16 accuracy."""
    cls, settings = RECORD_SETTINGS[recipe]
    gen = torch.Generator().manual_seed(1)
    weights = [0.1 * torch.randn(*s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(*s, generator=gen) for s in SHAPES] for _ in range(2)]
    params, _ = run_optimizer(cls, settings, weights, grads)
    expected, _ = spec_run(recipe, settings, weights, grads, polar_fn=svd_polar, dtype=torch.float64)
    for p, w, e in zip(params, weights, expected):
        moved, expected_move = p.detach().double() - w.double(), e - w.double()
        assert (moved - expected_move).norm() / expected_move.norm() < 0.02


def test_zero_gradient_gives_zero_update_for_every_optimizer():
    for recipe, (cls, settings) in RECORD_SETTINGS.items():
        weights = [0.1 * well_conditioned(s, 13) for s in SHAPES]
        no_decay = dict(settings, weight_decay=0.0)
        params, opt = run_optimizer(cls, no_decay, weights, [[torch.zeros(s) for s in SHAPES]] * 2)
        for p, w in zip(params, weights):
            assert torch.equal(p.detach(), w), recipe


def test_plain_momentum_without_nesterov_uses_the_buffer_itself():
    weights, grads = make_problem(steps=2)
    params, opt = run_optimizer(Muon, dict(lr=0.02, nesterov=False), weights, grads)
    for i, (p, w) in enumerate(zip(params, weights)):
        m = torch.zeros_like(w)
        for step_grads in grads:
            m = torch.lerp(m, step_grads[i], 0.05)
            w = w - 0.02 * (polar(m) * math.sqrt(max(1, w.size(0) / w.size(1)))).float()
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=2e-7)


def test_riemannian_variant_steps_with_more_uniform_leverage_than_vanilla():
    weights, grads = make_problem(steps=1)  # one step: the Riemannian ascent is the slow part
    _, vanilla = run_optimizer(Aurora, RECORD_SETTINGS["aurora"][1], weights, grads)
    settings = dict(RECORD_SETTINGS["aurora"][1], variant="riemannian")
    params, riemannian = run_optimizer(Aurora, settings, weights, grads)
    assert all(torch.isfinite(p).all() for p in params)
    vanilla_leverage = {tuple(p.shape) + (i,): lev for i, (p, lev) in enumerate(vanilla.leverage().items())}
    for i, (p, lev) in enumerate(riemannian.leverage().items()):
        if p is params[1]:  # the zero-gradient matrix has zero leverage
            continue
        spread = (lev / lev.mean() - 1).abs().max()
        assert spread < 0.01
        vanilla_lev = vanilla_leverage[tuple(p.shape) + (i,)]
        assert spread < (vanilla_lev / vanilla_lev.mean() - 1).abs().max() / 5


def test_u_normuon_tall_updates_have_uniform_rows():
    weights, grads = make_problem(steps=1)
    params, _ = run_optimizer(NorMuon, dict(lr=1.0, u_normuon=True), weights, grads)
    step = weights[0] - params[0].detach()
    torch.testing.assert_close(step.norm(dim=1), torch.full((48,), math.sqrt(16 / 48)), rtol=1e-5, atol=0)


def test_polar_express_backend_is_used_when_asked():
    weights, grads = make_problem(steps=1)
    reference, _ = run_optimizer(Muon, dict(lr=0.02), weights, grads)
    express, _ = run_optimizer(Muon, dict(lr=0.02, polar_backend="polar_express"), weights, grads)
    expected, _ = spec_run("muon", dict(lr=0.02), weights, grads, polar_fn=polar_express)
    for p, r, e in zip(express, reference, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=2e-7)
    assert not torch.equal(express[0], reference[0])


# ----------------------------------------------------------------------------------------------
# Interface: leverage hook, errors, state_dict
# ----------------------------------------------------------------------------------------------

def test_leverage_hook_reports_rectangular_matrices_in_tall_orientation():
    weights, grads = make_problem(steps=1)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = Muon(params, lr=0.02)
    assert opt.leverage() == {}
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()
    leverage = opt.leverage()
    assert set(leverage) == {p for p in params if p.size(0) != p.size(1)}
    for p, lev in leverage.items():
        assert lev.dtype == torch.float32 and lev.shape == (max(p.shape),)
    u = torch.lerp(grads[0][3], 0.05 * grads[0][3], 0.95)
    torch.testing.assert_close(leverage[params[3]], polar(u).float().square().sum(0))
    assert leverage[params[1]].abs().max() == 0  # zero gradient -> zero update


@pytest.mark.parametrize("cls", [Muon, NorMuon, Aurora, optimizers.MuonChain])
def test_non_matrix_parameter_is_refused_with_its_shape(cls):
    with pytest.raises(ValueError, match=r"\(768,\)"):
        cls([torch.nn.Parameter(torch.zeros(24, 24)), torch.nn.Parameter(torch.zeros(768))], lr=0.1)


@pytest.mark.parametrize("cls", [Muon, NorMuon, Aurora])
def test_non_finite_update_is_refused_with_the_parameter_shape(cls):
    params = [torch.nn.Parameter(torch.ones(24, 24)), torch.nn.Parameter(torch.ones(48, 16))]
    opt = cls(params, lr=0.1)
    params[0].grad = torch.ones(24, 24)
    params[1].grad = torch.ones(48, 16)
    params[1].grad[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"\(48, 16\)"):
        opt.step()


def test_bad_options_are_refused():
    p = [torch.nn.Parameter(torch.zeros(24, 24))]
    with pytest.raises(ValueError, match="variant"):
        Aurora(p, lr=0.1, variant="fancy")
    with pytest.raises(ValueError, match="polar_backend"):
        Muon(p, lr=0.1, polar_backend="svd")


@pytest.mark.parametrize("make, message", [
    (lambda p: optimizers.MuonChain(p, lr=0.1, radial_brak=(0.5, 1.0)), "unknown option 'radial_brak' (did you mean 'radial_brake'?)"),
    (lambda p: Muon([dict(params=p, nesterof=False)], lr=0.1), "param group 0: unknown option 'nesterof' (did you mean 'nesterov'?)"),
    (lambda p: optimizers.MuonChain(p, lr=0.1, soap=dict(beta2=0.9, frequency=1, denom_power=0.5, blnd=0.9)), "soap must be"),
    (lambda p: optimizers.MuonChain(p, lr=0.1, soap_combine="trust_gate", trust=dict(min_agre=0.2)), "trust"),
    (lambda p: optimizers.MuonChain(p, lr=0.1, floor=("rows", 0.3)), "floor must be"),
    (lambda p: Aurora(p, lr=0.1, uw_floor=0.35, floor=("scalar", 0.3)), "one stage"),
    (lambda p: NorMuon(p, lr=0.1, normuon_beta2=1.0), "exclude each other"),
    (lambda p: optimizers.MuonChain(p, lr=0.1, polar_dtype="float16"), "polar_dtype"),
])
def test_a_misspelt_or_impossible_option_is_one_error_line_before_any_step(make, message):
    """Every option of every stage is checked when the optimizer is made: an unknown one (a typo) names the
    nearest option, a bad value names the option; none is ignored."""
    with pytest.raises(ValueError) as refused:
        make([torch.nn.Parameter(torch.zeros(24, 24))])
    assert message in str(refused.value) and len(str(refused.value).splitlines()) == 1


@pytest.mark.parametrize("recipe", ["muon", "normuon", "aurora"])
def test_state_dict_round_trip_continues_identically(recipe):
    cls, settings = RECORD_SETTINGS[recipe]
    weights, grads = make_problem(steps=4)
    params, opt = run_optimizer(cls, settings, weights, grads[:2])
    saved_weights = [p.detach().clone() for p in params]
    checkpoint = io.BytesIO()  # through bytes, as a resumed run would (state_dict() holds live tensors)
    torch.save(opt.state_dict(), checkpoint)
    checkpoint.seek(0)
    saved_state = torch.load(checkpoint)
    for state in saved_state["state"].values():
        assert "momentum_buffer" in state and (recipe != "normuon" or "second_moment" in state)

    resumed = [torch.nn.Parameter(w.clone()) for w in saved_weights]
    resumed_opt = cls(resumed, **settings)
    resumed_opt.load_state_dict(saved_state)
    for step_grads in grads[2:]:
        for ps in (params, resumed):
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
        opt.step()
        resumed_opt.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


BEFORE_THE_CHAIN = os.path.join(ROOT, "tests", "data", "records", "before_the_chain.pt")


@pytest.mark.parametrize("name", ["muon", "normuon", "aurora", "muon-chain-42", "muon-chain-46"])
def test_a_state_dict_written_before_the_chain_loads_and_continues(name):
    """tests/data/records/before_the_chain.pt: the state_dict the optimizers before the one chain wrote after 2 steps (Muon,
    NorMuon, Aurora on one design, MuonChain with records #42's and #46's stages on another) loads as it was
    saved, its groups taking the options they lacked at this class's defaults, and the third step equals
    the old optimizers' third step: bit for bit on the CPU kind the data were made on; elsewhere bf16
    matmuls round differently (on AVX2, measured up to 4.6e-3 of the step's move; bound 2^-5), where a
    continuation without the saved state moves by about the step itself."""
    data = torch.load(BEFORE_THE_CHAIN, weights_only=True)
    case = data[name]
    params = [torch.nn.Parameter(w.clone()) for w in case["weights_after_2"]]
    opt = getattr(optimizers, case["class"])(params, **case["arguments"])
    opt.load_state_dict(case["state_dict"])
    assert opt.param_groups[0]["pin"] == (case["class"] == "MuonChain")
    for i, p in enumerate(params):
        saved = case["state_dict"]["state"][i]
        assert sorted(opt.state[p]) == sorted(saved)
        assert all(torch.equal(v, saved[k]) if torch.is_tensor(v) else v == saved[k] for k, v in opt.state[p].items())
        p.grad = data["grads"][2][i].clone()
    opt.step()
    for p, theirs, before in zip(params, case["weights_after_3"], case["weights_after_2"]):
        if data["cpu"] == torch.backends.cpu.get_cpu_capability():
            assert torch.equal(p.detach(), theirs)
        assert (p.detach() - theirs).norm() <= 2 ** -5 * (theirs - before).norm()


def test_a_state_dict_of_another_configuration_is_refused_with_one_line():
    data = torch.load(BEFORE_THE_CHAIN, weights_only=True)
    for name, into in (("muon-chain-46", Muon), ("muon", optimizers.MuonChain), ("muon", NorMuon)):
        opt = into([torch.nn.Parameter(w.clone()) for w in data["weights"]], lr=0.02)
        with pytest.raises(ValueError, match="cannot load this state_dict") as refused:
            opt.load_state_dict(data[name]["state_dict"])
        assert len(str(refused.value).splitlines()) == 1 and not opt.state


def test_lr_and_weight_decay_can_be_changed_between_steps():
    weights, grads = make_problem(steps=2)
    params, opt = run_optimizer(Muon, dict(lr=0.02, weight_decay=0.1), weights, grads[:1])
    for group in opt.param_groups:
        group["lr"], group["weight_decay"] = 0.01, 0.0
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    opt.step()
    W, _ = spec_run("muon", dict(lr=0.02, weight_decay=0.1), weights, grads[:1])
    # The second step by hand from the transcription's weights and momentum after step 1.
    m = [torch.lerp(torch.zeros_like(g), g, 0.05) for g in grads[0]]
    for p, w, g, mi in zip(params, W, grads[1], m):
        mi = torch.lerp(mi, g, 0.05)
        u = torch.lerp(g, mi, 0.95)
        want = w - 0.01 * (polar(u) * math.sqrt(max(1, u.size(0) / u.size(1)))).float()
        torch.testing.assert_close(p.detach(), want.float(), rtol=0, atol=2e-7)


# ----------------------------------------------------------------------------------------------
# Sharding across gloo ranks
# ----------------------------------------------------------------------------------------------

def gloo_process(rank, worker, world_size, store_path, args):
    """One rank: worker(rank, world_size, *args) in a gloo process group. A rank that finished waits for every
    other at a barrier, then ends without finalizing the interpreter. Why: after FSDP2, DTensor's caches keep
    the device mesh, and with it the gloo group and its worker threads, alive past destroy_process_group (seen:
    2 worker threads and gloo's loop thread still running; without FSDP2 the group's teardown joins them). A
    worker that drops a finished collective's last tensors needs the GIL; CPython ends a thread that asks for
    it while the interpreter finalizes (pthread_exit), and that unwinding through C++ aborts the process:
    "terminate called without an active exception", a lost rank in every FSDP2 test. A failed rank raises,
    for mp.spawn to report."""
    torch._dynamo.config.disable = True
    torch.set_num_threads(1)  # several processes share this machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
    except BaseException:
        train_gpt.leave_process_group(finished=False)
        raise
    dist.barrier()  # no other rank waits on this one's collectives after it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_gloo_ranks(worker, world_size, tmp_path, *args):
    """Runs worker(rank, world_size, *args) (a module-level function) in world_size spawned CPU
    processes joined in one gloo process group, eagerly and one thread each."""
    store_path = tmp_path / f"gloo-store-{world_size}-{len(os.listdir(tmp_path))}"
    mp.spawn(gloo_process, args=(worker, world_size, str(store_path), args), nprocs=world_size, join=True)


def distributed_worker(rank, world_size, out_dir):
    results = {}
    weights, grads = make_problem(steps=2)
    for recipe, (cls, settings) in RECORD_SETTINGS.items():
        params, opt = run_optimizer(cls, settings, weights, grads)
        results[recipe] = ([p.detach() for p in params], opt.state_dict()["state"])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.distributed
def test_gloo_ranks_give_the_same_parameters_and_state_as_one_process(tmp_path):
    world_size = 2
    run_on_gloo_ranks(distributed_worker, world_size, tmp_path, str(tmp_path))
    weights, grads = make_problem(steps=2)
    for rank in range(world_size):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for recipe, (cls, settings) in RECORD_SETTINGS.items():
            params, opt = run_optimizer(cls, settings, weights, grads)
            ranked_params, ranked_state = results[recipe]
            for a, b in zip(params, ranked_params):
                assert torch.equal(a.detach(), b), (recipe, rank)
            single_state = opt.state_dict()["state"]
            assert single_state.keys() == ranked_state.keys()
            for index, state in single_state.items():
                assert state.keys() == ranked_state[index].keys()
                for name, value in state.items():
                    assert torch.equal(value, ranked_state[index][name]), (recipe, rank, name)


CHAIN_CONFIGURATIONS = list(RECORD_SETTINGS) + ["aurora-ema-ref", "soap-muon"]


def chain_optimizer(name, params):
    """The chain in one of its configurations: the three benchmark optimizers at their records' settings,
    or MuonChain with the param groups of record #42's or #46's recipe, the matrices dealt to them in turn."""
    if name in RECORD_SETTINGS:
        cls, settings = RECORD_SETTINGS[name]
        return cls(params, **settings)
    groups = train_gpt.RECIPES[name].matrix_spec().groups
    return optimizers.MuonChain([dict(params=params[k::len(groups)], lr=group.lr, **group.options)
                                 for k, group in enumerate(groups)], lr=groups[0].lr)


def ownership_worker(rank, world_size, out_dir):
    """Per configuration, 2 steps: the shapes of the matrices the chain's math computed here (counted in
    its calls, stand-in zero matrices left out), the matrices this rank owns and those it keeps state of."""
    weights, grads = make_problem(steps=2)
    for step_grads in grads:  # every direction non-zero, so that only stand-ins are zero in a stack
        step_grads[1] = torch.randn(48, 16, generator=torch.Generator().manual_seed(7))
    math, results = optimizers.chain_update, {}
    for name in CHAIN_CONFIGURATIONS:
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = chain_optimizer(name, params)
        computed = []

        def counting(options, u, grad, W, state, scalars):
            computed.extend(tuple(m.shape) for m in ([u] if u.ndim == 2 else u.unbind(0)) if m.any())
            return math(options, u, grad, W, state, scalars)
        optimizers.chain_update = counting
        try:
            take_steps(opt, params, grads)
        finally:
            optimizers.chain_update = math
        index = {id(p): k for k, p in enumerate(params)}
        owned = sorted(index[id(p)] for (_, p), owner in zip(opt.matrices(), opt.owners(world_size)) if owner == rank)
        results[name] = (computed, owned, sorted(index[id(p)] for p in opt.state))
    torch.save(results, os.path.join(out_dir, f"owned{rank}.pt"))


@pytest.mark.distributed
def test_each_of_3_gloo_ranks_computes_and_stores_only_the_matrices_it_owns(tmp_path):
    """Counted in the calls of the chain's math on every rank, not read from the plan: each rank computes
    exactly its matrices, once a step, and keeps state for those alone; the ranks' matrices are all of
    them, each once. Every configuration of the chain, 3 gloo ranks, 2 steps."""
    world_size, steps = 3, 2
    run_on_gloo_ranks(ownership_worker, world_size, tmp_path, str(tmp_path))
    weights, _ = make_problem()
    ranked = [torch.load(tmp_path / f"owned{rank}.pt") for rank in range(world_size)]
    for name in CHAIN_CONFIGURATIONS:
        for rank, results in enumerate(ranked):
            computed, owned, stored = results[name]
            assert owned and stored == owned, (name, rank, owned, stored)
            assert sorted(computed) == sorted(tuple(weights[i].shape) for i in owned for _ in range(steps)), \
                (name, rank, owned, computed)
        assert sorted(i for results in ranked for i in results[name][1]) == list(range(len(weights))), name


def gpt_matrix_shapes(width=768, layers=12):
    d = width
    return ([(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]) * layers


def test_bucket_plan_joins_each_wide_matrix_to_the_bucket_of_its_transpose():
    shapes = gpt_matrix_shapes()
    plan = optimizers.bucket_plan(shapes)
    assert [len(bucket) for bucket in plan] == [48, 24]
    assert [shapes[i] for i in plan[1]] == [(3072, 768)] * 12 + [(768, 3072)] * 12  # tall first
    assert sorted(i for bucket in plan for i in bucket) == list(range(len(shapes)))
    by_shape = optimizers.bucket_plan(shapes, join_transposes=False)
    assert [len(bucket) for bucket in by_shape] == [48, 12, 12]


@pytest.mark.parametrize("cls", [Muon, NorMuon, Aurora])
def test_the_owner_plan_gives_every_rank_the_same_flops_of_the_gpt_matrices_on_8_ranks(cls):
    with torch.device("meta"):
        params = [torch.nn.Parameter(torch.empty(s)) for s in gpt_matrix_shapes()]
    opt = cls(params, lr=0.02)
    per_rank = opt.flops_per_rank(8)
    assert sum(per_rank) == sum(opt.flops_per_rank(1)) and max(per_rank) == min(per_rank)
    owners = opt.owners(8)
    for rank in range(8):  # 3 of the 24 rectangular matrices and 6 of the 48 square ones each
        mine = [p.shape for p, owner in zip(params, owners) if owner == rank]
        assert sum(rows != cols for rows, cols in mine) == 3 and len(mine) == 9
    # 12 iterations of A = X X^T, A A, B X on the 768 x 3072 orientation (Aurora: 2 polars).
    polars = 2 if cls is Aurora else 1
    assert opt.matrix_flops((3072, 768), opt.param_groups[0]) == polars * 12 * (4 * 768 ** 2 * 3072 + 2 * 768 ** 3)


def one_step_as_rank(cls, settings, weights, grads, rank, world_size, monkeypatch):
    """One step of `rank` of world_size under torch's fake process group (collectives move nothing), with
    the chain's math (optimizers.chain_update) recording its calls. Returns (params, optimizer,
    [(u, W, update) per call])."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = cls(params, **settings)
    opt.found_inf = torch.zeros(())  # the gathered rows are not real: a non-finite one only sets the flag
    calls, math = [], optimizers.chain_update

    def recording(options, u, grad, W, state, scalars):
        result = math(options, u, grad, W, state, scalars)
        calls.append((u, W, result[0]))
        return result
    monkeypatch.setattr(optimizers, "chain_update", recording)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        opt.step()
    finally:
        dist.destroy_process_group()
        monkeypatch.setattr(optimizers, "chain_update", math)
    return params, opt, calls


def test_gather_alone_takes_the_all_gather_path_in_a_world_of_one(monkeypatch):
    """train_gpt --ddp sets gather_alone so that one GPU runs the collective path of 8: in a process group
    of one the step then all-gathers its rows (once per bucket) instead of using them directly."""
    weights, grads = make_problem(steps=1)
    buckets = len(optimizers.bucket_plan([tuple(w.shape) for w in weights]))
    gathers, gather = [], optimizers.gather_from_ranks

    def recording_gather(chunk, world_size):
        gathers.append(world_size)
        return gather(chunk, world_size)
    monkeypatch.setattr(optimizers, "gather_from_ranks", recording_gather)
    for cls, settings in RECORD_SETTINGS.values():
        for alone in (False, True):
            gathers.clear()
            monkeypatch.setattr(cls, "gather_alone", alone)
            one_step_as_rank(cls, settings, weights, grads[0], 0, 1, monkeypatch)
            assert gathers == ([1] * buckets if alone else []), (cls.__name__, alone)


def test_a_lone_matrix_among_others_of_its_shape_is_batched_with_a_zero_stand_in(monkeypatch):
    """On 2 ranks the plan gives one rank a single one of make_problem's three (24, 24) matrices. torch's
    batched matmul takes another kernel for a batch of one, whose bf16 rounding differs, so the lone matrix
    goes into the math as a batch of two with a zero matrix and gets the update it gets among the three in
    one process, whatever the number of ranks. The (32, 24), the only one of its shape, is one 2-D matrix
    wherever it is computed. MuonChain (records #42 and #46) stacks nothing: every matrix is one 2-D call."""
    weights, grads = make_problem(steps=1)
    square = [i for i, w in enumerate(weights) if w.shape == (24, 24)]

    def batches(calls, shape):  # (u, W or None, update) of the math's calls on that shape
        return [call for call in calls if call[0].shape[-2:] == shape]
    for cls, settings in RECORD_SETTINGS.values():
        owners = cls([torch.nn.Parameter(w) for w in weights], **settings).owners(2)
        rank = next(r for r in (0, 1) if sum(owners[i] == r for i in square) == 1)
        lone = next(i for i in square if owners[i] == rank)
        _, _, on_rank = one_step_as_rank(cls, settings, weights, grads[0], rank, 2, monkeypatch)
        _, _, alone = one_step_as_rank(cls, settings, weights, grads[0], 0, 1, monkeypatch)
        [(u, stacked_weights, update)] = batches(on_rank, (24, 24))
        assert u.shape == (2, 24, 24) and not u[1].any(), cls.__name__
        if stacked_weights is not None:  # Aurora's floor reads W: a zero stand-in there too
            assert stacked_weights.shape == (2, 24, 24) and not stacked_weights[1].any()
        [(u_alone, _, update_alone)] = batches(alone, (24, 24))
        assert u_alone.shape == (3, 24, 24) and torch.equal(update[0], update_alone[square.index(lone)]), cls.__name__
        assert [u.shape for u, _, _ in batches(alone, (32, 24))] == [(32, 24)], cls.__name__
    _, _, calls = one_step_as_rank(optimizers.MuonChain, dict(lr=0.02), weights, grads[0], 0, 1, monkeypatch)
    assert sorted(tuple(u.shape) for u, _, _ in calls) == sorted(tuple(w.shape) for w in weights)


def test_found_inf_refuses_a_non_finite_update_on_the_device():
    weights, grads = make_problem(steps=2)
    for cls, settings in RECORD_SETTINGS.values():
        params, opt = run_optimizer(cls, settings, weights, grads[:1])
        before = [p.detach().clone() for p in params]
        opt.found_inf = torch.zeros(())
        for p, g in zip(params, grads[1]):
            p.grad = g.clone()
        params[4].grad[0, 0] = float("inf")
        opt.step()  # no exception: the flag records it
        assert opt.found_inf.item() == 1
        assert all(torch.equal(a, b) for a, b in zip(before, params))
        opt.found_inf.zero_()  # a clean flag and finite gradients: the step applies
        params[4].grad = grads[1][4].clone()
        params[1].grad = grads[1][1].clone()
        opt.state.clear()
        opt.step()
        assert opt.found_inf.item() == 0 and not torch.equal(before[0], params[0])


def test_found_inf_gate_changes_nothing_when_clear_and_everything_when_set():
    """The gate zeroes refused updates in place: a clear flag gives bit for bit the steps without a
    flag, and a set flag leaves every weight untouched, also when an update is inf or NaN (a product
    with 0 would make those NaN weights)."""
    weights, grads = make_problem(steps=2)
    for cls, settings in RECORD_SETTINGS.values():
        unflagged, _ = run_optimizer(cls, settings, weights, grads)
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = cls(params, **settings)
        opt.found_inf = torch.zeros(())
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        assert opt.found_inf.item() == 0
        assert all(torch.equal(a, b) for a, b in zip(unflagged, params)), cls.__name__
        before = [p.detach().clone() for p in params]
        for bad in (None, float("nan"), float("-inf")):  # set flag with finite, NaN and inf gradients
            opt.found_inf.fill_(1)
            for p, g in zip(params, grads[1]):
                p.grad = g.clone()
            if bad is not None:
                params[0].grad[1, 2] = bad
            opt.step()
            assert opt.found_inf.item() == 1
            assert all(torch.equal(a, b) for a, b in zip(before, params)), (cls.__name__, bad)


def full_model_problem(width=32, layers=5, steps=2, seed=3):
    """The hidden matrices of train_gpt's GPT in its order (per block q, k, v, attention proj: d x d;
    MLP fc: 4d x d; MLP proj: d x 4d) at a reduced width and depth, with rows of very different scales.
    5 layers make buckets of 20 and 10 matrices, which 4 and 8 ranks split unevenly (on 8, ranks left
    with no member), where 12 layers split evenly on each world size tested."""
    d = width
    shapes = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
    shapes = shapes * layers
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(*s, generator=gen) / s[1] ** 0.5 for s in shapes]
    grads = [[torch.randn(*s, generator=gen) * torch.logspace(-2, 1, s[0])[torch.randperm(s[0], generator=gen)][:, None]
              for s in shapes] for _ in range(steps)]
    return weights, grads


def run_both_bucketings():
    """{(recipe, join_transposes): (parameters, state_dict state)} after two steps of the full model's
    matrices, with transposes joined (the plan) and with one bucket per shape (the bucketing before)."""
    weights, grads = full_model_problem()
    results = {}
    for recipe, (cls, settings) in RECORD_SETTINGS.items():
        for join in (True, False):
            params = [torch.nn.Parameter(w.clone()) for w in weights]
            opt = cls(params, **settings)
            opt.join_transposes = join
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
            results[recipe, join] = ([p.detach() for p in params], opt.state_dict()["state"])
    return results


def bucketings_worker(rank, world_size, store_path, out_dir):
    torch._dynamo.config.disable = True
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    finished = False
    try:
        torch.save(run_both_bucketings(), os.path.join(out_dir, f"rank{rank}.pt"))
        finished = True
    finally:
        train_gpt.leave_process_group(finished)


def assert_same_results(a, b, what):
    (params_a, state_a), (params_b, state_b) = a, b
    for i, (x, y) in enumerate(zip(params_a, params_b)):
        assert torch.equal(x, y), (what, "parameter", i)
    assert state_a.keys() == state_b.keys()
    for index, state in state_a.items():
        assert state.keys() == state_b[index].keys(), (what, index)
        for name, value in state.items():
            assert value.shape == state_b[index][name].shape and torch.equal(value, state_b[index][name]), \
                (what, index, name)


@pytest.fixture(scope="module")
def one_process_bucketings():
    with torch._dynamo.config.patch(disable=True):
        return run_both_bucketings()


def test_joined_transposes_give_bit_identical_steps_in_one_process(one_process_bucketings):
    """Old (one bucket per shape) and new (wide matrices in the bucket of their transpose) bucketing:
    the same parameters and state, to the bit, for every recipe on the full model's shapes. (Against
    the optimizers before bucket_plan existed they were bit-identical too, eager and compiled.)"""
    results = one_process_bucketings
    for recipe in RECORD_SETTINGS:
        assert_same_results(results[recipe, True], results[recipe, False], recipe)
        _, state = results[recipe, True]
        if recipe == "normuon":  # a wide matrix keeps its column moments (1 x cols)
            assert state[5]["second_moment"].shape == (1, 128) and state[4]["second_moment"].shape == (128, 1)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 8])
def test_gloo_ranks_give_bit_identical_steps_for_both_bucketings(tmp_path, world_size, one_process_bucketings):
    """1 process against 2 and 8 (the benchmark's) gloo processes, each with both bucketings, on the full
    model's shapes at width 32 and 5 layers: every rank ends with the parameters and state of the single
    process. (3 ranks, an uneven split: test_recipes' test_gloo_ranks_save_the_same_state_as_one_process.)"""
    mp.spawn(bucketings_worker, args=(world_size, str(tmp_path / "store"), str(tmp_path)),
             nprocs=world_size, join=True)
    for rank in range(world_size):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        for key, result in one_process_bucketings.items():
            assert_same_results(result, ranked[key], (key, world_size, rank))


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

def compiled_chains():
    """(name, optimizer maker, schedule) per configuration the compiled-vs-eager test runs: record #17's
    Aurora, and record #42's mlp.proj and #46's attention-output groups (SOAP, Aurora #42's form,
    Contra-Muon, NorMuon-lite, the trust gate, brake, floors, the pinned step, cautious decay), their
    scheduled values changed between steps as the trainer changes them."""
    def record_group(recipe, name):
        group = train_gpt.RECIPES[recipe].group(name)
        return lambda params: optimizers.MuonChain([dict(params=params, lr=group.lr, **group.options)], lr=group.lr)

    def aurora(params):
        return Aurora(params, lr=0.03, weight_decay=0.01, contra=0.4, uw_floor=0.35)
    return [("aurora", aurora, dict(lr=0.01, weight_decay=0.02)),
            ("aurora-ema-ref mlp.proj", record_group("aurora-ema-ref", "mlp.proj"), dict(lr=0.02, momentum=0.9, contra=-0.1)),
            ("soap-muon attn.proj", record_group("soap-muon", "attn.proj"),
             dict(lr=0.02, momentum=0.9, trust_floor=0.3, trust_cap=0.8))]


@pytest.mark.slow
@pytest.mark.parametrize("name, make, schedule", compiled_chains(), ids=[c[0] for c in compiled_chains()])
def test_compiled_matches_eager_and_scheduled_values_do_not_recompile(name, make, schedule):
    """Compiled and eager agree to the precision of the bfloat16 polar: inductor fuses its steps and rounds
    elsewhere, so four steps' displacements differ by about 0.7% (2 bfloat16 eps, measured on Aurora); the
    bound is 2^-6. From the first compiled step on (a SOAP matrix's first step runs eagerly: no basis yet)
    a recompile is an error, while lr, weight decay, momentum, Contra-Muon and the trust bounds change. The
    eager side runs the function itself (update_math_now): a compiled wrapper called with compiling off
    still ran the code dynamo had compiled for it, which made this comparison compiled against compiled."""
    torch._dynamo.reset()
    weights = [0.1 * well_conditioned((40, 8), 14)]
    grads = [[well_conditioned((40, 8), 15 + i)] for i in range(4)]
    compiles_at = 0 if make([torch.nn.Parameter(weights[0].clone())]).param_groups[0]["soap"] is None else 1

    def four_steps_with_schedule_changes():
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = make(params)
        for step, step_grads in enumerate(grads):
            if step > compiles_at:
                opt.param_groups[0].update(schedule)
            params[0].grad = step_grads[0].clone()
            # After the compiled step a recompile is an error; the patch restores the setting however the block ends.
            with torch._dynamo.config.patch(error_on_recompile=step > compiles_at):
                opt.step()
        return params[0].detach(), opt

    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(disable=False):
        compiled, compiling = four_steps_with_schedule_changes()
    assert compiling._compiled_update_math is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before + 1  # one graph, no break
    eager, eager_opt = four_steps_with_schedule_changes()
    assert eager_opt._compiled_update_math is None  # no compiled code ran
    assert (compiled - eager).norm() <= 2 ** -6 * (eager - weights[0]).norm(), \
        ((compiled - eager).norm() / (eager - weights[0]).norm()).item()
    torch._dynamo.reset()


def test_torch_compile_disable_env_runs_the_update_math_eagerly():
    code = ("import torch, optimizers\n"
            "p = torch.nn.Parameter(torch.randn(24, 24)); p.grad = torch.randn(24, 24)\n"
            "optimizers.Muon([p], lr=0.02).step()\n"
            "print(torch._dynamo.utils.counters['stats']['unique_graphs'])\n")
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


# ----------------------------------------------------------------------------------------------
# Aurora where the u/w floor and the D clamp act (docs/recipes.md#aurora steps 2 and 5)
# ----------------------------------------------------------------------------------------------

def floor_problem(steps=2):
    """Weights at given Frobenius norms, so the floor 0.35 decides: a tall 48x16 update has ||Q||_F =
    sqrt(48) = 6.9 after the aspect scale (4 before it), so ||W||_F = 15 is floored only if the floor came
    before the aspect scale, and 40 is floored either way (to 14 here, 24 if it came first); the square
    24x24 has ||Q||_F = 4.9, floored at 40. The last matrix's gradient rows have norms 1e-9 .. 1e-6, some
    below Aurora's D clamp 1e-7 (with 1e-4 every row would be clamped and none equalized)."""
    gen = torch.Generator().manual_seed(30)
    shapes = [(48, 16), (48, 16), (16, 48), (24, 24), (24, 24), (48, 16)]
    norms = [40.0, 15.0, 40.0, 40.0, 1.0, 1.0]
    weights = []
    for shape, norm in zip(shapes, norms):
        w = torch.randn(*shape, generator=gen)
        weights.append(w * (norm / w.norm()))
    tiny_rows = torch.logspace(-9, -6, 48).unsqueeze(1)
    grads = [[torch.randn(*shape, generator=gen) for shape in shapes] for _ in range(steps)]
    for step_grads in grads:
        step_grads[-1] = step_grads[-1] / step_grads[-1].norm(dim=1, keepdim=True) * tiny_rows
    return weights, grads


def test_aurora_floor_and_clamp_end_to_end():
    """Two Aurora steps against the one-matrix transcription (spec_run): the floor raises matrices 0, 2
    and 3 and leaves 1 (15 < 19.8), 4 and 5 alone; measured difference 7e-9 to 2.4e-7 (one float32 ulp of
    entries near 2-4); tolerance 1e-6 (4x). A floor placed before the aspect scale fails it."""
    cls, settings = RECORD_SETTINGS["aurora"]
    weights, grads = floor_problem()
    params, _ = run_optimizer(cls, settings, weights, grads)
    expected, _ = spec_run("aurora", settings, weights, grads)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
    ratios = [((p.detach() - w).norm() / (settings["lr"] * w.norm())).item() for p, w in zip(params, weights)]
    # First step's ||update|| / ||W||: exactly the floor where it acts (the second step moves W slightly).
    params_one, _ = run_optimizer(cls, settings, weights, grads[:1])
    first = [((p.detach() - w).norm() / (settings["lr"] * w.norm())).item() for p, w in zip(params_one, weights)]
    assert first[0] == pytest.approx(0.35, rel=1e-5) and first[2] == pytest.approx(0.35, rel=1e-5)
    assert first[3] == pytest.approx(0.35, rel=1e-5)
    assert first[1] == pytest.approx(math.sqrt(48) / 15, rel=1e-2)  # not floored: sqrt(48)/15 = 0.46
    assert all(r > 0 for r in ratios)


def test_aurora_floor_reads_the_weights_after_this_steps_decay():
    """With weight_decay > 0 (the record uses 0) the floor compares the update with W as decayed in this
    step, (1 - lr wd) W, as docs/recipes.md#aurora orders it: against spec_run, which decays W before
    everything else. Reading W before its decay moves the floored matrices 0, 2 and 3 by lr * 0.35 *
    ||W|| * lr wd in norm: measured up to 3.4e-4 per entry, against the 1e-6 tolerance."""
    cls, settings = RECORD_SETTINGS["aurora"]
    settings = dict(settings, weight_decay=0.1)
    weights, grads = floor_problem()
    params, _ = run_optimizer(cls, settings, weights, grads)
    expected, _ = spec_run("aurora", settings, weights, grads)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)


def test_aurora_polar_reaches_the_d_clamp():
    """aurora_polar with the exact (SVD) polar, so only its own float32 arithmetic differs from the float64
    transcription: rows of norm 1e-9 .. 1e-6, 32 of 48 under the clamp 1e-7. Measured difference 3.9e-8;
    tolerance 1e-6 (25x). With the clamp at 1e-4 every row gets the same D and entries move by 0.2."""
    G = well_conditioned((48, 16), 31)
    G = G / G.norm(dim=1, keepdim=True) * torch.logspace(-9, -6, 48).unsqueeze(1)
    P = aurora_polar(G, polar_fn=lambda X: svd_polar(X).float())
    expected = aurora_polar_float64(G)
    assert (G.norm(dim=1) < 1e-7).sum() == 32
    assert (P.double() - expected).abs().max() < 1e-6


# ----------------------------------------------------------------------------------------------
# Records #42 and #46's stages, each alone (their chains against the records: tests/test_recipes.py)
# ----------------------------------------------------------------------------------------------

def test_schatten4_norm_is_the_fourth_root_of_the_summed_fourth_powers_of_the_singular_values():
    for shape in SHAPES:
        G = well_conditioned(shape, 21)
        s = torch.linalg.svdvals(G.double())
        assert optimizers.schatten4_norm(G).item() == pytest.approx(s.pow(4).sum().pow(0.25).item(), rel=1e-5)
        assert s.max() <= optimizers.schatten4_norm(G).double() <= G.double().norm() * (1 + 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_schatten_polar_is_the_polar_factor_in_bf16(shape):
    G = well_conditioned(shape, 22)
    P = optimizers.schatten_polar(G)
    assert P.dtype == torch.bfloat16 and P.shape == G.shape
    assert (P.double() - svd_polar(G)).abs().max() < 0.05


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_aurora_polar_schatten_balances_rows_more_than_the_plain_polar(shape):
    G = rows_of_different_scales(shape if shape[0] > shape[1] else shape[::-1], 23)
    G = G if shape[0] > shape[1] else G.T
    plain, balanced = optimizers.schatten_polar(G), optimizers.aurora_polar_schatten(G)
    assert row_norm_deviation(balanced) < 0.5 * row_norm_deviation(plain)
    assert orthogonality_error(balanced) < 0.1


def test_radial_brake_halves_an_outward_radial_step_and_keeps_the_rest():
    W = well_conditioned((16, 8), 24)
    tangent = well_conditioned((16, 8), 25)
    tangent = tangent - (tangent * W).sum() / (W * W).sum() * W  # orthogonal to W
    outward = tangent - 0.3 * W  # W - lr*update grows ||W||
    inward = tangent + 0.3 * W
    torch.testing.assert_close(optimizers.radially_braked(outward, W), tangent - 0.15 * W, rtol=0, atol=1e-6)
    torch.testing.assert_close(optimizers.radially_braked(inward, W), inward, rtol=0, atol=1e-6)


def test_row_floor_lifts_only_the_rows_below_the_floor_to_it():
    W = well_conditioned((12, 6), 26)
    update = well_conditioned((12, 6), 27) * torch.logspace(-3, 0, 12).unsqueeze(1)
    floored = optimizers.row_floored(update, W, 0.3825)
    ratio = floored.norm(dim=1) / W.norm(dim=1)
    below = update.norm(dim=1) / W.norm(dim=1) < 0.3825
    assert below.any() and (~below).any()
    torch.testing.assert_close(ratio[below], torch.full_like(ratio[below], 0.3825), rtol=1e-5, atol=0)
    assert torch.equal(floored[~below], update[~below])


def test_pinned_step_ends_at_the_first_order_radius_and_cautious_decay_touches_only_shrinking_coordinates():
    W = well_conditioned((10, 10), 28)
    update = well_conditioned((10, 10), 29)
    lr = 0.05
    target = W.norm() - lr * (update * W).sum() / W.norm()
    pinned = optimizers.pinned_step_(W.clone(), update, lr)
    assert pinned.norm().item() == pytest.approx(target.item(), rel=1e-6)
    decayed = optimizers.pinned_step_(W.clone(), update, lr, cautious_decay=0.025)
    shrinking = update * W > 0
    assert shrinking.any() and (~shrinking).any()
    torch.testing.assert_close(decayed[shrinking], pinned[shrinking] * (1 - lr * 0.025), rtol=1e-6, atol=0)
    assert torch.equal(decayed[~shrinking], pinned[~shrinking])


@pytest.mark.parametrize("pin", [False, True])
def test_the_step_decays_then_steps_plainly_or_pinned_then_decays_cautiously(pin):
    """The step stage's contract: W *= 1 - lr wd (decoupled, before); then W -= lr update and, with
    cautious_weight_decay, W *= 1 - lr cwd mask with the mask taken before the step (pin=False), or
    pinned_step_ with it (pin=True); the update is the chain's math's (here Muon's polar and aspect)."""
    W0, g = 0.1 * well_conditioned((48, 16), 30), well_conditioned((48, 16), 31)
    lr, wd, cwd = 0.02, 0.1, 0.5
    p = torch.nn.Parameter(W0.clone())
    p.grad = g.clone()
    Muon([p], lr=lr, weight_decay=wd, cautious_weight_decay=cwd, pin=pin).step()
    u = torch.lerp(g, torch.lerp(torch.zeros_like(g), g, 0.05), 0.95)
    update = (polar(u) * math.sqrt(48 / 16)).float()
    W = W0 * (1 - lr * wd)
    if pin:
        expected = optimizers.pinned_step_(W.clone(), update, lr, cwd)
    else:
        shrinking = (update * W > 0).float()
        expected = W.add(update, alpha=-lr) * (1 - lr * cwd * shrinking)
    assert torch.equal(p.detach(), expected)


def test_trust_gate_trusts_an_agreeing_aligned_direction_and_distrusts_an_opposed_one():
    grad = well_conditioned((8, 8), 30)
    raw = grad + 0.1 * well_conditioned((8, 8), 31)
    assert optimizers.trust_gate(raw, raw, grad).item() == pytest.approx(1.0, abs=1e-6)
    assert optimizers.trust_gate(raw, -grad, grad).item() == 0.0
    soap = raw + 2.2 * well_conditioned((8, 8), 32)

    def cos(a, b):
        return ((a * b).sum() / (a.norm() * b.norm())).item()
    expected = min(1, (cos(soap, raw) - 0.2) / 0.8) * min(1, cos(soap, grad) / cos(raw, grad))
    assert 0 < expected < 1
    assert optimizers.trust_gate(raw, soap, grad).item() == pytest.approx(expected, rel=1e-5)
    blended = optimizers.gated_blend(raw, grad, torch.tensor(0.5))
    assert optimizers.schatten4_norm(blended).item() == pytest.approx(optimizers.schatten4_norm(raw).item(), rel=1e-6)


def test_early_trust_bounds_and_contra_ramp_follow_their_schedules():
    assert [optimizers.early_trust_floor(s, 0.45, 1375, 1625) for s in (0, 1374, 1375, 1500, 1625)] == \
        [0.45, 0.45, 0.45, 0.45 * 125 / 250, 0.0]
    assert [optimizers.early_trust_cap(s, 0.85, 1625) for s in (1624, 1625)] == [0.85, 1.0]
    assert [optimizers.contra_coefficient(s, -0.2, 0, 2500) for s in (0, 1250, 2500, 2900)] == [-0.2, -0.1, -0.0, -0.0]


def test_soap_statistics_take_the_eigenbasis_first_then_refresh_every_frequency_calls(monkeypatch):
    refreshed = []
    real = optimizers.soap_refreshed_basis
    monkeypatch.setattr(optimizers, "soap_refreshed_basis", lambda *a: refreshed.append(1) or real(*a))
    state = {"row_gg": torch.zeros(6, 6), "col_gg": torch.zeros(4, 4), "exp_avg_sq": torch.zeros(6, 4), "soap_step": 0}
    for call in range(21):
        optimizers.soap_statistics_update_(state, well_conditioned((6, 4), 40 + call), 0.9, 10)
        if call == 0:
            assert "q_row" in state and not refreshed
            Q = state["q_row"]
            torch.testing.assert_close(Q.T @ Q, torch.eye(6), rtol=0, atol=1e-5)
    assert len(refreshed) == 2 * 2  # at calls 10 and 20, each basis


def test_muon_chain_refuses_non_matrices():
    with pytest.raises(ValueError, match="not a 2-D matrix"):
        optimizers.MuonChain([torch.nn.Parameter(torch.zeros(4))], lr=0.1)


def test_pieces_are_aligned_and_cover_each_tensor_once():
    for numel in (1, 63, 64, 65, 1000, 4097):
        for world in (1, 2, 3, 8):
            ranges = [optimizers.piece_range(numel, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(lo % optimizers.PIECE_ALIGNMENT == 0 for lo, hi in ranges if lo < hi)


def test_reference_readout_subtracts_its_delta_back_rather_than_copying():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096))
    readout = optimizers.ReferenceReadout([p])
    readout.capture()
    with torch.no_grad():
        p.add_(torch.randn(4096) * 0.01)
    before = p.detach().clone()
    delta = (before - readout.reference[0]) * -0.075
    with readout.readout(-0.075):
        assert torch.equal(p.detach(), before + delta)
    assert torch.equal(p.detach(), (before + delta) - delta)
    assert not torch.equal(p.detach(), before)  # some elements come back an ulp off, as in the record


def test_tail_ema_readout_blends_then_restores_exactly():
    """tau 4 and lam 0.25, so that a step the wrong way (ema towards its own start), a readout blending the
    other way round or an EMA started or updated a step late each give another number (all exact in float32)."""
    p = torch.nn.Parameter(torch.ones(8))
    ema = optimizers.TailEMA([p], tau=4.0, lam=0.25)
    ema.update()  # starts at W = 1
    with torch.no_grad():
        p.fill_(3.0)
    ema.update()  # 1 + (3 - 1) / 4
    assert torch.equal(ema.ema[0], torch.full((8,), 1.5))
    with torch.no_grad():
        p.fill_(7.0)
    ema.update()  # 1.5 + (7 - 1.5) / 4
    assert torch.equal(ema.ema[0], torch.full((8,), 2.875))
    with ema.readout():
        assert torch.equal(p.detach(), torch.full((8,), 0.75 * 7.0 + 0.25 * 2.875))
    assert torch.equal(p.detach(), torch.full((8,), 7.0))


def test_ema_nesterov_looks_ahead_along_its_displacement_average():
    """ema 0.75, so that b = lerp(b, displacement, 1 - ema) taken the wrong way (weight ema), or fed the
    previous step's displacement, gives another number; the look-ahead's own move counts in the next
    displacement, as in the records (all exact in float32)."""
    p = torch.nn.Parameter(torch.zeros(3))
    lookahead = optimizers.EMANesterov([p], ema=0.75)
    with torch.no_grad():
        p.add_(1.0)  # a step of +1
    lookahead.accumulate()  # b = lerp(0, 1, 0.25)
    assert torch.equal(lookahead.buffer[0], torch.full((3,), 0.25))
    lookahead.look_ahead(2.0)  # W = 1 + 2 b
    assert torch.equal(p.detach(), torch.full((3,), 1.5))
    with torch.no_grad():
        p.add_(3.0)  # a step of +3 from the looked-ahead weights: W = 4.5, 3.5 from the last accumulate
    lookahead.accumulate()  # b = lerp(0.25, 3.5, 0.25)
    assert torch.equal(lookahead.buffer[0], torch.full((3,), 1.0625))
    assert torch.equal(lookahead.previous[0], torch.full((3,), 4.5))
    lookahead.look_ahead(0.5)
    assert torch.equal(p.detach(), torch.full((3,), 4.5 + 0.5 * 1.0625))


def test_bias_free_adam_takes_no_bias_correction():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = optimizers.BiasFreeAdam([p], lr=0.1, betas=(0.8, 0.99), eps=0.0)
    p.grad = torch.tensor([1.0, -2.0])
    opt.step()
    # m = 0.2 g, v = 0.01 g^2: the step is lr * 0.2 / 0.1 = 2 lr in the direction of -sign(g), not lr
    torch.testing.assert_close(p.detach(), torch.tensor([-0.2, 0.2]), rtol=1e-6, atol=0)
