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

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

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
    for a, b, c in coefficient_schedule:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


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


POLAR_BACKENDS = {"polar": polar, "polar_express": polar_express}
POLAR_ITERATIONS = {
    "polar": REFERENCE_POLAR_ITERATIONS,
    "polar_express": len(POLAR_EXPRESS_COEFFICIENTS),
}


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
    if tuple(p.placements) != (Shard(0),):
        return (f"has placement {p.placements[0]!r}: only Shard(0), fully_shard's default, is supported "
                f"(a shard_placement_fn choosing another placement is not)")
    return None


def sharded_state_zeros(p, shape):
    """float32 zeros of `shape` for the state of the DTensor p, sharded over p's mesh along its
    longest dim (a row vector (1, cols) along its columns), so every rank keeps about 1/world of it."""
    dim = max(range(len(shape)), key=lambda d: shape[d])
    return torch.distributed.tensor.zeros(*shape, dtype=torch.float32, device_mesh=p.device_mesh,
                                          placements=[Shard(dim)])


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
    return p.to_local() if isinstance(p, DTensor) else p


def sharded_buckets(params):
    """DTensor parameters with a gradient, grouped by shape and mesh in order of first appearance."""
    buckets = {}
    for p in params:
        if isinstance(p, DTensor) and p.grad is not None:
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
        self._compiled_update_math = torch.compile(type(self).update_math, dynamic=False)

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
            elif isinstance(p, DTensor):
                problem = unsupported_placement(p)
            if problem is not None:
                self.param_groups.pop()
                label = repr(name) if name is not None else f"#{index} of param group {len(self.param_groups)}"
                if isinstance(p, DTensor):
                    label += f" (DTensor {tuple(p.placements)!r})"
                raise ValueError(f"{type(self).__name__}: parameter {label} of shape {tuple(p.shape)} "
                                 f"{problem}")

    def state_zeros(self, p, shape):
        """float32 zeros for per-matrix state of p: a plain tensor, or sharded like p (DTensor)."""
        if isinstance(p, DTensor):
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
        return polar_flops(*shape, POLAR_ITERATIONS[group["polar_backend"]])

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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = rank_and_world_size()
        launched = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and not isinstance(p, DTensor)]
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
            if not (isinstance(p.grad, DTensor) and p.grad.placements == p.placements):
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
        update, leverage = self._compiled_update_math(u, POLAR_BACKENDS[group["polar_backend"]])
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
        update, second_moment, leverage = self._compiled_update_math(
            u, stacked["second_moment"], group["beta2"], group["u_normuon"],
            POLAR_BACKENDS[group["polar_backend"]])
        return update, with_leverage({"second_moment": second_moment}, leverage)


AURORA_VARIANTS = ("vanilla", "riemannian")
# Which matrices get Aurora's polar factor: every non-square one (record #17), only tall ones (the
# shape the Aurora authors designed it for) or only wide ones (entries that apply it to the wide
# mlp.proj alone). The others get plain Muon's polar; square matrices get polar either way.
AURORA_ORIENTATIONS = ("non_square", "tall", "wide")


def takes_aurora_polar(orientation, rows, cols):
    """Whether the orientation policy gives a rows x cols matrix Aurora's polar factor."""
    if orientation == "tall":
        return rows >= cols
    if orientation == "wide":
        return rows <= cols
    return True


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
        update, leverage = self._compiled_update_math(
            u, weights, group["pp_iterations"], group["pp_beta"], group["contra"], group["uw_floor"],
            group["variant"], POLAR_BACKENDS[group["polar_backend"]],
            takes_aurora_polar(group["orientation"], u.size(-2), u.size(-1)))
        return update, with_leverage({}, leverage)

    def matrix_flops(self, shape, group):
        """Matmul FLOPs of one matrix's update: pp_iterations polars for a rectangular matrix, one for a
        square one (the Riemannian variant's extra float32 work is not counted)."""
        polars = 1 if shape[0] == shape[1] else group["pp_iterations"]
        return polars * super().matrix_flops(shape, group)
