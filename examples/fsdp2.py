"""Aurora, or record #46's SOAP-Muon, in a training loop whose model is sharded with FSDP2 (fully_shard), in
one file.

    torchrun --nproc_per_node=2 examples/fsdp2.py                        # Aurora; CPU (gloo), or GPUs (NCCL)
    torchrun --nproc_per_node=2 examples/fsdp2.py --optimizer soap-muon  # record #46's matrix optimizer
    torchrun --nproc_per_node=8 examples/fsdp2.py --steps 300 --orientation tall

A small GPT-like model: every block and then the whole model is wrapped with fully_shard, so each
parameter is a DTensor holding 1/world of its rows on each rank. The matrix optimizer takes the blocks'
matrices (tall qkv and fc, square attention proj, wide MLP proj) exactly as they come: each matrix is
assembled on the rank that owns it, which alone keeps its state (SOAP's Gram matrices and bases too)
and computes its update, and every rank gets its rows of the update back. AdamW takes the embedding,
the head and the gains. Nothing else changes from a single-GPU loop. Each rank trains on its own
batches of a random Markov chain over the vocabulary, so the loss has something to learn: it falls
from ln(vocab) towards the chain's entropy.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from optimizers import AURORA_ORIENTATIONS, Aurora, MuonChain  # noqa: E402

# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.attn_proj = torch.nn.Linear(dim, dim, bias=False)
        self.fc = torch.nn.Linear(dim, 4 * dim, bias=False)
        self.mlp_proj = torch.nn.Linear(4 * dim, dim, bias=False)
        self.attn_gain = torch.nn.Parameter(torch.ones(dim))
        self.mlp_gain = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(F.rms_norm(x, (dim,), self.attn_gain)).split(dim, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp_proj(F.relu(self.fc(F.rms_norm(x, (dim,), self.mlp_gain))).square())


class GPT(torch.nn.Module):
    def __init__(self, vocab, dim, layers, heads):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(F.rms_norm(x, (x.size(-1),)))


# --------------------------------------------------------------------------------------------
# Data: a random Markov chain (each token picks its successor among 4 fixed ones)
# --------------------------------------------------------------------------------------------

def markov_batches(vocab, batch, length, seed, device):
    table_gen = torch.Generator().manual_seed(0)  # the same chain on every rank
    successors = torch.randint(vocab, (vocab, 4), generator=table_gen)
    gen = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.empty(batch, length + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab, (batch,), generator=gen)
        for t in range(length):
            choice = torch.randint(4, (batch,), generator=gen)
            tokens[:, t + 1] = successors[tokens[:, t], choice]
        tokens = tokens.to(device)
        yield tokens[:, :-1], tokens[:, 1:]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--optimizer", choices=("aurora", "soap-muon"), default="aurora",
                        help="the blocks' matrix optimizer: record #17's Aurora, or record #46's chain (SOAP, "
                             "the Schatten-4 polar, radial brake, RowFloor, pinned step, cautious decay)")
    parser.add_argument("--orientation", choices=AURORA_ORIENTATIONS, default="non_square",
                        help="Aurora: matrices that get Aurora's polar factor (the others get Muon's)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if use_cuda else "cpu")
    mesh = init_device_mesh(device.type, (world_size,))

    torch.manual_seed(0)  # the same initial weights on every rank before sharding
    model = GPT(args.vocab, args.dim, args.layers, heads=4).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    matrices = [(n, p) for n, p in model.blocks.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if not (n.startswith("blocks.") and p.ndim == 2)]
    if args.optimizer == "aurora":
        matrix_optimizer = Aurora(matrices, lr=0.0375, contra=0.4, uw_floor=0.35, orientation=args.orientation)
    else:  # record #46's stages, its SOAP through the gate at 1 (the attention output's trust gate aside)
        matrix_optimizer = MuonChain(matrices, lr=0.0375, soap=dict(beta2=0.90, frequency=1, denom_power=0.50),
                                     soap_combine="gate", radial_brake=(0.5, 1.0), floor=("row", 0.3825, 1.0),
                                     cautious_weight_decay=0.025)
    optimizers = [matrix_optimizer, torch.optim.AdamW(rest, lr=0.01, betas=(0.8, 0.95), eps=1e-10)]
    if rank == 0:
        shapes = sorted({tuple(p.shape) for _, p in matrices})
        name = f"Aurora ({args.orientation})" if args.optimizer == "aurora" else "SOAP-Muon"
        print(f"{world_size} ranks on {device.type}; {name} on {len(matrices)} matrices of shapes {shapes}, "
              f"AdamW on {len(rest)} tensors; ln(vocab) = {math.log(args.vocab):.3f}")

    batches = markov_batches(args.vocab, args.batch, args.length, seed=1 + rank, device=device)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, targets = next(batches)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()  # fully_shard averages the gradients over ranks (reduce-scatter)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == args.steps:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step} loss {mean_loss.item() / world_size:.4f} "
                      f"time {time.perf_counter() - start:.1f}s", flush=True)
    # Every rank waits here first: a gloo worker still dropping the last collective's tensors needs the
    # GIL, and a rank that tore its group down at once could deadlock or abort on it (train_gpt.py's
    # leave_process_group says how).
    dist.barrier()
    gloo = dist.get_backend() == "gloo"
    dist.destroy_process_group()
    if gloo:
        # DTensor's caches keep the mesh, and so gloo's worker threads, alive until the interpreter finalizes,
        # and one that then needs the GIL aborts the process (tests/test_optimizers.py's gloo_process says
        # how): on the CPU, end here without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
