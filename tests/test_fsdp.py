"""Tests of optimizers.py on FSDP2-sharded (DTensor) parameters, on CPU gloo ranks: the same
parameters and state as one process without FSDP for every configuration of the chain (the three
benchmark optimizers, records #42's and #46's MuonChain groups with SOAP), a torch.distributed.checkpoint
saved at 2 ranks and resumed at 4, errors for placements the optimizers do not take, and examples/fsdp2.py.
The orientation policy of Aurora is tested here too (it decides per matrix shape, as sharding does)."""
import os
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from optimizers import Aurora, Muon, MuonChain
from test_optimizers import (CHAIN_CONFIGURATIONS, RECORD_SETTINGS, ROOT, chain_optimizer, make_problem,
                             run_on_gloo_ranks, run_optimizer, take_steps)
from test_train_gpt import run_bounded

STEPS = 3
RESUME_AFTER = 2
# Shapes the sharded module holds beyond make_problem's tall (48, 16), wide (16, 48) and square
# (24, 24) ones: rows that split unevenly (18 -> 9+9 and 5+5+5+3; the wide one's 10 columns
# -> 3+3+3+1 for its second moment) and a matrix with fewer rows than ranks (3 -> 1+1+1+0).
UNEVEN_SHAPES = [(18, 10), (3, 5)]
# Plain tensors optimized with them (a mixed model): 3 of one shape, so that on 4 ranks the
# replicated path gives some rank a single matrix of a bucket of 3.
REPLICATED_SHAPES = [(48, 16)] * 3


@pytest.fixture(autouse=True)
def eager():
    with torch._dynamo.config.patch(disable=True):
        yield


def fsdp_problem():
    """make_problem's matrices (one with zero gradient, one zero weight) and UNEVEN_SHAPES, to be
    sharded, then REPLICATED_SHAPES; 3 steps."""
    weights, grads = make_problem(seed=3, steps=STEPS)
    gen = torch.Generator().manual_seed(4)
    extra = UNEVEN_SHAPES + REPLICATED_SHAPES
    weights += [0.1 * torch.randn(*s, generator=gen) for s in extra]
    for step_grads in grads:
        step_grads += [torch.randn(*s, generator=gen) for s in extra]
    return weights, grads


class Matrices(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.mats = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in weights])


class MixedModel(torch.nn.Module):
    """Matrices sharded by fully_shard and matrices left replicated, optimized together."""

    def __init__(self, weights):
        super().__init__()
        self.sharded = Matrices(weights[:-len(REPLICATED_SHAPES)])
        self.replicated = Matrices(weights[-len(REPLICATED_SHAPES):])
        fully_shard(self.sharded)


def set_grads(model, step_grads):
    for p, g in zip(model.parameters(), step_grads):
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g.clone()


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


def full_results(model, opt):
    """Full parameters, {parameter index: {state name: full tensor}} (the state as state_dict() gives it:
    each matrix's state lives on its owner rank alone) and {parameter index: full leverage} (collectives:
    every rank calls)."""
    params = list(model.parameters())
    state = {i: {name: full(v) if torch.is_tensor(v) else v for name, v in entry.items()}
             for i, entry in opt.state_dict()["state"].items()}
    leverage = opt.leverage()
    return [full(p) for p in params], state, {i: full(leverage[p]) for i, p in enumerate(params) if p in leverage}


def fsdp_worker(rank, world_size, out_dir, resume_from):
    """Per configuration of the chain: 3 steps on the mixed model; at 2 ranks a DCP checkpoint after step
    2; with resume_from, a fresh model and optimizer loaded from that checkpoint take step 3."""
    weights, grads = fsdp_problem()
    results = {}
    for recipe in CHAIN_CONFIGURATIONS:
        model = MixedModel(weights)
        assert all(isinstance(p, DTensor) for p in model.sharded.parameters())
        assert not any(isinstance(p, DTensor) for p in model.replicated.parameters())
        opt = chain_optimizer(recipe, list(model.parameters()))
        for step, step_grads in enumerate(grads, 1):
            set_grads(model, step_grads)
            opt.step()
            if step == RESUME_AFTER and resume_from is None:
                dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                         checkpoint_id=os.path.join(out_dir, f"checkpoint-{recipe}"))
        results[recipe] = full_results(model, opt)
        if resume_from is not None:
            model = MixedModel([torch.zeros_like(w) for w in weights])
            opt = chain_optimizer(recipe, list(model.parameters()))
            checkpoint = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(checkpoint, checkpoint_id=os.path.join(resume_from, f"checkpoint-{recipe}"))
            set_model_state_dict(model, checkpoint["model"])
            set_optimizer_state_dict(model, opt, checkpoint["optim"])
            for step_grads in grads[RESUME_AFTER:]:
                set_grads(model, step_grads)
                opt.step()
            results[recipe + " resumed"] = full_results(model, opt)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """{world size: results}: 2 ranks (saving checkpoints), then 4 ranks (also resuming them)."""
    runs = {}
    two = tmp_path_factory.mktemp("fsdp2")
    run_on_gloo_ranks(fsdp_worker, 2, two, str(two), None)
    runs[2] = torch.load(two / "results.pt")
    four = tmp_path_factory.mktemp("fsdp4")
    run_on_gloo_ranks(fsdp_worker, 4, four, str(four), str(two))
    runs[4] = torch.load(four / "results.pt")
    return runs


def single_process(recipe):
    """One thread, as each gloo rank runs: CPU kernels (SOAP's eigh among them) split their sums by thread count."""
    weights, grads = fsdp_problem()
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = chain_optimizer(recipe, params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        take_steps(opt, params, grads)
    finally:
        torch.set_num_threads(threads)
    leverage = opt.leverage()
    return ([p.detach() for p in params], opt.state_dict()["state"],
            {i: leverage[p] for i, p in enumerate(params) if p in leverage})


def assert_same_as_single_process(results, recipe):
    expected_params, expected_state, expected_leverage = single_process(recipe)
    params, state, leverage = results
    assert leverage.keys() == expected_leverage.keys() and len(leverage) == 11  # every non-square matrix
    for i, value in expected_leverage.items():
        assert torch.equal(value, leverage[i]), (recipe, i, "leverage")
    for i, (a, b) in enumerate(zip(expected_params, params)):
        assert torch.equal(a, b), (recipe, i, (a - b).abs().max())
    assert state.keys() == expected_state.keys()
    for i, names in expected_state.items():
        assert names.keys() == state[i].keys(), (recipe, i)
        for name, value in names.items():
            assert torch.equal(value, state[i][name]) if torch.is_tensor(value) else value == state[i][name], \
                (recipe, i, name)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("recipe", CHAIN_CONFIGURATIONS)
def test_fsdp2_steps_equal_one_process_bit_for_bit(fsdp_runs, world_size, recipe):
    """Parameters, optimizer state (momentum, NorMuon's second moment, leverage, SOAP's statistics and
    bases) and leverage() after 3 steps, sharded and replicated matrices alike."""
    assert_same_as_single_process(fsdp_runs[world_size][recipe], recipe)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("recipe", CHAIN_CONFIGURATIONS)
def test_dcp_checkpoint_saved_at_2_ranks_resumes_at_4_identically(fsdp_runs, recipe):
    assert_same_as_single_process(fsdp_runs[4][recipe + " resumed"], recipe)


# ----------------------------------------------------------------------------------------------
# Refused placements
# ----------------------------------------------------------------------------------------------

def refusal_worker(rank, world_size, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    messages = {}
    mesh = init_device_mesh("cpu", (world_size,))
    mesh_2d = init_device_mesh("cpu", (1, world_size))
    cases = {
        "shard1": [("blocks.0.w", torch.nn.Parameter(distribute_tensor(torch.zeros(8, 6), mesh, [Shard(1)])))],
        "mesh2d": [("blocks.1.w", torch.nn.Parameter(
            distribute_tensor(torch.zeros(8, 6), mesh_2d, [Shard(0), Shard(0)])))],
        "vector": [("blocks.2.b", torch.nn.Parameter(distribute_tensor(torch.zeros(8), mesh, [Shard(0)])))],
    }
    for case, params in cases.items():
        try:
            Muon(params, lr=0.02)
        except ValueError as error:
            messages[case] = str(error)
    try:  # the same refusal from the chain in records #42 and #46's configuration
        MuonChain([torch.nn.Parameter(distribute_tensor(torch.zeros(8, 6), mesh, [Shard(1)]))], lr=0.02)
    except ValueError as error:
        messages["muon_chain"] = str(error)
    MuonChain([torch.nn.Parameter(distribute_tensor(torch.zeros(8, 6), mesh, [Shard(0)]))], lr=0.02)  # taken
    if rank == 0:
        torch.save(messages, os.path.join(out_dir, "messages.pt"))


@pytest.mark.distributed
def test_unsupported_placements_are_refused_naming_parameter_and_placement(tmp_path):
    run_on_gloo_ranks(refusal_worker, 2, tmp_path, str(tmp_path))
    messages = torch.load(tmp_path / "messages.pt")
    assert "'blocks.0.w'" in messages["shard1"] and "Shard(dim=1)" in messages["shard1"]
    assert "'blocks.1.w'" in messages["mesh2d"] and "2-D mesh" in messages["mesh2d"]
    assert "'blocks.2.b'" in messages["vector"] and "(8,)" in messages["vector"] and "2-D" in messages["vector"]
    assert "Shard(dim=0)" in messages["vector"]
    assert "Shard(dim=1)" in messages["muon_chain"] and "(8, 6)" in messages["muon_chain"]
    assert all(len(message.splitlines()) == 1 for message in messages.values())


# ----------------------------------------------------------------------------------------------
# Aurora's orientation policy (one process)
# ----------------------------------------------------------------------------------------------

def test_tall_only_gives_wide_matrices_muons_update_and_tall_ones_auroras():
    weights, grads = make_problem(steps=2)
    plain = dict(lr=0.02)  # no Contra-Muon mix and no floor: only the polar factor differs
    muon, _ = run_optimizer(Muon, plain, weights, grads)
    aurora, _ = run_optimizer(Aurora, plain, weights, grads)
    tall_only, _ = run_optimizer(Aurora, dict(plain, orientation="tall"), weights, grads)
    wide_only, _ = run_optimizer(Aurora, dict(plain, orientation="wide"), weights, grads)
    for w, m, a, t, v in zip(weights, muon, aurora, tall_only, wide_only):
        rows, cols = w.shape
        assert torch.equal(t, m if rows < cols else a), w.shape
        assert torch.equal(v, m if rows > cols else a), w.shape
    # The choice matters: Aurora's polar moves a tall (0) and a wide (3) matrix elsewhere than Muon's.
    assert not torch.equal(aurora[0], muon[0]) and not torch.equal(aurora[3], muon[3])


def test_default_orientation_is_the_record_aurora():
    cls, settings = RECORD_SETTINGS["aurora"]
    weights, grads = make_problem(steps=2)
    default, _ = run_optimizer(cls, settings, weights, grads)
    every, opt = run_optimizer(cls, dict(settings, orientation="non_square"), weights, grads)
    assert opt.param_groups[0]["orientation"] == "non_square"
    for a, b in zip(default, every):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="orientation"):
        Aurora(default, lr=0.1, orientation="square")


# ----------------------------------------------------------------------------------------------
# examples/fsdp2.py
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("optimizer", ["aurora", "soap-muon"])
def test_fsdp2_example_trains_under_torchrun_on_two_cpu_ranks(optimizer):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--standalone", "--nproc_per_node=2", "examples/fsdp2.py", "--steps", "20",
               "--optimizer", optimizer]
    out = run_bounded(command, 300, cwd=ROOT, env=dict(os.environ, TORCH_COMPILE_DISABLE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(line.split("loss ")[1].split()[0]) for line in out.stdout.splitlines() if "loss " in line]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.5, out.stdout


# ----------------------------------------------------------------------------------------------
# Communication volume
# ----------------------------------------------------------------------------------------------

TRAFFIC_SHAPES = [(48, 16)] * 3 + [(16, 48), (24, 24)]


def traffic_worker(rank, world_size, out_dir):
    """Elements each rank receives from other ranks through the optimizers' all-to-alls, one step."""
    received = []
    all_to_all_single = torch.distributed.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        received.append(sum(output_split_sizes) - output_split_sizes[rank])
        return all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group,
                                 async_op=async_op)

    torch.distributed.all_to_all_single = counting
    gen = torch.Generator().manual_seed(5)
    counts = {}
    for recipe, (cls, settings) in RECORD_SETTINGS.items():
        model = Matrices([torch.randn(*s, generator=gen) for s in TRAFFIC_SHAPES])
        fully_shard(model)
        opt = cls(model.parameters(), **settings)
        set_grads(model, [torch.randn(*s, generator=gen) for s in TRAFFIC_SHAPES])
        received.clear()
        opt.step()
        counts[recipe] = sum(received)
    torch.save(counts, os.path.join(out_dir, f"traffic{rank}.pt"))


@pytest.mark.distributed
def test_all_to_all_traffic_is_the_counted_bytes(tmp_path):
    """Over all ranks one step receives (W-1)/W of every matrix twice (gradient in, update out), three
    times for Aurora with its floor (the weights too), (W-1)/W of the leverage of the non-square matrices
    on the way out, and each matrix's two scalars (its update's finiteness, the pin's scale) on every other
    rank. The state stays on the owner: NorMuon's second moment never travels."""
    world_size = 2
    run_on_gloo_ranks(traffic_worker, world_size, tmp_path, str(tmp_path))
    total = {recipe: sum(torch.load(tmp_path / f"traffic{r}.pt")[recipe] for r in range(world_size))
             for recipe in RECORD_SETTINGS}
    fraction = (world_size - 1) / world_size
    matrix = sum(m * n for m, n in TRAFFIC_SHAPES)
    leverage = sum(max(m, n) for m, n in TRAFFIC_SHAPES if m != n)
    scalars = (world_size - 1) * 2 * len(TRAFFIC_SHAPES)
    assert total["muon"] == fraction * (2 * matrix + leverage) + scalars
    assert total["normuon"] == fraction * (2 * matrix + leverage) + scalars
    assert total["aurora"] == fraction * (3 * matrix + leverage) + scalars
