"""Matrix optimizers of the three record recipes: Muon, NorMuon and Aurora (docs/recipes.md).

Use them like any torch.optim optimizer, for the 2-D hidden matrices of a model:

    opt = Aurora(model.blocks.parameters(), lr=0.0375, contra=0.4, uw_floor=0.35)
    loss.backward(); opt.step(); opt.zero_grad()

The math is a set of small pure functions (polar, aurora_polar, ...). Each optimizer stacks
same-shape matrices so one batched polar serves them all, runs that update math through
torch.compile (TORCH_COMPILE_DISABLE=1 runs it eagerly), and, when a torch.distributed process
group is initialized, splits the work across ranks by a bucket plan (bucket_plan: a wide matrix
joins the bucket of its transpose's shape, so ranks get equal work) and all-gathers the results, so
that every rank ends the step with the same parameters and optimizer state. Gradients must already
be summed across ranks (the trainer does that) before step(). Given a `found_inf` tensor, as
GradScaler gives fused AdamW, a step never waits for the device (see _ShardedOrthogonalOptimizer).
Parameters sharded by FSDP2's fully_shard (DTensors, Shard(0)) are taken as they are: each whole
matrix is updated on one owner rank, with the same result (see the FSDP2 section below).

This file imports only the standard library and torch and has no top-level side effects:
train_gpt.py inlines its text into the single-file script that every log carries.
"""

import contextlib
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

    `dtype` exists for Riemannian Aurora's float32 retraction; the recipes use the bf16 default.
    """
    schedule = (REFERENCE_POLAR_COEFFICIENTS,) * REFERENCE_POLAR_ITERATIONS
    return odd_quintic_polar(X, schedule, 1.0, dtype)


def polar_express(X):
    """Polar Express (docs/recipes.md#variants): 5 bf16 iterations, each with its own coefficients. Not a
    record default."""
    return odd_quintic_polar(X, POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_SAFETY, torch.bfloat16)




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

def aurora_polar(G, pp_iterations=2, pp_beta=0.5, polar_fn=polar):
    """Aurora step 2 (docs/recipes.md#aurora): an orthogonal P whose tall-orientation rows have norm ~sqrt(n/m).

    Square G: polar(G). Otherwise, on the tall orientation U (m x n, float32), row-rescale
    D = 1/||U_i||, then repeat P = polar(D U) and D *= ((n/m) / ||P_i||^2)^pp_beta.
    A wide G gives exactly the transpose of the result for G^T.
    """
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


def schatten_polar(G):
    """Records #42 and #46's polar(G) (docs/recipes.md#schatten-4-pre-norm): polar's 12 bf16 iterations on
    the wide orientation, after dividing by the Schatten-4 norm (eps 1e-7, rounded to bf16) instead of
    the Frobenius norm, so the largest singular value starts nearer 1."""
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / schatten4_norm(X, keepdim=True, eps=1e-7).to(X.dtype)
    X = quintic_iterations(X, (REFERENCE_POLAR_COEFFICIENTS,) * REFERENCE_POLAR_ITERATIONS)
    return X.mT if tall else X


def aurora_polar_schatten(G, iterations=3, beta=0.25, eps=1e-7):
    """Aurora's row-balanced polar factor in record #42's form (docs/recipes.md#aurora-in-record-42): on the
    tall orientation T (m x n) of bf16(G), D = 1/||T_i||, then `iterations` times P = schatten_polar-style
    polar of bf16(D T) (each pass on its own Schatten-4 pre-norm) and, between passes,
    D *= ((n/m) / ||P_i||^2)^beta. Square G: schatten_polar(G)."""
    if G.size(-2) == G.size(-1):
        return schatten_polar(G)
    wide = G.size(-2) < G.size(-1)
    T = G.bfloat16().mT if wide else G.bfloat16()
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


def riemannian_aurora_polar(G, ascent_steps=4, cg_iterations=10, retraction_rounds=6):
    """Riemannian Aurora (docs/recipes.md#variants): maximizes <G, P> over P^T P = I with every
    tall-orientation row at norm^2 n/m, by projected Riemannian ascent from polar(G), in float32.

    The step length is 0.5 / (RMS singular value of G): a full 1 / RMS overshoots and the
    objective falls again after two steps; 0.5 raises it monotonically (measured on 48x16 to 192x48).
    Square G: polar(G) (orthogonal rows already have norm 1). Wide G: transpose of the tall case.
    Cost: 5 retractions of 6 float32 polars each; a whole Aurora step measured 22x vanilla's on a
    CPU at width 192 (benchmarks/optimizer_step.py --riemannian).
    """
    if G.size(-2) == G.size(-1):
        return polar(G)
    wide = G.size(-2) < G.size(-1)
    U = (G.mT if wide else G).float()
    step = 0.5 * U.size(-1) ** 0.5 / U.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    P = retract_uniform_leverage(polar(U).float(), retraction_rounds)
    for _ in range(ascent_steps):
        xi = constrained_tangent(P, U, cg_iterations)
        P = retract_uniform_leverage(P + step * xi, retraction_rounds)
    return P.mT if wide else P


# --------------------------------------------------------------------------------------------
# Per-shape update math (compiled): direction u of a stack of same-shape matrices -> update.
# Learning rate and weight decay are applied outside, so scheduling them never recompiles.
# --------------------------------------------------------------------------------------------

def leverage_if_rectangular(P):
    return None if P.size(-2) == P.size(-1) else tall_leverage(P)


def muon_update(u, polar_fn):
    """Muon (docs/recipes.md#muon): polar(u) * sqrt(max(1, rows/cols)). Returns (update, leverage)."""
    P = polar_fn(u)
    update = P * aspect_scale(u.size(-2), u.size(-1))
    return update.float(), leverage_if_rectangular(P)


def normuon_update(u, second_moment, beta2, u_normuon, polar_fn):
    """NorMuon (docs/recipes.md#normuon), or U-NorMuon's tall case (docs/recipes.md#variants).
    Returns (update, second moment, leverage)."""
    P = polar_fn(u)
    if u_normuon and u.size(-2) > u.size(-1):
        O = u_normuon_tall(P)
    else:
        O, second_moment = normuon_normalize(P * aspect_scale(u.size(-2), u.size(-1)), second_moment, beta2)
    return O.float(), second_moment, leverage_if_rectangular(P)


def aurora_update(u, W, pp_iterations, pp_beta, contra, floor, variant, polar_fn, use_aurora_polar=True):
    """Aurora (docs/recipes.md#aurora; variant "riemannian": docs/recipes.md#variants).
    Returns (update, leverage).

    W: the stacked weights, read only by the u/w floor (None when floor is 0). use_aurora_polar=False
    (a matrix the orientation policy leaves out) takes plain Muon's polar factor instead; the
    Contra-Muon mix and the u/w floor still apply."""
    if not use_aurora_polar:
        P = polar_fn(u)
    elif variant == "riemannian":
        P = riemannian_aurora_polar(u)
    else:
        P = aurora_polar(u, pp_iterations, pp_beta, polar_fn)
    Q = P
    if contra != 0:  # with c = 0 step 3 is the identity up to rounding
        Q = contra_mix(P, contra_direction(u), contra)
    Q = Q * aspect_scale(u.size(-2), u.size(-1))
    if floor != 0:
        Q = uw_floor(Q, W, floor)
    return Q.float(), leverage_if_rectangular(P)


# --------------------------------------------------------------------------------------------
# Bucket plan: which matrices share a batch and an all-gather, and which rank updates which.
# A pure function of the shapes, so the work per rank can be counted without starting any rank.
# --------------------------------------------------------------------------------------------

def bucket_plan(shapes, join_transposes=True):
    """Buckets of matrix indices (into `shapes`): each bucket's updates are computed rank by rank
    and collected by one all-gather. A bucket holds the matrices of one shape in order and, with
    join_transposes, then the wide matrices whose transpose has that shape. A GPT's 12 fc
    (3072x768) and 12 proj (768x3072) thus form one bucket of 24, 3 per rank on 8 ranks, where two
    buckets of 12 would leave two ranks computing on padding. Every matrix is still updated in its
    own orientation (see _ShardedOrthogonalOptimizer.start_bucket), so joining changes no number."""
    buckets = {}
    for index, (rows, cols) in enumerate(shapes):
        key = (max(rows, cols), min(rows, cols)) if join_transposes else (rows, cols)
        buckets.setdefault(key, []).append(index)
    return [sorted(bucket, key=lambda i: shapes[i][0] < shapes[i][1]) for bucket in buckets.values()]


def rank_slice(bucket_size, rank, world_size):
    """(lo, hi, share): the rank updates members lo:hi of a bucket; every rank sends `share` rows."""
    share = -(-bucket_size // world_size)
    return min(rank * share, bucket_size), min((rank + 1) * share, bucket_size), share


def same_shape_runs(indices, shapes):
    """Consecutive indices grouped into runs of equal shape (one batched update each)."""
    runs = []
    for i in indices:
        if runs and shapes[runs[-1][-1]] == shapes[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def polar_flops(rows, cols, iterations):
    """Matmul FLOPs of one odd-quintic polar, on the wide orientation n x N (n <= N): per iteration
    A = X X^T (2 n^2 N), A A (2 n^3) and B X (2 n^2 N)."""
    n, N = min(rows, cols), max(rows, cols)
    return iterations * (4 * n * n * N + 2 * n ** 3)


def flops_per_rank(plan, shapes, world_size, matrix_flops):
    """Each rank's summed matrix_flops(shape) over the matrices `plan` gives it on world_size ranks."""
    totals = [0] * world_size
    for bucket in plan:
        for rank in range(world_size):
            lo, hi, _ = rank_slice(len(bucket), rank, world_size)
            totals[rank] += sum(matrix_flops(shapes[i]) for i in bucket[lo:hi])
    return totals


# --------------------------------------------------------------------------------------------
# Optimizers.
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


def with_leverage(new_state, leverage):
    """Adds the leverage vectors (None for square matrices) to the state the update math produced."""
    if leverage is not None:
        new_state["leverage"] = leverage
    return new_state


def gather_from_ranks(chunk, world_size):
    """Starts an all-gather of each rank's (share, F) chunk into (world * share, F)."""
    out = chunk.new_empty(world_size * chunk.size(0), *chunk.shape[1:])
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return out, gather(out, chunk, async_op=True)


def all_finite(tensors):
    """Device bool: no tensor holds inf or NaN (by one fused norm per tensor; a norm beyond the
    float32 range also counts as not finite)."""
    return torch.stack(torch._foreach_norm(tensors)).isfinite().all()


# --------------------------------------------------------------------------------------------
# FSDP2 parameters (DTensor, Shard(0) on a 1-D mesh): every rank holds a block of rows of each
# matrix. The update math needs whole matrices, so each matrix gets an owner rank: one all-to-all
# brings the owner every rank's rows of the momentum direction (and of what else the math reads),
# the owner runs the same batched update math as for replicated parameters, and a second
# all-to-all returns each rank its rows of the update and of the new state. An all-to-all moves
# the same bytes as a gather to each owner plus a scatter back, but in 2 collectives per shape
# instead of 2 per matrix, with every rank's link busy instead of one owner's at a time.
# --------------------------------------------------------------------------------------------

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


def local_shape(shape, dim, rank, world_size):
    """Shape of `rank`'s piece of a tensor of `shape` sharded along `dim`."""
    shape = list(shape)
    shape[dim] = shard_sizes(shape[dim], world_size)[rank]
    return tuple(shape)


def rank_piece(t, dim, rank, world_size):
    """`rank`'s piece (a view) of the full tensor t sharded along `dim`."""
    sizes = shard_sizes(t.size(dim), world_size)
    return t.narrow(dim, sum(sizes[:rank]), sizes[rank])


def unsupported_placement(p):
    """Why the DTensor p cannot be optimized as a whole matrix per owner rank, or None."""
    if p.device_mesh.ndim != 1:
        return (f"has placements {tuple(p.placements)!r} on a {p.device_mesh.ndim}-D mesh: only 1-D meshes are "
                f"supported (fully_shard over one mesh dimension, no HSDP)")
    if tuple(p.placements) != (torch.distributed.tensor.Shard(0),):
        return (f"has placement {p.placements[0]!r}: only Shard(0), fully_shard's default, is supported "
                f"(a shard_placement_fn choosing another placement is not)")
    return None


def sharded_state_zeros(p, shape):
    """float32 zeros of `shape` for the state of the DTensor p, sharded over p's mesh along its
    longest dim (a row vector (1, cols) along its columns), so every rank keeps about 1/world of it."""
    dim = max(range(len(shape)), key=lambda d: shape[d])
    return torch.distributed.tensor.zeros(*shape, dtype=torch.float32, device_mesh=p.device_mesh,
                                          placements=[torch.distributed.tensor.Shard(dim)])


def owner_ranges(count, world_size):
    """Matrices each rank owns in a bucket of `count`: rank_slice's, as start_bucket splits."""
    return [range(*rank_slice(count, r, world_size)[:2]) for r in range(world_size)]


def field_numel(fields, rank, world_size):
    """Elements of `rank`'s pieces of one matrix's fields ((full shape, shard dim, dtype) each)."""
    return sum(torch.Size(local_shape(shape, dim, rank, world_size)).numel() for shape, dim, _ in fields)


def exchange_pieces(pieces_for, numels_from, like, group):
    """Starts an all-to-all: the tensors pieces_for[r] (flattened, float32) go to rank r, and
    numels_from[r] elements come from rank r. Returns (received buffer split per source, work)."""
    flat = [t.reshape(-1).float() for pieces in pieces_for for t in pieces]
    send = torch.cat(flat) if flat else like.new_zeros(0, dtype=torch.float32)
    received = like.new_empty(sum(numels_from), dtype=torch.float32)
    work = dist.all_to_all_single(received, send, output_split_sizes=list(numels_from),
                                  input_split_sizes=[sum(t.numel() for t in pieces) for pieces in pieces_for],
                                  group=group, async_op=True)
    return received.split(list(numels_from)), work


def unpack_pieces(buffer, count, fields, rank, world_size):
    """Inverse of the packing: `buffer` holds, for `count` matrices in turn, `rank`'s piece of each
    field. Returns one (count, *piece shape) tensor per field, in the field's dtype."""
    shapes = [local_shape(shape, dim, rank, world_size) for shape, dim, _ in fields]
    numels = [torch.Size(s).numel() for s in shapes]
    columns = buffer.reshape(count, sum(numels)).split(numels, dim=1)
    return [c.reshape(count, *s).to(dtype) for c, s, (_, _, dtype) in zip(columns, shapes, fields)]


def assemble_on_owners(pieces, fields, owned, mesh):
    """All-to-all 1: pieces[i] are this rank's pieces of matrix i's fields; returns, for the
    matrices this rank owns, each field whole: (owned count, *full shape), in the field's dtype."""
    group, rank, world_size = mesh.get_group(), mesh.get_local_rank(), mesh.size()
    count = len(owned[rank])
    received, work = exchange_pieces([[t for i in owned[r] for t in pieces[i]] for r in range(world_size)],
                                     [count * field_numel(fields, r, world_size) for r in range(world_size)],
                                     pieces[0][0], group)
    work.wait()
    per_source = [unpack_pieces(b, count, fields, r, world_size) for r, b in enumerate(received)]
    # Each field's pieces concatenated along its shard dim (+1 for the stack).
    return [torch.cat([source[f] for source in per_source], dim=dim + 1)
            for f, (_, dim, _) in enumerate(fields)]


def start_return_to_ranks(results, fields, owned, mesh, like):
    """All-to-all 2: results are the owner's (owned count, *full shape) fields; every rank gets
    its pieces back. Returns a callable that waits and returns, per field, this rank's pieces of
    every matrix of the bucket: (bucket size, *piece shape)."""
    group, rank, world_size = mesh.get_group(), mesh.get_local_rank(), mesh.size()
    pieces_for = [[rank_piece(t[j], dim, r, world_size) for j in range(len(owned[rank]))
                   for t, (_, dim, _) in zip(results, fields)] for r in range(world_size)]
    received, work = exchange_pieces(pieces_for, [len(owned[r]) * field_numel(fields, rank, world_size)
                                                  for r in range(world_size)], like, group)

    def finish():
        work.wait()
        per_owner = [unpack_pieces(b, len(owned[r]), fields, rank, world_size) for r, b in enumerate(received)]
        return [torch.cat([owner[f] for owner in per_owner]) for f in range(len(fields))]
    return finish


def local_tensor(p):
    """The tensor a step writes into: p itself, or this rank's rows of a DTensor p."""
    return p.to_local() if is_dtensor(p) else p


def sharded_buckets(params):
    """DTensor parameters with a gradient, grouped by shape and mesh in order of first appearance."""
    buckets = {}
    for p in params:
        if is_dtensor(p) and p.grad is not None:
            buckets.setdefault((tuple(p.shape), p.device_mesh), []).append(p)
    return list(buckets.values())


class _ShardedOrthogonalOptimizer(torch.optim.Optimizer):
    """Common step of the three optimizers; subclasses give the per-shape update math.

    Subclasses define `update_math` (a pure function, compiled once per stacked shape),
    `stacked_state` (names of per-matrix state the update math reads and rewrites) and
    `run_update_math(group, u, weights, stacked) -> (stacked update, {state name: stacked state})`
    for a stack of same-shape matrices of this rank's share of a bucket (`weights`: their stacked
    values where reads_full_weights says the math reads them, else None).

    Non-finite updates: with `found_inf` set (GradScaler's protocol, a float32 device tensor, as
    fused AdamW reads it), step() does not look at any value on the host. It adds a non-finite
    update of its own to found_inf and leaves the weights untouched while found_inf is 1; the
    momentum and other state of such a step are not restored. Without found_inf it raises
    FloatingPointError naming the matrix (one host sync per step).
    """

    stacked_state = ()
    join_transposes = True  # False: one bucket per exact shape (what benchmarks compare against)
    gather_alone = False  # True: the all-gather path also in a process group of one (tests it on one GPU)

    def __init__(self, params, defaults):
        if defaults["lr"] < 0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {defaults['lr']}")
        if defaults.get("polar_backend", "polar") not in POLAR_BACKENDS:
            raise ValueError(f"{type(self).__name__}: polar_backend must be one of "
                             f"{sorted(POLAR_BACKENDS)}, got {defaults['polar_backend']!r}")
        super().__init__(params, defaults)
        self._compiled_update_math = None  # made by the first compiled step

    def update_math_now(self):
        """update_math as it should run now: compiled, or the function itself while compiling is off
        (torch._dynamo.config.disable). A compiled wrapper called with compiling off still runs the code dynamo
        compiled for it earlier, and making one costs an uncompiled process inductor's import (over a second)."""
        if torch._dynamo.config.disable:
            return type(self).update_math
        if self._compiled_update_math is None:
            self._compiled_update_math = torch.compile(type(self).update_math, dynamic=False)
        return self._compiled_update_math

    def add_param_group(self, param_group):
        """torch.optim's, plus refusing what the matrix math cannot take (named in the error: pass
        model.named_parameters()-style (name, tensor) pairs to get parameter names there)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names") or [None] * len(group["params"])
        for index, (name, p) in enumerate(zip(names, group["params"])):
            problem = None
            if p.ndim != 2:
                problem = ("is not a 2-D matrix; give embeddings, heads, biases and gains to AdamW "
                           "instead")
            elif is_dtensor(p):
                problem = unsupported_placement(p)
            if problem is not None:
                self.param_groups.pop()
                label = repr(name) if name is not None else f"#{index} of param group {len(self.param_groups)}"
                if is_dtensor(p):
                    label += f" (DTensor {tuple(p.placements)!r})"
                raise ValueError(f"{type(self).__name__}: parameter {label} of shape {tuple(p.shape)} "
                                 f"{problem}")

    def state_zeros(self, p, shape):
        """float32 zeros for per-matrix state of p: a plain tensor, or sharded like p (DTensor)."""
        if is_dtensor(p):
            return sharded_state_zeros(p, shape)
        return torch.zeros(shape, dtype=torch.float32, device=p.device)

    def init_state(self, p):
        """Fills self.state[p] on first use (all tensors in `state` so state_dict carries them)."""
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
            if p.size(0) != p.size(1):
                state["leverage"] = self.state_zeros(p, (max(p.shape),))
        return state

    def leverage(self):
        """{parameter: float32 leverage of its latest orthogonal update} for non-square matrices."""
        return {p: s["leverage"] for p, s in self.state.items() if "leverage" in s}

    def matrix_flops(self, shape, group):
        """Matmul FLOPs of one matrix's update: its polar factor(s)."""
        return polar_backend_flops(group["polar_backend"], *shape)

    def gather_bytes(self, world_size):
        """The largest all-gather buffer of a step (one bucket: every rank's share of updates and state rows)."""
        largest = 0
        for group in self.param_groups:
            shapes = [tuple(p.shape) for p in group["params"]]
            for bucket in bucket_plan(shapes, self.join_transposes):
                rows, cols = shapes[bucket[0]]
                width = rows * cols + (max(rows, cols) if rows != cols else 0) + \
                    (rows if rows >= cols else cols) * len(self.stacked_state)
                largest = max(largest, 4 * world_size * rank_slice(len(bucket), 0, world_size)[2] * width)
        return largest

    def state_bytes_per_rank(self, world_size):
        """Bytes of this optimizer's state on each of world_size ranks: every rank keeps every matrix's
        momentum (float32), the leverage of the non-square ones and the subclass's stacked state, since
        every rank updates every momentum and the other state travels with the gathered updates."""
        total = 0
        for group in self.param_groups:
            for p in group["params"]:
                rows, cols = p.shape
                total += 4 * (rows * cols + (max(rows, cols) if rows != cols else 0))
                total += 4 * (rows if rows >= cols else cols) * len(self.stacked_state)
        return [total] * world_size

    def flops_per_rank(self, world_size, join_transposes=None):
        """Matrix FLOPs of each of world_size ranks in one step, from the bucket plan those ranks
        would follow (every matrix counted, as after the first step)."""
        join = self.join_transposes if join_transposes is None else join_transposes
        totals = [0] * world_size
        for group in self.param_groups:
            shapes = [tuple(p.shape) for p in group["params"]]
            per_rank = flops_per_rank(bucket_plan(shapes, join), shapes, world_size,
                                      lambda shape: self.matrix_flops(shape, group))
            totals = [a + b for a, b in zip(totals, per_rank)]
        return totals

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        rank, world_size = rank_and_world_size()
        launched = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and not is_dtensor(p)]
            for bucket in bucket_plan([tuple(p.shape) for p in params], self.join_transposes):
                members = [params[i] for i in bucket]
                launched.append((group, members, self.start_bucket(group, members, rank, world_size)))
            for params in sharded_buckets(group["params"]):
                launched.append((group, params, self.start_sharded_bucket(group, params)))
        finished = [(group, params, finish()) for group, params, finish in launched]
        self.apply_updates(finished, getattr(self, "found_inf", None))
        return loss

    def start_bucket(self, group, params, rank, world_size):
        """Momentum, and this rank's share of the update math for one bucket.

        The share is computed in runs of same-shape matrices, each in its own orientation: a wide
        matrix in a bucket of tall ones gets exactly the update it would get in a bucket of its
        own shape. Returns a callable that waits for the other ranks' shares, writes the gathered
        state back and returns the list of the bucket's updates."""
        states = [self.init_state(p) for p in params]
        # Every rank updates every momentum buffer: the grads are identical on all ranks, so the
        # buffers stay identical without communication. The polar work is then split.
        momenta = [s["momentum_buffer"] for s in states]
        momentum_step_(momenta, [p.grad for p in params], group["momentum"])
        lo, hi, share = rank_slice(len(params), rank, world_size)
        shapes = [p.shape for p in params]
        results = []  # (indices, stacked update, {name: stacked state}) per run
        for run in same_shape_runs(range(lo, hi), shapes):
            directions = [momenta[i] for i in run]
            if group["nesterov"]:
                directions = [nesterov_direction(params[i].grad, momenta[i], group["momentum"]) for i in run]
            update, new_state = self.update_run(group, directions, [params[i] for i in run],
                                                [states[i] for i in run], len(params))
            results.append((run, update, new_state))
        if world_size == 1 and not (self.gather_alone and dist.is_initialized()):
            return lambda: self.write_back(states, results)
        # Every state but the momentum travels with the update, one row per matrix.
        names = sorted(name for name in states[0] if name != "momentum_buffer")
        widths = [params[0].numel()] + [states[0][name].numel() for name in names]
        chunk = torch.zeros(share, sum(widths), device=params[0].device)
        for run, update, new_state in results:
            rows = [t.reshape(len(run), -1).float() for t in [update] + [new_state[name] for name in names]]
            chunk[run[0] - lo:run[-1] + 1 - lo] = torch.cat(rows, dim=1)
        gathered, work = gather_from_ranks(chunk, world_size)

        def finish():
            work.wait()
            pieces = gathered[:len(params)].split(widths, dim=1)
            for name, piece in zip(names, pieces[1:]):
                torch._foreach_copy_([s[name] for s in states],
                                     [row.view_as(s[name]) for row, s in zip(piece.unbind(0), states)])
            return [row.view_as(p) for row, p in zip(pieces[0].unbind(0), params)]
        return finish

    def update_run(self, group, directions, weights, states, bucket_size):
        """run_update_math on one run of same-shape matrices (lists: directions, weights, states; the
        weights are stacked only where the math reads them).

        A lone matrix of a bucket of several is stacked with a zero matrix: torch's batched
        matmul takes another kernel for a batch of one, whose bf16 rounding differs (14 of 180
        (48, 16) polars on a CPU), so without it a matrix's update would depend on how many ranks
        share its bucket. Returns the stacked update and state of the run's matrices."""
        count = len(directions)

        def stack(tensors):
            lone = count == 1 < bucket_size
            return torch.stack(tensors + [torch.zeros_like(tensors[0])] if lone else tensors)
        stacked = {name: stack([s[name] for s in states]) for name in self.stacked_state}
        weights = stack(weights) if self.reads_full_weights(group) else None
        update, new_state = self.run_update_math(group, stack(directions), weights, stacked)
        return update[:count], {name: t[:count] for name, t in new_state.items()}

    def reads_full_weights(self, group):
        """Whether run_update_math reads the weights themselves (Aurora's u/w floor)."""
        return False

    def start_sharded_bucket(self, group, params):
        """start_bucket for DTensor parameters of one shape (Shard(0) on one 1-D mesh): momentum
        and the Nesterov direction on the local rows, then whole matrices on their owner rank (see
        the section above); weight decay is apply_updates' as for replicated parameters.

        Rank r owns the matrices [r * share, (r + 1) * share) of the bucket, as in start_bucket.
        The owner gets the full direction u, the full weights when the math reads them (Aurora's
        floor needs ||W||_F of the whole matrix; computing it from the whole matrix keeps the
        result bit-identical to one process) and the full per-matrix state (NorMuon's row or
        column second moment), all assembled from the pieces. State lives sharded between steps.

        Returns a callable that waits for this rank's rows of the update and the new state, writes
        the state and returns the list of this rank's rows of the updates."""
        mesh = params[0].device_mesh
        rank, world_size = mesh.get_local_rank(), mesh.size()
        states = [self.init_state(p) for p in params]
        for p in params:
            if not (is_dtensor(p.grad) and p.grad.placements == p.placements):
                raise ValueError(f"{type(self).__name__}: the gradient of the DTensor parameter of shape "
                                 f"{tuple(p.shape)} must be a DTensor placed like it ({p.placements}), "
                                 f"as fully_shard's backward makes it")
        local_params = [p.to_local() for p in params]
        # Elementwise steps on each rank's rows give bit-for-bit the rows of the whole-matrix result.
        momenta = [s["momentum_buffer"].to_local() for s in states]
        grads = [p.grad.to_local() for p in params]
        momentum_step_(momenta, grads, group["momentum"])
        directions = momenta
        if group["nesterov"]:
            directions = [nesterov_direction(g, m, group["momentum"]) for g, m in zip(grads, momenta)]

        # What the owner reads, as (full shape, shard dim, dtype) fields, and this rank's pieces.
        shape, dtype = tuple(params[0].shape), params[0].dtype
        fields = [(shape, 0, dtype)]
        pieces = [[d] for d in directions]
        if self.reads_full_weights(group):
            fields.append((shape, 0, dtype))
            for matrix_pieces, w in zip(pieces, local_params):
                matrix_pieces.append(w)
        for name in self.stacked_state:
            fields.append((tuple(states[0][name].shape), states[0][name].placements[0].dim, torch.float32))
            for matrix_pieces, s in zip(pieces, states):
                matrix_pieces.append(s[name].to_local())
        owned = owner_ranges(len(params), world_size)
        whole = assemble_on_owners(pieces, fields, owned, mesh)

        # What comes back: the update and every state but the momentum.
        names = sorted(name for name in states[0] if name != "momentum_buffer")
        back_fields = [(shape, 0, torch.float32)] + [
            (tuple(states[0][n].shape), states[0][n].placements[0].dim, torch.float32) for n in names]
        results = []  # this rank's owned matrices' update and state (none if it owns none)
        count = len(owned[rank])
        if count:
            weights = list(whole[1].unbind(0)) if self.reads_full_weights(group) else None
            state_fields = whole[len(fields) - len(self.stacked_state):]
            owned_states = [{name: t[j] for name, t in zip(self.stacked_state, state_fields)}
                            for j in range(count)]
            update, new_state = self.update_run(group, list(whole[0].unbind(0)), weights, owned_states,
                                                len(params))
            results = [update] + [new_state[n] for n in names]
        receive = start_return_to_ranks(results, back_fields, owned, mesh, directions[0])

        def finish():
            update, *new_state = receive()
            for name, stacked in zip(names, new_state):
                torch._foreach_copy_([s[name].to_local() for s in states], list(stacked.unbind(0)))
            return list(update.unbind(0))
        return finish

    @staticmethod
    def write_back(states, results):
        """One process: copies each run's stacked new state into its matrices' state; returns the
        updates."""
        updates = []
        for run, update, new_state in results:
            for name, stacked in new_state.items():
                torch._foreach_copy_([states[i][name] for i in run], list(stacked.unbind(0)))
            updates.extend(update.unbind(0))
        return updates

    def apply_updates(self, finished, found_inf):
        """Decoupled weight decay and W -= lr * update for every bucket, refused for non-finite updates."""
        if not finished:
            return
        keep = None
        if found_inf is None:
            self.check_finite(finished)
        else:
            found_inf.copy_(torch.where(all_finite([u for _, _, updates in finished for u in updates]),
                                        found_inf, 1.0))
            keep = found_inf == 0
            refused = ~keep
        for group, params, updates in finished:
            decay = 1 - group["lr"] * group["weight_decay"]
            if keep is not None:
                decay = torch.where(keep, decay, 1.0)
                # The updates are this step's own buffers: zeroed in place when refused, no copies. A fill,
                # not a product with 0, which would turn an inf or NaN update into NaN weights.
                for update in updates:
                    update.masked_fill_(refused, 0.0)
            targets = [local_tensor(p) for p in params]
            if group["weight_decay"] != 0:
                torch._foreach_mul_(targets, decay)
            torch._foreach_add_(targets, updates, alpha=-group["lr"])

    def check_finite(self, finished):
        """One host sync per step: refuse to apply an update holding inf or NaN."""
        if bool(all_finite([u for _, _, updates in finished for u in updates])):
            return
        for group, params, updates in finished:
            for index, (p, update) in enumerate(zip(params, updates)):
                if not bool(update.isfinite().all()):
                    raise FloatingPointError(
                        f"{type(self).__name__}: non-finite update for the parameter of shape "
                        f"{tuple(p.shape)} (param group {self.param_groups.index(group)}, matrix "
                        f"{index} of its bucket); its gradient or momentum holds inf/NaN: the loss has "
                        f"probably diverged, lower the learning rate")


class Muon(_ShardedOrthogonalOptimizer):
    """Muon (docs/recipes.md#muon, record #36 with lr=0.025, weight_decay=0.05): W *= 1 - lr*wd;
    W -= lr * polar(u) * sqrt(max(1, rows/cols)), u the Nesterov momentum direction."""

    update_math = staticmethod(muon_update)

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, nesterov=True, polar_backend="polar"):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, polar_backend=polar_backend))

    def run_update_math(self, group, u, weights, stacked):
        update, leverage = self.update_math_now()(u, POLAR_BACKENDS[group["polar_backend"]])
        return update, with_leverage({}, leverage)


class NorMuon(_ShardedOrthogonalOptimizer):
    """NorMuon (docs/recipes.md#normuon, record #10 with lr=0.035, weight_decay=0.025): Muon's scaled polar
    factor normalized by a running second moment per row (rows >= cols) or per column.

    u_normuon=True gives U-NorMuon (docs/recipes.md#variants): tall matrices get rows of norm sqrt(n/m)
    instead."""

    update_math = staticmethod(normuon_update)
    stacked_state = ("second_moment",)

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, nesterov=True, beta2=0.95,
                 u_normuon=False, polar_backend="polar"):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, beta2=beta2, u_normuon=u_normuon,
                                      polar_backend=polar_backend))

    def init_state(self, p):
        state = super().init_state(p)
        if "second_moment" not in state:
            shape = (p.size(0), 1) if p.size(0) >= p.size(1) else (1, p.size(1))
            state["second_moment"] = self.state_zeros(p, shape)
        return state

    def run_update_math(self, group, u, weights, stacked):
        update, second_moment, leverage = self.update_math_now()(
            u, stacked["second_moment"], group["beta2"], group["u_normuon"],
            POLAR_BACKENDS[group["polar_backend"]])
        return update, with_leverage({"second_moment": second_moment}, leverage)


AURORA_VARIANTS = ("vanilla", "riemannian")
# Which matrices get Aurora's polar factor: every non-square one (record #17), only tall ones (the
# shape the Aurora authors designed it for), only wide ones (entries that apply it to the wide
# mlp.proj alone) or none (the group's polar_backend as it is: how --aurora picks matrices by name).
# The others get plain Muon's polar; square matrices get polar either way.
AURORA_ORIENTATIONS = ("non_square", "tall", "wide", "none")


def takes_aurora_polar(orientation, rows, cols):
    """Whether the orientation policy gives a rows x cols matrix Aurora's polar factor."""
    if orientation == "tall":
        return rows >= cols
    if orientation == "wide":
        return rows <= cols
    return orientation == "non_square"


class Aurora(_ShardedOrthogonalOptimizer):
    """Aurora (docs/recipes.md#aurora, record #17 with lr=0.0375, contra=0.4, uw_floor=0.35): Muon with a
    leverage-equalized polar factor (aurora_polar), an optional Contra-Muon mix and u/w floor.

    variant="riemannian" replaces aurora_polar by riemannian_aurora_polar (docs/recipes.md#variants).
    orientation ("non_square", the record's; "tall"; "wide") picks the matrices that get Aurora's
    polar factor; the others get Muon's polar, with the same Contra-Muon mix and u/w floor."""

    update_math = staticmethod(aurora_update)

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, nesterov=True, pp_iterations=2,
                 pp_beta=0.5, contra=0.0, uw_floor=0.0, variant="vanilla", polar_backend="polar",
                 orientation="non_square"):
        if variant not in AURORA_VARIANTS:
            raise ValueError(f"Aurora: variant must be one of {AURORA_VARIANTS}, got {variant!r}")
        if orientation not in AURORA_ORIENTATIONS:
            raise ValueError(f"Aurora: orientation must be one of {AURORA_ORIENTATIONS}, got {orientation!r}")
        if pp_iterations < 1:
            raise ValueError(f"Aurora: pp_iterations must be >= 1, got {pp_iterations}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, pp_iterations=pp_iterations, pp_beta=pp_beta,
                                      contra=contra, uw_floor=uw_floor, variant=variant,
                                      polar_backend=polar_backend, orientation=orientation))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # state_dicts saved before the orientation policy existed
            group.setdefault("orientation", "non_square")

    def reads_full_weights(self, group):
        return group["uw_floor"] != 0

    def run_update_math(self, group, u, weights, stacked):
        if weights is not None and group["weight_decay"] != 0:  # the floor sees W after this step's decay, as the parameters get it
            weights = weights * (1 - group["lr"] * group["weight_decay"])
        update, leverage = self.update_math_now()(
            u, weights, group["pp_iterations"], group["pp_beta"], group["contra"], group["uw_floor"],
            group["variant"], POLAR_BACKENDS[group["polar_backend"]],
            takes_aurora_polar(group["orientation"], u.size(-2), u.size(-1)))
        return update, with_leverage({}, leverage)

    def matrix_flops(self, shape, group):
        """Matmul FLOPs of one matrix's update: pp_iterations polars for a rectangular matrix, one for a
        square one (the Riemannian variant's extra float32 work is not counted)."""
        if not takes_aurora_polar(group["orientation"], *shape):
            return super().matrix_flops(shape, group)
        polars = 1 if shape[0] == shape[1] else group["pp_iterations"]
        return polars * polar_backend_flops(group["polar_backend"], *shape)


# --------------------------------------------------------------------------------------------
# The stages of records #42 and #46 (docs/recipes.md#soap-muon), one matrix at a time, each written with
# the record's operations in the record's order and dtypes so that the result is the record's bit for bit.
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
    projected = q_row.T @ u_f @ q_col
    exp_avg_sq = exp_avg_sq.mul(beta2).add(projected.square(), alpha=1 - beta2)
    denom = exp_avg_sq.clamp_min(eps * eps).pow(denom_power)
    if denom_floor > 0:
        floor = denom.float().square().mean().sqrt().mul(denom_floor).clamp_min(eps)
        denom = denom.clamp_min(floor.to(denom.dtype))
    preconditioned = q_row @ (projected / denom) @ q_col.T
    if blend != 1.0:
        preconditioned = blend * preconditioned + (1 - blend) * u_f
    preconditioned = preconditioned * (schatten4_norm(u_f, eps=eps) / schatten4_norm(preconditioned, eps=eps))
    return preconditioned.to(u.dtype), exp_avg_sq


def rescaled_to_schatten_norm_of(x, reference, eps=1e-8):
    """x scaled to the Schatten-4 norm of `reference`, in reference's dtype (record #42's V blend)."""
    return (x * (schatten4_norm(reference, eps=eps) / schatten4_norm(x, eps=eps)).to(x.dtype)).to(reference.dtype)


def cosine_similarity(a, b, eps=1e-8):
    """<a, b> / (||a|| ||b||) over all entries, float32."""
    a, b = a.float(), b.float()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(eps)


def trust_gate(raw, preconditioned, grad, min_agree=0.20, min_grad_align=0.0, power=1.0, eps=1e-8):
    """How far to trust SOAP's direction over the raw momentum (record #46, docs/recipes.md#trust-gate): 1
    when it still agrees with the raw momentum (cosine above min_agree) and is at least as aligned with
    the gradient, falling linearly to 0 as either fails; a float32 scalar in [0, 1]."""
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
    return (blended * (schatten4_norm(raw, eps=eps) / schatten4_norm(blended, eps=eps)).to(blended.dtype)).to(raw.dtype)


def contra_combined(P, u, contra):
    """Record #42's Contra-Muon term (docs/recipes.md#contra-muon-ramp): P + c u / ||u||_S4, rescaled to P's
    Schatten-4 norm (float32)."""
    direction = u / schatten4_norm(u).to(u.dtype)
    Q = P + contra * direction
    return Q * schatten4_norm(P) / schatten4_norm(Q)


def row_variance_normalized(Q, second_moment, beta2):
    """Record #42's NorMuon-lite: Q times rsqrt of a running mean square per row (rows >= cols) or column,
    rescaled to its Schatten-4 norm. Returns (Q, new second moment). With beta2 = 1, the record's value,
    the moment stays 0 and only the rescaling's rounding remains."""
    mean_square = (Q * Q).mean(dim=-1 if Q.size(-2) >= Q.size(-1) else -2, keepdim=True)
    second_moment = second_moment.lerp(mean_square.float(), 1 - beta2)
    before = schatten4_norm(Q)
    Q = Q * second_moment.clamp_min(1e-10).rsqrt().to(Q.dtype)
    return Q * (before / schatten4_norm(Q)), second_moment


def radially_braked(update, W, outward=0.5, inward=1.0, eps=1e-12):
    """The radial brake (docs/recipes.md#radial-brake-and-radius-pin): the update's component along W scaled
    by `outward` when the step W - lr*update grows ||W|| and by `inward` when it shrinks it."""
    u, w = update.float(), W.float()
    coefficient = (u * w).sum() / (w * w).sum().clamp_min(eps)
    radial = coefficient * w
    scale = torch.where(coefficient < 0, u.new_tensor(outward), u.new_tensor(inward))
    return (u - radial + scale * radial).to(update.dtype)


def row_floored(update, W, floor, rho=1.0):
    """RowFloor (record #46): every row whose update norm is below floor x its weight row's norm is lifted to
    it (rho = 1; other rho raise the factor to that power)."""
    w_rows = W.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    u_rows = update.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
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


def pinned_step_(W, update, lr, cautious_decay=0.0):
    """W -= lr * update, then W rescaled to the radius pin's target norm, then cautious weight decay
    W *= 1 - lr*wd*mask (after the pin, so the pin does not undo its shape), in place."""
    target = norm_after_radial_step(W, update, lr)
    mask = cautious_mask(update, W) if cautious_decay > 0 else None
    W.add_(update, alpha=-lr)
    W.mul_((target / W.float().norm().clamp_min(1e-8)).to(W.dtype))
    if mask is not None:
        W.mul_(1.0 - (lr * cautious_decay) * mask)
    return W


def plain_step_(W, update, lr, weight_decay=0.0, cautious_decay=0.0):
    """The step without the radius pin: decoupled weight decay W *= 1 - lr*wd, W -= lr * update, then the
    cautious weight decay of pinned_step_ (its mask taken before the step), in place."""
    mask = cautious_mask(update, W) if cautious_decay > 0 else None
    if weight_decay != 0:
        W.mul_(1 - lr * weight_decay)
    W.add_(update, alpha=-lr)
    if mask is not None:
        W.mul_(1.0 - (lr * cautious_decay) * mask)
    return W


def chain_step_(W, update, group):
    """MuonChain's step of one matrix: the pinned step where the group pins the radius, else the plain one."""
    if group["pin"]:
        return pinned_step_(W, update, group["lr"], group["cautious_weight_decay"])
    return plain_step_(W, update, group["lr"], group["weight_decay"], group["cautious_weight_decay"])


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


# --------------------------------------------------------------------------------------------
# MuonChain: records #42 and #46's matrix optimizer as a chain of the stages above. Each matrix has one
# owner rank, which keeps its state (momentum, SOAP statistics and bases) and computes its update; the
# updates are all-gathered and every rank takes the step (pinned in both records). The math runs eagerly, one
# matrix at a time, as in the records (compiling or batching it would change its rounding).
# --------------------------------------------------------------------------------------------

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


def owner_plan(costs, world_size):
    """The owner rank of each matrix: the costliest first, each to the rank with the least work so far
    (the lowest rank on a tie), so that every rank ends with about 1/world_size of the work."""
    loads = [0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owners[index] = min(range(world_size), key=lambda r: (loads[r], r))
        loads[owners[index]] += costs[index]
    return owners


SOAP_COMBINES = ("replace", "rescale", "gate", "trust_gate")


class MuonChain(torch.optim.Optimizer):
    """Muon as a chain of per-matrix stages (docs/recipes.md#soap-muon), the matrix optimizer of records #42
    and #46. Per matrix, with u the Nesterov direction of momentum `momentum` and g the gradient:

        soap:          u <- SOAP-preconditioned u, combined with u by `soap_combine`
                       ("replace"; "rescale": record #42's V; "gate": gate 1; "trust_gate": record #46's
                       attention output, gate clamped to [trust_floor, trust_cap])
        polar:         P = POLAR_BACKENDS[polar_backend](u)
        contra_muon:   P <- contra_combined(P, u, contra)
        aspect:        P <- P sqrt(max(1, rows/cols))
        normuon_beta2: P <- row_variance_normalized(P)
        radial_brake:  P <- radially_braked(P, W, outward, inward)
        floor:         ("scalar", f): uw_floor; ("row", f, rho): row_floored
        step:          pin: pinned_step_(W, P, lr, cautious_weight_decay); else plain_step_(W, P, lr,
                       weight_decay, cautious_weight_decay)

    then SOAP's statistics take g. A stage whose option is None (False, 0) is left out. The trainer
    writes the scheduled values (lr, momentum, contra, trust_floor, trust_cap) into the param groups.

    Non-finite updates: as _ShardedOrthogonalOptimizer (found_inf, or FloatingPointError naming the matrix).
    FSDP2's DTensor parameters are refused."""

    gather_alone = False  # True: the all-gather path also in a process group of one (--ddp)

    def __init__(self, params, lr, momentum=0.95, polar_backend="schatten", soap=None, soap_combine="replace",
                 trust=None, trust_floor=0.0, trust_cap=1.0, contra_muon=False, contra=0.0, normuon_beta2=None,
                 radial_brake=None, floor=None, cautious_weight_decay=0.0, pin=False, weight_decay=0.0):
        if lr < 0:
            raise ValueError(f"MuonChain: lr must be >= 0, got {lr}")
        if polar_backend not in POLAR_BACKENDS:
            raise ValueError(f"MuonChain: polar_backend must be one of {sorted(POLAR_BACKENDS)}, got {polar_backend!r}")
        if soap_combine not in SOAP_COMBINES:
            raise ValueError(f"MuonChain: soap_combine must be one of {SOAP_COMBINES}, got {soap_combine!r}")
        if floor is not None and floor[0] not in ("scalar", "row"):
            raise ValueError(f"MuonChain: floor must be None, ('scalar', f) or ('row', f, rho), got {floor!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, polar_backend=polar_backend, soap=soap,
                                      soap_combine=soap_combine, trust=trust, trust_floor=trust_floor,
                                      trust_cap=trust_cap, contra_muon=contra_muon, contra=contra,
                                      normuon_beta2=normuon_beta2, radial_brake=radial_brake, floor=floor,
                                      cautious_weight_decay=cautious_weight_decay, pin=pin,
                                      weight_decay=weight_decay))

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            problem = None
            if is_dtensor(p):
                problem = ("is an FSDP2 DTensor: MuonChain needs each whole matrix on its owner rank for SOAP "
                           "and the radius pin and does not shard them (use Muon, NorMuon or Aurora with FSDP2)")
            elif p.ndim != 2:
                problem = "is not a 2-D matrix; give embeddings, heads, biases and gains to AdamW instead"
            if problem is not None:
                self.param_groups.pop()
                raise ValueError(f"MuonChain: a parameter of shape {tuple(p.shape)} {problem}")

    def matrix_flops(self, shape, group):
        """Matmul FLOPs of one matrix's update: its polar(s) and SOAP's products."""
        flops = polar_backend_flops(group["polar_backend"], *shape)
        if group["soap"] is not None:
            flops += soap_flops(*shape, group["soap"]["frequency"])
        return flops

    def state_bytes(self, shape, group):
        """Bytes of one matrix's state, all on its owner: momentum, the row or column second moment and
        SOAP's second moment, Gram matrices and bases (float32)."""
        rows, cols = shape
        floats = rows * cols
        if group["normuon_beta2"] is not None:
            floats += rows if rows >= cols else cols
        if group["soap"] is not None:
            floats += rows * cols + 2 * rows * rows + 2 * cols * cols
        return 4 * floats

    def matrices(self):
        """(group, parameter) for every matrix, in param-group order: the order the owner plan indexes."""
        return [(group, p) for group in self.param_groups for p in group["params"]]

    def owners(self, world_size):
        """Each matrix's owner rank (owner_plan on matrix_flops), the same on every rank."""
        return owner_plan([self.matrix_flops(tuple(p.shape), group) for group, p in self.matrices()], world_size)

    def flops_per_rank(self, world_size, join_transposes=None):
        """Each rank's matrix FLOPs under the owner plan (which balances all matrices at once: how they are
        bucketed only groups the all-gathers, so join_transposes changes nothing)."""
        totals = [0] * world_size
        for owner, (group, p) in zip(self.owners(world_size), self.matrices()):
            totals[owner] += self.matrix_flops(tuple(p.shape), group)
        return totals

    def gather_bytes(self, world_size):
        """The largest all-gather buffer of a step: one bucket's updates, float32, the most any rank owns there."""
        owners, matrices = self.owners(world_size), self.matrices()
        largest = 0
        for bucket in bucket_plan([tuple(p.shape) for _, p in matrices]):
            share = max(sum(owners[i] == r for i in bucket) for r in range(world_size))
            largest = max(largest, 4 * world_size * share * matrices[bucket[0]][1].numel())
        return largest

    def state_bytes_per_rank(self, world_size):
        """Each rank's state bytes: only the matrices it owns."""
        totals = [0] * world_size
        for owner, (group, p) in zip(self.owners(world_size), self.matrices()):
            totals[owner] += self.state_bytes(tuple(p.shape), group)
        return totals

    def init_state(self, group, p):
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p)
            if group["normuon_beta2"] is not None:
                rows, cols = p.shape
                shape = (rows, 1) if rows >= cols else (1, cols)
                state["second_moment"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            if group["soap"] is not None:
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["row_gg"] = torch.zeros(p.size(0), p.size(0), dtype=torch.float32, device=p.device)
                state["col_gg"] = torch.zeros(p.size(1), p.size(1), dtype=torch.float32, device=p.device)
                state["soap_step"] = 0
        return state

    def preconditioned(self, group, state, u, grad):
        """The soap stage: u with SOAP's preconditioning combined in (u itself before the first basis)."""
        soap = group["soap"]
        preconditioned = u
        if "q_row" in state:
            preconditioned, state["exp_avg_sq"] = soap_precondition(
                u, state["q_row"], state["q_col"], state["exp_avg_sq"], soap["beta2"], soap["denom_power"],
                soap.get("blend", 1.0), soap.get("denom_floor", 0.0))
        combine = group["soap_combine"]
        if combine == "replace":
            return preconditioned
        if combine == "rescale":
            return rescaled_to_schatten_norm_of(preconditioned, u)
        if combine == "gate":
            return gated_blend(u, preconditioned, torch.ones((), dtype=torch.float32, device=u.device))
        gate = trust_gate(u, preconditioned, grad, **group["trust"]).clamp(min=group["trust_floor"],
                                                                           max=group["trust_cap"])
        return gated_blend(u, preconditioned, gate)

    def matrix_update(self, group, p):
        """The owner's work for one matrix: its state's step and its update (before the step)."""
        state, grad = self.init_state(group, p), p.grad
        state["momentum"].lerp_(grad, 1 - group["momentum"])
        u = grad.lerp(state["momentum"], group["momentum"])
        if group["soap"] is not None:
            u = self.preconditioned(group, state, u, grad)
        update = POLAR_BACKENDS[group["polar_backend"]](u)
        if group["contra_muon"]:
            update = contra_combined(update, u, group["contra"])
        update = update * aspect_scale(*p.shape)
        if group["normuon_beta2"] is not None:
            update, state["second_moment"] = row_variance_normalized(update, state["second_moment"],
                                                                     group["normuon_beta2"])
        if group["radial_brake"] is not None:
            update = radially_braked(update, p, *group["radial_brake"])
        if group["floor"] is not None and group["floor"][0] == "scalar":
            update = uw_floor(update, p, group["floor"][1])
        elif group["floor"] is not None:
            update = row_floored(update, p, *group["floor"][1:])
        if group["soap"] is not None:
            soap_statistics_update_(state, grad, group["soap"]["beta2"], group["soap"]["frequency"])
        return update

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        rank, world_size = rank_and_world_size()
        matrices = self.matrices()
        owners = self.owners(world_size)
        gather = world_size > 1 or (self.gather_alone and dist.is_initialized())
        finishes = []
        for bucket in bucket_plan([tuple(p.shape) for _, p in matrices]):
            bucket = [i for i in bucket if matrices[i][1].grad is not None]
            mine = [i for i in bucket if owners[i] == rank]
            updates = {i: self.matrix_update(*matrices[i]) for i in mine}
            finishes.append(self.start_gather(bucket, owners, updates, matrices, world_size) if gather
                            else (lambda updates=updates: updates))
        updates = {}
        for finish in finishes:
            updates |= finish()
        self.apply_updates([(matrices[i][0], matrices[i][1], update) for i, update in sorted(updates.items())],
                           getattr(self, "found_inf", None))
        return loss

    @staticmethod
    def start_gather(bucket, owners, updates, matrices, world_size):
        """Starts the all-gather of a bucket's updates: rank r sends its owned matrices' updates (float32,
        padded to the most any rank owns there). Returns a callable that waits and returns {index: update}."""
        by_rank = [[i for i in bucket if owners[i] == r] for r in range(world_size)]
        share = max(len(owned) for owned in by_rank)
        if share == 0:
            return dict
        numel = matrices[bucket[0]][1].numel()
        device = matrices[bucket[0]][1].device
        chunk = torch.zeros(share, numel, device=device)
        for row, i in enumerate(by_rank[dist.get_rank()]):
            chunk[row] = updates[i].reshape(-1).float()
        gathered, work = gather_from_ranks(chunk, world_size)

        def finish():
            work.wait()
            return {i: gathered[r * share + row].view(matrices[i][1].shape)
                    for r, owned in enumerate(by_rank) for row, i in enumerate(owned)}
        return finish

    def apply_updates(self, updates, found_inf):
        """Every matrix's step (chain_step_) on every rank, refused for non-finite updates (as
        _ShardedOrthogonalOptimizer.apply_updates)."""
        if not updates:
            return
        finite = all_finite([update for _, _, update in updates])
        if found_inf is None:
            if not bool(finite):
                shape = next(tuple(p.shape) for _, p, u in updates if not bool(u.isfinite().all()))
                raise FloatingPointError(f"MuonChain: non-finite update for the parameter of shape {shape}; its "
                                         f"gradient or momentum holds inf/NaN: the loss has probably diverged")
            for group, p, update in updates:
                chain_step_(p, update, group)
            return
        found_inf.copy_(torch.where(finite, found_inf, 1.0))
        keep = found_inf == 0
        for group, p, update in updates:
            stepped = chain_step_(p.clone(), update, group)
            p.copy_(torch.where(keep, stepped, p))

    def gathered_state_dict(self):
        """state_dict() with every matrix's state, collected on rank 0 from the owners (a collective: every
        rank calls it; the others get None). One process: state_dict()."""
        full = self.state_dict()
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
        """torch.optim's, keeping only the state of the matrices this rank owns."""
        super().load_state_dict(state_dict)
        rank, world_size = rank_and_world_size()
        for owner, (_, p) in zip(self.owners(world_size), self.matrices()):
            if owner != rank:
                self.state.pop(p, None)


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
