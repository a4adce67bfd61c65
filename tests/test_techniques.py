"""Tests of the techniques and their switches (train_gpt.py's TECHNIQUES; docs/recipes.md#techniques): every
technique of every recipe, switched off, leaves its stage out and nothing else (the update, schedule value,
readout or init equals the plain form's computed here from optimizers.py's pure functions or torch's own, and
every other parameter steps bit for bit as in the record); --with, --set and the errors of bad switches."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

import optimizers as opt
import train_gpt as tg
from test_recipes import TINY_STEPS, check_args, tiny_shards  # noqa: F401  (tiny_shards: a fixture)

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=32, num_layers=2, model_dim=16, head_dim=8, seq_len=8)
ONE_LAYER = dict(SMALL, num_layers=1)  # what the optimizer tests train: each kind of matrix once
STEPS = 3  # SOAP: no basis at step 0, its first basis at 1, a refreshed one at 2 (#46 refreshes every step)


@pytest.fixture(autouse=True)
def eager():
    with torch._dynamo.config.patch(disable=True):
        yield


def resolved(recipe_name, *argv):
    """(recipe at its record's horizon, hp, Switched) of train_gpt --recipe NAME argv, as a run resolves them."""
    args = tg.parse_args(["--recipe", recipe_name, *argv])
    recipe, _, hp, switched = tg.resolve_recipe(args, tg.resolve_hyperparameters(args))
    return recipe, hp, switched


def small_model(hp):
    """The recipe's model at a small size, every weight random (also those an init would zero)."""
    model = tg.GPT(dataclasses.replace(hp.model, **ONE_LAYER))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype))
    return model


def gradients(model, steps=STEPS):
    """Random gradients, each step's a fixed draw plus a smaller new one: the directions SOAP and the raw momentum
    take then agree enough for #46's trust gate to reach its cap."""
    generator = torch.Generator().manual_seed(1)
    fixed = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    return [{name: (fixed[name] + 0.3 * torch.randn(p.shape, generator=generator)).to(p.dtype)
             for name, p in model.named_parameters()} for _ in range(steps)]


def group_values(optimizers):
    return {g["name"]: dict(g) for o in optimizers for g in o.param_groups}


def trained(recipe, hp, steps=STEPS):
    """(weights after `steps` steps of the recipe's optimizers from fixed random gradients, the param groups' values
    at each step after set_schedules, the names of the parameters in each group)."""
    model = small_model(hp)
    grads = gradients(model, steps)
    optimizers = tg.build_optimizers(model, recipe)
    names = {id(p): name for name, p in model.named_parameters()}
    members = {g["name"]: [names[id(p)] for p in g["params"]] for o in optimizers for g in o.param_groups}
    schedule = []
    for step in range(steps):
        tg.set_schedules(optimizers, recipe, step)
        schedule.append({name: {k: v for k, v in values.items() if k != "params"}
                         for name, values in group_values(optimizers).items()})
        for name, p in model.named_parameters():
            p.grad = grads[step][name].clone()
        for optimizer in optimizers:
            optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, schedule, members


# ----------------------------------------------------------------------------------------------
# The plain forms, from optimizers.py's pure functions (and torch's AdamW), stage by stage
# ----------------------------------------------------------------------------------------------

def chain_stages(recipe, options):
    """The stages of docs/recipes.md#soap-muon a MuonChain group of the record runs, by the technique's name."""
    floor = (options["floor"] or ("",))[0]
    bounded = recipe.trust is not None and (recipe.trust.floor, recipe.trust.cap) != (0, 1)
    on = {"soap": options["soap"] is not None, "trust_gate": options["soap_combine"] == "trust_gate",
          "early_trust": options["soap_combine"] == "trust_gate" and bounded,
          "aurora": options["polar_backend"] == "aurora_schatten", "schatten_polar": options["polar_backend"] == "schatten",
          "contra": options["contra_muon"], "normuon_lite": options["normuon_beta2"] is not None,
          "uw_floor": floor == "scalar", "row_floor": floor == "row", "radial_brake": options["radial_brake"] is not None,
          "radius_pin": options["pin"], "cautious_wd": options["cautious_weight_decay"] > 0}
    return {stage for stage, is_on in on.items() if is_on}


def chain_reference(W, grads, options, schedule, stages):
    """One matrix after the steps of the chain with only `stages` on, written out from the pure functions."""
    W, momentum = W.clone(), torch.zeros_like(W)
    soap = options["soap"]
    state = dict(exp_avg_sq=torch.zeros_like(W), row_gg=torch.zeros(W.size(0), W.size(0)),
                 col_gg=torch.zeros(W.size(1), W.size(1)), soap_step=0)
    second = torch.zeros((W.size(0), 1) if W.size(0) >= W.size(1) else (1, W.size(1)))
    for g, at in zip(grads, schedule):
        momentum.lerp_(g, 1 - at["momentum"])
        u = g.lerp(momentum, at["momentum"])
        if "soap" in stages:
            S = u
            if "q_row" in state:
                S, state["exp_avg_sq"] = opt.soap_precondition(
                    u, state["q_row"], state["q_col"], state["exp_avg_sq"], soap["beta2"], soap["denom_power"],
                    soap.get("blend", 1.0), soap.get("denom_floor", 0.0))
            if options["soap_combine"] == "replace":
                u = S
            elif options["soap_combine"] == "rescale":
                u = opt.rescaled_to_schatten_norm_of(S, u)
            elif "trust_gate" in stages:
                low, high = (at["trust_floor"], at["trust_cap"]) if "early_trust" in stages else (0.0, 1.0)
                u = opt.gated_blend(u, S, opt.trust_gate(u, S, g, **options["trust"]).clamp(min=low, max=high))
            else:
                u = opt.gated_blend(u, S, torch.ones((), dtype=torch.float32))
        # Without Aurora's, the chain's plain polar is the Schatten-4 one (as --aurora none gives #42's mlp.proj).
        schatten = "schatten_polar" in stages or options["polar_backend"] == "aurora_schatten"
        polar = opt.aurora_polar_schatten if "aurora" in stages else opt.schatten_polar if schatten else opt.polar
        P = polar(u)
        if "contra" in stages:
            P = opt.contra_combined(P, u, at["contra"])
        P = P * opt.aspect_scale(*W.shape)
        if "normuon_lite" in stages:
            P, second = opt.row_variance_normalized(P, second, options["normuon_beta2"])
        if "radial_brake" in stages:
            P = opt.radially_braked(P, W, *options["radial_brake"])
        if "uw_floor" in stages:
            P = opt.uw_floor(P, W, options["floor"][1])
        if "row_floor" in stages:
            P = opt.row_floored(P, W, *options["floor"][1:])
        if "soap" in stages:
            opt.soap_statistics_update_(state, g, soap["beta2"], soap["frequency"])
        decay = options["cautious_weight_decay"] if "cautious_wd" in stages else 0.0
        if "radius_pin" in stages:
            opt.pinned_step_(W, P, at["lr"], decay)
        else:  # the plain step: W -= lr P, then the cautious decay with its mask from before the step
            mask = opt.cautious_mask(P, W)
            W.add_(P, alpha=-at["lr"]).mul_(1.0 - (at["lr"] * decay) * mask)
    return W


def benchmark_reference(weights, grads, kind, options, schedule, stages):
    """The matrices of one Muon / NorMuon / Aurora group after the steps, only `stages` on: momentum and the
    Nesterov direction per matrix, the update math on each shape's matrices stacked as the optimizer stacks
    them in one process (a shape's lone matrix as one 2-D matrix), decoupled decay and the step."""
    names = list(weights)
    W = {name: weights[name].clone() for name in names}
    momenta = {name: torch.zeros_like(W[name]) for name in names}
    seconds = {name: torch.zeros((w.size(0), 1) if w.size(0) >= w.size(1) else (1, w.size(1))) for name, w in W.items()}
    for g, at in zip(grads, schedule):
        mu, lr = at["momentum"], at["lr"]
        decay = 1 - lr * options["weight_decay"] if "weight_decay" in stages else 1.0
        updates = {}
        for name in names:
            momenta[name].lerp_(g[name], 1 - mu)
        for shape in dict.fromkeys(tuple(w.shape) for w in W.values()):
            run = [name for name in names if tuple(W[name].shape) == shape]

            def stack(tensors):
                return tensors[0] if len(run) == 1 else torch.stack(tensors)
            u = stack([g[name].lerp(momenta[name], mu) for name in run])
            rows, cols = shape
            if kind == "Aurora" and "aurora" in stages and rows != cols:
                P = opt.aurora_polar(u, options["pp_iterations"], options["pp_beta"])
            else:
                P = opt.polar(u)
            update = P
            if "contra" in stages:
                update = opt.contra_mix(P, opt.contra_direction(u), options["contra"])
            update = update * opt.aspect_scale(rows, cols)
            if kind == "NorMuon" and "normuon" in stages:
                update, second = opt.normuon_normalize(update, stack([seconds[n] for n in run]), options["beta2"])
                seconds.update(zip(run, [second] if len(run) == 1 else second.unbind(0)))
            if "uw_floor" in stages:  # the floor sees W after this step's decay
                update = opt.uw_floor(update, stack([W[n] * decay for n in run]), options["uw_floor"])
            update = update.float()
            updates.update(zip(run, [update] if len(run) == 1 else update.unbind(0)))
        for name in names:
            if decay != 1.0:
                W[name].mul_(decay)
            W[name].add_(updates[name], alpha=-lr)
    return W


def adamw_reference(weights, grads, groups, schedule, weight_decay):
    """Parameters of AdamW groups after the steps of torch's own fused AdamW with `weight_decay`."""
    params = {name: torch.nn.Parameter(w.clone()) for name, w in weights.items()}
    adamw = torch.optim.AdamW([dict(params=[params[n] for n in members], betas=values["betas"], lr=values["lr"],
                                    name=group) for group, (members, values) in groups.items()],
                              eps=1e-10, weight_decay=weight_decay, fused=True)
    for g, at in zip(grads, schedule):
        for group in adamw.param_groups:
            group["lr"] = at[group["name"]]["lr"]
        for name, p in params.items():
            p.grad = g[name].clone()
        adamw.step()
    return {name: p.detach() for name, p in params.items()}


# ----------------------------------------------------------------------------------------------
# One test per technique of every recipe
# ----------------------------------------------------------------------------------------------

def present(kinds):
    return [(recipe, name) for recipe in tg.RECIPES for name in tg.technique_names(tg.RECIPES[recipe])
            if kind_of(recipe, name) in kinds]


def kind_of(recipe_name, name):
    """Which test below checks a technique of a recipe."""
    matrix = tg.RECIPES[recipe_name].matrix_spec().kind
    if name in ("adam_weight_decay", "bias_free_adam"):
        return "adam"
    if name in ("power_cool", "momentum_schedule"):
        return "schedule"
    if name in ("ema_nesterov", "reference_readout", "tail_ema"):
        return "whole model"
    if name in ("record_init", "fc_depth_init", "signed_gains", "zero_biases", "norm_float32"):
        return "init"
    return "chain" if matrix == "MuonChain" else "benchmark matrix"


def test_every_technique_of_every_recipe_has_its_test_and_every_technique_a_recipe():
    kinds = {"chain", "benchmark matrix", "adam", "schedule", "whole model", "init"}
    pairs = [(r, n) for r in tg.RECIPES for n in tg.technique_names(tg.RECIPES[r])]
    assert {kind_of(*pair) for pair in pairs} <= kinds and len(present(kinds)) == len(pairs) == 40
    assert {n for _, n in pairs} == set(tg.TECHNIQUES)  # none defined that no recipe has


def compared(recipe_name, name):
    """(record's weights, switched weights, schedule, members, the switched recipe's acted-on groups)."""
    record, hp, _ = resolved(recipe_name)
    switched, _, _ = resolved(recipe_name, "--without", name)
    assert name not in tg.technique_names(switched)
    before, schedule, members = trained(record, hp)
    after, _, _ = trained(switched, hp)
    return record, hp, before, after, schedule, members


def assert_others_bit_identical(before, after, acted):
    others = [n for n in before if n not in acted]
    assert others and all(torch.equal(before[n], after[n]) for n in others), \
        [n for n in others if not torch.equal(before[n], after[n])]


@pytest.mark.parametrize("recipe_name, name", present({"chain"}))
def test_a_chain_stage_switched_off_is_left_out_of_its_groups_updates_and_nothing_else_changes(recipe_name, name):
    record, hp, before, after, schedule, members = compared(recipe_name, name)
    acted = tg.TECHNIQUES[name].where(record)
    model = small_model(hp)
    grads = gradients(model)
    spec = record.matrix_spec()
    changed = []
    for group in spec.groups:
        if group.name not in acted:
            continue
        options = tg.group_options(spec, group)
        stages = chain_stages(record, options)
        assert name in stages
        at = [step[group.name] for step in schedule]
        for param in members[group.name]:
            weight, steps = dict(model.named_parameters())[param].detach(), [g[param] for g in grads]
            assert torch.equal(before[param], chain_reference(weight, steps, options, at, stages))  # the record's own
            assert torch.equal(after[param], chain_reference(weight, steps, options, at, stages - {name})), param
            changed.append(not torch.equal(before[param], after[param]))
    assert any(changed)  # the stage did something here, so its absence is seen
    assert_others_bit_identical(before, after, {p for g in acted for p in members[g]})


@pytest.mark.parametrize("recipe_name, name", present({"benchmark matrix"}))
def test_a_benchmark_matrix_technique_switched_off_gives_the_plain_update_and_nothing_else_changes(recipe_name, name):
    record, hp, before, after, schedule, members = compared(recipe_name, name)
    (group,) = record.matrix_spec().groups
    spec = record.matrix_spec()
    options = tg.group_options(spec, group)
    stages = {"normuon", "weight_decay", "aurora", "contra", "uw_floor"} & set(tg.technique_names(record))
    model = small_model(hp)
    grads = gradients(model)
    weights = {n: dict(model.named_parameters())[n].detach() for n in members[group.name]}
    at = [step[group.name] for step in schedule]
    plain = benchmark_reference(weights, grads, spec.kind, options, at, stages - {name})
    assert all(torch.equal(after[n], plain[n]) for n in weights), [n for n in weights if not torch.equal(after[n], plain[n])]
    full = benchmark_reference(weights, grads, spec.kind, options, at, stages)  # the reference is the record's own
    assert all(torch.equal(before[n], full[n]) for n in weights)
    assert any(not torch.equal(before[n], after[n]) for n in weights)
    assert_others_bit_identical(before, after, set(weights))


@pytest.mark.parametrize("recipe_name, name", present({"adam"}))
def test_an_adam_technique_switched_off_gives_torchs_adamw_and_nothing_else_changes(recipe_name, name):
    record, hp, before, after, schedule, members = compared(recipe_name, name)
    acted = tg.TECHNIQUES[name].where(record)
    model = small_model(hp)
    groups = {}
    for spec in record.optimizers:
        for g in spec.groups:
            if g.name in acted:
                groups[g.name] = (members[g.name], tg.group_options(spec, g))
    params = {n: p.detach() for n, p in model.named_parameters() if any(n in m for m, _ in groups.values())}
    weight_decay = 0.0  # both techniques' plain form: no decay (bias-free Adam has none; AdamW's switched off)
    plain = adamw_reference(params, gradients(model), groups, schedule, weight_decay)
    assert all(torch.equal(after[n], plain[n]) for n in params)
    assert any(not torch.equal(before[n], after[n]) for n in params)
    assert_others_bit_identical(before, after, set(params))


def scheduled(recipe, steps):
    """{step: {group: (lr, momentum)}} of set_schedules on a weightless model."""
    with torch.device("meta"):
        model = tg.GPT(tg.FULL.model)
    optimizers = tg.build_optimizers(model, recipe)
    values = {}
    for step in steps:
        tg.set_schedules(optimizers, recipe, step)
        values[step] = {g["name"]: (g["lr"], g.get("momentum")) for o in optimizers for g in o.param_groups}
    return values


@pytest.mark.parametrize("recipe_name, name", present({"schedule"}))
def test_a_schedule_switched_off_gives_the_plain_schedule_and_nothing_else_changes(recipe_name, name):
    record, _, _ = resolved(recipe_name)
    switched, _, _ = resolved(recipe_name, "--without", name)
    steps = range(0, record.steps + 1, 29)
    was, now = scheduled(record, steps), scheduled(switched, steps)
    initial = {g.name: g.lr for spec in record.optimizers for g in spec.groups}
    matrix = tg.matrix_group_names(record)
    for step in steps:
        for group, (lr, momentum) in now[step].items():
            if name == "power_cool":  # the track's linear cooldown: flat for 30% of T, then linear to 0 at T
                progress = step / record.steps
                assert lr == initial[group] * (1.0 if progress < 0.3 else (1 - progress) / 0.7)
                assert momentum == was[step][group][1]
            else:  # a constant 0.95
                assert momentum == (0.95 if group in matrix else None) and lr == was[step][group][0]
    assert was != now
    unscheduled = dataclasses.replace(switched, lr_schedule=record.lr_schedule, momentum=record.momentum)
    assert without_power_c(unscheduled) == without_power_c(record)  # nothing else


def without_power_c(recipe):
    return tg.edit_groups(recipe, tg.group_names(recipe), lambda spec, g: tg.with_options(g, dropped=("power_c",)))


@pytest.mark.parametrize("recipe_name, name", present({"whole model"}))
def test_a_lookahead_or_readout_switched_off_is_absent_and_nothing_else_changes(recipe_name, name):
    record, _, _ = resolved(recipe_name)
    switched, _, _ = resolved(recipe_name, "--without", name)
    field_name = "lookahead" if name == "ema_nesterov" else "readout"
    assert getattr(record, field_name) is not None and getattr(switched, field_name) is None
    assert switched == dataclasses.replace(record, **{field_name: None})
    # train_trial then keeps no lookahead or readout, and the val lines have no readout's loss (the tiny runs of
    # tests/test_recipes.py log it).


def initialized(recipe, hp, seed=3):
    model = tg.GPT(dataclasses.replace(hp.model, **SMALL))
    generator = torch.Generator().manual_seed(seed)
    tg.initialize(model, recipe, generator, generator, seed)
    return model


@pytest.mark.parametrize("recipe_name, name", present({"init"}))
def test_an_init_technique_switched_off_gives_the_plain_init_and_nothing_else_changes(recipe_name, name):
    record, hp, _ = resolved(recipe_name)
    switched, switched_hp, _ = resolved(recipe_name, "--without", name)
    if name == "norm_float32":
        assert hp.model.norm_float32 and not switched_hp.model.norm_float32
        assert dataclasses.replace(switched_hp.model, norm_float32=True) == hp.model
        model = tg.GPT(dataclasses.replace(switched_hp.model, **SMALL))
        x = torch.randn(2, 16, dtype=torch.bfloat16)
        assert torch.equal(model.norm_a(x), torch.nn.functional.rms_norm(x, (16,), model.norm_a.gains.bfloat16()))
        assert switched == dataclasses.replace(record, model={})
        return
    before = dict(initialized(record, hp).named_parameters())
    after = dict(initialized(switched, hp).named_parameters())
    if name == "record_init":  # the benchmark's init, drawn here by its own function
        plain = tg.GPT(dataclasses.replace(hp.model, **SMALL))
        tg.init_parameters(plain, torch.Generator().manual_seed(3))
        assert all(torch.equal(after[n], p) for n, p in plain.named_parameters())
        return
    layers, alpha = SMALL["num_layers"], record.init.gain_alpha
    acted = {"fc_depth_init": [f"blocks.{i}.mlp.fc.weight" for i in range(layers)],
             "signed_gains": [f"blocks.{i}.norm{k}.gains" for i in range(layers) for k in (1, 2)],
             "zero_biases": [n for n in before if n.endswith("bias") and "proj" not in n]}[name]
    for n in acted:
        if name == "fc_depth_init":  # unscaled: the record's is the same draw times 1 - alpha l/(L-1)
            layer = int(n.split(".")[1])
            assert torch.equal(before[n], after[n] * (1.0 - record.init.fc_alpha * layer / (layers - 1)))
        elif name == "signed_gains":  # every sign +1
            assert torch.equal(after[n], torch.full_like(after[n], 1.0 - alpha if "norm1" in n else 1.0 + alpha))
        else:  # torch's default uniform draw within 1/sqrt(fan_in), the draws in the same order as the record's
            bound = 1 / math.sqrt(dict(initialized(record, hp).named_modules())[n[:-len(".bias")]].in_features)
            assert bool((before[n] == 0).all()) and bool((after[n] != 0).all() and (after[n].abs() <= bound).all())
    assert any(not torch.equal(before[n], after[n]) for n in acted)
    assert_others_bit_identical(before, after, set(acted))


def test_without_an_empty_list_is_the_recipe_bit_for_bit():
    for name in tg.RECIPES:
        record, hp, plain = resolved(name)
        same, _, switched = resolved(name, "--without", "")
        assert same == record and switched.differences == () and plain.differences == ()
    record, hp, _ = resolved("soap-muon")
    weights, _, _ = trained(record, hp)
    again, _, _ = trained(resolved("soap-muon", "--without", "")[0], hp)
    assert all(torch.equal(weights[n], again[n]) for n in weights)


# ----------------------------------------------------------------------------------------------
# --with, --set, the log's differences, bad switches
# ----------------------------------------------------------------------------------------------

def test_with_row_floor_replaces_record_42s_scalar_floor_and_steps_as_the_chain_with_it():
    record, hp, _ = resolved("aurora-ema-ref")
    switched, _, said = resolved("aurora-ema-ref", "--with", "row_floor")
    spec = switched.matrix_spec()
    assert {tg.group_options(spec, g)["floor"] for g in spec.groups} == {("row", tg.FLOOR_UW, 1.0)}
    assert said.differences == ("without uw_floor (record: on mlp.fc, mlp.proj, attn.v, attn.q,k,proj)",
                                "row_floor on mlp.fc, mlp.proj, attn.v, attn.q,k,proj (record: off)")
    after, schedule, members = trained(switched, hp)
    model, group = small_model(hp), spec.groups[0]
    stages = chain_stages(record, tg.group_options(record.matrix_spec(), record.matrix_spec().groups[0]))
    for param in members[group.name]:
        weight, steps = dict(model.named_parameters())[param].detach(), [g[param] for g in gradients(model)]
        plain = chain_reference(weight, steps, tg.group_options(spec, group), [s[group.name] for s in schedule],
                                stages - {"uw_floor"} | {"row_floor"})
        assert torch.equal(after[param], plain)


def test_with_soap_on_named_matrices_splits_their_group_and_changes_only_them():
    record, hp, _ = resolved("aurora-ema-ref")
    switched, _, said = resolved("aurora-ema-ref", "--with", "soap:attn.q")
    assert [g.name for g in switched.matrix_spec().groups] == ["mlp.fc", "mlp.proj", "attn.v", "attn.q,k,proj[attn.q]",
                                                               "attn.q,k,proj"]
    assert said.differences == ("soap on mlp.fc, mlp.proj, attn.v, attn.q,k,proj[attn.q] (record: on mlp.fc, "
                                "mlp.proj, attn.v)",)
    before, _, _ = trained(record, hp)
    after, _, members = trained(switched, hp)
    assert members["attn.q,k,proj[attn.q]"] == ["blocks.0.attn.q.weight"]
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"blocks.0.attn.q.weight"}


def test_with_a_schedule_or_readout_takes_the_newest_records_stretched_to_the_horizon():
    muon, _, _ = resolved("muon", "--with", "power_cool", "--with", "tail_ema")
    assert muon.lr_schedule == tg.PowerCool(3250, 1.2)  # #46's t_end 2900 of 2900, at muon's 3250
    assert muon.readout == tg.TailEMASpec(150.0, 0.6, tg.scaled_step(2400, 3250, 2900), 3250)
    c = {g.name: g.options["power_c"] for spec in muon.optimizers for g in spec.groups}
    assert c == {"embed": tg.EMBED_POWER_C, "head": tg.HEAD_POWER_C, "scalars": tg.AUX_POWER_C,
                 "matrices": tg.MATRIX_POWER_C}
    ours, _, _ = resolved("aurora-ema-ref", "--with", "tail_ema")  # a readout replaces the other
    assert isinstance(ours.readout, tg.TailEMASpec) and "without reference_readout" in " ".join(
        resolved("aurora-ema-ref", "--with", "tail_ema")[2].differences)


def test_set_changes_a_constant_everywhere_it_lives_or_in_one_group():
    recipe, _, said = resolved("soap-muon", "--set", "cautious_wd=0.05", "--set", "tail_ema.lambda=0.5",
                               "--set", "mlp.lr=0.04", "--set", "attn.proj.bias.beta2=0.997")
    spec = recipe.matrix_spec()
    assert [tg.group_options(spec, g)["cautious_weight_decay"] for g in spec.groups] == [0.05] * 3
    assert recipe.readout.lam == 0.5 and recipe.group("mlp").lr == 0.04
    assert recipe.group("attn.proj.bias").options["betas"] == (0.8, 0.997)
    assert said.differences == ("cautious_wd=0.05 (record: 0.025)", "tail_ema.lambda=0.5 (record: 0.6)",
                                "mlp.lr=0.04 (record: 0.0375)", "attn.proj.bias.beta2=0.997 (record: 0.9965)")
    one, _, _ = resolved("soap-muon", "--set", "mlp.cautious_wd=0.05")
    assert [tg.group_options(spec, g)["cautious_weight_decay"] for g in one.matrix_spec().groups] == [0.05, 0.025, 0.025]
    tiny, _, _ = resolved("soap-muon", "--tiny", "--set", "tail_ema.start=2000")  # at the record's horizon, scaled
    assert tiny.readout.start == tg.scaled_step(2000, 200, 2900)
    same, _, same_said = resolved("soap-muon", "--set", "cautious_wd=0.025")  # the record's own value
    assert same == resolved("soap-muon")[0] and same_said.differences == ()


@pytest.mark.parametrize("argv, is_record", [
    (["--recipe", "soap-muon", "--set", "cautious_wd=0.025"], True),  # the record's own value
    (["--recipe", "soap-muon", "--set", "cautious_wd=0.05"], False),
    (["--recipe", "soap-muon", "--without", ""], True),
    (["--recipe", "soap-muon", "--without", "tail_ema"], False),
    (["--recipe", "muon", "--with", "tail_ema"], False),
])
def test_a_switched_recipe_is_not_a_record_and_the_differences_say_why(argv, is_record):
    args = tg.parse_args(argv)
    recipe, steps, hp, switched = tg.resolve_recipe(args, tg.resolve_hyperparameters(args))
    differences = tg.record_differences(hp, recipe, steps, None, switched)
    assert (not differences) == is_record, differences


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "soap-muon", "--without", "fast_lane"],
     "error: --without fast_lane: no technique of that name; recipe soap-muon has schatten_polar, soap, trust_gate,"),
    (["--recipe", "aurora-ema-ref", "--without", "cautious_wd"],
     "error: --without cautious_wd: recipe aurora-ema-ref does not have it; it has aurora, schatten_polar,"),
    (["--recipe", "aurora", "--with", "fast_lane"],
     "error: --with fast_lane: no recipe has a technique of that name; the techniques are aurora, schatten_polar,"),
    (["--recipe", "aurora-ema-ref", "--with", "soap:attn.x"],
     "error: --with soap:attn.x: 'attn.x' is no group of recipe aurora-ema-ref that soap can act on (mlp.fc, "),
    (["--recipe", "soap-muon", "--without", "row_floor", "--with", "row_floor"],
     "error: row_floor is in both --with and --without; give it once"),
    (["--recipe", "soap-muon", "--set", "cautious_weight_decay=0.05"],
     "error: --set cautious_weight_decay: recipe soap-muon has no such constant; it has cautious_wd,"),
    (["--recipe", "soap-muon", "--set", "soap.frequency=1.5"],
     "error: --set soap.frequency=1.5: not a whole number; soap.frequency takes a whole number in [1, inf)"),
    (["--recipe", "soap-muon", "--set", "cautious_wd=-0.1"],
     "error: --set cautious_wd=-0.1: out of range; cautious_wd takes a value in [0, 1)"),
    (["--recipe", "soap-muon", "--set", "tail_ema.lambda=nan"],
     "error: --set tail_ema.lambda=nan: out of range; tail_ema.lambda takes a value in [0, 1]"),
    (["--recipe", "soap-muon", "--set", "cautious_wd"], "error: --set cautious_wd: give KEY=VALUE"),
    (["--recipe", "aurora", "--set", "cautious_wd=0.05"], "error: --set cautious_wd: recipe aurora has no such "),
    (["--recipe", "soap-muon", "--with", "row_floor"], "has row_floor there already; nothing would change"),
    (["--recipe", "soap-muon", "--with", "tail_ema:mlp"], "tail_ema acts on the whole model; give it without groups"),
    (["--recipe", "soap-muon", "--with", "aurora:mlp"], "with --aurora PATTERN"),
    (["--recipe", "soap-muon", "--aurora", "mlp.proj", "--without", "schatten_polar", "--with", "aurora"],
     "give it or --without/--with aurora, not both"),
    (["--recipe", "aurora-ema-ref", "--with", "trust_gate:attn.q,k,proj"], "have no SOAP; add it first"),
    (["--recipe", "aurora", "--with", "fc_depth_init"], "add the record init first: --with record_init"),
    (["--recipe", "soap-muon", "--without", "trust_gate", "--with", "early_trust"], "add it first (--with trust_gate"),
])
def test_a_bad_switch_is_one_error_line_before_any_work(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    status, stderr = check_args(capsys, *argv)
    assert status == 2 and stderr.startswith(message if message.startswith("error: ") else "error: ")
    assert message in stderr and stderr.count("\n") == 1, stderr
    assert list(tmp_path.iterdir()) == []


def test_an_option_the_optimizer_class_would_not_read_is_refused():
    muon = tg.RECIPES["muon"]
    stray = tg.edit_groups(muon, ["embed"], lambda spec, g: tg.with_options(g, {"floor": ("row", 0.3, 1.0)}))
    with pytest.raises(tg.SetupError, match="group embed of recipe muon goes to AdamW, which has no option floor"):
        tg.refuse_untaken_options(stray, "x")
    for recipe in tg.RECIPES.values():
        tg.refuse_untaken_options(recipe, "x")


def test_techniques_prints_each_recipes_table(capsys):
    for name, recipe in tg.RECIPES.items():
        assert tg.main(["--recipe", name, "--techniques"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"Techniques of {name} (record {recipe.record})")
        assert out.rstrip("\n").endswith(tg.technique_table(recipe))
        assert all(f"| {t} |" in out for t in tg.technique_names(recipe))
    assert tg.main(["--recipe", "soap-muon", "--without", "row_floor", "--techniques"]) == 0
    assert "| row_floor |" not in capsys.readouterr().out


def test_docs_recipes_holds_every_recipes_technique_table():
    page = (ROOT / "docs" / "recipes.md").read_text()
    for name, recipe in tg.RECIPES.items():
        assert f"\n#### {name} ({recipe.record})\n\n{tg.technique_table(recipe)}\n" in page, name


@pytest.mark.slow
@pytest.mark.parametrize("argv, absent", [
    (["--recipe", "soap-muon", "--without", "tail_ema"], (" val_ema_loss:",)),
    (["--recipe", "aurora-ema-ref", "--without", "reference_readout,ema_nesterov"],
     (" ref_gamma:", " raw_val_loss:", " ema_beta:")),
])
def test_a_run_without_its_readout_or_lookahead_logs_the_raw_loss_and_says_what_it_left_out(argv, absent, tiny_shards,
                                                                                             tmp_path, monkeypatch):
    """train_gpt.main in this process (uncompiled): the val lines carry no readout's loss (nor #42's lookahead
    stepsize), and the config line holds the switches and names them among the differences."""
    from test_train_gpt import events, split_log
    monkeypatch.chdir(tmp_path)
    assert tg.main(["--tiny", "--device", "cpu", "--steps", str(TINY_STEPS), "--no-diagnostics", "--run-id", "r",
                    *argv, *tiny_shards]) == 0
    _, lines = split_log((tmp_path / "logs" / "r.txt").read_text())
    val_lines = [line for line in lines if line.startswith("step:")]
    assert len(val_lines) > 1 and not any(field in line for line in val_lines for field in absent)
    (config,) = events(lines, "config")
    removed = sorted(argv[-1].split(","))
    assert config["switches"] == {"without": removed, "with": [], "set": []} and not config["is_record_recipe"]
    assert sorted(d.split(" ")[1] for d in config["differs_from_record"] if d.startswith("without ")) == removed
    assert config["recipe_settings"]["readout"] is None


def test_with_weight_decay_under_the_radius_pin_decays_before_the_pin_reads_w():
    """--with weight_decay on soap-muon, whose groups pin the radius: the chain decays W before the step and the pin
    takes its target from the decayed W, so the decay shrinks the norm the pin keeps and the weights change."""
    record, hp, _ = resolved("soap-muon")
    switched, _, said = resolved("soap-muon", "--with", "weight_decay")
    spec = switched.matrix_spec()
    assert all(tg.group_options(spec, g)["weight_decay"] > 0 and tg.group_options(spec, g)["pin"] for g in spec.groups)
    before, _, _ = trained(record, hp)
    after, _, members = trained(switched, hp)
    matrices = {n for g in spec.groups for n in members[g.name]}
    assert {n for n in before if not torch.equal(before[n], after[n])} == matrices
    assert sum(after[n].norm() for n in matrices) < sum(before[n].norm() for n in matrices)


def test_with_soap_on_auroras_mlp_needs_every_stage_in_every_matrix_optimizer():
    """--with soap:mlp on aurora (#17, whose matrix optimizer is the Aurora class): the fc and proj matrices get
    SOAP, in a group split off for them, and every other parameter steps as in the record. Needs the one chain
    in which every matrix optimizer takes every stage option."""
    record, hp, _ = resolved("aurora")
    switched, _, said = resolved("aurora", "--with", "soap:mlp")
    assert [g.name for g in switched.matrix_spec().groups] == ["matrices[mlp]", "matrices"]
    assert said.differences == ("soap on matrices[mlp] (record: off)",)
    before, _, _ = trained(record, hp)
    after, _, members = trained(switched, hp)
    assert members["matrices[mlp]"] == ["blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"]
    assert {n for n in before if not torch.equal(before[n], after[n])} == set(members["matrices[mlp]"])
