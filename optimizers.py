"""The matrix optimizer of the five recipes (docs/recipes.md), one chain of small stages, and the record
schedules and weight averages around it.

Use it like any torch.optim optimizer, for the 2-D hidden matrices of a model:

    opt = Aurora(model.blocks.parameters(), lr=0.0375, contra=0.4, uw_floor=0.35)
    loss.backward(); opt.step(); opt.zero_grad()

`MuonChain` is the one class: per matrix, momentum, then optional stages (SOAP, the polar factor or
Aurora's, Contra-Muon, the aspect scale, the NorMuon row normalization, the radial brake, a floor) and
the step (plain with weight decay, or pinned to a radius with cautious decay), each a param-group
option. `Muon`, `NorMuon` and `Aurora` are its configurations for records #36, #10 and #17, with their
own arguments and state_dict keys; records #42 and #46 are MuonChain param groups (train_gpt.RECIPES).
The math is a set of small pure functions; the per-matrix part runs through torch.compile
(TORCH_COMPILE_DISABLE=1 runs it eagerly), on stacks of same-shape matrices.

When a torch.distributed process group is initialized, every matrix has one owner rank (owner_plan:
the costliest first, each to the least loaded rank), which alone keeps its state and computes its
update; the updates are all-gathered and every rank takes the same step. Gradients must already be
summed across ranks (the trainer does that) before step(). Parameters sharded by FSDP2's fully_shard
(DTensors, Shard(0)) are taken as they are: each matrix is assembled on its owner and its update
returns as shards (see the FSDP2 section). Given a `found_inf` tensor, as GradScaler gives fused
AdamW, a step never waits for the device (see MuonChain).

This file imports only the standard library and torch and has no top-level side effects:
train_gpt.py inlines its text into the single-file script that every log carries.
"""

import collections
import contextlib
import difflib
import functools
import sys

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------
# Orthogonalization: odd quintic Newton-Schulz iterations towards the polar factor U V^T.
# --------------------------------------------------------------------------------------------

# (a, b, c) of X <- a X + (b A + c A^2) X with A = X X^T, used 12 times by the records.
REFERENCE_POLAR_COEFFICIENTS = (2.0, -1.5, 0.5)
REFERENCE_POLAR_ITERATIONS = 12

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): one minimax-optimal odd
# quintic per iteration, 5 iterations, computed for a 2% safety margin (cushion 2) as in the
# modded-nanogpt speedrun; the input is therefore scaled by 1 / (1.02 ||X||_F).
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02


def odd_quintic_polar(X, coefficient_schedule, norm_safety=1.0, dtype=torch.bfloat16):
    """Runs X <- a X + (b A + c A^2) X, A = X X^T, once per (a, b, c) of the schedule.

    Works on the last two dims (leading dims are a batch) in `dtype`, on the wide orientation
    (so A is the smaller Gram matrix), after dividing each matrix by norm_safety * ||X||_F + 1e-7.
    """
    X = X.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * norm_safety + 1e-7)
    X = quintic_iterations(X, coefficient_schedule)
    return X.mT if tall else X


def quintic_iterations(X, coefficient_schedule):
    """X <- a X + (b A + c A^2) X with A = X X^T, once per (a, b, c), in X's dtype (X wide, already scaled)."""
    for a, b, c in coefficient_schedule:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X


def polar(X, dtype=torch.bfloat16):
    """The records' polar(X) (docs/recipes.md#polar-factor): 12 reference iterations in bf16; singular
    values -> ~1.

    `dtype`: float32 for Riemannian Aurora's retraction, or a group's polar_dtype (the CPU's float32).
    """
    schedule = (REFERENCE_POLAR_COEFFICIENTS,) * REFERENCE_POLAR_ITERATIONS
    return odd_quintic_polar(X, schedule, 1.0, dtype)


def polar_express(X, dtype=torch.bfloat16):
    """Polar Express (docs/recipes.md#variants): 5 iterations in `dtype` (bf16), each with its own
    coefficients. Not a record default."""
    return odd_quintic_polar(X, POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_SAFETY, dtype)


# --------------------------------------------------------------------------------------------
# Small pieces of the update rules.
# --------------------------------------------------------------------------------------------

def momentum_step_(momenta, grads, momentum):
    """m = lerp(m, g, 1 - mu), in place on lists of buffers (docs/recipes.md)."""
    torch._foreach_lerp_(momenta, grads, 1 - momentum)


def nesterov_direction(grad, momentum_buffer, momentum):
    """Nesterov direction u = lerp(g, m, mu) from the already updated buffer m (docs/recipes.md)."""
    return grad.lerp(momentum_buffer, momentum)


def aspect_scale(rows, cols):
    """sqrt(max(1, rows/cols)): Muon's factor that gives tall updates the RMS of square ones."""
    return max(1.0, rows / cols) ** 0.5


def tall_leverage(P):
    """l_i = ||P_i||^2 over the rows of P in its tall orientation (columns of a wide P), float32."""
    P = P.float()
    return P.square().sum(-1) if P.size(-2) >= P.size(-1) else P.square().sum(-2)


def rows_to_norm(X, norm):
    """X (float32) with every row rescaled to Euclidean norm `norm` (zero rows stay zero)."""
    X = X.float()
    return X * (norm / X.norm(dim=-1, keepdim=True).clamp_min(1e-10))


def normuon_normalize(O, second_moment, beta2):
    """NorMuon (docs/recipes.md#normuon): row (rows >= cols) or column second-moment normalization of the
    scaled orthogonal update O, keeping its Frobenius norm. Returns (normalized O, new second moment).

    Everything but the float32 second moment stays in O's dtype, as in record #10: for the bf16 polar
    factor the norms, the mean squares, the scale and the result are all bf16-rounded."""
    f = O.norm(dim=(-2, -1), keepdim=True)
    reduce_dim = -1 if O.size(-2) >= O.size(-1) else -2
    mean_square = (O * O).mean(dim=reduce_dim, keepdim=True)
    second_moment = second_moment.lerp(mean_square.to(second_moment.dtype), 1 - beta2)
    O = O * second_moment.clamp_min(1e-10).rsqrt().to(O.dtype)
    return O * (f / O.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)), second_moment


def u_normuon_tall(P):
    """U-NorMuon (docs/recipes.md#variants) for a tall polar factor P (m x n): every row at norm sqrt(n/m), i.e.
    uniform leverage; this replaces both the aspect factor and the second-moment normalization."""
    return rows_to_norm(P, (P.size(-1) / P.size(-2)) ** 0.5)


def top_singular_value(U, rounds=5):
    """sigma_max of each matrix (float32) by power iteration on U^T U from the normalized all-ones
    vector, sigma = ||U v||; shape (..., 1, 1).

    The matrix-vector products are written as multiply-and-sum because torch.matmul sends a batch
    of one to a different kernel (other rounding), which would make a rank's result depend on how
    many matrices it was given.
    """
    U = U.float()
    v = torch.ones(*U.shape[:-2], 1, U.size(-1), dtype=U.dtype, device=U.device)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-10)
    for _ in range(rounds):
        Uv = (U * v).sum(-1, keepdim=True)
        v = (U * Uv).sum(-2, keepdim=True)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-10)
    return (U * v).sum(-1, keepdim=True).norm(dim=(-2, -1), keepdim=True)


def contra_direction(U):
    """Contra-Muon direction g = u / sigma_max(u), float32 (Aurora step 1)."""
    return U.float() / top_singular_value(U).clamp_min(1e-10)


def contra_mix(P, g, contra):
    """Aurora step 3: Q = P - (c/2) g (float32), rescaled back to ||P||_F. The norm f is taken in P's own
    dtype, as in the record: for the bf16 polar factor, f is bf16-rounded."""
    f = P.norm(dim=(-2, -1), keepdim=True)
    Q = P.float() - (contra / 2) * g
    return Q * f / Q.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)


def uw_floor(Q, W, floor):
    """Aurora step 5: scales Q up so that ||Q||_F / ||W||_F is at least `floor`."""
    w = W.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    q = Q.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    return torch.where(q / w < floor, Q * (floor * w / q), Q)  # the scale first, as the record rounds it


# --------------------------------------------------------------------------------------------
# Aurora's polar factor with uniform leverage: vanilla (the record) and Riemannian (docs/recipes.md#variants).
# --------------------------------------------------------------------------------------------

def aurora_polar(G, pp_iterations=2, pp_beta=0.5, polar_fn=None, dtype=torch.bfloat16):
    """Aurora step 2 (docs/recipes.md#aurora): an orthogonal P whose tall-orientation rows have norm ~sqrt(n/m).

    Square G: polar(G). Otherwise, on the tall orientation U (m x n, float32), row-rescale
    D = 1/||U_i||, then repeat P = polar(D U) and D *= ((n/m) / ||P_i||^2)^pp_beta.
    A wide G gives exactly the transpose of the result for G^T. polar_fn: the polar it balances (default:
    polar in `dtype`).
    """
    if polar_fn is None:
        polar_fn = functools.partial(polar, dtype=dtype)
    if G.size(-2) == G.size(-1):
        return polar_fn(G)
    wide = G.size(-2) < G.size(-1)
    U = (G.mT if wide else G).float()
    target_leverage = U.size(-1) / U.size(-2)
    D = 1 / U.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    for k in range(1, pp_iterations + 1):
        P = polar_fn(D * U)
        if k < pp_iterations:
            leverage = P.float().square().sum(-1, keepdim=True)
            D = D * (target_leverage / leverage.clamp_min(1e-14)) ** pp_beta
    return P.mT if wide else P


def schatten4_norm(G, keepdim=False, eps=1e-10):
    """(sum_i s_i^4)^(1/4) of each matrix, as ||G^T G||_F^(1/2) from the smaller Gram matrix in float32,
    at least eps (docs/recipes.md#schatten-4-pre-norm). It lies between the spectral and the Frobenius
    norm, and far closer to the spectral one when a few directions dominate."""
    X = G.float()
    gram = X.mT @ X if X.size(-2) > X.size(-1) else X @ X.mT
    return gram.norm(dim=(-2, -1), keepdim=keepdim).sqrt().clamp_min(eps)


def schatten_polar(G, dtype=torch.bfloat16):
    """Records #42 and #46's polar(G) (docs/recipes.md#schatten-4-pre-norm): polar's 12 bf16 iterations on
    the wide orientation, after dividing by the Schatten-4 norm (eps 1e-7, rounded to bf16) instead of
    the Frobenius norm, so the largest singular value starts nearer 1. `dtype`: the iterations' (bf16)."""
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / schatten4_norm(X, keepdim=True, eps=1e-7).to(X.dtype)
    X = quintic_iterations(X, (REFERENCE_POLAR_COEFFICIENTS,) * REFERENCE_POLAR_ITERATIONS)
    return X.mT if tall else X


def aurora_polar_schatten(G, iterations=3, beta=0.25, eps=1e-7, dtype=torch.bfloat16):
    """Aurora's row-balanced polar factor in record #42's form (docs/recipes.md#aurora-in-record-42): on the
    tall orientation T (m x n) of bf16(G), D = 1/||T_i||, then `iterations` times P = schatten_polar-style
    polar of bf16(D T) (each pass on its own Schatten-4 pre-norm) and, between passes,
    D *= ((n/m) / ||P_i||^2)^beta. Square G: schatten_polar(G). `dtype`: the polars' (bf16)."""
    if G.size(-2) == G.size(-1):
        return schatten_polar(G, dtype)
    wide = G.size(-2) < G.size(-1)
    T = G.to(dtype).mT if wide else G.to(dtype)
    T32 = T.float()
    target_leverage = T.size(-1) / T.size(-2)
    D = 1.0 / T32.norm(dim=-1, keepdim=True).clamp_(min=eps)
    for k in range(iterations):
        S = (D * T32).to(T.dtype).mT
        S = S / schatten4_norm(S, keepdim=True, eps=eps).to(S.dtype)
        P = quintic_iterations(S, (REFERENCE_POLAR_COEFFICIENTS,) * REFERENCE_POLAR_ITERATIONS).mT
        if k < iterations - 1:
            leverage = P.float().pow(2).sum(dim=-1, keepdim=True).clamp_(min=eps * eps)
            D = D * (target_leverage / leverage).pow(beta)
    return P.mT if wide else P



# The orthogonal factors a matrix optimizer can take (its group's polar_backend): the plain polars, and
# Aurora's row-balanced ones in record #17's form (aurora_polar) and record #42's (aurora_polar_schatten),
# which --aurora puts in place of a plain polar.
POLAR_BACKENDS = {"polar": polar, "polar_express": polar_express, "schatten": schatten_polar,
                  "aurora": aurora_polar, "aurora_schatten": aurora_polar_schatten}
AURORA_PASSES = {"aurora": 2, "aurora_schatten": 3}  # polars per non-square matrix, at the defaults


def polar_backend_flops(backend, rows, cols):
    """Matmul FLOPs of one backend call on a rows x cols matrix (Aurora's: one polar per pass)."""
    iterations = len(POLAR_EXPRESS_COEFFICIENTS) if backend == "polar_express" else REFERENCE_POLAR_ITERATIONS
    passes = AURORA_PASSES.get(backend, 1) if rows != cols else 1
    return passes * polar_flops(rows, cols, iterations)

def stiefel_tangent(P, Z):
    """Projection of Z onto the tangent space of {P^T P = I} at P: Z - P sym(P^T Z)."""
    S = P.mT @ Z
    return Z - P @ ((S + S.mT) / 2)


def row_gram_square_times(P, lam):
    """((P P^T) o (P P^T)) lam without forming the m x m matrix: row-wise P_i^T (P^T diag(lam) P) P_i."""
    M = P.mT @ (lam.unsqueeze(-1) * P)
    return ((P @ M) * P).sum(-1)


def row_multipliers(P, q, iterations, tolerance=1e-10):
    """Per-row Lagrange multipliers lam of the row-norm constraints: conjugate gradient on
    (diag(||P_i||^2) - (P P^T) o (P P^T)) lam = q (positive semi-definite; q is consistent).

    A matrix stops updating once its squared residual falls below tolerance times the initial
    one: past that point float32 rounding feeds the null space (the all-ones vector) and CG
    diverges (seen on 768x192 after 6 iterations)."""
    row_norms = P.square().sum(-1)

    def apply(lam):
        return row_norms * lam - row_gram_square_times(P, lam)

    lam = torch.zeros_like(q)
    residual = q
    direction = residual
    rr = (residual * residual).sum(-1, keepdim=True)
    threshold = tolerance * rr
    for _ in range(iterations):
        Ad = apply(direction)
        curvature = (direction * Ad).sum(-1, keepdim=True)
        active = rr > threshold
        alpha = torch.where(active & (curvature > 0), rr / curvature, torch.zeros_like(rr))
        lam = lam + alpha * direction
        residual = residual - alpha * Ad
        rr_next = (residual * residual).sum(-1, keepdim=True)
        direction = residual + torch.where(active, rr_next / rr, torch.zeros_like(rr)) * direction
        rr = rr_next
    return lam


def constrained_tangent(P, G, cg_iterations):
    """Projection of G onto the tangent space of {P^T P = I, ||P_i||^2 = n/m} at P:
    xi = T(G - diag(lam) P) with T the Stiefel projection and lam chosen so <xi_i, P_i> = 0."""
    S = stiefel_tangent(P, G)
    lam = row_multipliers(P, (S * P).sum(-1), cg_iterations)
    return S - stiefel_tangent(P, lam.unsqueeze(-1) * P)


def retract_uniform_leverage(P, rounds, over_relaxation=1.5):
    """Alternates an over-relaxed row rescaling towards norm sqrt(n/m) (each row times
    (sqrt(n/m) / ||P_i||)^1.5) and a float32 polar, ending orthogonal.

    Plain alternation (exponent 1) stalls on ill-conditioned, nearly square inputs (a 32x24 with
    condition number 3600 kept 15% row error after 4 ascent steps); 1.5 reached 0.2%."""
    row_norm = (P.size(-1) / P.size(-2)) ** 0.5
    for _ in range(rounds):
        scale = row_norm / P.norm(dim=-1, keepdim=True).clamp_min(1e-10)
        P = polar(P * scale ** over_relaxation, dtype=torch.float32)
    return P


def riemannian_aurora_polar(G, ascent_steps=4, cg_iterations=10, retraction_rounds=6, dtype=torch.bfloat16):
    """Riemannian Aurora (docs/recipes.md#variants): maximizes <G, P> over P^T P = I with every
    tall-orientation row at norm^2 n/m, by projected Riemannian ascent from polar(G), in float32.

    The step length is 0.5 / (RMS singular value of G): a full 1 / RMS overshoots and the
    objective falls again after two steps; 0.5 raises it monotonically (measured on 48x16 to 192x48).
    Square G: polar(G) (orthogonal rows already have norm 1). Wide G: transpose of the tall case.
    Cost: 5 retractions of 6 float32 polars each; a whole Aurora step measured 22x vanilla's on a
    CPU at width 192 (benchmarks/optimizer_step.py --riemannian). `dtype`: the first polar's (bf16).
    """
    if G.size(-2) == G.size(-1):
        return polar(G, dtype)
    wide = G.size(-2) < G.size(-1)
    U = (G.mT if wide else G).float()
    step = 0.5 * U.size(-1) ** 0.5 / U.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    P = retract_uniform_leverage(polar(U, dtype).float(), retraction_rounds)
    for _ in range(ascent_steps):
        xi = constrained_tangent(P, U, cg_iterations)
        P = retract_uniform_leverage(P + step * xi, retraction_rounds)
    return P.mT if wide else P


# --------------------------------------------------------------------------------------------
# The stages of records #42 and #46 (docs/recipes.md#soap-muon), each written with the record's operations
# in the record's order and dtypes so that one matrix's result is the record's bit for bit; those of the
# chain's math (soap_precondition to row_floored) also take a stack, each matrix reduced on its own.
# --------------------------------------------------------------------------------------------

def soap_eigenbasis(gram):
    """Eigenvectors of a symmetric PSD Gram matrix, largest eigenvalue first (float32; eigh in float64
    where float32 fails to converge). The 1e-30 on the diagonal is the record's."""
    eye = torch.eye(gram.size(0), device=gram.device)
    try:
        _, vectors = torch.linalg.eigh(gram + 1e-30 * eye)
    except RuntimeError:
        _, vectors = torch.linalg.eigh(gram.double() + 1e-30 * eye)
        vectors = vectors.float()
    return torch.flip(vectors, [1])


def soap_refreshed_basis(gram, basis, exp_avg_sq, dim):
    """One refresh of a SOAP basis (Vyas et al. 2024, arXiv:2409.11321, Algorithm 4): the basis vectors
    sorted by their Rayleigh quotient (largest first, exp_avg_sq's `dim` permuted alike), then one
    power-iteration step with a QR re-orthonormalization. Returns (basis, exp_avg_sq)."""
    order = torch.argsort(torch.diag(basis.T @ gram @ basis), descending=True)
    basis = basis[:, order]
    exp_avg_sq = exp_avg_sq.index_select(dim, order)
    basis, _ = torch.linalg.qr(gram @ basis)
    return basis, exp_avg_sq


def soap_statistics_update_(state, grad, beta, frequency):
    """After the step: the Gram EMAs G G^T and G^T G of the raw gradient, the eigenbasis at the first call,
    a refreshed basis every `frequency` calls after it (in place on `state`)."""
    g = grad.float()
    state["row_gg"].lerp_(g @ g.T, 1 - beta)
    state["col_gg"].lerp_(g.T @ g, 1 - beta)
    if "q_row" not in state:
        state["q_row"] = soap_eigenbasis(state["row_gg"])
        state["q_col"] = soap_eigenbasis(state["col_gg"])
    elif state["soap_step"] > 0 and state["soap_step"] % frequency == 0:
        state["q_row"], state["exp_avg_sq"] = soap_refreshed_basis(state["row_gg"], state["q_row"],
                                                                   state["exp_avg_sq"], 0)
        state["q_col"], state["exp_avg_sq"] = soap_refreshed_basis(state["col_gg"], state["q_col"],
                                                                   state["exp_avg_sq"], 1)
    state["soap_step"] += 1


def soap_precondition(u, q_row, q_col, exp_avg_sq, beta2, denom_power=0.5, blend=1.0, denom_floor=0.0,
                      eps=1e-8):
    """SOAP's Adam in the Gram eigenbases (docs/recipes.md#soap): project u, update the second moment there,
    divide by its `denom_power` power (optionally floored at denom_floor x its RMS), project back, mix with u
    (blend < 1), rescaled to u's Schatten-4 norm. Returns (preconditioned u in u's dtype, new exp_avg_sq)."""
    u_f = u.float()
    projected = q_row.mT @ u_f @ q_col
    exp_avg_sq = exp_avg_sq.mul(beta2).add(projected.square(), alpha=1 - beta2)
    denom = exp_avg_sq.clamp_min(eps * eps).pow(denom_power)
    if denom_floor > 0:
        floor = denom.float().square().mean(dim=(-2, -1), keepdim=True).sqrt().mul(denom_floor).clamp_min(eps)
        denom = denom.clamp_min(floor.to(denom.dtype))
    preconditioned = q_row @ (projected / denom) @ q_col.mT
    if blend != 1.0:
        preconditioned = blend * preconditioned + (1 - blend) * u_f
    preconditioned = preconditioned * (schatten4_norm(u_f, keepdim=True, eps=eps) /
                                       schatten4_norm(preconditioned, keepdim=True, eps=eps))
    return preconditioned.to(u.dtype), exp_avg_sq


def rescaled_to_schatten_norm_of(x, reference, eps=1e-8):
    """x scaled to the Schatten-4 norm of `reference`, in reference's dtype (record #42's V blend)."""
    ratio = schatten4_norm(reference, keepdim=True, eps=eps) / schatten4_norm(x, keepdim=True, eps=eps)
    return (x * ratio.to(x.dtype)).to(reference.dtype)


def cosine_similarity(a, b, eps=1e-8):
    """<a, b> / (||a|| ||b||) over all entries of each matrix, float32."""
    a, b = a.float(), b.float()
    dims = dict(dim=(-2, -1), keepdim=True)
    return (a * b).sum(**dims) / (a.norm(**dims) * b.norm(**dims)).clamp_min(eps)


def trust_gate(raw, preconditioned, grad, min_agree=0.20, min_grad_align=0.0, power=1.0, eps=1e-8):
    """How far to trust SOAP's direction over the raw momentum (record #46, docs/recipes.md#trust-gate): 1
    when it still agrees with the raw momentum (cosine above min_agree) and is at least as aligned with
    the gradient, falling linearly to 0 as either fails; a float32 in [0, 1] per matrix."""
    raw_grad = cosine_similarity(raw, grad, eps)
    soap_grad = cosine_similarity(preconditioned, grad, eps)
    soap_raw = cosine_similarity(preconditioned, raw, eps)
    agreement = ((soap_raw - min_agree) / (1 - min_agree)).clamp(0, 1)
    alignment = ((soap_grad - min_grad_align) / (raw_grad - min_grad_align).clamp_min(eps)).clamp(0, 1)
    gate = (agreement * alignment).clamp(0, 1)
    return gate.pow(power) if power != 1.0 else gate


def gated_blend(raw, preconditioned, gate, eps=1e-8):
    """raw + gate (preconditioned - raw), rescaled to raw's Schatten-4 norm, in raw's dtype."""
    blended = raw + (preconditioned - raw) * gate.to(raw.dtype)
    ratio = schatten4_norm(raw, keepdim=True, eps=eps) / schatten4_norm(blended, keepdim=True, eps=eps)
    return (blended * ratio.to(blended.dtype)).to(raw.dtype)


def contra_combined(P, u, contra):
    """Record #42's Contra-Muon term (docs/recipes.md#contra-muon-ramp): P + c u / ||u||_S4, rescaled to P's
    Schatten-4 norm (float32)."""
    direction = u / schatten4_norm(u, keepdim=True).to(u.dtype)
    Q = P + contra * direction
    return Q * schatten4_norm(P, keepdim=True) / schatten4_norm(Q, keepdim=True)


def row_variance_normalized(Q, second_moment, beta2):
    """Record #42's NorMuon-lite: Q times rsqrt of a running mean square per row (rows >= cols) or column,
    rescaled to its Schatten-4 norm. Returns (Q, new second moment). With beta2 = 1, the record's value,
    the moment stays 0 and only the rescaling's rounding remains."""
    mean_square = (Q * Q).mean(dim=-1 if Q.size(-2) >= Q.size(-1) else -2, keepdim=True)
    second_moment = second_moment.lerp(mean_square.float(), 1 - beta2)
    before = schatten4_norm(Q, keepdim=True)
    Q = Q * second_moment.clamp_min(1e-10).rsqrt().to(Q.dtype)
    return Q * (before / schatten4_norm(Q, keepdim=True)), second_moment


def radially_braked(update, W, outward=0.5, inward=1.0, eps=1e-12):
    """The radial brake (docs/recipes.md#radial-brake-and-radius-pin): the update's component along W scaled
    by `outward` when the step W - lr*update grows ||W|| and by `inward` when it shrinks it."""
    u, w = update.float(), W.float()
    coefficient = (u * w).sum(dim=(-2, -1), keepdim=True) / (w * w).sum(dim=(-2, -1), keepdim=True).clamp_min(eps)
    radial = coefficient * w
    scale = torch.where(coefficient < 0, u.new_tensor(outward), u.new_tensor(inward))
    return (u - radial + scale * radial).to(update.dtype)


def row_floored(update, W, floor, rho=1.0):
    """RowFloor (record #46): every row whose update norm is below floor x its weight row's norm is lifted to
    it (rho = 1; other rho raise the factor to that power)."""
    w_rows = W.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    u_rows = update.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    factor = torch.clamp(floor * w_rows / u_rows, min=1.0).pow(rho)
    return (update.float() * factor).to(update.dtype)


def norm_after_radial_step(W, update, lr, eps=1e-8):
    """The radius pin's target: ||W|| plus the first-order change of the step's radial part."""
    w, u = W.float(), update.float()
    before = w.norm().clamp_min(eps)
    return (before + -lr * (u * w).sum() / before).clamp_min(eps)


def cautious_mask(update, W):
    """1 where the step W - lr*update shrinks |W| (update and W of one sign), in W's dtype."""
    return (update.float() * W.float() > 0).to(W.dtype)


def radius_pin_scale(W, update, lr):
    """The radius pin's factor: its target norm over ||W - lr * update|| (float32, 0-d)."""
    target = norm_after_radial_step(W, update, lr)
    return target / W.add(update, alpha=-lr).float().norm().clamp_min(1e-8)


def pinned_step_(W, update, lr, cautious_decay=0.0, scale=None):
    """W -= lr * update, then W times the radius pin's scale (radius_pin_scale of W and update, or `scale`
    where the owner of an FSDP2 matrix computed it on the whole matrix), then cautious weight decay
    W *= 1 - lr*wd*mask with the mask taken before the step (after the pin, so the pin does not undo its
    shape), in place."""
    scale = radius_pin_scale(W, update, lr) if scale is None else scale
    mask = cautious_mask(update, W) if cautious_decay > 0 else None
    W.add_(update, alpha=-lr)
    W.mul_(scale.to(W.dtype))
    if mask is not None:
        W.mul_(1.0 - (lr * cautious_decay) * mask)
    return W


# --------------------------------------------------------------------------------------------
# The chain's math (docs/recipes.md#the-chain): one matrix's direction u -> its update, every stage of
# every recipe in one order. It takes one matrix (2-D) or a stack of same-shape ones (3-D, each reduced
# over its own last two dims). Learning rate, momentum and weight decay are applied outside, and the
# scheduled values come in as 0-d tensors, so that scheduling them never recompiles.
# --------------------------------------------------------------------------------------------

POLAR_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SOAP_COMBINES = ("replace", "rescale", "gate", "trust_gate")
AURORA_VARIANTS = ("vanilla", "riemannian")
# Which matrices get Aurora's polar factor: every non-square one (record #17), only tall ones (the
# shape the Aurora authors designed it for), only wide ones (entries that apply it to the wide
# mlp.proj alone) or none (the group's polar_backend as it is: how --aurora picks matrices by name).
# The others get the group's polar; square matrices get it either way.
AURORA_ORIENTATIONS = ("non_square", "tall", "wide", "none")


def takes_aurora_polar(orientation, rows, cols):
    """Whether the orientation policy gives a rows x cols matrix Aurora's polar factor."""
    if orientation == "tall":
        return rows >= cols
    if orientation == "wide":
        return rows <= cols
    return orientation == "non_square"


def polar_stage(u, options):
    """P: the group's polar backend in its polar_dtype, or Aurora's row-balanced polar (record #17's form
    over that backend, or the Riemannian variant) where the orientation policy gives it."""
    dtype = POLAR_DTYPES[options["polar_dtype"]]
    backend = POLAR_BACKENDS[options["polar_backend"]]
    if not takes_aurora_polar(options["orientation"], u.size(-2), u.size(-1)):
        return backend(u, dtype=dtype)
    if options["variant"] == "riemannian":
        return riemannian_aurora_polar(u, dtype=dtype)
    return aurora_polar(u, options["pp_iterations"], options["pp_beta"], functools.partial(backend, dtype=dtype))


def soap_stage(u, grad, state, options, scalars):
    """SOAP's preconditioned u (u itself before the first eigenbasis), combined with u by soap_combine
    ("replace"; "rescale": record #42's V; "gate": gate 1; "trust_gate": record #46's attention output,
    the gate clamped to [trust_floor, trust_cap]). Returns (u, new exp_avg_sq or None)."""
    soap = options["soap"]
    preconditioned, exp_avg_sq = u, None
    if "q_row" in state:
        preconditioned, exp_avg_sq = soap_precondition(
            u, state["q_row"], state["q_col"], state["exp_avg_sq"], soap["beta2"], soap["denom_power"],
            soap.get("blend", 1.0), soap.get("denom_floor", 0.0))
    combine = options["soap_combine"]
    if combine == "rescale":
        preconditioned = rescaled_to_schatten_norm_of(preconditioned, u)
    elif combine == "gate":
        preconditioned = gated_blend(u, preconditioned, torch.ones((), dtype=torch.float32, device=u.device))
    elif combine == "trust_gate":
        gate = trust_gate(u, preconditioned, grad, **options["trust"])
        preconditioned = gated_blend(u, preconditioned, gate.clamp(min=scalars["trust_floor"], max=scalars["trust_cap"]))
    return preconditioned, exp_avg_sq


def chain_update(options, u, grad, W, state, scalars):
    """The update of one matrix (or a stack) from its direction u, the stages in order:

        soap:          u <- soap_stage(u)                        (options["soap"] not None)
        polar:         P = polar_stage(u)
        contra:        P <- contra_combined(P, u, contra)        (contra_muon: record #42's form)
                       P <- contra_mix(P, g(u), contra)          (contra != 0: record #17's)
        aspect:        P <- P sqrt(max(1, rows/cols))            (u_normuon, tall: rows at sqrt(n/m) instead)
        normalization: P <- normuon_normalize(P)                 (beta2: record #10's)
                       P <- row_variance_normalized(P)           (normuon_beta2: record #42's)
        radial_brake:  P <- radially_braked(P, W, outward, inward)
        floor:         ("scalar", f): uw_floor(P, W, f); ("row", f, rho): row_floored

    options: the group's static options (static_options); grad: the gradient (read by the trust gate);
    W: the weights after this step's decay (read by the brake and the floors); state: the stacked state
    the stages read; scalars: contra, trust_floor and trust_cap as 0-d tensors. Returns (update in
    float32, {state name: new value}, leverage of P or None for a square matrix)."""
    new_state = {}
    if options["soap"] is not None:
        u, exp_avg_sq = soap_stage(u, grad, state, options, scalars)
        if exp_avg_sq is not None:
            new_state["exp_avg_sq"] = exp_avg_sq
    P = polar_stage(u, options)
    update = P
    if options["contra_muon"]:
        update = contra_combined(P, u, scalars["contra"])
    elif options["contra_mix"]:  # with c = 0 step 3 is the identity up to rounding
        update = contra_mix(P, contra_direction(u), scalars["contra"])
    rows, cols = u.size(-2), u.size(-1)
    if options["u_normuon"] and rows > cols:
        update = u_normuon_tall(update)
    else:
        update = update * aspect_scale(rows, cols)
        if options["beta2"] is not None:
            update, new_state["second_moment"] = normuon_normalize(update, state["second_moment"], options["beta2"])
        elif options["normuon_beta2"] is not None:
            update, new_state["second_moment"] = row_variance_normalized(update, state["second_moment"],
                                                                         options["normuon_beta2"])
    if options["radial_brake"] is not None:
        update = radially_braked(update, W, *options["radial_brake"])
    floor = options["floor"]
    if floor is not None and floor[0] == "scalar":
        update = uw_floor(update, W, floor[1])
    elif floor is not None:
        update = row_floored(update, W, *floor[1:])
    return update.float(), new_state, None if rows == cols else tall_leverage(P)


# --------------------------------------------------------------------------------------------
# The work split: which rank computes which matrix (owner_plan; it replaced the bucketed slices, rank r
# taking the r-th block of every bucket, which left record #42's busiest rank 28% over the mean) and which
# matrices share an all-gather (bucket_plan). Pure functions of the shapes and costs, so the work per
# rank can be counted without starting any rank.
# --------------------------------------------------------------------------------------------

def bucket_plan(shapes, join_transposes=True):
    """Buckets of matrix indices (into `shapes`): each bucket's updates travel in one collective. A bucket
    holds the matrices of one shape in order and, with join_transposes, then the wide matrices whose
    transpose has that shape (the same number of elements: one row width in the all-gather). Every matrix
    is still updated in its own orientation, so the bucketing changes no number."""
    buckets = {}
    for index, (rows, cols) in enumerate(shapes):
        key = (max(rows, cols), min(rows, cols)) if join_transposes else (rows, cols)
        buckets.setdefault(key, []).append(index)
    return [sorted(bucket, key=lambda i: shapes[i][0] < shapes[i][1]) for bucket in buckets.values()]


def owner_plan(costs, world_size):
    """The owner rank of each matrix: the costliest first, each to the rank with the least work so far
    (the lowest rank on a tie), so that every rank ends with about 1/world_size of the work."""
    loads = [0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owners[index] = min(range(world_size), key=lambda r: (loads[r], r))
        loads[owners[index]] += costs[index]
    return owners


def polar_flops(rows, cols, iterations):
    """Matmul FLOPs of one odd-quintic polar, on the wide orientation n x N (n <= N): per iteration
    A = X X^T (2 n^2 N), A A (2 n^3) and B X (2 n^2 N)."""
    n, N = min(rows, cols), max(rows, cols)
    return iterations * (4 * n * n * N + 2 * n ** 3)


def soap_flops(rows, cols, frequency):
    """Matmul FLOPs of SOAP on one rows x cols matrix per step: the projections into and out of the
    bases, the two Gram products and, amortized over `frequency` steps, a refresh of each basis (the
    Rayleigh quotients as two k x k products, one product with the Gram matrix, a QR counted as 4/3 k^3;
    the first step's eigendecompositions are not counted)."""
    m, n = rows, cols
    projections = 2 * (2 * m * m * n + 2 * m * n * n)
    grams = 2 * m * m * n + 2 * m * n * n
    refresh = sum(3 * 2 * k ** 3 + 4 * k ** 3 // 3 for k in (m, n))
    return projections + grams + refresh // frequency


def chain_flops(group, rows, cols):
    """Matmul FLOPs of one matrix's update in a param group: its polar factor(s) and SOAP's products (the
    Riemannian variant's extra float32 work is not counted)."""
    if takes_aurora_polar(group["orientation"], rows, cols):
        polars = 1 if rows == cols else group["pp_iterations"]
        flops = polars * polar_backend_flops(group["polar_backend"], rows, cols)
    else:
        flops = polar_backend_flops(group["polar_backend"], rows, cols)
    if group["soap"] is not None:
        flops += soap_flops(rows, cols, group["soap"]["frequency"])
    return flops


# --------------------------------------------------------------------------------------------
# Ranks: the all-gather of replicated matrices' updates, and FSDP2's pieces. A DTensor parameter
# (Shard(0) on a 1-D mesh over all ranks) holds a block of rows of its matrix on every rank. One
# all-to-all brings each owner every rank's rows of its matrices' gradients (and weights, where a stage
# or the pin reads them); the owner runs the same math as for replicated matrices; a second all-to-all
# returns every rank its rows of the update, its piece of the leverage and the step's scalars. An
# all-to-all moves the same bytes as a gather to each owner plus a scatter back, in 2 collectives per
# bucket instead of 2 per matrix, with every rank's link busy at once.
# --------------------------------------------------------------------------------------------

def closure_loss(closure):
    """torch.optim's closure protocol: the loss the closure returns, computed with grad enabled (None without one)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def rank_and_world_size():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_from_ranks(chunk, world_size):
    """Starts an all-gather of each rank's (share, F) chunk into (world * share, F)."""
    out = chunk.new_empty(world_size * chunk.size(0), *chunk.shape[1:])
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return out, gather(out, chunk, async_op=True)


def all_finite(tensors):
    """Device bool: no tensor holds inf or NaN (by one fused norm per tensor; a norm beyond the
    float32 range also counts as not finite)."""
    return torch.stack(torch._foreach_norm(tensors)).isfinite().all()


def is_dtensor(t):
    """isinstance(t, DTensor), without importing DTensor where nothing has (no tensor can be one then): the
    import, with sympy, costs every process 0.7 s. Where one exists, torch.distributed.tensor is loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def shard_sizes(length, world_size):
    """Lengths of the pieces Shard(d) gives ranks 0..world_size-1 of a dim of `length`
    (torch.chunk's split: ceil(length / world_size) each, trailing ranks may get less or none)."""
    chunk = -(-length // world_size)
    return [max(0, min(chunk, length - r * chunk)) for r in range(world_size)]


def local_shape(shape, rank, world_size):
    """Shape of `rank`'s piece of a tensor of `shape` sharded along dim 0."""
    return (shard_sizes(shape[0], world_size)[rank], *shape[1:])


def rank_piece(t, rank, world_size):
    """`rank`'s piece (a view) of the full tensor t sharded along dim 0."""
    sizes = shard_sizes(t.size(0), world_size)
    return t.narrow(0, sum(sizes[:rank]), sizes[rank])


def unsupported_placement(p):
    """Why the DTensor p cannot be assembled on an owner rank, or None."""
    mesh = p.device_mesh
    if mesh.ndim != 1:
        return (f"has placements {tuple(p.placements)!r} on a {mesh.ndim}-D mesh: only 1-D meshes are "
                f"supported (fully_shard over one mesh dimension, no HSDP)")
    if tuple(p.placements) != (torch.distributed.tensor.Shard(0),):
        return (f"has placement {p.placements[0]!r}: only Shard(0), fully_shard's default, is supported "
                f"(a shard_placement_fn choosing another placement is not)")
    if mesh.mesh.tolist() != list(range(dist.get_world_size())):
        return (f"is sharded over ranks {mesh.mesh.tolist()}: the matrices are split across all "
                f"{dist.get_world_size()} ranks of the default process group, so the mesh must hold them all, in order")
    return None


def local_tensor(t):
    """The tensor a step writes into: t itself, or this rank's rows of a DTensor t."""
    return t.to_local() if is_dtensor(t) else t


def start_exchange(send, layouts, like, group):
    """Starts an all-to-all of float32 pieces: send[r] are the tensors for rank r, layouts[s] the (shape,
    dtype) of each tensor that comes from rank s, in order. Returns a callable that waits and returns, per
    source rank, the received tensors in their shapes and dtypes."""
    flat = [t.reshape(-1).float() for tensors in send for t in tensors]
    send_buffer = torch.cat(flat) if flat else like.new_zeros(0, dtype=torch.float32)
    sizes = [[torch.Size(shape).numel() for shape, _ in layout] for layout in layouts]
    received = like.new_empty(sum(map(sum, sizes)), dtype=torch.float32)
    work = dist.all_to_all_single(received, send_buffer, output_split_sizes=[sum(s) for s in sizes],
                                  input_split_sizes=[sum(t.numel() for t in tensors) for tensors in send],
                                  group=group, async_op=True)

    def finish():
        work.wait()
        pieces = received.split([sum(s) for s in sizes])
        return [[t.view(shape).to(dtype) for t, (shape, dtype) in zip(piece.split(s), layout)]
                for piece, s, layout in zip(pieces, sizes, layouts)]
    return finish


def start_gather(bucket, owners, results, matrices):
    """Starts the all-gather of a bucket's results: rank r sends one row per matrix it owns there (update,
    leverage, scalars; float32, padded to the most any rank owns). Returns a callable that waits and
    returns {index: (update, leverage or None, scalars)} for every matrix of the bucket."""
    rank, world_size = rank_and_world_size()
    by_rank = [[i for i in bucket if owners[i] == r] for r in range(world_size)]
    share = max(len(owned) for owned in by_rank)
    rows, cols = matrices[bucket[0]][1].shape
    widths = [rows * cols, max(rows, cols) if rows != cols else 0, 2]
    chunk = torch.zeros(share, sum(widths), device=matrices[bucket[0]][1].device)
    for row, i in enumerate(by_rank[rank]):
        update, leverage, scalars = results[i]
        chunk[row] = torch.cat([update.reshape(-1)] + ([leverage] if leverage is not None else []) + [scalars])
    gathered, work = gather_from_ranks(chunk, world_size)

    def finish():
        work.wait()
        delivered = {}
        for r, owned in enumerate(by_rank):
            for row, i in enumerate(owned):
                update, leverage, scalars = gathered[r * share + row].split(widths)
                delivered[i] = (update.view(matrices[i][1].shape), leverage if widths[1] else None, scalars)
        return delivered
    return finish


def assembled_fields(group, p):
    """What an owner needs whole of an FSDP2 matrix: its gradient, and its weights where the math or the pin reads them."""
    return [p.grad] + ([p] if reads_weights(group) or group["pin"] else [])


def assemble_on_owners(bucket, owners, matrices):
    """All-to-all 1 for a bucket of DTensor matrices: every rank sends each owner its rows of the owner's
    matrices' fields. Returns {index: (whole gradient, whole weights or None)} for this rank's matrices."""
    rank, world_size = rank_and_world_size()
    mine = [i for i in bucket if owners[i] == rank]
    fields = {i: assembled_fields(*matrices[i]) for i in bucket}
    p = matrices[bucket[0]][1]
    receive = start_exchange(
        [[t.to_local() for i in bucket if owners[i] == r for t in fields[i]] for r in range(world_size)],
        [[(local_shape(t.shape, s, world_size), t.dtype) for i in mine for t in fields[i]] for s in range(world_size)],
        p.to_local(), p.device_mesh.get_group())
    pieces, whole, position = receive(), {}, 0
    for i in mine:
        count = len(fields[i])
        assembled = [torch.cat([pieces[s][position + f] for s in range(world_size)]) for f in range(count)]
        whole[i] = (assembled[0], assembled[1] if count == 2 else None)
        position += count
    return whole


def returned_fields(p):
    """What returns to the ranks per FSDP2 matrix, as (full shape, 0: rows of it to each rank, None: all of
    it to every rank): the update, the leverage of a non-square matrix, the two scalars."""
    rows, cols = p.shape
    return [((rows, cols), 0)] + ([((max(rows, cols),), 0)] if rows != cols else []) + [((2,), None)]


def start_return_to_ranks(bucket, owners, matrices, results):
    """All-to-all 2: each owner sends every rank its rows of its matrices' results ({index: (update,
    leverage or None, scalars)}). Returns a callable that waits and returns {index: (this rank's rows of the
    update, its piece of the leverage or None, the scalars)} for every matrix of the bucket."""
    rank, world_size = rank_and_world_size()
    p = matrices[bucket[0]][1]
    send = [[t if dim is None else rank_piece(t, r, world_size)
             for i in bucket if owners[i] == rank
             for t, (_, dim) in zip([t for t in results[i] if t is not None], returned_fields(matrices[i][1]))]
            for r in range(world_size)]
    layouts = [[(shape if dim is None else local_shape(shape, rank, world_size), torch.float32)
                for i in bucket if owners[i] == s for shape, dim in returned_fields(matrices[i][1])]
               for s in range(world_size)]
    returned = start_exchange(send, layouts, p.to_local(), p.device_mesh.get_group())

    def finish():
        pieces, delivered = returned(), {}
        for s in range(world_size):
            position = 0
            for i in (i for i in bucket if owners[i] == s):
                got = pieces[s][position:position + len(returned_fields(matrices[i][1]))]
                position += len(got)
                delivered[i] = (got[0], got[1] if len(got) == 3 else None, got[-1])
        return delivered
    return finish


def laid_out(key, value):
    """A loaded state value in the memory layout the step makes it in: SOAP's bases come from LAPACK (eigh,
    qr) column-major, and a matmul rounds by its operands' layout, so a basis loaded row-major (as
    torch.distributed.checkpoint lays it out) is copied back to column-major."""
    if key in ("q_row", "q_col") and value.is_contiguous():
        return value.mT.contiguous().mT
    return value


def spread_from(t, p, owner):
    """The owner's state tensor t on every rank (a collective): whole for a replicated parameter p, a DTensor
    sharded along its longest dim for an FSDP2 one. The collectives send memory in storage order, so a
    basis from torch.linalg.qr (column-major) goes as a contiguous copy."""
    t = t.contiguous()
    if not is_dtensor(p):
        dist.broadcast(t, src=owner)
        return t
    dim = max(range(t.ndim), key=lambda d: t.size(d))
    return torch.distributed.tensor.distribute_tensor(t, p.device_mesh, [torch.distributed.tensor.Shard(dim)],
                                                      src_data_rank=owner)


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------

# Every option of a MuonChain param group, with MuonChain's defaults (docs/recipes.md#the-chain).
CHAIN_OPTIONS = dict(
    momentum=0.95, nesterov=True, weight_decay=0.0,
    soap=None, soap_combine="replace", trust=None, trust_floor=0.0, trust_cap=1.0,
    polar_backend="schatten", polar_dtype="bfloat16",
    orientation="none", pp_iterations=2, pp_beta=0.5, variant="vanilla",
    contra=0.0, contra_muon=False,
    beta2=None, u_normuon=False, normuon_beta2=None,
    radial_brake=None, floor=None, uw_floor=0.0,
    pin=True, cautious_weight_decay=0.0, stack=False)
SCHEDULED = ("contra", "trust_floor", "trust_cap")  # read by the math as 0-d tensors: a new value never recompiles
STEP_OPTIONS = ("momentum", "nesterov", "weight_decay", "pin", "cautious_weight_decay", "stack")  # outside the math
SOAP_OPTIONS = {"beta2", "frequency", "denom_power", "blend", "denom_floor"}
TRUST_OPTIONS = {"min_agree", "min_grad_align", "power", "eps"}
# Keys of a param group that are not options: torch.optim's, a name, and the records' schedule (power_cool_lr).
GROUP_KEYS = {"params", "param_names", "lr", "name", "initial_lr", "power_c"}
MATH_STATE = ("second_moment", "exp_avg_sq", "q_row", "q_col")  # the state the math reads, stacked per run


def static_options(group):
    """What the math specializes on: the group's options but the values applied outside it and the
    scheduled ones (which come as tensors), with Aurora's uw_floor as a scalar floor."""
    options = {name: group[name] for name in CHAIN_OPTIONS if name not in STEP_OPTIONS + SCHEDULED + ("uw_floor",)}
    options["contra_mix"] = not group["contra_muon"] and group["contra"] != 0
    if group["uw_floor"]:
        options["floor"] = ("scalar", group["uw_floor"])
    return options


def reads_weights(group):
    """Whether the math reads the weights (the radial brake, the floors)."""
    return group["radial_brake"] is not None or group["floor"] is not None or group["uw_floor"] != 0


def unknown_key_problem(keys):
    """An error naming the first key that is neither an option nor a group key, with the nearest option, or None."""
    unknown = sorted(set(keys) - set(CHAIN_OPTIONS) - GROUP_KEYS)
    if not unknown:
        return None
    near = difflib.get_close_matches(unknown[0], CHAIN_OPTIONS, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown option {unknown[0]!r}{hint}; the options are {', '.join(CHAIN_OPTIONS)}"


def option_problem(group):
    """What is wrong with a param group's option values, or None."""
    choices = {"polar_backend": POLAR_BACKENDS, "polar_dtype": POLAR_DTYPES, "soap_combine": SOAP_COMBINES,
               "orientation": AURORA_ORIENTATIONS, "variant": AURORA_VARIANTS}
    for name, allowed in choices.items():
        if group[name] not in allowed:
            return f"{name} must be one of {sorted(allowed)}, got {group[name]!r}"
    if not group["lr"] >= 0:
        return f"lr must be >= 0, got {group['lr']}"
    if group["pp_iterations"] < 1:
        return f"pp_iterations must be >= 1, got {group['pp_iterations']}"
    soap = group["soap"]
    if soap is not None and not (isinstance(soap, dict) and {"beta2", "frequency", "denom_power"} <= set(soap)
                                 <= SOAP_OPTIONS and soap["frequency"] >= 1):
        return (f"soap must be None or a dict with beta2, frequency (>= 1) and denom_power, and optionally blend "
                f"and denom_floor, got {soap!r}")
    if group["soap_combine"] == "trust_gate" and not (isinstance(group["trust"], dict) and set(group["trust"]) <= TRUST_OPTIONS):
        return f"soap_combine 'trust_gate' needs trust, a dict of {sorted(TRUST_OPTIONS)}, got {group['trust']!r}"
    if group["beta2"] is not None and group["normuon_beta2"] is not None:
        return "beta2 (record #10's row normalization) and normuon_beta2 (record #42's) exclude each other"
    floor = group["floor"]
    if floor is not None and not ((len(floor) == 2 and floor[0] == "scalar") or (len(floor) == 3 and floor[0] == "row")):
        return f"floor must be None, ('scalar', f) or ('row', f, rho), got {floor!r}"
    if floor is not None and group["uw_floor"]:
        return f"uw_floor {group['uw_floor']} and floor {floor!r} are one stage: give one"
    if group["radial_brake"] is not None and len(group["radial_brake"]) != 2:
        return f"radial_brake must be None or (outward, inward), got {group['radial_brake']!r}"
    return None


class MuonChain(torch.optim.Optimizer):
    """The matrix optimizer of every recipe (docs/recipes.md#the-chain): per matrix, with g its gradient,

        momentum:  m = lerp(m, g, 1 - momentum);  u = lerp(g, m, momentum)  (nesterov=False: u = m)
        math:      update = chain_update(u): SOAP, the polar, Contra-Muon, the aspect scale, the row
                   normalization, the radial brake, a floor (each a param-group option, see chain_update)
        step:      W *= 1 - lr weight_decay;  W -= lr update;  pin: W rescaled to the radius pin's target
                   norm;  cautious_weight_decay: W *= 1 - lr cwd mask (the mask taken before the step)

    then SOAP's statistics take g. A stage whose option is None (False, 0) is left out. The defaults are
    records #42 and #46's (the Schatten-4 polar, the pinned step); Muon, NorMuon and Aurora are the
    benchmark recipes' configurations. The trainer writes the scheduled values (lr, momentum, contra,
    trust_floor, trust_cap) into the param groups; changing any of them never recompiles.

    Work and state: every matrix has an owner rank (owner_plan), the only one to keep its state and run
    its math; same-group, same-shape matrices of an owner are stacked into one batched call (a lone one
    beside a stand-in zero matrix where its group has others of its shape, so that a matrix's bits never
    depend on the number of ranks; the only matrix of its group and shape runs as one 2-D matrix, as the
    records compute). The updates are all-gathered (FSDP2: returned as rows) and every rank takes the step.
    state_dict() is then a collective that gives every rank the whole state; load_state_dict() keeps this
    rank's part.

    Non-finite updates: with `found_inf` set (GradScaler's protocol, a float32 device tensor, as fused
    AdamW reads it), step() does not look at any value on the host. It adds a non-finite update of its
    own to found_inf and leaves the weights untouched while found_inf is 1; the momentum and other state
    of such a step are not restored. Without found_inf it raises FloatingPointError naming the matrix (one
    host sync per step)."""

    option_defaults = CHAIN_OPTIONS
    momentum_name = "momentum"  # the state key of the momentum buffer
    keeps_leverage = False  # the state keeps each rectangular matrix's latest leverage (Muon, NorMuon, Aurora)
    join_transposes = True  # all-gather buckets: wide matrices with their transposes' shape (False: by exact shape)
    gather_alone = False  # True: the all-gather path also in a process group of one (train_gpt --ddp)

    def __init__(self, params, lr, **options):
        problem = unknown_key_problem(options)
        if problem is not None:
            raise ValueError(f"{type(self).__name__}: {problem}")
        super().__init__(params, dict(self.option_defaults, lr=lr, **options))
        self._compiled_update_math = None  # made by the first compiled step
        self.latest_leverage = {}  # {parameter: leverage of its latest polar factor}, on every rank

    def add_param_group(self, param_group):
        """torch.optim's, refusing with one line what the chain cannot take: an unknown option (a misspelt
        name), a bad option value, a parameter that is not a matrix, a DTensor placement that cannot be
        assembled. Pass model.named_parameters()-style (name, tensor) pairs to get names in the errors."""
        index = len(self.param_groups)
        problem = unknown_key_problem(param_group)
        if problem is None:
            super().add_param_group(param_group)
            problem = option_problem(self.param_groups[-1])
            if problem is not None:
                self.param_groups.pop()
        if problem is not None:
            raise ValueError(f"{type(self).__name__}: param group {index}: {problem}")
        group = self.param_groups[-1]
        names = group.get("param_names") or [None] * len(group["params"])
        for position, (name, p) in enumerate(zip(names, group["params"])):
            problem = None
            if p.ndim != 2:
                problem = "is not a 2-D matrix; give embeddings, heads, biases and gains to AdamW instead"
            elif is_dtensor(p):
                problem = unsupported_placement(p)
            if problem is not None:
                self.param_groups.pop()
                label = repr(name) if name is not None else f"#{position} of param group {index}"
                if is_dtensor(p):
                    label += f" (DTensor {tuple(p.placements)!r})"
                raise ValueError(f"{type(self).__name__}: parameter {label} of shape {tuple(p.shape)} {problem}")

    # ---- the plan

    def matrices(self):
        """(group, parameter) for every matrix, in param-group order: the order the plan indexes."""
        return [(group, p) for group in self.param_groups for p in group["params"]]

    def matrix_flops(self, shape, group):
        """Matmul FLOPs of one matrix's update: its polar factor(s) and SOAP's products."""
        return chain_flops(group, *shape)

    def owners(self, world_size):
        """Each matrix's owner rank, the same on every rank."""
        return owner_plan([self.matrix_flops(tuple(p.shape), group) for group, p in self.matrices()], world_size)

    def flops_per_rank(self, world_size):
        """Each of world_size ranks' matrix FLOPs in one step (every matrix counted, as after the first step)."""
        totals = [0] * world_size
        for owner, (group, p) in zip(self.owners(world_size), self.matrices()):
            totals[owner] += self.matrix_flops(tuple(p.shape), group)
        return totals

    def state_bytes(self, p, group):
        """Bytes of one matrix's state, all on its owner: the momentum (the parameter's dtype), the leverage,
        the row or column second moment and SOAP's second moment, Gram matrices and bases (float32)."""
        rows, cols = p.shape
        normalized = group["beta2"] is not None or group["normuon_beta2"] is not None
        floats = (rows if rows >= cols else cols) if normalized else 0
        if self.keeps_leverage and rows != cols:
            floats += max(rows, cols)
        if group["soap"] is not None:
            floats += rows * cols + 2 * rows * rows + 2 * cols * cols
        return rows * cols * p.element_size() + 4 * floats

    def state_bytes_per_rank(self, world_size):
        """Each of world_size ranks' state bytes: only the matrices it owns."""
        totals = [0] * world_size
        for owner, (group, p) in zip(self.owners(world_size), self.matrices()):
            totals[owner] += self.state_bytes(p, group)
        return totals

    def gather_bytes(self, world_size):
        """The largest all-gather buffer of a step: one bucket's rows (update, leverage, the two scalars),
        float32, padded to the most matrices any rank owns there."""
        owners, matrices = self.owners(world_size), self.matrices()
        largest = 0
        for bucket in bucket_plan([tuple(p.shape) for _, p in matrices], self.join_transposes):
            share = max(sum(owners[i] == r for i in bucket) for r in range(world_size))
            rows, cols = matrices[bucket[0]][1].shape
            largest = max(largest, 4 * world_size * share * (rows * cols + (max(rows, cols) if rows != cols else 0) + 2))
        return largest

    # ---- one step

    def update_math_now(self):
        """chain_update as it should run now: compiled, or the function itself while compiling is off
        (torch._dynamo.config.disable). A compiled wrapper called with compiling off still runs the code dynamo
        compiled for it earlier, and making one costs an uncompiled process inductor's import (over a second)."""
        if torch._dynamo.config.disable:
            return chain_update
        if self._compiled_update_math is None:
            self._compiled_update_math = torch.compile(chain_update, dynamic=False)
        return self._compiled_update_math

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        rank, world_size = rank_and_world_size()
        matrices = self.matrices()
        owners = self.owners(world_size)
        stepping = [i for i, (_, p) in enumerate(matrices) if p.grad is not None]
        for i in stepping:
            self.check_gradient(*matrices[i])
        groups = {id(group): g for g, group in enumerate(self.param_groups)}
        sizes = collections.Counter((groups[id(matrices[i][0])], tuple(matrices[i][1].shape)) for i in stepping)
        gather = world_size > 1 or (self.gather_alone and dist.is_initialized())
        finishes = []
        for sharded in (False, True):
            members = [i for i in stepping if is_dtensor(matrices[i][1]) == sharded]
            for bucket in bucket_plan([tuple(matrices[i][1].shape) for i in members], self.join_transposes):
                bucket = [members[k] for k in bucket]
                if sharded:
                    finishes.append(self.start_sharded_bucket(bucket, owners, matrices, sizes, groups))
                    continue
                mine = [i for i in bucket if owners[i] == rank]
                results = self.update_owned(mine, {i: (matrices[i][1].grad, matrices[i][1]) for i in mine},
                                            matrices, sizes, groups)
                finishes.append(start_gather(bucket, owners, results, matrices) if gather
                                else (lambda results=results: results))
        delivered = {}
        for finish in finishes:
            delivered |= finish()
        self.apply_updates([(matrices[i][0], matrices[i][1], *delivered[i]) for i in sorted(delivered)],
                           getattr(self, "found_inf", None))
        return loss

    def check_gradient(self, group, p):
        if is_dtensor(p) and not (is_dtensor(p.grad) and p.grad.placements == p.placements):
            raise ValueError(f"{type(self).__name__}: the gradient of the DTensor parameter of shape {tuple(p.shape)} "
                             f"must be a DTensor placed like it ({p.placements}), as fully_shard's backward makes it")

    def init_state(self, group, p, like):
        """This matrix's state on its owner, made at its first step: whole tensors shaped like `like` (its
        whole gradient; for FSDP2 the assembled one)."""
        state = self.state[p]
        if not state:
            rows, cols = like.shape
            state[self.momentum_name] = torch.zeros_like(like)
            if self.keeps_leverage and rows != cols:
                state["leverage"] = torch.zeros(max(rows, cols), dtype=torch.float32, device=like.device)
            if group["beta2"] is not None or group["normuon_beta2"] is not None:
                shape = (rows, 1) if rows >= cols else (1, cols)
                state["second_moment"] = torch.zeros(shape, dtype=torch.float32, device=like.device)
            if group["soap"] is not None:
                state["exp_avg_sq"] = torch.zeros_like(like, dtype=torch.float32)
                state["row_gg"] = torch.zeros(rows, rows, dtype=torch.float32, device=like.device)
                state["col_gg"] = torch.zeros(cols, cols, dtype=torch.float32, device=like.device)
                state["soap_step"] = 0
        return state

    def update_owned(self, owned, whole, matrices, sizes, groups):
        """The owner's work on its matrices `owned` of one bucket, from their whole gradients and weights
        ({index: (grad, W)}): momentum, the math on each run of same-group, same-shape matrices, SOAP's
        statistics and the pin's scale. Returns {index: (update, leverage or None, scalars)}, scalars =
        (1 if the update is finite else 0, the pin's scale or 1)."""
        runs = {}
        for i in owned:
            group, p = matrices[i]
            alone = None if group["stack"] else i  # stack: one run per group and shape; else one per matrix
            runs.setdefault((groups[id(group)], tuple(p.shape), "q_row" in self.state[p], alone), []).append(i)
        results = {}
        for (g, shape, _, alone), run in runs.items():
            group = self.param_groups[g]
            grads, weights = [whole[i][0] for i in run], [whole[i][1] for i in run]
            states = [self.init_state(group, matrices[i][1], grad) for i, grad in zip(run, grads)]
            momenta = [s[self.momentum_name] for s in states]
            momentum_step_(momenta, grads, group["momentum"])
            directions = momenta
            if group["nesterov"]:
                directions = [nesterov_direction(grad, m, group["momentum"]) for grad, m in zip(grads, momenta)]
            if group["weight_decay"] != 0 and (reads_weights(group) or group["pin"]):
                # The brake, the floors and the pin see W after this step's decay, as the step applies it.
                weights = [w * (1 - group["lr"] * group["weight_decay"]) for w in weights]
            updates, leverages = self.run_math(group, directions, grads, weights, states,
                                               alone is not None or sizes[g, shape] == 1)
            finite = torch.stack(torch._foreach_norm(updates)).isfinite().float()
            scales = ([radius_pin_scale(w, update, group["lr"]) for w, update in zip(weights, updates)] if group["pin"]
                      else [torch.ones((), device=finite.device)] * len(run))
            for k, (i, state) in enumerate(zip(run, states)):
                if group["soap"] is not None:
                    soap_statistics_update_(state, grads[k], group["soap"]["beta2"], group["soap"]["frequency"])
                if leverages[k] is not None and self.keeps_leverage:
                    state["leverage"].copy_(leverages[k])
                results[i] = (updates[k], leverages[k], torch.stack([finite[k], scales[k]]))
        return results

    def run_math(self, group, directions, grads, weights, states, alone):
        """The math on one run of same-group, same-shape matrices: stacked, beside a zero matrix if the rank
        has only one (torch's batched matmul takes another kernel for a batch of one, whose bf16 rounding
        differs), or as one 2-D matrix if it is `alone` in its group and shape. Writes the new state; returns
        the updates and leverages, one per matrix. A SOAP matrix's first step (no eigenbasis yet: its update
        skips the preconditioning) runs uncompiled, so that the compiled math has one form from the first
        step on."""
        count = len(directions)

        def stack(tensors):
            if alone:
                return tensors[0]
            return torch.stack(tensors + [torch.zeros_like(tensors[0])] if count == 1 else tensors)

        options = static_options(group)
        state = {name: stack([s[name] for s in states]) for name in MATH_STATE if name in states[0]}
        grad = stack(grads) if options["soap_combine"] == "trust_gate" else None
        W = stack(weights) if reads_weights(group) else None
        device = directions[0].device
        scalars = {name: torch.full((), float(group[name]), dtype=torch.float32, device=device) for name in SCHEDULED}
        first_soap_step = options["soap"] is not None and "q_row" not in states[0]
        math = chain_update if first_soap_step else self.update_math_now()
        update, new_state, leverage = math(options, stack(directions), grad, W, state, scalars)

        def unstack(t):
            return [t] if alone else list(t.unbind(0))[:count]
        for name, value in new_state.items():
            torch._foreach_copy_([s[name] for s in states], unstack(value))
        return unstack(update), [None] * count if leverage is None else unstack(leverage)

    def start_sharded_bucket(self, bucket, owners, matrices, sizes, groups):
        """The same for DTensor parameters: their whole gradients (and weights, where the math or the pin reads
        them) assembled on the owners, which compute; every rank gets its rows of the results back."""
        mine = [i for i in bucket if owners[i] == rank_and_world_size()[0]]
        whole = assemble_on_owners(bucket, owners, matrices)
        return start_return_to_ranks(bucket, owners, matrices, self.update_owned(mine, whole, matrices, sizes, groups))

    def apply_updates(self, delivered, found_inf):
        """The step of every matrix on every rank, refused for non-finite updates: delivered is (group,
        parameter, update, leverage, scalars) per matrix, the update whole or this rank's rows."""
        if not delivered:
            return
        finite = torch.stack([scalars[0] for *_, scalars in delivered]) == 1
        keep = None
        if found_inf is None:
            if not bool(finite.all()):
                self.raise_non_finite([p for (_, p, *_), ok in zip(delivered, finite.tolist()) if not ok][0])
        else:
            found_inf.copy_(torch.where(finite.all(), found_inf, 1.0))
            keep = found_inf == 0
        by_group = {}
        for group, p, update, leverage, scalars in delivered:
            by_group.setdefault(id(group), (group, []))[1].append((p, update, scalars))
            if leverage is not None:
                self.latest_leverage[p] = self.leverage_tensor(p, leverage)
        for group, members in by_group.values():
            targets = [local_tensor(p) for p, _, _ in members]
            updates = [update for _, update, _ in members]
            scales = [scalars[1] for _, _, scalars in members]
            if keep is not None:
                # The updates are this step's own buffers: zeroed in place when refused, no copies. A fill,
                # not a product with 0, which would turn an inf or NaN update into NaN weights.
                for update in updates:
                    update.masked_fill_(~keep, 0.0)
                scales = [torch.where(keep, scale, 1.0) for scale in scales]
            take_step_(targets, updates, scales, group, keep)

    @staticmethod
    def leverage_tensor(p, leverage):
        """The leverage as leverage() gives it: whole, or for a DTensor parameter a DTensor of the pieces."""
        if not is_dtensor(p):
            return leverage.clone()
        length = max(p.shape)
        return torch.distributed.tensor.DTensor.from_local(
            leverage.clone(), p.device_mesh, [torch.distributed.tensor.Shard(0)], run_check=False,
            shape=(length,), stride=(1,))

    def raise_non_finite(self, p):
        group_index, index = next((g, k) for g, group in enumerate(self.param_groups)
                                  for k, q in enumerate(group["params"]) if q is p)
        raise FloatingPointError(
            f"{type(self).__name__}: non-finite update for the parameter of shape {tuple(p.shape)} (param group "
            f"{group_index}, matrix {index}); its gradient or momentum holds inf/NaN: the loss has probably "
            f"diverged, lower the learning rate")

    def leverage(self):
        """{parameter: float32 leverage (tall-orientation row norms^2) of its latest polar factor} for every
        non-square matrix, on every rank (FSDP2: a DTensor sharded along its length)."""
        return dict(self.latest_leverage)

    # ---- state_dict

    def state_dict(self):
        """torch.optim's, with every matrix's state. Where the matrices are split across ranks it is a
        collective (every rank calls it) and every rank gets the whole state: tensors for replicated
        parameters, DTensors sharded along their longest dim for FSDP2 ones, so that
        torch.distributed.checkpoint saves it and resumes it at another world size."""
        full = super().state_dict()
        rank, world_size = rank_and_world_size()
        if world_size == 1:
            return full
        layout = {i: {key: ("tensor", tuple(v.shape), v.dtype) if torch.is_tensor(v) else ("value", v)
                      for key, v in s.items()} for i, s in full["state"].items()}
        held = [None] * world_size
        dist.all_gather_object(held, layout)
        owners = self.owners(world_size)
        state = {}
        for i, (_, p) in enumerate(self.matrices()):
            owner = owners[i]
            state[i] = {}
            for key, (kind, *what) in held[owner].get(i, {}).items():
                if kind == "value":
                    state[i][key] = what[0]
                    continue
                shape, dtype = what
                t = full["state"][i][key] if owner == rank else torch.empty(shape, dtype=dtype, device=local_tensor(p).device)
                state[i][key] = spread_from(t, p, owner)
            if not state[i]:
                del state[i]
        full["state"] = state
        return full

    def gathered_state_dict(self):
        """The whole state_dict on rank 0 (CPU tensors), None on the other ranks: a collective, for a
        checkpoint that rank 0 writes. One process: state_dict()."""
        full = super().state_dict()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return full
        local = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in full["state"].items()}
        pieces = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local, pieces, dst=0)
        if dist.get_rank() != 0:
            return None
        for piece in pieces:
            full["state"].update(piece)
        return full

    def load_state_dict(self, state_dict):
        """torch.optim's, for state_dicts of this class and of the optimizers before the one chain (their
        groups lack the newer options, which take this class's defaults: the behaviour they were saved
        with). Refuses with one line a state_dict whose groups or state this optimizer cannot continue from.
        Keeps the state of the matrices this rank owns (every rank calls it: DTensor state is gathered)."""
        name = type(self).__name__
        groups = [dict(self.option_defaults, **saved) for saved in state_dict["param_groups"]]
        for index, group in enumerate(groups):
            problem = option_problem(group)
            if problem is not None:
                raise ValueError(f"{name}: cannot load this state_dict: param group {index}: {problem}")
        # The saved keys (indices, or torch.distributed.checkpoint's parameter names) in this optimizer's order.
        params = dict(zip((key for g in groups for key in g["params"]), (p for _, p in self.matrices())))
        for index, saved in state_dict["state"].items():
            group = next(g for g in groups if index in g["params"])
            keys = {self.momentum_name}  # what init_state makes, and SOAP's bases after its first step
            if self.keeps_leverage and index in params and params[index].size(0) != params[index].size(1):
                keys.add("leverage")
            if group["beta2"] is not None or group["normuon_beta2"] is not None:
                keys.add("second_moment")
            if group["soap"] is not None:
                keys |= {"exp_avg_sq", "row_gg", "col_gg", "soap_step"} | ({"q_row", "q_col"} & set(saved))
            if set(saved) != keys:
                raise ValueError(f"{name}: cannot load this state_dict: parameter {index} has state {sorted(saved)}, "
                                 f"where {name} keeps {sorted(keys)} for its group: it was saved by another "
                                 f"optimizer (or with other stages)")
        super().load_state_dict(dict(state_dict, param_groups=groups))
        rank, world_size = rank_and_world_size()
        for owner, (_, p) in zip(self.owners(world_size), self.matrices()):
            if p not in self.state:
                continue
            state = {key: laid_out(key, value.full_tensor() if is_dtensor(value) else value)
                     for key, value in self.state[p].items()}
            if owner == rank:
                self.state[p] = state
            else:
                del self.state[p]


def take_step_(targets, updates, scales, group, keep):
    """The step on every rank (whole matrices, or FSDP2's rows): decoupled weight decay, then for a pinned
    group pinned_step_ with the owner's scale, else W -= lr * update and cautious weight decay."""
    lr, cautious_decay = group["lr"], group["cautious_weight_decay"]
    if group["weight_decay"] != 0:
        decay = 1 - lr * group["weight_decay"]
        torch._foreach_mul_(targets, decay if keep is None else torch.where(keep, decay, 1.0))
    if group["pin"]:
        for W, update, scale in zip(targets, updates, scales):
            pinned_step_(W, update, lr, cautious_decay, scale)
        return
    masks = [cautious_mask(update, W) for W, update in zip(targets, updates)] if cautious_decay > 0 else []
    torch._foreach_add_(targets, updates, alpha=-lr)
    for W, mask in zip(targets, masks):
        W.mul_(1.0 - (lr * cautious_decay) * mask)


class Muon(MuonChain):
    """Muon (docs/recipes.md#muon, record #36 with lr=0.025, weight_decay=0.05): W *= 1 - lr*wd;
    W -= lr * polar(u) * sqrt(max(1, rows/cols)), u the Nesterov momentum direction."""

    option_defaults = dict(CHAIN_OPTIONS, polar_backend="polar", pin=False, stack=True)
    momentum_name = "momentum_buffer"
    keeps_leverage = True

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, nesterov=True, polar_backend="polar", **options):
        super().__init__(params, lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         polar_backend=polar_backend, **options)


class NorMuon(Muon):
    """NorMuon (docs/recipes.md#normuon, record #10 with lr=0.035, weight_decay=0.025): Muon's scaled polar
    factor normalized by a running second moment per row (rows >= cols) or per column.

    u_normuon=True gives U-NorMuon (docs/recipes.md#variants): tall matrices get rows of norm sqrt(n/m)
    instead."""

    option_defaults = dict(Muon.option_defaults, beta2=0.95)

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, nesterov=True, beta2=0.95, u_normuon=False,
                 polar_backend="polar", **options):
        super().__init__(params, lr, weight_decay, momentum, nesterov, polar_backend, beta2=beta2, u_normuon=u_normuon,
                         **options)


class Aurora(Muon):
    """Aurora (docs/recipes.md#aurora, record #17 with lr=0.0375, contra=0.4, uw_floor=0.35): Muon with a
    leverage-equalized polar factor (aurora_polar), an optional Contra-Muon mix and u/w floor.

    variant="riemannian" replaces aurora_polar by riemannian_aurora_polar (docs/recipes.md#variants).
    orientation ("non_square", the record's; "tall"; "wide") picks the matrices that get Aurora's
    polar factor; the others get Muon's polar, with the same Contra-Muon mix and u/w floor."""

    option_defaults = dict(Muon.option_defaults, orientation="non_square")

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, nesterov=True, pp_iterations=2, pp_beta=0.5,
                 contra=0.0, uw_floor=0.0, variant="vanilla", polar_backend="polar", orientation="non_square",
                 **options):
        super().__init__(params, lr, weight_decay, momentum, nesterov, polar_backend, pp_iterations=pp_iterations,
                         pp_beta=pp_beta, contra=contra, uw_floor=uw_floor, variant=variant, orientation=orientation,
                         **options)


# --------------------------------------------------------------------------------------------
# Schedules of records #42 and #46 (docs/recipes.md#schedules): pure functions of the step, which the
# trainer writes into the param groups each step (lr, momentum, contra, trust_floor, trust_cap).
# --------------------------------------------------------------------------------------------

def power_cool_lr(step, initial_lr, power_c, t_end, power, time_scale=1.0):
    """PowerCool: min(lr0, c (t_end - step)^p), flat until the power law falls below lr0, 0 from t_end.
    time_scale stretches the steps when the schedule is shortened (--steps), 1 at the record's horizon."""
    return min(initial_lr, power_c * (max(0.0, t_end - step) * time_scale) ** power)


def warmup_cooldown_momentum(step, train_steps, warmup, cooldown, low=0.85, high=0.95):
    """mu from `low` to `high` over the first `warmup` steps, back to `low` over the last `cooldown`."""
    cooldown_start = train_steps - cooldown
    if step < warmup:
        return low + step / max(warmup, 1) * (high - low)
    if step > cooldown_start:
        return high - (step - cooldown_start) / max(cooldown, 1) * (high - low)
    return high


def linear_ramp(step, start, end):
    """0 before `start`, 1 from `end`, linear between."""
    if end <= start:
        return 1.0 if step >= end else 0.0
    return min(1.0, max(0.0, (step - start) / (end - start)))


def contra_coefficient(step, coefficient, hold_end, ramp_end):
    """Record #42's Contra-Muon ramp: `coefficient` until hold_end, then linearly to 0 at ramp_end."""
    return coefficient * (1.0 - linear_ramp(step, hold_end, ramp_end))


def early_trust_floor(step, floor, end, fade_end):
    """Record #46's floor on the attention trust gate: `floor` until `end`, linearly to 0 at fade_end."""
    if fade_end <= end:
        return 0.0 if step >= fade_end else floor
    if step < end:
        return floor
    if step >= fade_end:
        return 0.0
    return floor * (fade_end - step) / (fade_end - end)


def early_trust_cap(step, cap, fade_end):
    """Record #46's cap on the attention trust gate: `cap` until fade_end, then 1."""
    return cap if step < fade_end else 1.0


class BiasFreeAdam(torch.optim.Optimizer):
    """Adam without bias correction (record #46's aux optimizer for gains and biases; docs/recipes.md):
    m = lerp(m, g, 1 - b1), v = lerp(v, g^2, 1 - b2) (float32), W -= lr m / (sqrt(v) + eps). Unlike
    torch.optim.Adam it does not divide m and v by 1 - b^t, so its first steps are small."""

    def __init__(self, params, lr=0.01, betas=(0.8, 0.99), eps=1e-10):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            # One list operation per step of the update (each is the tensor operation, tensor by tensor).
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
            grads = [p.grad.float() for p in params]
            torch._foreach_lerp_(exp_avgs, [p.grad for p in params], 1 - beta1)
            torch._foreach_lerp_(exp_avg_sqs, torch._foreach_pow(grads, 2), 1 - beta2)
            denominators = torch._foreach_add(torch._foreach_sqrt(exp_avg_sqs), group["eps"])
            directions = [d.to(p.dtype) for d, p in
                          zip(torch._foreach_div([m.float() for m in exp_avgs], denominators), params)]
            if found_inf is None:
                torch._foreach_add_(params, directions, alpha=-group["lr"])
            else:  # GradScaler's protocol: no step while found_inf is set, without a host sync
                stepped = torch._foreach_add(params, directions, alpha=-group["lr"])
                for p, new in zip(params, stepped):
                    p.copy_(torch.where(found_inf == 0, new, p))
        return loss


# --------------------------------------------------------------------------------------------
# Weight averages of records #42 and #46 (docs/recipes.md#ema-nesterov, #reference-readout, #tail-ema):
# elementwise state kept as 1/W pieces, one per rank, of every parameter; what every rank needs whole
# (the looked-ahead weights, a readout's weights) is all-gathered from the pieces.
# --------------------------------------------------------------------------------------------

PIECE_ALIGNMENT = 64  # elements: a piece starts where a whole-tensor elementwise kernel starts a vector


def piece_range(numel, rank, world_size):
    """[lo, hi): rank's piece of a flattened tensor, every piece but the last a multiple of 64 elements long."""
    per = -(-numel // (world_size * PIECE_ALIGNMENT)) * PIECE_ALIGNMENT
    return min(rank * per, numel), min((rank + 1) * per, numel)


class Pieces:
    """This rank's pieces of a list of same-device tensors (the parameters), and the all-gather that makes
    such tensors whole again on every rank. One process: each piece is the whole tensor."""

    def __init__(self, tensors):
        self.rank, self.world_size = rank_and_world_size()
        self.tensors = list(tensors)
        self.ranges = [[piece_range(t.numel(), r, self.world_size) for r in range(self.world_size)]
                       for t in self.tensors]

    def of(self, index, tensor):
        """This rank's piece (a view) of `tensor`, shaped like tensors[index]."""
        lo, hi = self.ranges[index][self.rank]
        return tensor.view(-1)[lo:hi]

    def mine(self, tensors=None):
        """This rank's piece of each tensor (default: of the tensors themselves)."""
        return [self.of(i, t) for i, t in enumerate(self.tensors if tensors is None else tensors)]

    @torch.no_grad()
    def gather_(self, tensors=None, force=False):
        """Every rank's pieces into each whole tensor (default: the tensors themselves), in place: one
        all-gather per dtype. A no-op in one process unless `force`."""
        tensors = self.tensors if tensors is None else tensors
        if (self.world_size == 1 and not force) or not dist.is_initialized():
            return
        by_dtype = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for indices in by_dtype.values():
            lengths = [self.ranges[i][0][1] - self.ranges[i][0][0] for i in indices]  # the longest piece
            send = tensors[indices[0]].new_zeros(sum(lengths))
            for i, offset in zip(indices, [sum(lengths[:k]) for k in range(len(lengths))]):
                piece = self.of(i, tensors[i])
                send[offset:offset + piece.numel()] = piece
            received = send.new_empty(self.world_size * send.numel())
            dist.all_gather_into_tensor(received, send)
            blocks = received.view(self.world_size, -1)
            for r in range(self.world_size):
                offset = 0
                for i, length in zip(indices, lengths):
                    lo, hi = self.ranges[i][r]
                    tensors[i].view(-1)[lo:hi] = blocks[r, offset:offset + hi - lo]
                    offset += length

    @torch.no_grad()
    def whole(self, pieces):
        """Whole tensors shaped like self.tensors (in the pieces' dtype) from every rank's `pieces`: a
        collective, for a checkpoint."""
        tensors = [piece.new_zeros(t.shape) for t, piece in zip(self.tensors, pieces)]
        for i, piece in enumerate(pieces):
            self.of(i, tensors[i]).copy_(piece)
        self.gather_(tensors)
        return tensors

    def from_whole(self, tensors):
        """This rank's pieces (copies, on the parameters' devices) of whole tensors, e.g. from a checkpoint."""
        return [self.of(i, t.to(p.device)).clone() for i, (t, p) in enumerate(zip(tensors, self.tensors))]


class EMANesterov:
    """EMA-Nesterov lookahead (PR #309, records #42 and #46; docs/recipes.md#ema-nesterov). Before each
    forward pass, look_ahead(s): W += s b; after the optimizers' steps, accumulate(): b = lerp(b, W - W_prev,
    1 - ema), W_prev = W. b and W_prev live in 1/W pieces; the looked-ahead weights are all-gathered."""

    def __init__(self, params, ema=0.99):
        self.params = list(params)
        self.ema = ema
        self.pieces = Pieces(self.params)
        self.own = self.pieces.mine()  # views of this rank's pieces of the parameters (updated in place)
        self.previous = [piece.clone() for piece in self.own]
        self.buffer = [torch.zeros_like(piece) for piece in self.previous]

    @torch.no_grad()
    def look_ahead(self, stepsize):
        if stepsize == 0:
            return
        torch._foreach_add_(self.own, self.buffer, alpha=stepsize)
        self.pieces.gather_()

    @torch.no_grad()
    def accumulate(self):
        torch._foreach_lerp_(self.buffer, torch._foreach_add(self.own, self.previous, alpha=-1), 1 - self.ema)
        torch._foreach_copy_(self.previous, self.own)

    def state_dict(self):
        """Whole tensors, as one process keeps them (a collective)."""
        return {"previous": self.pieces.whole(self.previous), "buffer": self.pieces.whole(self.buffer)}

    def load_state_dict(self, state):
        self.previous = self.pieces.from_whole(state["previous"])
        self.buffer = self.pieces.from_whole(state["buffer"])


class TailEMA:
    """Tail-EMA readout (PR #325, record #46; docs/recipes.md#tail-ema): update() keeps ema += (W - ema) / tau
    in float32 (the first call starts it at W); readout() evaluates W = (1 - lam) W + lam ema for the
    duration of a `with`, then puts the weights back exactly. ema lives in 1/W pieces."""

    def __init__(self, params, tau, lam):
        self.params = list(params)
        self.tau, self.lam = tau, lam
        self.pieces = Pieces(self.params)
        self.ema = None

    @torch.no_grad()
    def update(self):
        if self.ema is None:
            self.ema = [piece.float().clone() for piece in self.pieces.mine()]
            return
        for ema, piece in zip(self.ema, self.pieces.mine()):
            ema.add_(piece.float() - ema, alpha=1.0 / self.tau)

    @contextlib.contextmanager
    def readout(self):
        kept = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for ema, piece in zip(self.ema, self.pieces.mine()):
                piece.copy_(((1.0 - self.lam) * piece.float() + self.lam * ema).to(piece.dtype))
            self.pieces.gather_()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, kept):
                    p.copy_(value)

    def state_dict(self):
        return {"ema": None if self.ema is None else self.pieces.whole(self.ema)}

    def load_state_dict(self, state):
        self.ema = None if state["ema"] is None else self.pieces.from_whole(state["ema"])


class ReferenceReadout:
    """Record #42's reference readout (docs/recipes.md#reference-readout): capture() keeps the weights R;
    readout(gamma) evaluates W + gamma (W - R) for the duration of a `with`, then subtracts the same
    delta back, as the record does (not a copy: a few elements come back 1 ulp off, and training goes on
    from them). R lives in 1/W pieces."""

    def __init__(self, params):
        self.params = list(params)
        self.pieces = Pieces(self.params)
        self.reference = None

    @torch.no_grad()
    def capture(self):
        self.reference = [piece.clone() for piece in self.pieces.mine()]

    @contextlib.contextmanager
    def readout(self, gamma):
        with torch.no_grad():
            deltas = [(piece - reference) * gamma for piece, reference in zip(self.pieces.mine(), self.reference)]
            for piece, delta in zip(self.pieces.mine(), deltas):
                piece.add_(delta)
            self.pieces.gather_()
        try:
            yield
        finally:
            with torch.no_grad():
                for piece, delta in zip(self.pieces.mine(), deltas):
                    piece.sub_(delta)
                self.pieces.gather_()

    def state_dict(self):
        return {"reference": None if self.reference is None else self.pieces.whole(self.reference)}

    def load_state_dict(self, state):
        self.reference = None if state["reference"] is None else self.pieces.from_whole(state["reference"])
