"""Tests that pin recipes aurora-ema-ref (record #42) and soap-muon (record #46) of train_gpt.py to their records'
own scripts, on the values tests/data/records/make_reference.py made by running those scripts (see the README
there): every schedule value at every step of the horizon, the initialization bit for bit, the trajectory of
every parameter SOAP does not touch over the whole horizon through train_gpt's own training loop, and SOAP
steps from the record's state. Eager, on the CPU, at the reduced sizes the reference was made at."""
import contextlib
import dataclasses
import json
import os
import sys

import pytest
import torch

import optimizers
import train_gpt as tg

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "records")
sys.path.insert(0, DATA)
import make_reference  # noqa: E402
from make_reference import file_digest, synthetic_gradient, tensor_digest  # noqa: E402  the generator's own definitions
RECIPE_OF = {42: "aurora-ema-ref", 46: "soap-muon"}
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def eager():
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module", params=[42, 46])
def reference(request):
    return request.param, torch.load(os.path.join(DATA, f"record{request.param}.pt"), weights_only=False)


def our_name(record_name):
    """The record model's parameter names in this project's model: its top-level norm1/norm2 are norm_a/norm_b."""
    return {"norm1.gains": "norm_a.gains", "norm2.gains": "norm_b.gains"}.get(record_name, record_name)


def reduced_config(data):
    size = data["size"]
    return tg.ModelConfig(vocab_size=size["vocab"], num_layers=size["layers"], model_dim=size["width"],
                          head_dim=size["head_dim"], seq_len=8, norm_float32=True)


def relative_error(ours, theirs):
    ours, theirs = ours.double(), theirs.double()
    return ((ours - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()


def test_each_reference_file_is_the_one_its_note_of_where_it_was_made_describes():
    """make_reference.py notes in made_on.json where it made each file (CPU, torch, forced kernels) with the
    file's SHA-256: a file replaced without its note (or a note without its file) fails here. (The other .pt
    file there, before_the_chain.pt, holds optimizer state_dicts, not a record's values: its CPU kind is inside.)"""
    made_on = json.load(open(os.path.join(DATA, "made_on.json")))
    files = sorted(name for name in os.listdir(DATA) if name.startswith("record") and name.endswith(".pt"))
    assert sorted(made_on) == files
    assert {name: made_on[name]["sha256"] for name in files} == {name: file_digest(os.path.join(DATA, name))
                                                                 for name in files}


def test_the_generator_notes_the_cpu_torch_and_forced_kernels_it_ran_on(tmp_path, monkeypatch):
    made = tmp_path / "record99.pt"
    made.write_bytes(b"values")
    monkeypatch.setattr(make_reference, "MADE_ON", str(tmp_path / "made_on.json"))
    for name in make_reference.FORCING:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    make_reference.note_where_made(str(made))
    note = json.load(open(tmp_path / "made_on.json"))["record99.pt"]
    assert note["sha256"] == file_digest(str(made)) and note["torch"] == torch.__version__
    assert note["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert note["forced"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert note["cpu"]["model"] and set(note["cpu"]["features"]) <= set(make_reference.CPU_FEATURES)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

def our_schedules(recipe, config):
    """Every per-step value the record's schedule columns hold, from this project's recipe: the param
    groups after set_schedules (lr, mu, Contra, trust bounds), the lookahead stepsize, the readout's
    reference gamma, capture step and Tail-EMA updates."""
    with torch.device("meta"):
        model = tg.GPT(config)
    opts = tg.build_optimizers(model, recipe)
    groups = {g["name"]: g for opt in opts for g in opt.param_groups}
    columns = {key: [] for key in ("muon_lr", "mu", "lookahead", "adam_lr", "aux_lr", "contra", "ref_gamma",
                                   "trust_floor", "trust_cap", "tail_ema_updated")}
    readout = recipe.readout
    for step in range(recipe.steps):
        tg.set_schedules(opts, recipe, step)
        matrix = next(g for g in opts[-1].param_groups)
        columns["muon_lr"].append(matrix["lr"])
        columns["mu"].append(matrix["momentum"])
        columns["lookahead"].append(recipe.lookahead.stepsize_at(step, recipe))
        columns["adam_lr"].append([groups[name]["lr"] for name in ("embed", "head", "scalars") if name in groups])
        columns["aux_lr"].append([groups[name]["lr"] for name in ("gains", "biases", "attn.proj.bias") if name in groups])
        columns["contra"].append(matrix.get("contra"))
        columns["ref_gamma"].append(readout.gamma if isinstance(readout, tg.ReferenceReadoutSpec)
                                    and step >= readout.apply_from else 0.0)
        trust = groups.get("attn.proj", {})
        columns["trust_floor"].append(trust.get("trust_floor"))
        columns["trust_cap"].append(trust.get("trust_cap"))
        columns["tail_ema_updated"].append(isinstance(readout, tg.TailEMASpec) and readout.start <= step + 1 < readout.end)
    return columns


def schedule_mismatches(record, recipe, data):
    """The schedule values (by column and first step) where the recipe differs from the record: exact equality."""
    theirs = data["schedule"]
    ours = our_schedules(recipe, reduced_config(data))
    mismatches = []
    for key, column in theirs.items():
        if key in ("step_count", "tail_ema_started"):
            continue
        mine = torch.tensor(ours[key], dtype=torch.float64)
        length = min(len(mine), len(column))  # the record's columns stop at its last trained step
        differ = (mine[:length] != column[:length]) & ~column[:length].isnan()  # NaN: the record has no value there
        if len(mine) < len(column) or differ.any():
            mismatches.append((key, int(differ.nonzero()[0, 0]) if differ.any() else length))
    if isinstance(recipe.readout, tg.ReferenceReadoutSpec) and recipe.readout.capture != data["reference_captured_step"]:
        mismatches.append(("reference_captured_step", recipe.readout.capture))
    ours_validated = [s for s in range((recipe.stop or recipe.steps) + 1) if s and tg.validates_at(s, recipe, tg.FULL)]
    theirs_validated = record_validation_steps(record, data)
    if ours_validated != theirs_validated:
        mismatches.append(("validation_steps", sorted(set(ours_validated) ^ set(theirs_validated))[0]))
    if (recipe.stop or recipe.steps) != theirs_validated[-1]:
        mismatches.append(("stop", recipe.stop))
    return mismatches


def record_validation_steps(record, data):
    """The steps the record's logs validate at (after 0): #42's script validates where its logs do; #46's logs
    validate at more steps than its script (docs/recipes.md#soap-muon): those of its complete public logs, from
    their committed val lines (tests/data/record46_val_lines)."""
    if record == 42:
        return data["validation_steps"]
    folder = os.path.join(os.path.dirname(DATA), "record46_val_lines")
    runs = [[int(line.split("/")[0][len("step:"):]) for line in open(os.path.join(folder, name)) if line.startswith("step:")]
            for name in sorted(os.listdir(folder)) if name.endswith(".txt")]
    complete = [steps for steps in runs if steps[-1] == data["horizon"]]
    assert len(complete) == 7 and all(steps == complete[0] for steps in complete)
    return complete[0]


def test_schedules_equal_the_records_at_every_step(reference):
    record, data = reference
    recipe = tg.RECIPES[RECIPE_OF[record]]
    assert recipe.steps == data["horizon"]
    counts = data["schedule"]["step_count"]
    trained = counts[~counts.isnan()]  # the record's Muon counts steps as the loop does: Contra and the trust gate read it
    assert trained.tolist() == list(range(len(trained)))
    assert schedule_mismatches(record, recipe, data) == []


def step_constants(recipe):
    """(path, value) of every step constant of the recipe (step_field), a tuple's elements one by one."""
    found = []

    def walk(obj, path):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("step") and value is not None:
                items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
                found.extend(((path + (f.name, i)), v) for i, v in items)
            elif dataclasses.is_dataclass(value):
                walk(value, path + (f.name,))
    walk(recipe, ())
    return found


def shifted(recipe, path, delta):
    """The recipe with the step constant at `path` moved by `delta` steps."""
    *fields, name, index = path

    def replace(obj, fields):
        if not fields:
            value = getattr(obj, name)
            if index is not None:
                value = value[:index] + (value[index] + delta,) + value[index + 1:]
            else:
                value = value + delta
            return dataclasses.replace(obj, **{name: value})
        return dataclasses.replace(obj, **{fields[0]: replace(getattr(obj, fields[0]), fields[1:])})
    return replace(recipe, fields)


def test_every_step_constant_off_by_one_step_is_caught(reference):
    """Planted bugs: each step constant of the recipe in turn one step early and one step late; the schedule
    comparison must see every one (a constant it could not see would not be pinned)."""
    record, data = reference
    recipe = tg.RECIPES[RECIPE_OF[record]]
    constants = step_constants(recipe)
    assert len(constants) > 10
    missed = [(path, delta) for path, _ in constants for delta in (-1, 1)
              if not schedule_mismatches(record, shifted(recipe, path, delta), data)]
    assert missed == []


# ----------------------------------------------------------------------------------------------
# Initialization
# ----------------------------------------------------------------------------------------------

def test_initialization_equals_the_records_bit_for_bit(reference):
    record, data = reference
    recipe = tg.RECIPES[RECIPE_OF[record]]
    model = tg.GPT(reduced_config(data))
    generator = torch.Generator().manual_seed(data["seed"])
    tg.initialize(model, recipe, generator, generator, data["seed"])  # on the CPU the signs share the generator
    ours = model.state_dict()
    theirs = {our_name(name): digest for name, digest in data["init_digests"].items() if "rotary" not in name}
    assert sorted(theirs) == sorted(ours)
    differ = [name for name, digest in theirs.items() if tensor_digest(ours[name]) != digest]
    assert differ == []


# ----------------------------------------------------------------------------------------------
# The trajectory of every parameter SOAP does not touch, through train_gpt.train_trial
# ----------------------------------------------------------------------------------------------

class GradientStandIn(torch.nn.Module):
    """The forward pass of train_step, replaced as make_reference.py replaces the record's: it sets every
    trained parameter's gradient to the synthetic gradient of the run's step (one micro-batch a step) and
    returns a zero loss whose backward changes nothing."""

    def __init__(self, run, record_names):
        super().__init__()
        self.run = run
        index = {our_name(name): i for i, name in enumerate(record_names)}
        self.trained = [(index[name], p) for name, p in run.raw_model.named_parameters() if p.requires_grad]

    def forward(self, inputs, targets):
        for index, p in self.trained:
            p.grad = synthetic_gradient(self.run.step, index, p.shape, p.dtype)
        return torch.zeros((), requires_grad=True)


def write_shard(path, tokens):
    header = torch.zeros(tg.HEADER_INTS, dtype=torch.int32)
    header[:3] = torch.tensor([tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)])
    with open(path, "wb") as f:
        f.write(header.numpy().tobytes())
        f.write(torch.as_tensor(tokens, dtype=torch.int16).numpy().tobytes())


def reduced_run(recipe, data, folder, argv=(), dist_info=tg.Distributed(0, 1, 0, False), frozen=()):
    """A train_gpt Run of `recipe` on the reduced model of `data` with the forward pass replaced by
    GradientStandIn, the parameters named in `frozen` not trained, and argv's train_gpt.py arguments."""
    config = reduced_config(data)
    # Six sequences a step, one micro-batch on each of 1, 2 or 3 ranks (the stand-in gives each the whole gradient).
    hp = dataclasses.replace(tg.FULL, model=config, batch_tokens=6 * config.seq_len, micro_batch_seqs=6,
                             val_tokens=6 * config.seq_len)
    shard = os.path.join(folder, "train.bin")
    if not os.path.exists(shard):
        write_shard(shard, [0] * (hp.batch_tokens * (recipe.steps + 2)))
    raw_model = tg.GPT(config)
    for name, p in raw_model.named_parameters():
        p.requires_grad_(name not in frozen)
    args = tg.parse_args(["--recipe", recipe.name, "--no-diagnostics", "--seed", str(data["seed"]), *argv])
    generator = torch.Generator().manual_seed(data["seed"])
    run = tg.Run(args=args, hp=hp, recipe=recipe, steps=recipe.steps, dist=dist_info, device=torch.device("cpu"),
                 layout=tg.batch_layout(hp, dist_info.world_size), log=tg.RunLog(None), raw_model=raw_model, model=None,
                 generator=generator, sign_generator=generator, train_paths=[shard], first_train_shard=None,
                 val_buffer=torch.zeros(hp.val_tokens + 1, dtype=torch.int64), probe=None, train_probe=None,
                 probe_micro_seqs=6, units=None, init_weights=None, resume=None)
    run.model = GradientStandIn(run, data["parameter_names"])
    return run


def run_reduced(record, data, tmp_path, monkeypatch):
    """train_trial on the reduced model with the SOAP-touched matrices frozen, evaluation replaced by a note of
    the weights it would evaluate. Returns ({step: weights entering it}, {step: [weights of each evaluation]})."""
    recipe = tg.RECIPES[RECIPE_OF[record]]
    kept = {our_name(name) for name in data["trajectory"][1]}
    run = reduced_run(recipe, data, tmp_path, frozen={our_name(n) for n in data["parameter_names"]} - kept)
    entering, evaluated = {}, {}

    def weights():
        return {name: p.detach().clone() for name, p in run.raw_model.named_parameters() if name in kept}

    def note_evaluation(*args, **kwargs):
        evaluated.setdefault(run.step, []).append(weights())
        return 0.0

    real_set_schedules = tg.set_schedules

    def note_entering(optimizers, recipe, step):
        if step in data["trajectory"]:  # a validated step's weights before any readout: its first evaluation's
            entering[step] = evaluated[step][0] if step in evaluated else weights()
        real_set_schedules(optimizers, recipe, step)

    monkeypatch.setattr(tg, "evaluate", note_evaluation)
    monkeypatch.setattr(tg, "set_schedules", note_entering)
    tg.train_trial(run)
    final = recipe.stop or recipe.steps
    if final in data["trajectory"]:  # the loop ends before training at its last step
        entering[final] = evaluated[final][0]
    return entering, evaluated


@pytest.mark.slow
def test_parameters_soap_does_not_touch_follow_the_records_trajectory(reference, tmp_path, monkeypatch):
    """Over the whole horizon: AdamW (and record #46's bias-free Adam), record #42's non-SOAP matrices through
    MuonChain, the EMA-Nesterov lookahead, the readouts and their restore, the validation steps. Within 1e-5:
    on an AVX512 Xeon this trajectory is bit for bit the record script's own there, and both are at most
    7.4e-6 from the reference file (#42, by step 2860; the record script with the AVX2 paths forced: 7.9e-6;
    #46, Adam only: 2.6e-7): the file was made on another CPU (tests/data/records/README.md)."""
    record, data = reference
    entering, evaluated = run_reduced(record, data, tmp_path, monkeypatch)
    errors = {(step, name): relative_error(entering[step][our_name(name)], theirs)
              for step, weights in data["trajectory"].items() for name, theirs in weights.items()}
    assert max(errors.values()) <= RELATIVE_TOLERANCE, max(errors.items(), key=lambda kv: kv[1])
    # The readout's weights: record #42's single evaluation is the readout; #46's second one.
    readout_errors = {(step, name): relative_error(evaluated[step][-1][our_name(name)], theirs)
                      for step, weights in data["readout"].items() for name, theirs in weights.items()}
    assert max(readout_errors.values()) <= RELATIVE_TOLERANCE, max(readout_errors.items(), key=lambda kv: kv[1])
    assert sorted(s for s in evaluated if s) == record_validation_steps(record, data)


# ----------------------------------------------------------------------------------------------
# SOAP steps from the record's state
# ----------------------------------------------------------------------------------------------

def soap_cases():
    cases = []
    for record in (42, 46):
        data = torch.load(os.path.join(DATA, f"record{record}.pt"), weights_only=False)
        cases += [(record, step, name) for step, matrices in sorted(data["soap"].items()) for name in matrices]
    return cases


# A SOAP basis column whose Rayleigh quotient on its Gram matrix is at most this fraction of the largest one
# lies in the Gram's null space: float32 rounding of a zero eigenvalue. Measured on the reference data: at
# most 2.8e-8 for such columns on both CPU kinds, at least 5.8e-6 for every other column.
NULL_SPACE_QUOTIENT = 2.0 ** -20
GRAM_OF_BASIS = {"q_row": "row_gg", "q_col": "col_gg"}


def basis_errors(ours, theirs, gram):
    """Relative errors of what determines a SOAP basis (an eigenbasis, or one power step and a QR from it),
    as CPUs do not: each column outside the Gram's null space, up to its sign (an eigenvector's or a QR
    column's sign is arbitrary, and preconditioning in the basis is the same with either), and the
    projector onto the null-space columns, which eigh and QR may return in any orthonormal arrangement
    (the first bases of one or two rank-deficient gradients: 48 and 32 of 64 columns). The null columns
    are those of the reference's by their Rayleigh quotients on the reference's Gram matrix; ours must be
    the same columns."""
    ours, theirs, gram = ours.double(), theirs.double(), gram.double()

    def null_columns(basis):
        quotients = torch.diag(basis.T @ gram @ basis)
        return quotients <= NULL_SPACE_QUOTIENT * quotients.max()
    null = null_columns(theirs)
    assert torch.equal(null_columns(ours), null), "the bases put different columns in the Gram's null space"
    signs = torch.sign((ours * theirs).sum(0))
    columns = relative_error((ours * signs)[:, ~null], theirs[:, ~null])
    projector = relative_error(ours[:, null] @ ours[:, null].T, theirs[:, null] @ theirs[:, null].T) if null.any() else 0.0
    return columns, projector


@pytest.mark.parametrize("record,step,name", soap_cases())
def test_soap_step_from_the_records_state_equals_the_records(record, step, name):
    """One MuonChain step of one matrix from the record's weights, momentum, SOAP statistics and bases (the
    first step, before any basis; the first basis refresh; a late step) equals the record's step: the whole
    chain of the matrix's group (SOAP and its combine, the polar or Aurora's, Contra-Muon, NorMuon-lite, the
    radial brake, the floor, the radius pin, cautious weight decay), with set_schedules' values. The bases
    are compared by what determines them (basis_errors), the rest value by value, all within 1e-5."""
    data = torch.load(os.path.join(DATA, f"record{record}.pt"), weights_only=False)
    case = data["soap"][step][name]
    recipe = tg.RECIPES[RECIPE_OF[record]]
    spec_index, group_index = tg.group_of(name, recipe)
    group = recipe.optimizers[spec_index].groups[group_index]
    param = torch.nn.Parameter(case["weight"].clone())
    optimizer = optimizers.MuonChain([dict(params=[param], lr=group.lr, name=group.name, **group.options)], lr=group.lr)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    tg.set_schedules([optimizer], recipe, step)
    optimizer.state[param].update({key: value.clone() if torch.is_tensor(value) else value
                                   for key, value in case["state"].items() if value is not None})
    param.grad = case["grad"].clone()
    optimizer.step()
    assert relative_error(param.detach(), case["after_weight"]) <= RELATIVE_TOLERANCE
    after = {key: value for key, value in case["after_state"].items() if value is not None}
    assert sorted(optimizer.state[param]) == sorted(after)
    for key, value in after.items():
        if key in GRAM_OF_BASIS:
            errors = basis_errors(optimizer.state[param][key], value, after[GRAM_OF_BASIS[key]])
            assert max(errors) <= RELATIVE_TOLERANCE, (key, errors)
        elif torch.is_tensor(value):
            assert relative_error(optimizer.state[param][key], value) <= RELATIVE_TOLERANCE, key
        else:
            assert optimizer.state[param][key] == value, key


# ----------------------------------------------------------------------------------------------
# The lookahead and the readouts in train_gpt's loop, on a short horizon (the whole-horizon test is slow)
# ----------------------------------------------------------------------------------------------

LOOP_STEPS = 12  # the schedules scaled to 12 steps: a lookahead from step 1 to 8, readouts from step 10


@pytest.mark.parametrize("record", [42, 46])
def test_lookahead_and_readouts_act_at_their_steps(record, tmp_path, monkeypatch):
    """train_trial on LOOP_STEPS steps, against the equations of docs/recipes.md from the weights W_s each
    step s enters with (before its look-ahead): the forward pass of step s sees W_s + stepsize(s) b_s, where
    b_{s+1} = lerp(b_s, W_{s+1} - W_s, 1 - ema); #42 keeps R = W_capture and evaluates the readout from
    apply_from on; #46's Tail-EMA averages W_start .. W_{end-1} and is evaluated once it has started. Bit for
    bit (the same float operations): a step early or late, or a lerp the wrong way, fails."""
    data = torch.load(os.path.join(DATA, f"record{record}.pt"), weights_only=False)
    data["size"] = dict(data["size"], layers=2)  # #46's 8 layers cost 5 times as much, and add nothing here
    recipe = tg.scaled_recipe(tg.RECIPES[RECIPE_OF[record]], LOOP_STEPS)
    run = reduced_run(recipe, data, tmp_path, ["--steps", str(LOOP_STEPS)])
    entering, seen, evaluations, trials = [], [], {}, []

    def weights():
        return [p.detach().clone() for p in run.raw_model.parameters()]

    def note_entering(optimizers, recipe, step):
        entering.append(weights())
        real_set_schedules(optimizers, recipe, step)

    def note_forward(*args):
        seen.append(weights())
        return real_forward(*args)

    def note_evaluation(*args):
        evaluations[run.step] = evaluations.get(run.step, 0) + 1
        return 0.0

    real_set_schedules, real_forward, real_trial_state = tg.set_schedules, run.model.forward, tg.TrialState
    monkeypatch.setattr(tg, "set_schedules", note_entering)
    monkeypatch.setattr(run.model, "forward", note_forward)
    monkeypatch.setattr(tg, "evaluate", note_evaluation)
    monkeypatch.setattr(tg, "TrialState", lambda *args: trials.append(real_trial_state(*args)) or trials[-1])
    tg.train_trial(run)
    entering.append(weights())  # W_final: the loop validates the last step and ends before training it
    last = len(entering) - 1
    assert last == (recipe.stop or recipe.steps)

    lookahead, buffer = recipe.lookahead, [torch.zeros_like(w) for w in entering[0]]
    for step in range(last):
        stepsize = lookahead.stepsize_at(step, recipe)
        expected = [w.add(b, alpha=stepsize) if stepsize else w for w, b in zip(entering[step], buffer)]
        assert all(torch.equal(a, b) for a, b in zip(seen[step], expected)), step
        buffer = [b.lerp(after - before, 1 - lookahead.ema)
                  for b, before, after in zip(buffer, entering[step], entering[step + 1])]
    assert any(lookahead.stepsize_at(step, recipe) for step in range(last))

    readout, state = recipe.readout, trials[0].readout
    if record == 42:
        assert all(torch.equal(r, w.view(-1)) for r, w in zip(state.reference, entering[readout.capture]))
        assert [s for s in sorted(evaluations) if evaluations[s] == 2] == [s for s in sorted(evaluations)
                                                                          if s >= readout.apply_from]
    else:
        averaged = [i for i, p in enumerate(run.raw_model.parameters()) if p is not run.raw_model.embed.weight]
        ema = [entering[readout.start][i].float().view(-1) for i in averaged]
        for step in range(readout.start + 1, min(readout.end, last + 1)):
            for e, i in zip(ema, averaged):
                e.add_(entering[step][i].float().view(-1) - e, alpha=1.0 / readout.tau)
        assert all(torch.equal(a, b) for a, b in zip(state.ema, ema))
        assert [s for s in sorted(evaluations) if evaluations[s] == 2] == [s for s in sorted(evaluations)
                                                                          if s >= readout.start]


# ----------------------------------------------------------------------------------------------
# Ranks and resume: the whole state (MuonChain's owner-kept state, the lookahead's and readouts' pieces)
# ----------------------------------------------------------------------------------------------

SHORT_STEPS = 24  # the horizon of the short runs: the schedules scaled to it, a readout by the end


def short_run_checkpoint(record, folder, argv=(), dist_info=tg.Distributed(0, 1, 0, False), resume=None):
    """Runs the recipe on SHORT_STEPS steps on the reduced model (every parameter trained), saving its
    final checkpoint (and any --save-every ones) under `folder`; returns the final checkpoint's path."""
    data = torch.load(os.path.join(DATA, f"record{record}.pt"), weights_only=False)
    recipe = tg.scaled_recipe(tg.RECIPES[RECIPE_OF[record]], SHORT_STEPS)
    path = os.path.join(folder, "final.pt")
    run = reduced_run(recipe, data, folder, ["--steps", str(SHORT_STEPS), "--save", path, *argv], dist_info)
    run.resume = resume and torch.load(resume, weights_only=False)
    with mock_evaluation():
        tg.train_trial(run)
    return path


@contextlib.contextmanager
def mock_evaluation():
    """evaluate() replaced by the sum of the weights, so that every validation (readouts included) reads them."""
    real = tg.evaluate
    tg.evaluate = lambda model, *args: float(sum(p.detach().double().sum() for p in model.run.raw_model.parameters()))
    try:
        yield
    finally:
        tg.evaluate = real


def short_run_worker(rank, world_size, record, folder):
    short_run_checkpoint(record, folder, dist_info=tg.Distributed(rank, world_size, rank, True))


def assert_same_checkpoints(a, b):
    """Two checkpoint files hold bit-identical tensors (and equal everything else), but for the rng states."""
    a, b = torch.load(a, weights_only=False), torch.load(b, weights_only=False)

    def compare(x, y, where):
        if torch.is_tensor(x):
            assert torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert sorted(x, key=str) == sorted(y, key=str), where
            for key in x:
                compare(x[key], y[key], where + (key,))
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                compare(u, v, where + (i,))
        else:
            assert x == y, where
    for key in a:
        if key not in ("rng", tg.CHECKSUM):  # the checksum covers the rng states too
            compare(a[key], b[key], (key,))
    for checkpoint in (a, b):
        assert checkpoint[tg.CHECKSUM] == tg.checkpoint_digest(checkpoint)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("record, world_size", [(42, 3), (46, 2)])
def test_gloo_ranks_save_the_same_state_as_one_process(record, world_size, tmp_path):
    """Gloo ranks (3: pieces and owners uneven; 2): every matrix updated by its owner, the lookahead's pieces
    gathered, the readout's pieces, the checkpoint gathered on rank 0: the same bits as one process."""
    from test_optimizers import run_on_gloo_ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each gloo rank runs (CPU kernels split their sums by thread count)
    try:
        alone = short_run_checkpoint(record, str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path / f"world{world_size}"
    folder.mkdir()
    run_on_gloo_ranks(short_run_worker, world_size, folder, record, str(folder))
    assert_same_checkpoints(alone, folder / "final.pt")


@pytest.mark.slow
@pytest.mark.parametrize("record", [42, 46])
def test_resume_continues_bit_identically(record, tmp_path):
    """A run saved at step 12 and resumed ends with the uninterrupted run's every bit (lookahead buffers, SOAP
    statistics and bases, the captured reference or Tail-EMA, the data position)."""
    whole = tmp_path / "whole"
    parts = tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    final = short_run_checkpoint(record, str(whole), ["--save-every", "12"])
    resumed = short_run_checkpoint(record, str(parts), resume=str(whole / "final.step12.pt"))
    assert_same_checkpoints(final, resumed)
    # The --save room check's estimate covers the checkpoint with its SOAP, lookahead and readout state.
    data = torch.load(os.path.join(DATA, f"record{record}.pt"), weights_only=False)
    recipe = tg.scaled_recipe(tg.RECIPES[RECIPE_OF[record]], SHORT_STEPS)
    assert os.path.getsize(final) <= tg.estimated_checkpoint_bytes(reduced_config(data), recipe)


# ----------------------------------------------------------------------------------------------
# --steps, --tiny and --aurora; tiny runs
# ----------------------------------------------------------------------------------------------

def test_scaling_is_the_identity_at_the_records_horizon_and_rounds_half_up():
    for name, recipe in tg.RECIPES.items():
        assert tg.scaled_recipe(recipe, recipe.steps) == recipe, name
    assert [tg.scaled_step(v, 200, 2900) for v in (125, 2375, 2850, 2860, 2900)] == [9, 164, 197, 197, 200]
    assert tg.scaled_step(725, 2, 2900) == 1 and tg.scaled_step(724, 2, 2900) == 0  # 0.5 rounds up, 0.4993 down
    tiny = tg.scaled_recipe(tg.RECIPES["aurora-ema-ref"], 200)
    assert (tiny.steps, tiny.stop, tiny.lookahead.prefill, tiny.lookahead.rest, tiny.readout.capture) == (200, 197, 21, 134, 164)
    assert tiny.lookahead.stepsize == 0.3 and tiny.record_steps == 2900
    # PowerCool is stretched with the steps: s steps before the shortened t_end, the lr is the record's
    # s * 2900 / 200 steps before its own t_end.
    group = {"initial_lr": 0.0375, "power_c": tg.MATRIX_POWER_C}
    record = tg.RECIPES["aurora-ema-ref"]
    for step in (150, 180, 206):
        before_end = (tiny.lr_schedule.t_end - step) * 14.5
        assert tiny.lr_schedule.lr(step, group, tiny) == record.lr_schedule.lr(record.lr_schedule.t_end - before_end,
                                                                                group, record)


def check_args(capsys, *argv):
    """train_gpt.main(["--check-args", *argv]) in this process: (exit status, stderr); an argument error
    exits as argparse does."""
    try:
        status = tg.main(["--check-args", *argv])
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--aurora", "widest"], "'widest' is not none, wide, tall or all and names no block matrix"),
    (["--aurora", "attn.q"], "names only square matrices"),
    (["--aurora-form", "42"], "give --aurora PATTERN too"),
    (["--aurora-form", "17"], "give --aurora PATTERN too"),  # the default form, given: refused all the same
    (["--recipe", "soap-muon", "--aux-from", "muon"], "only the benchmark-schedule recipes"),
    (["--recipe", "aurora-ema-ref", "--mlp", "swiglu"], "has no draws for a SwiGLU's up projection"),
])
def test_bad_recipe_combinations_are_refused_with_one_error_line(argv, message, capsys):
    status, stderr = check_args(capsys, *argv)
    assert status == 2 and message in stderr and stderr.count("\n") == 1 and stderr.startswith("error: "), stderr


def test_stop_at_after_the_recipes_own_stop_is_refused(capsys):
    assert check_args(capsys, "--recipe", "aurora-ema-ref", "--stop-at", "2870") == (
        2, "error: --stop-at 2870: after recipe aurora-ema-ref's own stop at step 2860 of 2900; give a step up to 2860\n")
    assert check_args(capsys, "--recipe", "aurora-ema-ref", "--stop-at", "2860") == (0, "")


def test_every_parameter_needs_a_group(monkeypatch):
    """A model option a recipe was not written for (here: a recipe whose groups miss the MLP's up projection
    under SwiGLU) is refused before any work, naming the parameters left without an optimizer."""
    muon = tg.RECIPES["muon"]
    narrow = dataclasses.replace(muon, name="narrow", optimizers=(muon.optimizers[0], dataclasses.replace(
        muon.optimizers[1], groups=(tg.Group("matrices", ("blocks.*.attn.*.weight", "blocks.*.mlp.fc.weight",
                                                          "blocks.*.mlp.proj.weight"), 0.025),))))
    monkeypatch.setitem(tg.RECIPES, "narrow", narrow)
    args = tg.parse_args(["--recipe", "narrow", "--mlp", "swiglu"])
    with pytest.raises(tg.SetupError, match=r"recipe narrow has no optimizer group for blocks\.0\.mlp\.up\.weight"):
        tg.resolve_recipe(args, tg.resolve_hyperparameters(args))


def test_aurora_needs_a_recipe_with_a_polar_step(monkeypatch):
    adam_only = dataclasses.replace(tg.RECIPES["muon"], name="adam-only", optimizers=(
        tg.OptimizerSpec("AdamW", (tg.Group("all", ("*",), 0.001),)),))
    monkeypatch.setitem(tg.RECIPES, "adam-only", adam_only)
    args = tg.parse_args(["--recipe", "adam-only", "--aurora", "wide"])
    with pytest.raises(tg.SetupError, match="has no polar step to give Aurora's"):
        tg.resolve_recipe(args, tg.resolve_hyperparameters(args))


def aurora_run(argv):
    args = tg.parse_args(argv)
    return tg.resolve_recipe(args, tg.resolve_hyperparameters(args))


@pytest.mark.parametrize("argv, is_record", [
    (["--recipe", "aurora-ema-ref"], True),
    (["--recipe", "aurora-ema-ref", "--aurora", "mlp.proj", "--aurora-form", "42"], True),  # its own choice
    (["--recipe", "aurora-ema-ref", "--aurora", "wide", "--aurora-form", "42"], True),  # the same matrices
    (["--recipe", "aurora-ema-ref", "--aurora", "none"], False),  # #42 without Aurora
    (["--recipe", "aurora-ema-ref", "--aurora", "mlp.proj"], False),  # #17's form
    (["--recipe", "soap-muon", "--aurora", "mlp.proj"], False),
    (["--recipe", "soap-muon", "--aurora", "none"], True),
    (["--recipe", "aurora", "--aurora", "all"], True),  # record #17 gives every rectangular matrix Aurora's polar
    (["--recipe", "aurora", "--aurora", "tall"], False),
    (["--recipe", "soap-muon", "--steps", "1000"], False),
    (["--recipe", "soap-muon", "--tiny"], False),
])
def test_is_record_only_for_the_records_full_configuration(argv, is_record):
    recipe, steps, hp, switched = aurora_run(argv)
    differences = tg.record_differences(hp, recipe, steps, None, switched)
    assert (not differences) == is_record, differences
    if switched.aurora and not is_record:
        assert any(d.startswith("aurora=") for d in differences)


def test_the_aurora_difference_names_both_choices():
    def said(argv):
        recipe, steps, hp, switched = aurora_run(argv)
        return next(d for d in tg.record_differences(hp, recipe, steps, None, switched) if d.startswith("aurora="))
    assert said(["--recipe", "soap-muon", "--aurora", "mlp.proj"]) == (
        "aurora='mlp.proj' in record #17's form on 12 matrices (record: 'none', 0 matrices)")
    assert said(["--recipe", "aurora-ema-ref", "--aurora", "none"]) == (
        "aurora='none' in record #17's form on 0 matrices (record: 'mlp.proj', 12 matrices, polar aurora_schatten)")


def updated_weights(recipe_name, argv=(), steps=2):
    """The weights after `steps` steps of the recipe's optimizers (with argv's --aurora) on a small model with
    every weight random, from fixed random gradients."""
    recipe, _, hp, _ = aurora_run(["--recipe", recipe_name, *argv])
    config = dataclasses.replace(hp.model, vocab_size=32, num_layers=2, model_dim=16, head_dim=8, seq_len=8)
    model = tg.GPT(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype))
    opts = tg.build_optimizers(model, recipe)  # the groups --aurora split at full size hold the same names here
    for step in range(steps):
        tg.set_schedules(opts, recipe, step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        for opt in opts:
            opt.step()
    opts[-1].model_parameters = list(model.named_parameters())
    return {name: p.detach().clone() for name, p in model.named_parameters()}, opts


def model_of(opts):
    return opts[-1].model_parameters


@pytest.mark.parametrize("recipe_name, pattern, form, backend", [
    ("soap-muon", "mlp.proj", "17", "aurora"),
    ("soap-muon", "tall", "42", "aurora_schatten"),
    ("muon", "wide", "17", "aurora"),
    ("aurora-ema-ref", "none", "17", None),
])
def test_aurora_switch_changes_only_the_named_matrices_polar(recipe_name, pattern, form, backend):
    """--aurora: the named matrices' groups take Aurora's polar backend and their steps change; every other
    parameter steps exactly as in the recipe itself (#42 with `none`: its mlp.proj loses Aurora's polar)."""
    plain, _ = updated_weights(recipe_name)
    switched, opts = updated_weights(recipe_name, ["--aurora", pattern, "--aurora-form", form])
    named = aurora_run(["--recipe", recipe_name, "--aurora", pattern, "--aurora-form", form])[3].aurora["matrices"] & set(plain)
    own = {n for n in plain if n.endswith("mlp.proj.weight")} if recipe_name == "aurora-ema-ref" else set()
    changed = {name for name in plain if not torch.equal(plain[name], switched[name])}
    assert changed and changed == named ^ own
    names = {id(p): n for n, p in model_of(opts)}
    for group in opts[-1].param_groups:
        for p in group["params"]:
            if names[id(p)] in named and backend is not None:
                assert group["polar_backend"] == backend
            elif names[id(p)] not in own:
                assert group["polar_backend"] in ("polar", "schatten"), (names[id(p)], group["polar_backend"])


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from test_train_gpt import write_synthetic_shards
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(str(folder), vocab_size=512, train_shards=1, tokens_per_shard=(TINY_STEPS + 2) *
                           tg.TINY.batch_tokens, val_tokens=tg.TINY.val_tokens + 100)
    return ["--train-files", str(folder / "synthetic_train_*.bin"), "--val-files", str(folder / "synthetic_val_*.bin")]


TINY_STEPS = 5  # the CPU preset on a 5-step horizon: every step constant scaled by 5/2900


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--recipe", "aurora-ema-ref"], ["--recipe", "soap-muon"],
                                  ["--recipe", "soap-muon", "--aurora", "mlp.proj"]])
def test_tiny_runs_fall_log_their_readouts_and_say_they_are_not_records(argv, tiny_shards, tmp_path, monkeypatch):
    """train_gpt.main in this process (uncompiled, as the eager fixture sets), from argument checks to the log."""
    from test_train_gpt import split_log
    monkeypatch.chdir(tmp_path)
    assert tg.main(["--tiny", "--device", "cpu", "--steps", str(TINY_STEPS), "--no-diagnostics", "--run-id", "r",
                    *argv, *tiny_shards]) == 0
    code, lines = split_log((tmp_path / "logs" / "r.txt").read_text())
    assert "class MuonChain" in code and "def record_init" in code  # the code that ran, optimizers inlined
    val_lines = [line for line in lines if line.startswith("step:")]
    losses = [float(line.split("val_loss:")[1].split()[0]) for line in val_lines]
    assert val_lines[0].startswith(f"step:0/{TINY_STEPS} ") and losses[-1] < losses[0]
    config = next(line for line in lines if line.startswith("config "))
    assert '"is_record_recipe": false' in config
    if "--aurora" in argv:
        assert '"aurora=' in config  # named in the differences from the record
    if argv[1] == "aurora-ema-ref":  # stops at round(2860 * 5 / 2900) = 5; the readout applies from round(2850 ...) = 5
        assert all(" ema_beta:" in line for line in val_lines)
        assert " ref_gamma:-0.075 ref_step:4 raw_val_loss:" in val_lines[-1]
    else:
        assert all(" val_ema_loss:" in line for line in val_lines)


@pytest.mark.parametrize("name", ["aurora-ema-ref", "soap-muon"])
def test_the_shortest_horizons_scale_to_a_schedule_that_runs(name):
    """--steps 1 to 7: constants scaled to 0 (a validation interval, a warmup) still give every step a value."""
    with torch.device("meta"):
        model = tg.GPT(dataclasses.replace(tg.TINY.model, **tg.RECIPES[name].model))
    for steps in range(1, 8):
        recipe = tg.scaled_recipe(tg.RECIPES[name], steps)
        opts = tg.build_optimizers(model, recipe)
        for step in range(steps + 1):
            tg.set_schedules(opts, recipe, step)
            assert recipe.lookahead.stepsize_at(step, recipe) >= 0
        assert tg.validates_at(0, recipe, tg.TINY) and tg.validates_at(recipe.stop or steps, recipe, tg.TINY)


def test_resuming_a_run_that_ended_at_its_recipes_stop_is_refused():
    """aurora-ema-ref stops before its horizon (99 of 100 here): a checkpoint of its last step has nothing left."""
    args = tg.parse_args(["--tiny", "--recipe", "aurora-ema-ref", "--steps", "100", "--resume", "x.pt"])
    recipe, steps, hp, _ = tg.resolve_recipe(args, tg.resolve_hyperparameters(args))
    assert (recipe.stop, steps) == (99, 100)
    checkpoint = {"stream": {}, "recipe": recipe.name, "steps": steps, "model_config": dataclasses.asdict(hp.model),
                  "batch_tokens": hp.batch_tokens, "trial": 0, "step": recipe.stop,
                  "model": tg.GPT(hp.model).state_dict(), **tg.resume_settings(args)}
    with pytest.raises(tg.SetupError, match="the saved run ended there"):
        tg.check_resumable(checkpoint, "x.pt", args, recipe, steps, hp)
    tg.check_resumable({**checkpoint, "step": recipe.stop - 1}, "x.pt", args, recipe, steps, hp)
