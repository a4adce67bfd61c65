"""The modded-nanoGPT optimization-track harness (docs/benchmark.md) with the Aurora, NorMuon and Muon
record recipes (docs/recipes.md) and neuron-death diagnostics (docs/diagnostics.md), in one file as the
leaderboard requires.

    torchrun --standalone --nproc_per_node=8 train_gpt.py --recipe aurora   # a record run
    python train_gpt.py --tiny                                              # CPU preset, synthetic data

The log (logs/<run id>.txt) starts with this file's source, optimizers.py inlined, so the code cut out
of a log runs on its own and reproduces the run.
"""

import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import fnmatch
import functools
import glob
import hashlib
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.constants import default_pg_timeout
from torch.nn.parallel import DistributedDataParallel

# ---------------------------------------------------------------------------------------------------
# Optimizers: this import line is replaced by the text of optimizers.py in the logged source.

from optimizers import (Aurora, BiasFreeAdam, EMANesterov, Muon, MuonChain, NorMuon, ReferenceReadout, TailEMA, all_finite, contra_coefficient, early_trust_cap, early_trust_floor, piece_range, power_cool_lr, warmup_cooldown_momentum)

# ---------------------------------------------------------------------------------------------------
# Configuration: the fixed benchmark (docs/benchmark.md), the CPU preset and the three recipes (docs/recipes.md)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50304
    num_layers: int = 12
    model_dim: int = 768
    head_dim: int = 128
    seq_len: int = 1024
    mlp_ratio: int = 4  # MLP hidden width / model_dim; a research knob (--mlp-ratio), 4 in the benchmark
    mlp: str = "relu2"  # the MLP's activation: relu^2 (the benchmark's) or swiglu, a research knob (--mlp)
    norm_float32: bool = False  # RMSNorm in float32, then cast (records #42 and #46); else in bf16 with bf16 gains


@dataclass(frozen=True)
class Hyperparameters:
    """Everything the benchmark fixes; only the recipe changes between record runs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_tokens: int = 524_288  # B: tokens per optimizer step over all ranks
    micro_batch_seqs: int = 64  # sequences per forward pass
    val_tokens: int = 20 * 524_288
    val_every: int = 125  # while step/T < 0.9 ...
    val_every_tail: int = 25  # ... and after
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    steps: int | None = None  # None: the recipe's step count
    # The command that provides the data ({shards}: how many train shards), and its shards' size.
    data_command: str = "python data/cached_fineweb10B.py {shards}"
    data_shard_tokens: int = 100_000_000


FULL = Hyperparameters()
# CPU preset on the shards `python data/synthetic.py` writes (vocabulary 512, EOT 511); 11 val lines.
# Measured with torch.compile on a 2-core AMD EPYC box: 1 min (warm compile cache) to 2 min 13 s (cold),
# 6 min 17 s while other jobs shared the cores.
TINY = Hyperparameters(
    model=ModelConfig(vocab_size=512, num_layers=4, model_dim=128, head_dim=32, seq_len=256),
    batch_tokens=16 * 256,
    micro_batch_seqs=8,
    val_tokens=64 * 256,
    val_every=25,
    val_every_tail=10,
    train_files="data/synthetic/synthetic_train_*.bin",
    val_files="data/synthetic/synthetic_val_*.bin",
    steps=200,
    data_command="python data/synthetic.py --train-shards {shards}",
    data_shard_tokens=2_000_000,
)

# The diagnostics' probes per preset: --probe-tokens and --probe-every (None: at every validation). The CPU
# preset's 11 probes of 65,536 tokens took 87% as long as its training; 5 of its 16,384 validation tokens take
# a ninth (README).
PROBE_TOKENS = {"full": 65_536, "tiny": TINY.val_tokens}
PROBE_EVERY = {"full": None, "tiny": 50}


def step_field(default=None):
    """A dataclass field holding a step number (or a tuple of them): scaled_recipe stretches it with --steps."""
    return field(default=default, metadata={"step": True})


@dataclass(frozen=True)
class Group:
    """One param group: the parameters whose names match one of `params` (fnmatch patterns; a parameter
    goes to the first group of the recipe that matches it), its lr and its options (betas, PowerCool's
    power_c, MuonChain's stages, ...)."""
    name: str
    params: tuple
    lr: float
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerSpec:
    kind: str  # a key of OPTIMIZER_CLASSES
    groups: tuple
    options: dict = field(default_factory=dict)  # the constructor's options shared by its groups


@dataclass(frozen=True)
class LinearCooldown:
    """docs/benchmark.md#training-loop: every lr at its initial value for the first 30%, then linearly to 0."""

    def lr(self, step, group, recipe):
        return group["initial_lr"] * lr_multiplier(step, recipe.steps)


@dataclass(frozen=True)
class PowerCool:
    """docs/recipes.md#schedules: lr = min(lr0, power_c (t_end - step)^power), power_c per group."""
    t_end: int = step_field()
    power: float = 1.0

    def lr(self, step, group, recipe):
        return power_cool_lr(step, group["initial_lr"], group["power_c"], self.t_end, self.power,
                             recipe.record_steps / recipe.steps)


@dataclass(frozen=True)
class MomentumWarmupCooldown:
    """docs/recipes.md#schedules: the matrix optimizer's mu from 0.85 up to 0.95 over `warmup` steps and back
    down over the last `cooldown` steps of the horizon."""
    warmup: int = step_field()
    cooldown: int = step_field()

    def momentum(self, step, recipe):
        return warmup_cooldown_momentum(step, recipe.steps, self.warmup, self.cooldown)


@dataclass(frozen=True)
class Lookahead:
    """EMA-Nesterov (docs/recipes.md#ema-nesterov): before step s's forward pass, W += stepsize(s) b, where
    stepsize is `stepsize` times the `ratio_group` lr's fraction of its initial value at step s - 1, from
    step `prefill` to step `rest` (excluded), else 0."""
    stepsize: float
    ema: float
    prefill: int = step_field()
    rest: int = step_field()
    ratio_group: str = "embed"
    logged: bool = False  # the val line ends with ema_beta:<the last stepsize>, as record #42's does

    def stepsize_at(self, step, recipe):
        if not (step + 1 > self.prefill and step < self.rest):
            return 0.0
        group = recipe.group(self.ratio_group)
        lr = recipe.lr_schedule.lr(step - 1, {"initial_lr": group.lr, **group.options}, recipe) if step else group.lr
        return self.stepsize * (lr / group.lr)


@dataclass(frozen=True)
class ContraRamp:
    """Record #42's Contra-Muon coefficient (docs/recipes.md#contra-muon-ramp), ramped to 0."""
    coefficient: float
    hold_end: int = step_field()
    ramp_end: int = step_field()


@dataclass(frozen=True)
class EarlyTrust:
    """Record #46's bounds on the attention trust gate (docs/recipes.md#trust-gate)."""
    floor: float
    cap: float
    end: int = step_field()
    fade_end: int = step_field()


@dataclass(frozen=True)
class ReferenceReadoutSpec:
    """Record #42's readout (docs/recipes.md#reference-readout): W + gamma (W - R) at validations from
    `apply_from` on, R the weights the validation of step `capture` sees. Its val lines log the readout's
    loss as val_loss, as the record's do, with the raw loss at the end (raw_val_loss)."""
    gamma: float
    capture: int = step_field()
    apply_from: int = step_field()

    def make(self, model):
        return ReferenceReadout(model.parameters())

    def after_step(self, readout, step):
        """After step `step`'s update: the weights now are those the validation of step + 1 sees."""
        if step + 1 == self.capture:
            readout.capture()

    def losses(self, readout, step, raw, evaluate):
        """(val line losses, suffix fields) of a validation whose raw loss is `raw`."""
        if step < self.apply_from:
            return {"val_loss": raw}, {}
        with readout.readout(self.gamma):
            loss = evaluate()
        return {"val_loss": loss}, {"ref_gamma": f"{self.gamma:g}", "ref_step": str(self.capture),
                                    "raw_val_loss": f"{raw:.5f}"}


@dataclass(frozen=True)
class TailEMASpec:
    """Record #46's readout (docs/recipes.md#tail-ema): an EMA of every weight but the token embedding's,
    updated after the steps that end at `start` .. `end` - 1, evaluated as (1 - lam) W + lam ema."""
    tau: float
    lam: float
    start: int = step_field()
    end: int = step_field()

    def make(self, model):
        return TailEMA([p for p in model.parameters() if p is not model.embed.weight], self.tau, self.lam)

    def after_step(self, readout, step):
        if self.start <= step + 1 < self.end:
            readout.update()

    def losses(self, readout, step, raw, evaluate):
        """val_loss the raw loss, val_ema_loss the readout's (the raw one until the EMA starts), as the
        record's logs print them."""
        if readout.ema is None:
            return {"val_loss": raw, "val_ema_loss": raw}, {}
        with readout.readout():
            return {"val_loss": raw, "val_ema_loss": evaluate()}, {}


@dataclass(frozen=True)
class Validation:
    """The validation steps of a record's logs: every `every` steps, the `extra` steps, the stop step and
    the horizon (and step 0, which this harness always validates)."""
    every: int = step_field()
    extra: tuple = step_field(())

    def at(self, step, recipe):
        every = max(self.every, 1)  # a horizon short enough to scale it to 0 validates every step
        return step == 0 or step % every == 0 or step in self.extra or step in (recipe.stop, recipe.steps)


@dataclass(frozen=True)
class RecordInit:
    """docs/recipes.md#initialization-of-records-42-and-46: torch's default Linear and Embedding init drawn
    in the record model's order, "proj" weights zeroed, the other biases zeroed when zero_biases, mlp.fc of
    layer l scaled by 1 - fc_alpha l/(L-1), and, with gain_alpha, signed norm gains (record #46)."""
    zero_biases: bool
    fc_alpha: float
    gain_alpha: float = 0.0
    gain_pairs_from: int = 0  # the layers from here on take their signs in head-balanced pairs
    gain_head_shrink: float = 0.0
    draw_signs: bool = True  # False: every gain sign +1 (--without signed_gains), nothing drawn


@dataclass(frozen=True)
class Recipe:
    """Everything a record chooses (docs/recipes.md): the optimizers and which parameters each takes,
    the schedules, the initialization, the eval-time readout and the validation steps. steps is the
    schedule's horizon T (--steps changes it and scaled_recipe stretches every step constant with it);
    stop, when set, is the step the run ends at inside it. record_step, the step its record reported, is a fact
    about the record, not a constant of its schedule: a run's config gives it scaled to the run's horizon."""
    name: str
    record: str  # the leaderboard entry it reproduces
    steps: int = step_field()
    record_step: int = 0  # where the record's runs cleared the bar (records/ablate.py compares there)
    optimizers: tuple = ()
    lr_schedule: object = LinearCooldown()
    momentum: object = 0.95  # a number, or a schedule with .momentum(step, recipe)
    stop: int | None = step_field()
    model: dict = field(default_factory=dict)  # ModelConfig fields the record's model differs in
    init: RecordInit | None = None  # None: the benchmark's (docs/benchmark.md#initialization)
    lookahead: Lookahead | None = None
    contra: ContraRamp | None = None
    trust: EarlyTrust | None = None
    readout: ReferenceReadoutSpec | TailEMASpec | None = None
    validation: Validation | None = None  # None: the benchmark's rule (is_validation_step)
    aurora: tuple = ("none", "aurora")  # which matrices take Aurora's polar (see --aurora), and in which form
    record_steps: int = 0  # the horizon before --steps scaled it (set by the RECIPES table)

    def group(self, name):
        return next(g for spec in self.optimizers for g in spec.groups if g.name == name)

    def matrix_spec(self):
        return next(spec for spec in self.optimizers if spec.kind in MATRIX_OPTIMIZERS)


def recipe_table(*recipes):
    return {recipe.name: dataclasses.replace(recipe, record_steps=recipe.steps) for recipe in recipes}


BENCHMARK_ADAM = dict(betas=(0.8, 0.95), eps=1e-10)
BLOCK_MATRICES = ("blocks.*.weight",)  # every 2-D weight inside the blocks (gains are named .gains)
SCALARS = ("*.gains", "*.bias")
# Records #42 and #46: PowerCool's power_c per group, the aux optimizers' betas, MuonChain's shared stages.
EMBED_POWER_C, HEAD_POWER_C, AUX_POWER_C, MATRIX_POWER_C = (4.976805410800738e-05, 5.184172302917436e-07,
                                                            1.6589351369335795e-06, 3.3169534699576625e-06)
RECORD_ADAM = dict(betas=(0.8, 0.99), eps=1e-10, weight_decay=0.0)
FLOOR_UW = 0.3825
SOAP_42 = dict(beta2=0.90, frequency=10, denom_power=0.50)
CHAIN_42 = dict(contra_muon=True, normuon_beta2=1.0, radial_brake=(0.5, 1.0), floor=("scalar", FLOOR_UW), pin=True,
                power_c=MATRIX_POWER_C)
SOAP_46 = dict(beta2=0.90, frequency=1, denom_power=0.50)
CHAIN_46 = dict(radial_brake=(0.5, 1.0), floor=("row", FLOOR_UW, 1.0), pin=True, cautious_weight_decay=0.025,
                power_c=MATRIX_POWER_C)


def benchmark_recipe(name, record, steps, record_step, adam_lrs, adam_weight_decay, kind, lr, weight_decay, aurora="none",
                     **options):
    """The three recipes on the benchmark's schedule: AdamW on the embedding, the head's weight and the
    scalars, a matrix optimizer on every block matrix, momentum 0.95 with Nesterov."""
    embed_lr, head_lr, scalar_lr = adam_lrs
    adam = OptimizerSpec("AdamW", (Group("embed", ("embed.weight",), embed_lr), Group("head", ("proj.weight",), head_lr),
                                   Group("scalars", SCALARS, scalar_lr)),
                         dict(BENCHMARK_ADAM, weight_decay=adam_weight_decay))
    matrix = OptimizerSpec(kind, (Group("matrices", BLOCK_MATRICES, lr),),
                           dict(weight_decay=weight_decay, momentum=0.95, nesterov=True, **options))
    return Recipe(name, record, steps, record_step, (adam, matrix), aurora=(aurora, "aurora"))


RECIPES = recipe_table(
    benchmark_recipe("aurora", "#17", 3200, 3175, (0.3, 1 / 320, 0.01), 0.0, "Aurora", 0.0375, 0.0, aurora="all",
                     pp_iterations=2, pp_beta=0.5, contra=0.4, uw_floor=0.35),
    benchmark_recipe("normuon", "#10", 3300, 3250, (0.3, 1 / 320, 0.01), 0.0, "NorMuon", 0.035, 0.025, beta2=0.95),
    benchmark_recipe("muon", "#36", 3250, 3250, (0.7, 0.004, 0.015), 0.001, "Muon", 0.025, 0.05),
    Recipe(
        "aurora-ema-ref", "#42", 2900, 2860,
        (OptimizerSpec("AdamW", (Group("embed", ("embed.weight",), 0.3, dict(power_c=EMBED_POWER_C)),
                                 Group("head", ("proj.weight",), 1 / 320, dict(power_c=HEAD_POWER_C)),
                                 Group("scalars", SCALARS, 0.01, dict(power_c=AUX_POWER_C))), RECORD_ADAM),
         OptimizerSpec("MuonChain", (
             Group("mlp.fc", ("blocks.*.mlp.fc.weight",), 0.0375, dict(CHAIN_42, soap=SOAP_42)),
             Group("mlp.proj", ("blocks.*.mlp.proj.weight",), 0.0375,
                   dict(CHAIN_42, soap=SOAP_42, polar_backend="aurora_schatten")),
             Group("attn.v", ("blocks.*.attn.v.weight",), 0.0375,
                   dict(CHAIN_42, soap=dict(SOAP_42, blend=0.95, denom_floor=0.55), soap_combine="rescale")),
             Group("attn.q,k,proj", BLOCK_MATRICES, 0.0375, CHAIN_42)))),
        lr_schedule=PowerCool(2980, 1.2), momentum=MomentumWarmupCooldown(300, 100), stop=2860,
        model=dict(norm_float32=True), init=RecordInit(zero_biases=True, fc_alpha=0.30),
        lookahead=Lookahead(0.3, 0.99, 300, 1950, logged=True), contra=ContraRamp(-0.2, 0, 2500),
        readout=ReferenceReadoutSpec(-0.075, 2375, 2850), validation=Validation(125, (2850,)),  # and 2860, the stop
        aurora=("mlp.proj", "aurora_schatten")),
    Recipe(
        "soap-muon", "#46", 2900, 2690,
        (OptimizerSpec("AdamW", (Group("embed", ("embed.weight",), 0.3, dict(power_c=EMBED_POWER_C)),
                                 Group("head", ("proj.weight",), 1 / 320, dict(power_c=HEAD_POWER_C))), RECORD_ADAM),
         OptimizerSpec("BiasFreeAdam", (
             Group("gains", ("*.gains",), 0.01, dict(betas=(0.8, 0.99), power_c=AUX_POWER_C)),
             Group("attn.proj.bias", ("blocks.*.attn.proj.bias",), 0.01, dict(betas=(0.8, 0.9965), power_c=AUX_POWER_C)),
             Group("biases", ("*.bias",), 0.01, dict(betas=(0.8, 0.997), power_c=AUX_POWER_C))), dict(eps=1e-10)),
         OptimizerSpec("MuonChain", (
             Group("mlp", ("blocks.*.mlp.fc.weight", "blocks.*.mlp.proj.weight"), 0.0375, dict(CHAIN_46, soap=SOAP_46)),
             Group("attn.proj", ("blocks.*.attn.proj.weight",), 0.0375,
                   dict(CHAIN_46, soap=SOAP_46, soap_combine="trust_gate",
                        trust=dict(min_agree=0.20, min_grad_align=0.0, power=1.0))),
             Group("attn.q,k,v", BLOCK_MATRICES, 0.0375, dict(CHAIN_46, soap=SOAP_46, soap_combine="gate"))))),
        lr_schedule=PowerCool(2900, 1.2), momentum=MomentumWarmupCooldown(300, 200),
        model=dict(norm_float32=True), init=RecordInit(zero_biases=False, fc_alpha=0.30, gain_alpha=0.125,
                                                       gain_pairs_from=6, gain_head_shrink=0.50),
        lookahead=Lookahead(0.3, 0.99, 300, 1950), trust=EarlyTrust(0.45, 0.85, 1375, 1625),
        readout=TailEMASpec(150.0, 0.6, 2400, 2900),
        # The validations of the record's logs (its README's 2690 is one of them; the script's own
        # extra_val_steps lack 2600-2695): every 125 steps, then every 5 from 2600 to 2810, then ...
        validation=Validation(125, (2600, *range(2605, 2811, 5), 2820, 2830, 2840, 2850, 2860, 2870, 2880, 2890,
                                    2895))),
)
MATRIX_OPTIMIZERS = {"Muon": Muon, "NorMuon": NorMuon, "Aurora": Aurora, "MuonChain": MuonChain}
OPTIMIZER_CLASSES = {"AdamW": torch.optim.AdamW, "BiasFreeAdam": BiasFreeAdam, **MATRIX_OPTIMIZERS}


def scaled_step(value, steps, record_steps):
    """A step constant stretched from the record's horizon to `steps`, rounded half up: value at the record's own."""
    return (2 * value * steps + record_steps) // (2 * record_steps)


def scaled_recipe(recipe, steps):
    """The recipe on a horizon of `steps`: every step constant (the fields marked by step_field, in the
    recipe and its schedules and readouts) scaled by steps / record_steps with scaled_step. Rates,
    EMAs and SOAP's refresh interval stay as they are."""
    def scale(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes = {}
            for f in dataclasses.fields(value):
                current = getattr(value, f.name)
                if f.metadata.get("step") and f.name != "steps" and current is not None:
                    changes[f.name] = (tuple(scaled_step(v, steps, recipe.record_steps) for v in current)
                                       if isinstance(current, tuple) else scaled_step(current, steps, recipe.record_steps))
                elif dataclasses.is_dataclass(current):
                    changes[f.name] = scale(current)
            return dataclasses.replace(value, **changes)
        return value
    return dataclasses.replace(scale(recipe), steps=steps)


class SetupError(RuntimeError):
    """A problem found before training: the message names the file or setting and the fix."""


class NonFiniteLoss(RuntimeError):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (what timeout, torchrun and schedulers send), ended like Ctrl-C: the log gets its end line."""


def raise_terminated(signum, frame):
    raise Terminated()


class WriteError(RuntimeError):
    """A file of a running run (checkpoint, log, per-unit records) could not be written: the message names it
    and says what is kept."""


def lr_multiplier(step, steps):
    """docs/benchmark.md#training-loop: 1 for the first 30% of training, then linear to 0 at step T."""
    progress = step / steps
    return 1.0 if progress < 0.3 else (1 - progress) / 0.7


def is_validation_step(step, steps, every, tail_every):
    """docs/benchmark.md#training-loop: step 0, every `every` steps while step/T < 0.9, every `tail_every`
    after, and T."""
    if step == 0 or step == steps:
        return True
    return step % (every if 10 * step < 9 * steps else tail_every) == 0


# ---------------------------------------------------------------------------------------------------
# Data: shards (docs/benchmark.md#data), the train stream and its rank slices, the validation tokens

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256


def read_shard_header(path):
    """Validate a shard's header and size; return its token count."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise SetupError(f"{path}: cannot be read as a shard ({e.strerror or e})") from None
    if size < HEADER_INTS * 4:
        raise SetupError(f"{path}: {size} bytes, shorter than the 1024-byte shard header (corrupt or truncated)")
    if header[0] != SHARD_MAGIC:
        raise SetupError(f"{path}: magic number {header[0]}, expected {SHARD_MAGIC} (not a token shard)")
    if header[1] != SHARD_VERSION:
        raise SetupError(f"{path}: version {header[1]}, expected {SHARD_VERSION}")
    num_tokens = int(header[2])
    body = size - HEADER_INTS * 4
    if num_tokens < 0 or body < 2 * num_tokens:
        raise SetupError(f"{path}: header says {num_tokens} tokens ({2 * num_tokens} bytes) but the body holds "
                         f"{body} bytes (truncated download?)")
    return num_tokens


def check_token_ids(path, tokens, vocab_size):
    """Refuse a shard holding a token id the model's embedding has no row for: such an id would reach
    the (compiled) forward and abort the process. tokens: the shard's uint16 ids (a numpy array or a
    CPU tensor; torch has no max for uint16, numpy's takes milliseconds for 100M ids)."""
    highest = int(np.asarray(tokens).max()) if len(tokens) else -1
    if highest >= vocab_size:
        raise SetupError(f"{path}: holds token id {highest}, but the model's vocabulary has {vocab_size} ids "
                         f"(0..{vocab_size - 1}): the shard was tokenized for another vocabulary. Write it with "
                         f"this preset's tokenizer (--tiny: python data/synthetic.py, vocabulary 512; full size: "
                         f"GPT-2, python data/cached_fineweb10B.py or python data/fineweb.py)")


def load_shard(path, vocab_size, pin_memory=False):
    """The tokens of a shard as a uint16 tensor (in page-locked memory for fast copies to a GPU), every id
    checked to be below vocab_size."""
    num_tokens = read_shard_header(path)
    # Read straight into the (pinned) tensor, as the record does: no second copy of a 200 MB shard.
    # (Tokens are little-endian uint16, the byte order of every machine this runs on.)
    tokens = torch.empty(num_tokens, dtype=torch.uint16, pin_memory=pin_memory)
    with open(path, "rb") as f:
        f.seek(HEADER_INTS * 4)
        f.readinto(tokens.numpy())
    check_token_ids(path, tokens, vocab_size)
    return tokens


def steps_in_shard(num_tokens, batch_tokens):
    """How many batches the stream takes from a shard: those at pos = k*B with pos + B + 1 < N."""
    return (num_tokens - batch_tokens - 2) // batch_tokens + 1 if num_tokens >= batch_tokens + 2 else 0


def glob_matches_nothing(flag, pattern):
    return SetupError(f"{flag} {pattern!r}: the glob matches no file (in {os.getcwd()}); check the path")


def find_shards(pattern, hp, steps, what, flag=None):
    """The files of a shard glob, sorted. `flag` names the option the user gave the glob with: no match
    is then a wrong glob; for the preset's own glob the error says how to get the data."""
    paths = sorted(glob.glob(pattern))
    if not paths and flag:
        raise glob_matches_nothing(flag, pattern)
    if not paths:
        shards = shards_read([hp.data_shard_tokens] * (steps + 1), steps, hp.batch_tokens)
        raise SetupError(f"no {what} shards match {pattern!r} (in {os.getcwd()}). Get them with: "
                         f"{hp.data_command.format(shards=shards)}")
    return paths


def shards_read(token_counts, steps, batch_tokens):
    """How many leading shards the train stream reads in `steps` steps (None: all are not enough)."""
    remaining = steps
    for index, num_tokens in enumerate(token_counts):
        if remaining <= 0:
            return index
        remaining -= steps_in_shard(num_tokens, batch_tokens)
    return len(token_counts) if remaining <= 0 else None


def check_train_shards(paths, steps, hp):
    """Every train shard must be valid and together hold `steps` batches, checked before anything is
    compiled so a run never crashes for lack of data. Returns the shards the run will read."""
    token_counts = [read_shard_header(path) for path in paths]
    count = shards_read(token_counts, steps, hp.batch_tokens)
    if count is not None:
        return paths[:count]
    capacities = [steps_in_shard(n, hp.batch_tokens) for n in token_counts]
    fix = f"Get more with: {hp.data_command.format(shards='N')}"
    if capacities[0] > 0:
        needed = len(paths) + math.ceil((steps - sum(capacities)) / capacities[0])
        fix = f"{steps} steps need {needed} shards like the first. Get them with: " \
              f"{hp.data_command.format(shards=needed)}"
    raise SetupError(f"the {len(paths)} train shards matching {hp.train_files!r} hold {sum(capacities)} steps "
                     f"of {hp.batch_tokens} tokens, fewer than the {steps} steps asked for. {fix}")


class TrainStream:
    """The train stream of docs/benchmark.md#data: each step takes B contiguous tokens (+1 for the shifted
    targets); rank r reads the slice at pos + r*B/W of length B/W + 1; the next shard starts when
    pos + B + 1 >= len(shard). With a data seed (--data-seed, not a record) the batches of each shard are
    visited in the order batch_order draws instead."""

    def __init__(self, paths, batch_tokens, rank, world_size, vocab_size, pin_memory=False, data_seed=None,
                 first_shard=None):
        self.paths = paths
        self.data_seed = data_seed
        self.vocab_size = vocab_size
        self.pin_memory = pin_memory
        self.batch_tokens = batch_tokens
        self.rank_tokens = batch_tokens // world_size
        self.offset = rank * self.rank_tokens
        self.shard_index = 0
        self.tokens = load_shard(paths[0], vocab_size, pin_memory) if first_shard is None else first_shard
        self.pos = 0

    def next_batch(self):
        while self.pos + self.batch_tokens + 1 >= len(self.tokens):
            self.shard_index += 1
            if self.shard_index == len(self.paths):
                raise SetupError(f"the train shards {self.paths[0]} ... ran out (the pre-training check missed it)")
            self.tokens = load_shard(self.paths[self.shard_index], self.vocab_size, self.pin_memory)
            self.pos = 0
        start = self.pos + self.offset
        if self.data_seed is not None:
            order = batch_order(steps_in_shard(len(self.tokens), self.batch_tokens), self.data_seed, self.shard_index)
            start = order[self.pos // self.batch_tokens] * self.batch_tokens + self.offset
        self.pos += self.batch_tokens
        return self.tokens[start:start + self.rank_tokens + 1]

    def state_dict(self):
        """Where the stream stands; the same on every rank, so it resumes at any world size."""
        return {"shard_index": self.shard_index, "pos": self.pos}

    def load_state_dict(self, state):
        if not 0 <= state["shard_index"] < len(self.paths):
            raise SetupError(f"the checkpoint's data position is in train shard {state['shard_index'] + 1}, "
                             f"but only {len(self.paths)} shards match (same --train-files as the saved run?)")
        if state["shard_index"] != self.shard_index:
            self.tokens = load_shard(self.paths[state["shard_index"]], self.vocab_size, self.pin_memory)
        self.shard_index, self.pos = state["shard_index"], state["pos"]


SEED_MAX = 2 ** 64 - 1  # torch seeds a generator with 0 .. 2^64 - 1 (a negative seed aliases a large one)
DATA_SEED_STRIDE = 1_000_003
DATA_SEED_MAX = SEED_MAX // DATA_SEED_STRIDE - 1  # batch_order's seeds stay within SEED_MAX


@functools.lru_cache(maxsize=4)
def batch_order(num_batches, data_seed, shard_index):
    """--data-seed: the order in which the train stream takes a shard's batches, a permutation drawn from
    the seed and the shard's index."""
    generator = torch.Generator().manual_seed(data_seed * DATA_SEED_STRIDE + shard_index)
    return torch.randperm(num_batches, generator=generator).tolist()


def data_offset(data_seed, shard_tokens, needed, seq_len):
    """Where a run's validation slice (and the diagnostics' probes) start in a shard: 0, or with --data-seed
    a whole number of sequences drawn from the seed, leaving `needed` tokens after it."""
    if data_seed is None:
        return 0
    positions = (shard_tokens - needed) // seq_len + 1
    generator = torch.Generator().manual_seed(data_seed)
    return int(torch.randint(positions, (), generator=generator)) * seq_len if positions > 0 else 0


def val_slice(tokens, val_tokens, rank, world_size, start=0):
    """val_tokens (+1) tokens of the val shard's `tokens` from `start` (the first ones unless --data-seed),
    sliced across ranks like one train step. check_data and data_offsets made sure they are there."""
    rank_tokens = val_tokens // world_size
    start += rank * rank_tokens
    return tokens[start:start + rank_tokens + 1].long()


def probe_sequences(tokens, probe_tokens, seq_len, start=0):
    """The diagnostics' probe: `probe_tokens` of a shard's `tokens` from `start`, as (sequences, seq_len)
    inputs. data_offsets made sure they are there."""
    return tokens[start:start + probe_tokens].long().view(-1, seq_len)


def micro_batches(buffer, seq_len, micro_seqs):
    """(inputs, targets) pairs of micro_seqs sequences each from a buffer of n*seq_len + 1 tokens."""
    inputs = buffer[:-1].view(-1, seq_len)
    targets = buffer[1:].view(-1, seq_len)
    return zip(inputs.split(micro_seqs), targets.split(micro_seqs))


@dataclass(frozen=True)
class BatchLayout:
    rank_seqs: int  # sequences per rank per step
    micro_seqs: int
    val_rank_seqs: int


def splits_evenly(step_seqs, val_seqs, micro_batch_seqs, world_size):
    """Whether every rank gets the same whole number of train and val micro-batches."""
    if step_seqs % world_size or val_seqs % world_size:
        return False
    micro_seqs = min(micro_batch_seqs, step_seqs // world_size)
    return (step_seqs // world_size) % micro_seqs == 0 and (val_seqs // world_size) % micro_seqs == 0


def batch_layout(hp, world_size, ranks_are="processes"):
    """How a step's sequences split over `world_size` ranks; `ranks_are` names the ranks in errors
    ("GPUs" on CUDA, "processes" on CPU)."""
    seq_len = hp.model.seq_len
    if hp.batch_tokens % seq_len or hp.val_tokens % seq_len:
        raise SetupError(f"batch_tokens {hp.batch_tokens} and val_tokens {hp.val_tokens} must be multiples of "
                         f"seq_len {seq_len}")
    step_seqs, val_seqs = hp.batch_tokens // seq_len, hp.val_tokens // seq_len
    if step_seqs % hp.micro_batch_seqs:
        raise SetupError(f"the {step_seqs} sequences of a step must be a whole number of micro-batches of "
                         f"{hp.micro_batch_seqs} sequences")
    if not splits_evenly(step_seqs, val_seqs, hp.micro_batch_seqs, world_size):
        usable = [str(n) for n in range(1, 9) if splits_evenly(step_seqs, val_seqs, hp.micro_batch_seqs, n)]
        if not usable:
            raise SetupError(f"the {step_seqs} train and {val_seqs} val sequences of a step do not split into "
                             f"micro-batches of {hp.micro_batch_seqs} sequences")
        counts = " or ".join([", ".join(usable[:-1]), usable[-1]] if len(usable) > 1 else usable)
        raise SetupError(f"world size {world_size} does not divide the {step_seqs} sequences of a step into "
                         f"whole micro-batches (of up to {hp.micro_batch_seqs}) per rank: run on {counts} "
                         f"{ranks_are} (torchrun --nproc_per_node)")
    rank_seqs = step_seqs // world_size
    return BatchLayout(rank_seqs, min(hp.micro_batch_seqs, rank_seqs), val_seqs // world_size)


# ---------------------------------------------------------------------------------------------------
# Model (docs/benchmark.md#model) and initialization (docs/benchmark.md#initialization)


class WeightlessInit:
    """A model built on the meta device (for shapes alone: argument checks, plans) skips torch's default random
    init: there is nothing to draw into, and torch's first meta draw imports its reference ops (0.6 s)."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


class Linear(WeightlessInit, nn.Linear):
    """fp32 weights cast to the activation dtype at use, so the forward runs in bf16."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class Embedding(WeightlessInit, nn.Embedding):
    pass


class RMSNorm(nn.Module):
    def __init__(self, dim, float32=False):
        super().__init__()
        self.gains = nn.Parameter(torch.ones(dim))
        self.float32 = float32

    def forward(self, x):
        if self.float32:
            return (F.rms_norm(x.float(), (x.size(-1),)) * self.gains).type_as(x)
        return F.rms_norm(x, (x.size(-1),), self.gains.to(x.dtype))


def rotary_tables(head_dim, seq_len):
    """Half-truncated rotary: d/4 frequencies (1/1024)^(j/(d/4-1)), then d/4 zeros (unrotated pairs).
    The exponents come from linspace, as in the record: arange/(d/4-1) rounds some of them differently.
    Computed on the CPU (the model moves them with itself), also for a model built on the meta device."""
    quarter = head_dim // 4
    freqs = (1 / 1024) ** torch.linspace(0, 1, quarter, dtype=torch.float32, device="cpu")
    freqs = torch.cat([freqs, freqs.new_zeros(quarter)])
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device="cpu"), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x: (batch, time, heads, head_dim); rotation in fp32, cast back."""
    cos, sin = cos[None, :x.size(1), None, :], sin[None, :x.size(1), None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = config.model_dim
        self.head_dim = config.head_dim
        self.q, self.k, self.v = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.proj = Linear(dim, dim)
        cos, sin = rotary_tables(config.head_dim, config.seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        batch, time_, dim = x.shape
        shape = (batch, time_, dim // self.head_dim, self.head_dim)
        q = F.rms_norm(self.q(x).view(shape), (self.head_dim,))
        k = F.rms_norm(self.k(x).view(shape), (self.head_dim,))
        q, k = apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
        v = self.v(x).view(shape)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=0.12)
        return self.proj(y.transpose(1, 2).reshape(batch, time_, dim))


MLP_KINDS = ("relu2", "swiglu")


def swiglu_hidden_width(dim, hidden):
    """The SwiGLU width h' whose gate, up and proj (weights and biases, 3*d*h' + 2*h' + d parameters) come
    closest to a relu^2 MLP of width h (2*d*h + h + d): 2048 for the benchmark's 768 x 3072."""
    return round((2 * dim + 1) * hidden / (3 * dim + 2))


class MLP(nn.Module):
    """relu^2: proj(relu(fc(x))^2). swiglu: proj(silu(fc(x)) * up(x)), where fc is the gate, so that for both
    kinds fc's output is the pre-activation that decides whether a unit fires (docs/diagnostics.md)."""

    def __init__(self, dim, ratio, kind="relu2"):
        super().__init__()
        hidden = ratio * dim if kind == "relu2" else swiglu_hidden_width(dim, ratio * dim)
        self.kind = kind
        self.fc = Linear(dim, hidden)
        if kind == "swiglu":
            self.up = Linear(dim, hidden)
        self.proj = Linear(hidden, dim)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.proj(F.silu(self.fc(x)) * self.up(x))
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = RMSNorm(config.model_dim, config.norm_float32)
        self.attn = Attention(config)
        self.norm2 = RMSNorm(config.model_dim, config.norm_float32)
        self.mlp = MLP(config.model_dim, config.mlp_ratio, config.mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """The benchmark's model. Its activations are bf16 (the embedding's dtype), as in the records; the CPU
    preset passes activation_dtype=float32 where bf16 matmuls are slow (the weights keep their dtypes)."""

    def __init__(self, config, activation_dtype=torch.bfloat16):
        super().__init__()
        self.config = config
        self.activation_dtype = activation_dtype
        self.embed = Embedding(config.vocab_size, config.model_dim, dtype=torch.bfloat16)
        self.norm_a = RMSNorm(config.model_dim, config.norm_float32)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm_b = RMSNorm(config.model_dim, config.norm_float32)
        self.proj = Linear(config.model_dim, config.vocab_size)  # the head; named so the init zeroes it

    def features(self, inputs):
        """The residual stream after the last block."""
        x = self.norm_a(self.embed(inputs).to(self.activation_dtype))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, inputs, targets):
        """Summed cross-entropy over every token of the (batch, time) inputs."""
        logits = soft_cap(self.proj(self.norm_b(self.features(inputs))).float())
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


def soft_cap(logits):
    """15 z / sqrt(z^2 + 15^2), written with rsqrt as the record does (a division by sqrt rounds differently)."""
    return 15 * logits * torch.rsqrt(logits.square() + 15 ** 2)


@torch.no_grad()
def init_parameters(model, generator):
    """docs/benchmark.md#initialization, drawn on the CPU from `generator` so every device gets the same
    weights."""
    for name, param in model.named_parameters():
        if name.endswith("gains"):
            value = torch.ones(param.shape)
        elif name.endswith("bias") or "proj" in name:
            value = torch.zeros(param.shape)
        elif param is model.embed.weight:
            value = torch.randn(param.shape, generator=generator)
        else:
            value = torch.randn(param.shape, generator=generator) * math.sqrt(0.33 / param.size(1))
        param.copy_(value)


def head_balanced_sign_pair(width, head_dim, shrink, generator):
    """Record #46's signs for a pair of layers (its "head-mean antithetic" gains): per head, a draw of
    head_dim random signs gives a count of +1s, pulled `shrink` of the way to head_dim/2 (rounded as Python
    rounds); the first layer's head gets that many +1s and the second layer's the rest, each laid out by a
    random permutation. Drawn on the generator's device, in the record's order."""
    device = generator.device
    first, second = [], []
    for _ in range(width // head_dim):
        draw = (torch.randint(0, 2, (head_dim,), device=device, generator=generator, dtype=torch.int64) * 2 - 1).float()
        plus = int((draw > 0).sum().item())
        plus = max(0, min(head_dim, int(round(head_dim / 2 + shrink * (plus - head_dim / 2)))))
        for count, signs in ((plus, first), (head_dim - plus, second)):
            layout = torch.cat([torch.ones(count, device=device), -torch.ones(head_dim - count, device=device)])
            signs.append(layout[torch.randperm(head_dim, device=device, generator=generator)])
    return torch.cat(first), torch.cat(second)


def random_signs(width, generator):
    """+-1 (float32) on the generator's device, as record #46 draws a layer's gain signs."""
    return torch.randint(0, 2, (width,), device=generator.device, generator=generator, dtype=torch.float32) * 2 - 1


def gain_signs(config, init, seed, generator):
    """Record #46's sign vector of every layer: independent signs (from `generator`, the device's default
    generator as the record seeds it) below layer gain_pairs_from, head-balanced pairs of layers from there
    on, each pair from its own generator seeded 0xA9170000 + 1009 seed + 9176 layer on the same device."""
    signs, paired = [], None
    for layer in range(config.num_layers):
        if layer >= init.gain_pairs_from and (layer - init.gain_pairs_from) % 2 == 1:
            signs.append(paired)
        elif layer >= init.gain_pairs_from and config.model_dim % config.head_dim:
            first = random_signs(config.model_dim, generator)  # no whole heads: the record's fallback
            signs.append(first)
            paired = -first
        elif layer >= init.gain_pairs_from:
            pair_generator = torch.Generator(device=generator.device).manual_seed(0xA9170000 + seed * 1009 + layer * 9176)
            first, paired = head_balanced_sign_pair(config.model_dim, config.head_dim, init.gain_head_shrink,
                                                    pair_generator)
            signs.append(first)
        else:
            signs.append(random_signs(config.model_dim, generator))
    return signs


@torch.no_grad()
def record_init(model, init, generator, sign_generator, seed):
    """RecordInit (docs/recipes.md#initialization-of-records-42-and-46): the draws of torch's default
    Embedding (N(0, 1) in float32, then bf16) and Linear (kaiming-uniform weight, uniform bias) init in the
    record's module order (embedding; per block q, k, v, attention output, fc, MLP proj; the head), from the
    CPU `generator`; then the record's zeroing, fc scaling and signed gains (signs from sign_generator, the
    run device's generator: on CUDA they equal the record's, on the CPU the record run on a CPU's)."""
    def linear(module):
        weight = torch.empty(module.weight.shape)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        bias = torch.empty(module.bias.shape)
        nn.init.uniform_(bias, -1 / math.sqrt(weight.size(1)), 1 / math.sqrt(weight.size(1)), generator=generator)
        module.weight.copy_(weight)
        module.bias.copy_(bias)

    model.embed.weight.copy_(torch.empty(model.embed.weight.shape).normal_(generator=generator))
    for block in model.blocks:
        for module in (block.attn.q, block.attn.k, block.attn.v, block.attn.proj, block.mlp.fc, block.mlp.proj):
            linear(module)
    linear(model.proj)
    for name, param in model.named_parameters():
        if name.endswith("gains"):
            param.fill_(1.0)
        if "proj" in name or (init.zero_biases and name.endswith("bias")):
            param.zero_()
    layers = len(model.blocks)
    for index, block in enumerate(model.blocks):
        block.mlp.fc.weight.mul_(1.0 - init.fc_alpha * (index / (layers - 1) if layers > 1 else 0.0))
    if init.gain_alpha:
        layer_signs = (gain_signs(model.config, init, seed, sign_generator) if init.draw_signs else
                       [torch.ones(model.config.model_dim)] * len(model.blocks))
        for block, signs in zip(model.blocks, layer_signs):
            block.norm1.gains.copy_((1.0 - init.gain_alpha * signs).to(block.norm1.gains.dtype))
            block.norm2.gains.copy_((1.0 + init.gain_alpha * signs).to(block.norm2.gains.dtype))


def initialize(model, recipe, generator, sign_generator, seed):
    """The recipe's initialization: the benchmark's, or its record's own (RecordInit)."""
    if recipe.init is None:
        init_parameters(model, generator)
    else:
        record_init(model, recipe.init, generator, sign_generator, seed)


# ---------------------------------------------------------------------------------------------------
# Optimizer setup (docs/recipes.md)


def group_of(name, recipe):
    """(optimizer index, group index) of the first group of the recipe whose patterns match `name`, or None."""
    for i, spec in enumerate(recipe.optimizers):
        for j, group in enumerate(spec.groups):
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in group.params):
                return i, j
    return None


def check_groups_cover(model, recipe):
    """Every trained parameter must fall into a group of the recipe (SetupError naming those that do not)."""
    orphans = [name for name, p in model.named_parameters() if p.requires_grad and group_of(name, recipe) is None]
    if orphans:
        raise SetupError(f"recipe {recipe.name} has no optimizer group for {', '.join(orphans[:4])}"
                         f"{' ...' if len(orphans) > 4 else ''} (a model option it was not written for?)")


AURORA_FORMS = {"17": "aurora", "42": "aurora_schatten"}  # --aurora-form: the record whose Aurora to take
# --aurora: the options that give a matrix optimizer's matched matrices Aurora's polar (the backend) and
# the others its plain one, per optimizer class.
AURORA_SWITCH = {
    "Muon": (lambda backend: {"polar_backend": backend}, {}),
    "NorMuon": (lambda backend: {"polar_backend": backend}, {}),
    "Aurora": (lambda backend: {"orientation": "non_square"} if backend == "aurora" else
               {"orientation": "none", "polar_backend": backend}, {"orientation": "none"}),
    "MuonChain": (lambda backend: {"polar_backend": backend}, {"polar_backend": "schatten"}),
}


def aurora_matrices(pattern, shapes):
    """The non-square matrices (names from {name: shape}) that --aurora PATTERN names: none, wide, tall,
    all, or comma-separated names such as mlp.proj (matching blocks.<i>.mlp.proj.weight) or fnmatch
    patterns. Square matrices are left out: Aurora's polar of a square matrix is its plain polar."""
    rectangular = {name for name, (rows, cols) in shapes.items() if rows != cols}
    if pattern in ("none", "wide", "tall", "all"):
        keep = {"none": lambda r, c: False, "wide": lambda r, c: r < c, "tall": lambda r, c: r > c,
                "all": lambda r, c: True}[pattern]
        return {name for name in rectangular if keep(*shapes[name])}
    chosen = set()
    for item in pattern.split(","):
        named = {name for name in shapes if name.endswith(f".{item}.weight") or fnmatch.fnmatchcase(name, item)}
        if not named:
            raise SetupError(f"--aurora {pattern}: {item!r} is not none, wide, tall or all and names no block matrix "
                             f"(names are like mlp.fc, mlp.proj, attn.q, attn.k, attn.v, attn.proj)")
        if not named & rectangular:
            raise SetupError(f"--aurora {pattern}: {item!r} names only square matrices, whose Aurora polar is their "
                             f"plain polar: nothing would change")
        chosen |= named & rectangular
    return chosen


def recipe_aurora(recipe, model):
    """(matrices, backend): what the recipe itself gives Aurora's polar."""
    pattern, backend = recipe.aurora
    return aurora_matrices(pattern, matrix_shapes(model, recipe)), backend


def matrix_shapes(model, recipe):
    """{name: shape} of the parameters the recipe's matrix optimizer takes."""
    matrix = recipe.optimizers.index(recipe.matrix_spec())
    return {name: tuple(p.shape) for name, p in model.named_parameters() if (group_of(name, recipe) or (None,))[0] == matrix}


def build_optimizers(model, recipe):
    """One optimizer per OptimizerSpec of the recipe, every trained parameter in the first group whose
    patterns match its name (model order kept), each group carrying its name, options and starting lr
    (group["initial_lr"])."""
    check_groups_cover(model, recipe)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizers = []
    for i, spec in enumerate(recipe.optimizers):
        groups = []
        for j, group in enumerate(spec.groups):
            members = [p for name, p in named if group_of(name, recipe) == (i, j)]
            if members:
                groups.append(dict(params=members, lr=group.lr, name=group.name, **group.options))
        if not groups:  # every parameter it would train is frozen
            continue
        options = dict(spec.options)
        if spec.kind == "AdamW":
            options["fused"] = model.embed.weight.device.type in ("cuda", "cpu")
        if spec.kind in MATRIX_OPTIMIZERS:
            options["lr"] = groups[0]["lr"]
        optimizer = OPTIMIZER_CLASSES[spec.kind](groups, **options)
        for param_group in optimizer.param_groups:
            param_group["initial_lr"] = param_group["lr"]
        optimizers.append(optimizer)
    return optimizers


def set_schedules(optimizers, recipe, step):
    """Step `step`'s scheduled values in every param group: its lr, and where the recipe schedules them the
    matrix optimizer's momentum, Contra-Muon coefficient and trust-gate bounds."""
    momentum = recipe.momentum if isinstance(recipe.momentum, float) else recipe.momentum.momentum(step, recipe)
    contra, trust = recipe.contra, recipe.trust
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_schedule.lr(step, group, recipe)
            if "momentum" in group:
                group["momentum"] = momentum
            if group.get("contra_muon"):
                group["contra"] = contra_coefficient(step, contra.coefficient, contra.hold_end, contra.ramp_end)
            if group.get("soap_combine") == "trust_gate":
                group["trust_floor"] = early_trust_floor(step, trust.floor, trust.end, trust.fade_end)
                group["trust_cap"] = early_trust_cap(step, trust.cap, trust.fade_end)


def mlp_scalars(model):
    """The MLP input norm gains and the biases of the MLP's input projections (fc, and up under SwiGLU)."""
    return [p for block in model.blocks for p in
            [block.norm2.gains, block.mlp.fc.bias] + ([block.mlp.up.bias] if hasattr(block.mlp, "up") else [])]


def with_aux_from(recipe, other):
    """--aux-from: `recipe` with the AdamW optimizer (its groups' lrs and weight decay) of `other`; the
    matrix optimizer stays. Only between recipes on the benchmark's schedule, whose AdamW groups match."""
    for r in (recipe, other):
        if r.init is not None or [spec.kind for spec in r.optimizers] != ["AdamW", r.matrix_spec().kind]:
            raise SetupError(f"--aux-from {other.name} with --recipe {recipe.name}: only the benchmark-schedule "
                             f"recipes ({', '.join(n for n, x in RECIPES.items() if x.init is None)}) share AdamW "
                             f"groups; {r.name} has its own optimizers and schedules")
    return dataclasses.replace(recipe, optimizers=(other.optimizers[0],) + recipe.optimizers[1:])


# ---------------------------------------------------------------------------------------------------
# Techniques (docs/recipes.md#techniques): what each recipe adds to the Muon core, read from its data, and the
# switches --aurora, --without, --with and --set, each a function from recipe to recipe applied to the record's
# recipe before it is scaled to --steps and before anything is built


@functools.lru_cache(maxsize=None)
def class_defaults(kind):
    """The options an optimizer class takes, with their defaults (None where it has none): its signature's, and
    for the matrix optimizers the stage options they take as keywords (option_defaults)."""
    cls = OPTIMIZER_CLASSES[kind]
    parameters = inspect.signature(cls).parameters
    named = {name: None if p.default is p.empty else p.default for name, p in parameters.items()
             if name != "params" and p.kind != p.VAR_KEYWORD}
    return {**getattr(cls, "option_defaults", {}), **named}


SCHEDULE_OPTIONS = ("power_c",)  # group options the lr schedule reads, not the optimizer


def group_options(spec, group):
    """The options the group's optimizer runs it with: its class's defaults, the spec's shared ones, the group's own."""
    return {**class_defaults(spec.kind), **spec.options, **group.options}


def group_names(recipe, on=lambda spec, options: True):
    """The names of the groups (of every optimizer, in order) whose spec and options satisfy `on`."""
    return [g.name for spec in recipe.optimizers for g in spec.groups if on(spec, group_options(spec, g))]


def matrix_group_names(recipe):
    return [g.name for g in recipe.matrix_spec().groups]


def adam_group_names(recipe):
    return group_names(recipe, lambda spec, options: spec.kind == "AdamW")


def groups_holding(recipe, *parameters):
    """The names of the groups that take these parameters (by the model's names), in the recipe's order."""
    found = {group_of(name, recipe) for name in parameters} - {None}
    return [g.name for i, spec in enumerate(recipe.optimizers) for j, g in enumerate(spec.groups) if (i, j) in found]


def edit_groups(recipe, names, edit):
    """recipe with every group named in `names` replaced by edit(spec, group)."""
    return dataclasses.replace(recipe, optimizers=tuple(
        dataclasses.replace(spec, groups=tuple(edit(spec, g) if g.name in names else g for g in spec.groups))
        for spec in recipe.optimizers))


def with_options(group, changes=(), dropped=()):
    """group with its options changed, the `dropped` ones removed (their optimizer's defaults hold again)."""
    kept = {k: v for k, v in group.options.items() if k not in dropped}
    return dataclasses.replace(group, options={**kept, **dict(changes)})


def value_at(value, path):
    for key in path:
        value = getattr(value, key) if dataclasses.is_dataclass(value) else value[key]
    return value


def has_value_at(value, path):
    try:
        value_at(value, path)
    except (KeyError, IndexError, TypeError, AttributeError):
        return False
    return True


def replaced_at(value, path, new):
    """A copy of nested data (dataclasses, dicts, tuples) with the value at `path` replaced by `new`."""
    if not path:
        return new
    key, rest = path[0], path[1:]
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{key: replaced_at(getattr(value, key), rest, new)})
    if isinstance(value, dict):
        return {**value, key: replaced_at(value[key], rest, new)}
    return value[:key] + (replaced_at(value[key], rest, new),) + value[key + 1:]


def without_unread_schedules(recipe):
    """recipe without a Contra ramp or trust-gate bounds that no group reads any more."""
    contra_read = group_names(recipe, lambda spec, options: options.get("contra_muon"))
    trust_read = group_names(recipe, lambda spec, options: options.get("soap_combine") == "trust_gate")
    return dataclasses.replace(recipe, contra=recipe.contra if contra_read else None,
                               trust=recipe.trust if trust_read else None)


@dataclass(frozen=True)
class Constant:
    """A number of a technique that --set KEY=VALUE changes, with its type and range. It lives at `path` in the
    options of the groups the technique is on (in_groups; a group lacking the path has none) or in the recipe.
    `path` may be a function of the group's options. A step constant is given at the record's horizon, scaled with
    --steps like the record's own."""
    key: str
    kind: type  # int or float
    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    path: tuple = ()
    in_groups: bool = True

    def admits(self, value):
        return ((value > self.low if self.open_low else value >= self.low)
                and (value < self.high if self.open_high else value <= self.high))

    def range_text(self):
        high = "inf)" if self.high == math.inf else f"{self.high:g}{')' if self.open_high else ']'}"
        return f"{'(' if self.open_low else '['}{self.low:g}, {high}"


def step_constant(key, *path):
    return Constant(key, int, 0, path=path, in_groups=False)


@dataclass(frozen=True)
class Technique:
    """A technique of the records. where(recipe): the groups it acts on (empty: the recipe lacks it); remove and
    add: the switches --without and --with, from recipe to recipe (add(recipe, the source recipe that has it, the
    groups to put it on)); candidates(recipe): the groups --with may name (None: it acts on the whole model, and
    takes no groups)."""
    name: str
    does: str
    introduced: str
    off: str
    where: object
    remove: object
    add: object
    constants: tuple = ()
    candidates: object = None


def stage(name, does, introduced, off, on, off_changes, copied, constants=(), before_add=None, add=None):
    """A technique that is an option of the matrix optimizer's groups: on(kind, options) says where it is on,
    off_changes(kind, options) the options that turn it off, `copied` the options --with takes from the first
    group of the source recipe that has it (after before_add(recipe, names) has refused what cannot take it), or
    `add` does what --with does."""
    def where(recipe):
        return group_names(recipe, lambda spec, options: spec.kind in MATRIX_OPTIMIZERS and on(spec.kind, options))

    def remove(recipe):
        return without_unread_schedules(edit_groups(
            recipe, where(recipe), lambda spec, g: with_options(g, off_changes(spec.kind, group_options(spec, g)))))

    def copy(recipe, source, names):
        if before_add:
            before_add(recipe, names)
        spec, group = next((spec, g) for spec in source.optimizers for g in spec.groups if g.name in where(source))
        options = group_options(spec, group)
        return edit_groups(recipe, names, lambda spec, g: with_options(g, {key: options[key] for key in copied}))

    return Technique(name, does, introduced, off, where, remove, add or copy, constants, matrix_group_names)


def whole_model(name, does, introduced, off, where, field_name, off_value, constants=(), before_add=None):
    """A technique that is one field of the recipe (a schedule, a readout, the lookahead, the init): off puts
    off_value(recipe's value) there, --with the source recipe's (before_add(recipe) refusing a recipe that cannot
    take it)."""
    def add(recipe, source, names):
        if before_add:
            before_add(recipe)
        return dataclasses.replace(recipe, **{field_name: getattr(source, field_name)})

    return Technique(name, does, introduced, off, where, lambda recipe: dataclasses.replace(
        recipe, **{field_name: off_value(getattr(recipe, field_name))}), add, constants)


def init_tweak(name, does, introduced, off, acts_on, on, off_fields, copied, constants=()):
    """A technique of the record init (RecordInit): on(init) says whether it is on, off_fields the init fields that
    turn it off, `copied` the fields --with takes from the source's init; `acts_on` names a parameter it changes."""
    def where(recipe):
        return groups_holding(recipe, acts_on) if recipe.init is not None and on(recipe.init) else []

    def add(recipe, source, names):
        if recipe.init is None:
            raise SetupError(f"--with {name}: recipe {recipe.name} has the benchmark's init, which {name} changes "
                             f"nothing of; add the record init first: --with record_init --with {name}")
        return dataclasses.replace(recipe, init=dataclasses.replace(
            recipe.init, **{key: getattr(source.init, key) for key in copied}))

    return Technique(name, does, introduced, off, where,
                     lambda recipe: dataclasses.replace(recipe, init=dataclasses.replace(recipe.init, **off_fields)),
                     add, constants)


def aurora_orientation_option(name):
    """The path of one of record #17's Aurora-polar constants in a group's options: only where the group takes that
    polar by its orientation (the Aurora polar backends, #42's form included, run at their fixed constants)."""
    return lambda options: (name,) if options.get("orientation", "none") != "none" else None


def uses_aurora_polar(kind, options):
    return ((kind == "Aurora" and options["orientation"] != "none")
            or options.get("polar_backend") in AURORA_FORMS.values())


def plain_polar(kind, options):
    """The options that give a group its optimizer's plain polar instead of Aurora's (as --aurora none does)."""
    changes = dict(AURORA_SWITCH[kind][1])
    if options.get("polar_backend") in AURORA_FORMS.values():
        changes.setdefault("polar_backend", "polar")
    return changes


def refuse_with_aurora(recipe, names):
    raise SetupError("--with aurora: Aurora's polar is given to matrices by name with --aurora PATTERN (and "
                     "--aurora-form 17|42); use that")


def refuse_unless_soap(recipe, names):
    lacking = [g for g in names if g not in TECHNIQUES["soap"].where(recipe)]
    if lacking:
        raise SetupError(f"--with trust_gate: it blends SOAP's direction, and group(s) {', '.join(lacking)} of recipe "
                         f"{recipe.name} have no SOAP; add it first (--with soap:GROUPS)")


def add_trust_gate(recipe, source, names):
    refuse_unless_soap(recipe, names)
    spec, group = next((spec, g) for spec in source.optimizers for g in spec.groups
                       if g.name in TECHNIQUES["trust_gate"].where(source))
    options = group_options(spec, group)
    recipe = edit_groups(recipe, names, lambda spec, g: with_options(
        g, {"soap_combine": "trust_gate", "trust": options["trust"]}))
    # The gate unbounded until --with early_trust adds the record's bounds.
    return dataclasses.replace(recipe, trust=recipe.trust or EarlyTrust(0.0, 1.0, 0, 0))


def add_contra(recipe, source, names):
    recipe = edit_groups(recipe, names, lambda spec, g: with_options(g, {"contra_muon": True}))
    return dataclasses.replace(recipe, contra=recipe.contra or source.contra)


def remove_normuon(recipe):
    """The NorMuon optimizer made a Muon of the same groups and shared options (NorMuon's own dropped)."""
    only = ("beta2", "u_normuon")
    return dataclasses.replace(recipe, optimizers=tuple(
        dataclasses.replace(spec, kind="Muon", options={k: v for k, v in spec.options.items() if k not in only},
                            groups=tuple(with_options(g, dropped=only) for g in spec.groups))
        if spec.kind == "NorMuon" else spec for spec in recipe.optimizers))


def add_normuon(recipe, source, names):
    spec = recipe.matrix_spec()
    if spec.kind != "Muon" or set(names) != set(matrix_group_names(recipe)):
        raise SetupError(f"--with normuon: NorMuon replaces a whole Muon optimizer; recipe {recipe.name}'s matrix "
                         f"optimizer is {spec.kind}" + ("" if spec.kind != "Muon" else ": give no groups"))
    beta2 = group_options(source.matrix_spec(), source.matrix_spec().groups[0])["beta2"]
    return dataclasses.replace(recipe, optimizers=tuple(
        dataclasses.replace(s, kind="NorMuon", options={**s.options, "beta2": beta2}) if s is spec else s
        for s in recipe.optimizers))


def remove_bias_free_adam(recipe):
    """The bias-free Adam's groups moved, options and all, to the end of the AdamW optimizer."""
    moved = tuple(g for spec in recipe.optimizers if spec.kind == "BiasFreeAdam" for g in spec.groups)
    return dataclasses.replace(recipe, optimizers=tuple(
        dataclasses.replace(spec, groups=spec.groups + moved) if spec.kind == "AdamW" else spec
        for spec in recipe.optimizers if spec.kind != "BiasFreeAdam"))


def add_bias_free_adam(recipe, source, names):
    """The named AdamW groups moved, with their betas, into a bias-free Adam (with the source's shared options)
    after the AdamW."""
    shared = next(spec.options for spec in source.optimizers if spec.kind == "BiasFreeAdam")
    optimizers = []
    for spec in recipe.optimizers:
        if spec.kind != "AdamW":
            optimizers.append(spec)
            continue
        kept = tuple(g for g in spec.groups if g.name not in names)
        moved = tuple(with_options(g, {"betas": group_options(spec, g)["betas"]}) for g in spec.groups if g.name in names)
        optimizers += [dataclasses.replace(spec, groups=kept)] if kept else []
        optimizers.append(OptimizerSpec("BiasFreeAdam", moved, shared))
    return dataclasses.replace(recipe, optimizers=tuple(optimizers))


def remove_power_cool(recipe):
    recipe = edit_groups(recipe, group_names(recipe), lambda spec, g: with_options(g, dropped=("power_c",)))
    return dataclasses.replace(recipe, lr_schedule=LinearCooldown())


def add_power_cool(recipe, source, names):
    """PowerCool with the source's t_end and power, each group's c the source's for the same group (by name), for
    a matrix group its matrix groups', else its other aux groups'."""
    def c_of(names):
        return next(group_options(spec, g)["power_c"] for spec in source.optimizers for g in spec.groups
                    if g.name in names)
    source_matrix = matrix_group_names(source)
    aux = [name for name in group_names(source) if name not in source_matrix + ["embed", "head"]]

    def with_c(spec, g):
        same = [g.name] if g.name in group_names(source) else source_matrix if spec.kind in MATRIX_OPTIMIZERS else aux
        return with_options(g, {"power_c": c_of(same)})
    recipe = edit_groups(recipe, group_names(recipe), with_c)
    return dataclasses.replace(recipe, lr_schedule=source.lr_schedule)


def add_momentum_schedule(recipe, source, names):
    return dataclasses.replace(recipe, momentum=source.momentum)


def refuse_without_trust_gate(recipe):
    if not TECHNIQUES["trust_gate"].where(recipe):
        raise SetupError(f"--with early_trust: it bounds the trust gate, which recipe {recipe.name} has on no group; "
                         f"add it first (--with trust_gate:GROUPS)")


def early_trust_where(recipe):
    bounded = recipe.trust is not None and (recipe.trust.floor, recipe.trust.cap) != (0, 1)
    return TECHNIQUES["trust_gate"].where(recipe) if bounded else []


def add_adam_weight_decay(recipe, source, names):
    spec, group = next((spec, g) for spec in source.optimizers for g in spec.groups
                       if g.name in TECHNIQUES["adam_weight_decay"].where(source))
    decay = group_options(spec, group)["weight_decay"]
    return edit_groups(recipe, names, lambda spec, g: with_options(g, {"weight_decay": decay}))


def readout_where(kind, groups):
    return lambda recipe: groups(recipe) if isinstance(recipe.readout, kind) else []


def all_but_embedding(recipe):
    return [name for name in group_names(recipe) if name not in groups_holding(recipe, "embed.weight")]


SOAP_CONSTANTS = tuple(Constant(f"soap.{name}", kind, low, high, open_low, open_high, ("soap", name))
                       for name, kind, low, high, open_low, open_high in (
                           ("beta2", float, 0, 1, False, True), ("frequency", int, 1, math.inf, False, False),
                           ("denom_power", float, 0, math.inf, True, False), ("blend", float, 0, 1, False, False),
                           ("denom_floor", float, 0, math.inf, False, False)))

TECHNIQUES = {t.name: t for t in (
    stage("aurora", "Aurora's row-balanced polar factor: orthogonal, every row of the tall orientation at one norm",
          "#17; on the wide mlp.proj, in #42's form: #30",
          "the plain polar factor (in #42's chain the Schatten-4 one, as --aurora none gives)", uses_aurora_polar,
          plain_polar, ("polar_backend",),
          (Constant("aurora.pp_iterations", int, 1, path=aurora_orientation_option("pp_iterations")),
           Constant("aurora.pp_beta", float, 0, path=aurora_orientation_option("pp_beta"))),
          before_add=refuse_with_aurora),
    stage("schatten_polar", "the Newton-Schulz input divided by its Schatten-4 norm, not its Frobenius norm",
          "#20 (its script; the README does not name it)", "the Frobenius pre-norm (polar)",
          lambda kind, options: options.get("polar_backend") == "schatten",
          lambda kind, options: {"polar_backend": "polar"}, ("polar_backend",)),
    stage("soap", "SOAP: the momentum direction preconditioned by Adam in the eigenbases of the gradient's Gram "
          "matrices", "#14 (MLP); attention: #16; every block matrix, refreshed every step: #44",
          "the raw Nesterov direction", lambda kind, options: options.get("soap") is not None,
          lambda kind, options: {"soap": None, "soap_combine": "replace", "trust": None}, ("soap", "soap_combine"),
          SOAP_CONSTANTS),
    stage("trust_gate", "SOAP's direction blended with the raw momentum by how well it agrees with it and with the "
          "gradient", "#16", "gate 1: SOAP's direction at the raw momentum's Schatten-4 norm",
          lambda kind, options: options.get("soap_combine") == "trust_gate",
          lambda kind, options: {"soap_combine": "gate", "trust": None}, (),
          tuple(Constant(f"trust_gate.{name}", float, low, high, open_low, open_high, ("trust", name))
                for name, low, high, open_low, open_high in (("min_agree", 0, 1, False, True),
                                                            ("min_grad_align", 0, 1, False, True),
                                                            ("power", 0, math.inf, True, False))), add=add_trust_gate),
    whole_model("early_trust", "the trust gate clamped between a floor and a cap early in training",
                "unknown (#46's README lists it with #44's components)", "the gate unbounded: floor 0, cap 1",
                early_trust_where, "trust", lambda trust: dataclasses.replace(trust, floor=0.0, cap=1.0),
                (Constant("early_trust.floor", float, 0, 1, path=("trust", "floor"), in_groups=False),
               Constant("early_trust.cap", float, 0, 1, path=("trust", "cap"), in_groups=False),
               step_constant("early_trust.end", "trust", "end"),
               step_constant("early_trust.fade_end", "trust", "fade_end")), before_add=refuse_without_trust_gate),
    stage("contra", "Contra-Muon: the momentum direction mixed into the polar factor",
          "#11; ramped to 0 at step 2500: #30", "coefficient 0: the stage left out",
          lambda kind, options: options.get("contra_muon") or (kind == "Aurora" and options["contra"] != 0),
          lambda kind, options: {"contra": 0.0} if kind == "Aurora" else {"contra_muon": False}, (),
          (Constant("contra", float, -math.inf, path=("contra", "coefficient"), in_groups=False),
           Constant("contra", float, -math.inf, path=("contra",)),
           step_constant("contra.hold_end", "contra", "hold_end"),
           step_constant("contra.ramp_end", "contra", "ramp_end")), add=add_contra),
    Technique("normuon", "NorMuon: the scaled polar factor normalized per neuron by a running second moment",
              "#8 (with a hyperball; alone: #10)", "Muon: the polar factor times the aspect factor",
              lambda recipe: group_names(recipe, lambda spec, options: spec.kind == "NorMuon"), remove_normuon,
              add_normuon, (Constant("normuon.beta2", float, 0, 1, open_high=True, path=("beta2",)),),
              matrix_group_names),
    stage("normuon_lite", "NorMuon-lite: the update divided by a running mean square per row, rescaled to its "
          "Schatten-4 norm", "#9; beta2 1.0, a rescale only: #30", "left out",
          lambda kind, options: options.get("normuon_beta2") is not None,
          lambda kind, options: {"normuon_beta2": None}, ("normuon_beta2",),
          (Constant("normuon_lite.beta2", float, 0, 1, path=("normuon_beta2",)),)),
    stage("uw_floor", "the u/w floor: the update scaled up to at least a fraction of the weight's Frobenius norm", "#9",
          "no floor", lambda kind, options: (options.get("uw_floor") or 0) != 0 or (options.get("floor") or ("",))[0]
          == "scalar", lambda kind, options: {"uw_floor": 0.0} if options.get("uw_floor") else {"floor": None},
          ("floor",), (Constant("uw_floor", float, 0, open_low=True,
                                path=lambda options: ("uw_floor",) if options.get("uw_floor") else ("floor", 1)),)),
    stage("row_floor", "RowFloor: every row of the update lifted to at least a fraction of its weight row's norm",
          "#46", "no floor", lambda kind, options: (options.get("floor") or ("",))[0] == "row",
          lambda kind, options: {"floor": None}, ("floor",),
          (Constant("row_floor", float, 0, open_low=True, path=("floor", 1)),
           Constant("row_floor.rho", float, 0, open_low=True, path=("floor", 2)))),
    stage("radial_brake", "the update's outward radial component (along W) scaled down", "#29",
          "outward scale 1: the stage left out", lambda kind, options: options.get("radial_brake") is not None,
          lambda kind, options: {"radial_brake": None}, ("radial_brake",),
          (Constant("radial_brake.outward", float, 0, path=("radial_brake", 0)),
           Constant("radial_brake.inward", float, 0, path=("radial_brake", 1)))),
    stage("radius_pin", "after the step, W rescaled to the norm the step's radial part alone gives it", "#29",
          "the plain step: W *= 1 - lr wd, W -= lr update", lambda kind, options: options.get("pin"),
          lambda kind, options: {"pin": False}, ("pin",)),
    stage("cautious_wd", "cautious weight decay after the step, only on the entries the step already shrinks",
          "#46, after the pin (cautious weight decay itself: PR #265)", "0",
          lambda kind, options: (options.get("cautious_weight_decay") or 0) > 0,
          lambda kind, options: {"cautious_weight_decay": 0.0}, ("cautious_weight_decay",),
          (Constant("cautious_wd", float, 0, 1, open_high=True, path=("cautious_weight_decay",)),)),
    stage("weight_decay", "decoupled weight decay of the block matrices, W *= 1 - lr wd before the step", "#1", "0",
          lambda kind, options: (options.get("weight_decay") or 0) != 0,
          lambda kind, options: {"weight_decay": 0.0}, ("weight_decay",),
          (Constant("weight_decay", float, 0, 1, open_high=True, path=("weight_decay",)),)),
    Technique("adam_weight_decay", "AdamW's decoupled weight decay", "#36 (earlier: unknown)", "0",
              lambda recipe: group_names(recipe, lambda spec, options: spec.kind == "AdamW"
                                         and options["weight_decay"] != 0),
              lambda recipe: edit_groups(recipe, adam_group_names(recipe),
                                         lambda spec, g: with_options(g, {"weight_decay": 0.0})),
              add_adam_weight_decay, (Constant("adam_weight_decay", float, 0, 1, open_high=True, path=("weight_decay",)),),
              adam_group_names),
    Technique("bias_free_adam", "Adam without bias correction for the gains and biases",
              "unknown (its per-family beta2: #44)", "torch's AdamW (bias-corrected) with the embedding's settings",
              lambda recipe: group_names(recipe, lambda spec, options: spec.kind == "BiasFreeAdam"),
              remove_bias_free_adam, add_bias_free_adam, (), adam_group_names),
    Technique("power_cool", "PowerCool: every lr min(lr0, c (t_end - step)^power), c per group", "#20",
              "the track's linear cooldown: flat for 30% of T, then linear to 0",
              lambda recipe: group_names(recipe) if isinstance(recipe.lr_schedule, PowerCool) else [],
              remove_power_cool, add_power_cool,
              (Constant("power_cool.t_end", int, 1, path=("lr_schedule", "t_end"), in_groups=False),
               Constant("power_cool.power", float, 0, open_low=True, path=("lr_schedule", "power"), in_groups=False))),
    Technique("momentum_schedule", "the matrix momentum warmed up from 0.85 to 0.95, cooled back at the end",
              "#30; its 200-step cooldown: #44", "a constant 0.95",
              lambda recipe: matrix_group_names(recipe) if not isinstance(recipe.momentum, float) else [],
              lambda recipe: dataclasses.replace(recipe, momentum=0.95), add_momentum_schedule,
              (step_constant("momentum_schedule.warmup", "momentum", "warmup"),
               step_constant("momentum_schedule.cooldown", "momentum", "cooldown"))),
    whole_model("ema_nesterov", "EMA-Nesterov: W += s b before each step, b an EMA of the steps' displacements",
                "#39; at 0.3 lr/lr0: #40", "no lookahead",
                lambda recipe: group_names(recipe) if recipe.lookahead else [], "lookahead", lambda lookahead: None,
                (Constant("ema_nesterov.stepsize", float, 0, path=("lookahead", "stepsize"), in_groups=False),
                 Constant("ema_nesterov.ema", float, 0, 1, open_high=True, path=("lookahead", "ema"), in_groups=False),
                 step_constant("ema_nesterov.prefill", "lookahead", "prefill"),
                 step_constant("ema_nesterov.rest", "lookahead", "rest"))),
    whole_model("reference_readout", "validation of W + gamma (W - R), R the weights of an earlier step", "#42",
                "the raw weights are evaluated", readout_where(ReferenceReadoutSpec, group_names), "readout",
                lambda readout: None,
                (Constant("reference_readout.gamma", float, -math.inf, path=("readout", "gamma"), in_groups=False),
                 step_constant("reference_readout.capture", "readout", "capture"),
                 step_constant("reference_readout.apply_from", "readout", "apply_from"))),
    whole_model("tail_ema", "Tail-EMA: validation of (1 - lambda) W + lambda EMA(W), the EMA over the last steps",
                "#45", "the raw weights are evaluated", readout_where(TailEMASpec, all_but_embedding), "readout",
                lambda readout: None, (Constant("tail_ema.tau", float, 1, path=("readout", "tau"), in_groups=False),
                       Constant("tail_ema.lambda", float, 0, 1, path=("readout", "lam"), in_groups=False),
                       step_constant("tail_ema.start", "readout", "start"),
                       step_constant("tail_ema.end", "readout", "end"))),
    whole_model("record_init", "torch's default Linear and Embedding init in the record model's order, proj zeroed",
                "unknown (#42's and #46's scripts)", "the benchmark's init (docs/benchmark.md#initialization)",
                lambda recipe: group_names(recipe) if recipe.init else [], "init", lambda init: None),
    init_tweak("fc_depth_init", "mlp.fc of layer l scaled by 1 - alpha l/(L-1) at init", "#30",
               "the default init, unscaled", "blocks.0.mlp.fc.weight", lambda init: init.fc_alpha != 0,
               {"fc_alpha": 0.0}, ("fc_alpha",),
               (Constant("fc_depth_init", float, 0, 1, path=("init", "fc_alpha"), in_groups=False),)),
    init_tweak("signed_gains", "norm gains 1 -/+ alpha s at init, s random signs (head-balanced layer pairs)",
               "#30; alpha 0.125: #44", "every sign +1", "blocks.0.norm1.gains",
               lambda init: init.gain_alpha != 0 and init.draw_signs, {"draw_signs": False},
               ("gain_alpha", "gain_pairs_from", "gain_head_shrink", "draw_signs"),
               (Constant("signed_gains.alpha", float, 0, 1, open_high=True, path=("init", "gain_alpha"),
                         in_groups=False),
                Constant("signed_gains.shrink", float, 0, 1, path=("init", "gain_head_shrink"), in_groups=False),
                Constant("signed_gains.pairs_from", int, 0, path=("init", "gain_pairs_from"), in_groups=False))),
    init_tweak("zero_biases", "every bias zeroed at init, not only proj's", "#42", "torch's default uniform biases",
               "blocks.0.attn.q.bias", lambda init: init.zero_biases, {"zero_biases": False}, ("zero_biases",)),
    Technique("norm_float32", "RMSNorm in float32, the gains applied before the cast back to bf16",
              "unknown (#42's and #46's scripts)", "the benchmark's RMSNorm in bf16",
              lambda recipe: groups_holding(recipe, "norm_a.gains") if recipe.model.get("norm_float32") else [],
              lambda recipe: dataclasses.replace(recipe, model={k: v for k, v in recipe.model.items()
                                                                if k != "norm_float32"}),
              lambda recipe, source, names: dataclasses.replace(recipe, model={**recipe.model, "norm_float32": True})),
)}
# Where --with takes a technique from: the newest record that has it.
def source_recipe(technique, recipe):
    """The newest record recipe that has `technique`, its step constants scaled to recipe's horizon."""
    newest_first = sorted(RECIPES.values(), key=lambda r: -int(r.record.lstrip("#")))
    source = next(r for r in newest_first if technique.where(r))
    return scaled_recipe(source, recipe.steps)


def technique_names(recipe):
    return [name for name, technique in TECHNIQUES.items() if technique.where(recipe)]


def constant_places(recipe, technique, key, group=None):
    """Where the constant `key` of `technique` lives in recipe: [(group name, path)] or [(None, path)] for a place
    in the recipe itself; `group` keeps only that group's."""
    places, placed, acted = [], set(), technique.where(recipe)
    for constant in technique.constants:
        if constant.key != key:
            continue
        if not constant.in_groups:
            if group is None and not places and has_value_at(recipe, constant.path):
                return [(None, constant.path)]
            continue
        for spec in recipe.optimizers:
            for g in spec.groups:
                options = group_options(spec, g)
                path = constant.path(options) if callable(constant.path) else constant.path
                if (g.name in acted and g.name not in placed and group in (None, g.name)
                        and has_value_at(options, path)):
                    places.append((g.name, path))
                    placed.add(g.name)
    return places


LR = Constant("lr", float, 0, path=("lr",))
BETAS = tuple(Constant(f"beta{i + 1}", float, 0, 1, open_high=True, path=("betas", i)) for i in range(2))


def settable(recipe):
    """{--set key: (Constant, places)} of every constant of the recipe's techniques, alone and (where it lives in
    groups) as GROUP.KEY for one group, and every group's lr and Adam betas as GROUP.lr, GROUP.beta1, GROUP.beta2."""
    keys = {}
    for name in technique_names(recipe):
        technique = TECHNIQUES[name]
        for constant in technique.constants:
            places = constant_places(recipe, technique, constant.key)
            if places and constant.key not in keys:
                keys[constant.key] = (constant, places)
            for group, path in places:
                if group is not None:
                    keys[f"{group}.{constant.key}"] = (constant, [(group, path)])
    for spec in recipe.optimizers:
        for g in spec.groups:
            keys[f"{g.name}.lr"] = (LR, [(g.name, LR.path)])
            if "betas" in group_options(spec, g):
                keys |= {f"{g.name}.{beta.key}": (beta, [(g.name, beta.path)]) for beta in BETAS}
    return keys


def value_in(recipe, group, path):
    if group is None:
        return value_at(recipe, path)
    spec, g = next((spec, g) for spec in recipe.optimizers for g in spec.groups if g.name == group)
    return g.lr if path == ("lr",) else value_at(group_options(spec, g), path)


def with_value(recipe, group, path, value):
    if group is None:
        return replaced_at(recipe, path, value)
    if path == ("lr",):
        return edit_groups(recipe, [group], lambda spec, g: dataclasses.replace(g, lr=value))
    return edit_groups(recipe, [group], lambda spec, g: with_options(
        g, {path[0]: replaced_at(group_options(spec, g)[path[0]], path[1:], value)}))


def parsed_value(text, constant, key):
    """The number --set KEY=text gives, of the constant's type and in its range (SetupError otherwise)."""
    try:
        value = constant.kind(text)
    except ValueError:
        kind = "a whole number" if constant.kind is int else "a number"
        raise SetupError(f"--set {key}={text}: not {kind}; {key} takes {kind} in {constant.range_text()}") from None
    if not math.isfinite(value) or not constant.admits(value):
        raise SetupError(f"--set {key}={text}: out of range; {key} takes a value in {constant.range_text()}")
    return value


def with_constant(recipe, text):
    """--set KEY=VALUE: (recipe with the constant changed everywhere it lives, the difference it makes: None where
    the value is the one already there)."""
    key, equals, value_text = text.partition("=")
    if not equals or not key or not value_text:
        raise SetupError(f"--set {text}: give KEY=VALUE, e.g. --set cautious_wd=0.05")
    keys = settable(recipe)
    if key not in keys:
        ungrouped = sorted(k for k in keys if not any(k.startswith(g + ".") for g in group_names(recipe)))
        raise SetupError(f"--set {key}: recipe {recipe.name} has no such constant; it has {', '.join(ungrouped)}, "
                         f"and GROUP.lr, GROUP.KEY for one group's (groups: {', '.join(group_names(recipe))})")
    constant, places = keys[key]
    value = parsed_value(value_text, constant, key)
    before = [value_in(recipe, *place) for place in places]
    for group, path in places:
        recipe = with_value(recipe, group, path, value)
    return recipe, None if set(before) == {value} else f"{key}={value!r} (record: {before[0]!r})"


def matrix_kinds_text(names):
    kinds = sorted({".".join(name.split(".")[2:-1]) for name in names if name.startswith("blocks.")})
    return ", ".join(kinds)


def names_item(item, name):
    """Whether an item of --with NAME:GROUPS names the parameter: a module path in it (mlp, mlp.fc, attn.q) or an
    fnmatch pattern of its whole name."""
    return f".{item}." in f".{name}" or fnmatch.fnmatchcase(name, item)


def split_items(text, groups):
    """The comma-separated items of GROUPS, a group name with commas in it (attn.q,k,v) kept whole."""
    tokens, items, i = text.split(","), [], 0
    while i < len(tokens):
        j = next((j for j in range(len(tokens), i, -1) if ",".join(tokens[i:j]) in groups), i + 1)
        items.append(",".join(tokens[i:j]))
        i = j
    return items


def split_groups(recipe, chosen, label, names):
    """recipe in which every group holding some but not all of the `chosen` parameters (names) is split in two: a
    group GROUP[label] of those, placed before GROUP, which keeps the others (a parameter takes the first group
    that matches it). Returns (recipe, the groups that now hold only chosen parameters)."""
    members = {}
    for name in names:
        where = group_of(name, recipe)
        if where is not None:
            members.setdefault(where, []).append(name)
    holding, optimizers = [], []
    for i, spec in enumerate(recipe.optimizers):
        groups = []
        for j, g in enumerate(spec.groups):
            inside = [name for name in members.get((i, j), []) if name in chosen]
            if inside and len(inside) < len(members[(i, j)]):
                groups.append(dataclasses.replace(g, name=f"{g.name}[{label}]", params=tuple(inside)))
                holding.append(groups[-1].name)
            elif inside:
                holding.append(g.name)
            groups.append(g)
        optimizers.append(dataclasses.replace(spec, groups=tuple(groups)))
    return dataclasses.replace(recipe, optimizers=tuple(optimizers)), holding


def with_technique(recipe, text, names):
    """--with NAME[:GROUPS]: recipe with the technique of the newest record that has it added on the groups named
    (groups or parameters by name, as mlp, mlp.fc, attn.q; default: every group it can act on); a group holding only
    some of the named parameters is split."""
    name, colon, groups_text = text.partition(":")
    technique, record = TECHNIQUES[name], recipe
    source = source_recipe(technique, recipe)
    if technique.candidates is None:
        if colon:
            raise SetupError(f"--with {text}: {name} acts on the whole model; give it without groups")
        switched = technique.add(recipe, source, [])
    else:
        candidates = technique.candidates(recipe)
        if not colon:
            switched = technique.add(recipe, source, candidates)
        else:
            positions = {group_of_name(recipe, g) for g in candidates}
            members = [n for n in names if group_of(n, recipe) in positions]
            chosen = set()
            for item in split_items(groups_text, candidates):
                named = ([n for n in members if group_of(n, recipe) == group_of_name(recipe, item)]
                         if item in candidates else [n for n in members if names_item(item, n)])
                if not named:
                    raise SetupError(f"--with {text}: {item!r} is no group of recipe {recipe.name} that {name} can act on "
                                     f"({', '.join(candidates)}) and names none of their parameters (such as "
                                     f"{matrix_kinds_text(members)})")
                chosen |= set(named)
            recipe, holding = split_groups(recipe, chosen, groups_text, names)
            switched = technique.add(recipe, source, holding)
    if switched == record:
        raise SetupError(f"--with {text}: recipe {recipe.name} has {name} there already; nothing would change")
    refuse_untaken_options(switched, f"--with {text}")
    return switched


def group_of_name(recipe, group_name):
    return next((i, j) for i, spec in enumerate(recipe.optimizers) for j, g in enumerate(spec.groups)
                if g.name == group_name)


def refuse_untaken_options(recipe, what):
    """SetupError for a group option its optimizer class does not take (torch.optim would keep it unread)."""
    for spec in recipe.optimizers:
        taken = set(class_defaults(spec.kind)) | set(SCHEDULE_OPTIONS)
        for g in spec.groups:
            untaken = sorted((set(spec.options) | set(g.options)) - taken)
            if untaken:
                raise SetupError(f"{what}: group {g.name} of recipe {recipe.name} goes to {spec.kind}, which has no "
                                 f"option {', '.join(untaken)}; it cannot take that technique")


@dataclass(frozen=True)
class Switched:
    """What the switches did: --aurora's choice (None without it) and the differences from the record they make."""
    aurora: dict | None = None
    differences: tuple = ()


def base_name(group):
    """A group's name before split_groups split it."""
    return group.split("[")[0]


def technique_differences(record, switched, skipped=()):
    """Each technique whose groups differ between the record's recipe and the switched one, said in a line."""
    differences = []
    for name, technique in TECHNIQUES.items():
        was, now = technique.where(record), technique.where(switched)
        if name in skipped or {base_name(g) for g in was} == {base_name(g) for g in now}:
            continue
        if not now:
            differences.append(f"without {name} (record: on {', '.join(was)})")
        else:
            differences.append(f"{name} on {', '.join(now)} (record: {'on ' + ', '.join(was) if was else 'off'})")
    return differences


def switch_names(args):
    """(--without's technique names, --with's (name, text) pairs, --set's texts) as given."""
    without = [name for text in args.without for name in text.split(",") if name]
    return without, [(text.partition(":")[0], text) for text in args.with_], list(args.set_)


def refuse_bad_switches(recipe, args):
    """One SetupError for a switch that names no technique, one the recipe lacks, or one both added and removed."""
    without, added, _ = switch_names(args)
    own = technique_names(recipe)
    for name in without:
        if name not in TECHNIQUES:
            raise SetupError(f"--without {name}: no technique of that name; recipe {recipe.name} has {', '.join(own)}")
        if name not in own:
            raise SetupError(f"--without {name}: recipe {recipe.name} does not have it; it has {', '.join(own)}")
    for name, text in added:
        if name not in TECHNIQUES:
            raise SetupError(f"--with {text}: no recipe has a technique of that name; the techniques are "
                             f"{', '.join(TECHNIQUES)}")
        if name in without:
            raise SetupError(f"{name} is in both --with and --without; give it once")
    if args.aurora is not None and "aurora" in without + [name for name, _ in added]:
        raise SetupError("--aurora chooses the matrices that take Aurora's polar; give it or --without/--with aurora, "
                         "not both")


def with_aurora(recipe, pattern, form, model):
    """--aurora PATTERN: recipe with the named matrices given Aurora's polar in record #FORM's form and every
    other matrix of its matrix optimizer the plain polar (AURORA_SWITCH), and what it chose for the log."""
    if not any(spec.kind in AURORA_SWITCH for spec in recipe.optimizers):
        raise SetupError(f"--aurora {pattern}: recipe {recipe.name} has no polar step to give Aurora's")
    record_matrices, record_backend = recipe_aurora(recipe, model)
    backend = AURORA_FORMS[form]
    matrices = aurora_matrices(pattern, matrix_shapes(model, recipe))
    switched, chosen = split_groups(recipe, matrices, pattern, [name for name, _ in model.named_parameters()])
    matched, plain = AURORA_SWITCH[switched.matrix_spec().kind]
    switched = edit_groups(switched, matrix_group_names(switched), lambda spec, g: with_options(
        g, matched(backend) if g.name in chosen else plain))
    return switched, {"pattern": pattern, "form": form, "backend": backend, "matrices": matrices,
                      "record_matrices": record_matrices, "record_backend": record_backend}


def switched_recipe(recipe, args, model):
    """The record's `recipe` (unscaled) after --aurora, --without, --with and --set, in that order, and what they
    did (Switched). model: a weightless model of the run's shapes, for the parameters' names."""
    refuse_bad_switches(recipe, args)
    without, added, constants = switch_names(args)
    switched, aurora = recipe, None
    if args.aurora is not None:
        switched, aurora = with_aurora(recipe, args.aurora, args.aurora_form, model)
    for name in [name for name in TECHNIQUES if name in without]:  # in one order, whatever the command's
        switched = TECHNIQUES[name].remove(switched)
    names = [name for name, _ in model.named_parameters()]
    for _, text in added:
        switched = with_technique(switched, text, names)
    said = []
    for text in constants:
        switched, difference = with_constant(switched, text)
        said += [difference] if difference else []
    differences = technique_differences(recipe, switched, ("aurora",) if aurora else ()) + said
    return switched, Switched(aurora, tuple(differences))


def constants_text(recipe, technique):
    """The technique's --set keys in recipe with their values, key=value (GROUP.key=value for a constant that lives
    in some of its groups only, or differs between them)."""
    shown = {}
    for constant in technique.constants:
        places = constant_places(recipe, technique, constant.key)
        values = [value_in(recipe, *place) for place in places]
        everywhere = places and (places[0][0] is None or len(places) == len(technique.where(recipe)))
        if everywhere and len({repr(value) for value in values}) == 1:
            shown.setdefault(constant.key, f"{constant.key}={values[0]!r}")
            continue
        for (group, _), value in zip(places, values):
            shown.setdefault(f"{group}.{constant.key}", f"{group}.{constant.key}={value!r}")
    return ", ".join(shown.values()) or "-"


def technique_table(recipe):
    """The recipe's techniques as a Markdown table (train_gpt.py --techniques; docs/recipes.md#techniques)."""
    lines = [f"| technique | what it does | introduced | acts on | constants (--set) | off |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in technique_names(recipe):
        technique = TECHNIQUES[name]
        lines.append(f"| {name} | {technique.does} | {technique.introduced} | {', '.join(technique.where(recipe))} | "
                     f"{constants_text(recipe, technique)} | {technique.off} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Distributed setup: torchrun (CUDA + NCCL, or CPU + gloo) or a plain single process


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    launched: bool  # under torchrun (a process group exists, even with one process)
    local_world_size: int = 1  # the processes on this node


LAUNCH_FIX = ("start under torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and "
              "MASTER_PORT, or unset them")
# How long a rank waits for the others to join its process group (torch's own default: 30 minutes, silent).
JOIN_TIMEOUT = datetime.timedelta(minutes=5)


class JoinError(SetupError):
    """A process group that did not form: reported by every rank that finds it, as its peers may never have
    started."""


def launch_number(name, default=None, highest=None):
    """A whole number torchrun sets in the environment (`default` where it may be missing), up to `highest`."""
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    if value is None or not value.isdigit() or (highest is not None and int(value) > highest):
        within = f" from 0 to {highest}" if highest is not None else ""
        raise SetupError(f"{name}={value!r} in the environment is not a whole number{within}; {LAUNCH_FIX}")
    return int(value)


def distributed_from_env():
    """This process's place in a torchrun launch, or a plain single process where RANK is not set. The
    rendezvous address (MASTER_ADDR, MASTER_PORT) must be there too."""
    if "RANK" not in os.environ:
        return Distributed(0, 1, 0, False)
    rank, world_size = launch_number("RANK"), launch_number("WORLD_SIZE")
    if rank >= world_size:
        raise SetupError(f"RANK={rank} in the environment is not below WORLD_SIZE={world_size}; {LAUNCH_FIX}")
    if not os.environ.get("MASTER_ADDR"):
        raise SetupError(f"MASTER_ADDR is not set in the environment (RANK is: a process group needs its address); "
                         f"{LAUNCH_FIX}")
    launch_number("MASTER_PORT", highest=2 ** 16 - 1)
    return Distributed(rank, world_size, launch_number("LOCAL_RANK", 0), True, launch_number("LOCAL_WORLD_SIZE", 1))


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def uses_cuda(choice):
    """--device: "auto" is CUDA when torch sees a GPU and the CPU otherwise."""
    return choice == "cuda" or (choice == "auto" and torch.cuda.is_available())


def resolve_device(choice, local_rank, local_world_size=1):
    """The device of --device `choice`; "cuda" without a usable GPU is a SetupError. Each process of a
    node takes the GPU of its LOCAL_RANK; the check uses the node's process count so that every rank
    finds the same problem (rank 0 reports it)."""
    if not uses_cuda(choice):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise SetupError(f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA GPU; "
                         f"run with --device cpu, or install a CUDA build of torch on a GPU machine")
    count, needed = torch.cuda.device_count(), max(local_rank + 1, local_world_size)
    if needed > count:
        raise SetupError(f"{needed} processes on this node need {needed} GPUs but {count} are visible: start at "
                         f"most {count} per node (torchrun --nproc_per_node={count}) or use --device cpu")
    return torch.device("cuda", local_rank)


def missing_peers(rank, world_size, problem):
    """Who did not join, as far as this rank can tell from torch's rendezvous error `problem`: rank 0 hosts the
    rendezvous and counts the ranks that reached it; any other rank sees only whether rank 0 answered."""
    if rank != 0:
        return "rank 0, which hosts the rendezvous,"
    if world_size == 2:
        return "rank 1"
    joined = re.search(r"(\d+)/\d+ clients joined", problem)
    return f"{world_size - int(joined[1]) if joined else 'some'} of ranks 1 to {world_size - 1}"


def join_process_group(dist_info, device):
    """Joins the process group (NCCL on CUDA, gloo on CPU) through torch's env:// rendezvous, waiting at most
    JOIN_TIMEOUT for the other ranks (a JoinError naming the missing ones) rather than torch's silent 30
    minutes: with RANK and WORLD_SIZE set by hand, outside torchrun, the peers may never start."""
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        store, _, _ = next(dist.rendezvous("env://", dist_info.rank, dist_info.world_size, timeout=JOIN_TIMEOUT))
    except dist.DistError as e:
        raise JoinError(f"{missing_peers(dist_info.rank, dist_info.world_size, str(e))} did not join the process "
                        f"group at {address} (MASTER_ADDR:MASTER_PORT) within {JOIN_TIMEOUT.total_seconds():g} s; "
                        f"start all {dist_info.world_size} ranks together (torchrun --nproc_per_node="
                        f"{dist_info.world_size} train_gpt.py ...), or unset RANK and WORLD_SIZE to train in one "
                        f"process") from None
    store.set_timeout(default_pg_timeout)  # every rank is there: later waits get torch's process-group default
    backend = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore("default_pg", store),
                            rank=dist_info.rank, world_size=dist_info.world_size, **backend)


def setup_device(dist_info, device):
    """Binds this process to `device` and, under torchrun, joins the process group."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist_info.launched:
        join_process_group(dist_info, device)


def leave_process_group(finished):
    """Destroys the process group, after a finished run only once every rank has finished. Why wait: a
    gloo worker thread drops a completed collective's tensors a moment after the collective completes,
    and dropping a tensor Python has seen takes the GIL. A rank that tore its group down first (rank 1
    while rank 0 writes the checkpoint) could reach ProcessGroupGloo's destructor, which joins that
    worker, holding the GIL (a deadlock), or end the interpreter under it (std::terminate: SIGABRT).
    In the barrier every rank waits with the GIL released, so its workers finish first. A failed rank
    does not wait: torchrun stops the others."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sum_gradients(process_group, bucket):
    """DDP communication hook: sums a gradient bucket over the ranks (DDP's own hook averages), so
    every rank holds the summed gradient of the whole batch, as the recipes' learning rates expect."""
    buffer = bucket.buffer()
    work = dist.all_reduce(buffer, group=process_group, async_op=True)
    return work.get_future().then(lambda _: buffer)  # the all-reduce sums in place


def distributed_model(model, device, bucket_cap_mb=25, even_alone=False):
    """The model wrapped in DistributedDataParallel when several processes train it (or, with
    even_alone, in any process group, so that one GPU runs the wrapper, hook and no_sync of eight),
    else the model.

    Why DDP rather than hand-written post-accumulate-grad hooks: under torch.compile the backward is
    one AOT graph, so per-parameter hooks would all fire at its end; DDP + torch.compile splits the
    graph at DDP's bucket boundaries (dynamo's DDPOptimizer), so each bucket's all-reduce starts as
    soon as the last micro-batch's backward has made its gradients final, eager or compiled. The
    earlier micro-batches run under no_sync (train_step). Buffers are not broadcast (the rotary
    tables are equal everywhere), gradients live in DDP's buckets (no copies)."""
    if not dist.is_initialized() or (dist.get_world_size() == 1 and not even_alone):
        return model
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers; 2.11 knows only the old name.
    options = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                  gradient_as_bucket_view=True, bucket_cap_mb=bucket_cap_mb,
                                  **{no_buffer_sync: False})
    ddp.register_comm_hook(None, sum_gradients)
    return ddp


def broadcast_parameters(model):
    if dist.is_initialized():
        for param in model.parameters():
            dist.broadcast(param.data, 0)


# ---------------------------------------------------------------------------------------------------
# Logging (docs/benchmark.md#log-format)

SEPARATOR = "=" * 100
OPTIMIZERS_IMPORT = "from optimizers import (Aurora, BiasFreeAdam, EMANesterov, Muon, MuonChain, NorMuon, ReferenceReadout, TailEMA, all_finite, contra_coefficient, early_trust_cap, early_trust_floor, piece_range, power_cool_lr, warmup_cooldown_momentum)"


def logged_source():
    """This file with the optimizers import replaced by optimizers.py itself: one runnable script. A
    script cut out of a log has no such line and logs itself unchanged."""
    with open(os.path.abspath(__file__)) as f:
        lines = f.read().splitlines(keepends=True)
    out = []
    for line in lines:
        if line.rstrip("\n") == OPTIMIZERS_IMPORT:
            with open(sys.modules["optimizers"].__file__) as f:
                inlined = f.read()
            out.append(inlined if inlined.endswith("\n") else inlined + "\n")
        else:
            out.append(line)
    return "".join(out)


def val_line(step, steps, losses, train_time, step_avg_ms, suffix=None):
    """The leaderboard's val line: losses ({name: value}, val_loss first) after the step, the times, then
    any suffix fields a record's logs carry ({name: text})."""
    fields = " ".join(f"{name}:{value:.5f}" for name, value in losses.items())
    tail = "".join(f" {name}:{text}" for name, text in (suffix or {}).items())
    return f"step:{step}/{steps} {fields} train_time:{train_time:.3f}s step_avg:{step_avg_ms:.2f}ms{tail}"


def running_line(device, world_size):
    """The leaderboard's header line; a torch built without CUDA says so instead of 'CUDA None'."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    build = f"compiled for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    return f"Running PyTorch {torch.__version__} {build} on {name} with world_size {world_size}"


LOG_ROOM_BYTES = 16 * 2 ** 20  # the log and its per-unit records (a full-size run's take about 10 MB)
LOGS_ELSEWHERE = "run from a folder whose logs/ can take it"


def existing_log(path):
    run_id = os.path.splitext(os.path.basename(path))[0]
    return SetupError(f"--run-id {run_id}: {path} exists (an earlier run's log); give another --run-id, or "
                      f"--overwrite to replace it")


def write_error(path, error, kept):
    """The WriteError of a run's file that could not be written; `kept` says what the run keeps."""
    if error.errno == errno.ENOSPC:
        return WriteError(f"no space left on device: {path} could not be written; {kept}")
    return WriteError(f"{path}: could not be written ({error.strerror or error}); {kept}")


class FileLock:
    """This process's lock on PATH.lock (fcntl.flock), held while a run writes its log or its --save checkpoints,
    so that two runs never write one file at once. The kernel drops a flock when its holder ends, however it
    ends: a run that crashed leaves at most the empty file, which the next run takes over. release() removes
    the file, and the folders made for it if they are still empty. A SetupError names `what`, and says to give
    another `other` or, where the file cannot be made, to write `elsewhere`."""

    def __init__(self, path, what, other, elsewhere):
        self.path, self.fd, self.made = path + ".lock", None, []  # made: deepest first
        home = folder = os.path.dirname(os.path.abspath(self.path))
        while not os.path.lexists(folder):
            self.made.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(home, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 32).decode(errors="replace").strip()  # its pid, once it has written it
                    os.close(fd)
                    self.release()
                    raise SetupError(f"{what}: another run{f' (process {holder})' if holder.isdigit() else ''} is "
                                     f"writing it now; give another {other}, or wait for that run to end") from None
                # A holder removes the file before it lets go: a lock on a file no longer at the path locks nothing.
                if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self.fd = fd
                else:
                    os.close(fd)
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            self.release()
            raise SetupError(f"{what}: cannot be created ({e.strerror or e}); {elsewhere}") from None

    def release(self):
        if self.fd is not None:
            os.remove(self.path)
            os.close(self.fd)
            self.fd = None
        for folder in self.made:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                os.rmdir(folder)
        self.made = []


class RunLog:
    """Rank 0's log file, written unbuffered line by line, so a crash or Ctrl-C keeps everything written so
    far and a failed write (a full disk: WriteError) leaves nothing to write again at close. Other ranks get
    a RunLog(None), which writes nothing. It holds the run's locks (FileLock), on the log and on the --save
    path, from before the log is opened until close(), so a second run with the same --run-id or --save
    stops (SetupError) instead of writing into the first's files, even with --overwrite; and the log is
    created exclusively unless `overwrite`, so a run id whose log an earlier run left is refused too."""

    def __init__(self, path, overwrite=False, save=None):
        self.path, self.file, self.locks = path, None, []
        if path is None:
            return
        try:
            self.locks.append(FileLock(path, f"the log {path}", "--run-id", LOGS_ELSEWHERE))
            if save:
                self.locks.append(FileLock(save, f"--save {save}", "--save path", "save elsewhere"))
            self.file = open(path, "wb" if overwrite else "xb", buffering=0)
        except FileExistsError:
            self.close()
            raise existing_log(path) from None
        except OSError as e:
            self.close()
            raise SetupError(f"the log {path}: cannot be created ({e.strerror or e}); {LOGS_ELSEWHERE}") from None
        except SetupError:
            self.close()
            raise

    def write(self, text, echo=True):
        if self.file is None:  # another rank's, or a log that could not be written
            return
        line = (text if text.endswith("\n") else text + "\n").encode()
        try:
            if self.file.write(line) < len(line):  # a short write: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            self.close()
            raise write_error(self.path, e, "it keeps every line written before") from None
        if echo:
            print(text, flush=True)

    def event(self, kind, payload, echo=True):
        """A `kind {json}` line: config, diag, error, interrupted, done."""
        self.write(f"{kind} {json.dumps(payload)}", echo)

    def echo(self, text):
        """A console line that is not part of the log file (rank 0 only, like the log)."""
        if self.path is not None:
            print(text, flush=True)

    def end(self, kind, payload):
        """The log's last line, an event; a log that cannot take it any more leaves the report to the caller."""
        with contextlib.suppress(WriteError):
            self.event(kind, payload)

    def close(self):
        """Closes the file and lets go of the locks."""
        if self.file is not None:
            self.file.close()
            self.file = None
        for lock in reversed(self.locks):
            lock.release()
        self.locks = []


def record_differences(hp, recipe, steps, init_from, switched=Switched()):
    """What makes this run's settings differ from the record recipe's (empty: a record run): the benchmark's
    settings, the horizon, and what the switches (--aurora, --without, --with, --set) changed."""
    record_model = dataclasses.replace(FULL.model, **recipe.model)  # a switched model option is said below
    compared = [f.name for f in dataclasses.fields(Hyperparameters)
                if f.name not in ("steps", "data_command", "data_shard_tokens")]
    record = dataclasses.replace(FULL, model=record_model)
    differences = [f"{name}={getattr(hp, name)!r} (record: {getattr(record, name)!r})"
                   for name in compared if getattr(hp, name) != getattr(record, name)]
    if steps != recipe.record_steps:
        differences.append(f"steps={steps} (record: {recipe.record_steps})")
    aurora = switched.aurora
    if aurora is not None and (aurora["matrices"] != aurora["record_matrices"] or
                               (aurora["matrices"] and aurora["backend"] != aurora["record_backend"])):
        differences.append(f"aurora={aurora['pattern']!r} in record #{aurora['form']}'s form on "
                           f"{len(aurora['matrices'])} matrices (record: {recipe.aurora[0]!r}, "
                           f"{len(aurora['record_matrices'])} matrices"
                           f"{', polar ' + aurora['record_backend'] if aurora['record_matrices'] else ''})")
    differences += switched.differences
    if init_from:
        differences.append(f"init_from={init_from!r} (record: fresh initialization)")
    return differences


# ---------------------------------------------------------------------------------------------------
# Diagnostics (docs/diagnostics.md): dead MLP neurons under three definitions on fixed val and train probes
# (and per-unit records beside the log), the scalar path (norm gains, fc biases), their fate across probes,
# the fc updates dead and live units receive, leverage of the orthogonal updates

NEARLY_DEAD_ACTIVITY = 0.001  # active on fewer than 0.1% of the probe tokens
LOW_OUTPUT_POWER = 0.01  # output power below 1% of the layer's mean
STARVED_LEVERAGE = 0.1  # l_i below 10% of the mean


def active_token_counts(preacts):
    """preacts: (..., hidden) fc outputs over a batch. Per hidden unit, the tokens with pre-activation > 0."""
    return (preacts.reshape(-1, preacts.size(-1)) > 0).sum(dim=0)


def dead_fractions_from_counts(active, tokens):
    """(dead, nearly_dead): the fractions of units active on no token, and on fewer than 0.1% of the
    `tokens` (dead included)."""
    dead = (active == 0).float().mean().item()
    nearly_dead = (active < NEARLY_DEAD_ACTIVITY * tokens).float().mean().item()
    return dead, nearly_dead


def dead_neuron_fractions(preacts):
    """preacts: (..., hidden) fc outputs over a batch. Returns (dead, nearly_dead): the fractions of
    hidden units with pre-activation > 0 on no token, and on fewer than 0.1% of tokens (dead included)."""
    return dead_fractions_from_counts(active_token_counts(preacts), preacts.numel() // preacts.size(-1))


def low_power_fraction(output_power):
    """The fraction of a layer's units whose output power is below 1% of the layer's mean."""
    return (output_power < LOW_OUTPUT_POWER * output_power.mean()).float().mean().item()


@dataclass
class FcProbe:
    """One MLP on the probe tokens."""
    active: torch.Tensor  # (hidden,) tokens on which each unit's pre-activation (fc output) is > 0
    tokens: int
    mean_input: torch.Tensor  # (dim,) the fc input averaged over the probe tokens, fp32
    input_rms: float  # RMS of the MLP's input (norm2's output) over the probe tokens and features
    output_power: torch.Tensor  # (hidden,) mean over tokens of the unit's squared output vector, fp32


@torch.no_grad()
def probe_mlps(model, inputs, micro_seqs=None):
    """One FcProbe per block over the (sequences, seq_len) `inputs`, `micro_seqs` sequences per forward
    (all at once when None). Runs the uncompiled model up to the last block (the head's logits are not
    needed); hooks sum each fc's input and output and each proj's input on the spot. A unit's output
    power is mean_t(a_ti^2) * ||proj.weight[:, i]||^2, the mean squared norm of what it adds to the MLP output."""
    layers = len(model.blocks)
    active, input_sum, input_square = [0] * layers, [0] * layers, [0] * layers
    activation_square = [0] * layers

    def on_fc(i):
        def hook(module, args, out):
            x = args[0].reshape(-1, args[0].size(-1)).double()
            active[i] = active[i] + active_token_counts(out)
            input_sum[i] = input_sum[i] + x.sum(dim=0)
            input_square[i] = input_square[i] + x.square().sum()
        return hook

    def on_proj(i):
        def hook(module, args):
            a = args[0].reshape(-1, args[0].size(-1)).double()
            activation_square[i] = activation_square[i] + a.square().sum(dim=0)
        return hook

    hooks = [hook for i, block in enumerate(model.blocks)
             for hook in (block.mlp.fc.register_forward_hook(on_fc(i)),
                          block.mlp.proj.register_forward_pre_hook(on_proj(i)))]
    try:
        for batch in inputs.split(micro_seqs or len(inputs)):
            model.features(batch)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = inputs.numel()
    dim = model.config.model_dim
    return [FcProbe(active[i], tokens, (input_sum[i] / tokens).float(),
                    math.sqrt(input_square[i].item() / (tokens * dim)),
                    (activation_square[i] / tokens).float() * block.mlp.proj.weight.float().square().sum(dim=0))
            for i, block in enumerate(model.blocks)]


def neuron_report(probes):
    """Per layer and overall (the mean over layers): the fractions of the MLP units that never fire (dead),
    fire on fewer than 0.1% of the probe tokens (nearly dead, dead included), and whose output power is
    below 1% of their layer's mean (low power)."""
    dead, nearly = zip(*[dead_fractions_from_counts(p.active, p.tokens) for p in probes])
    low = [low_power_fraction(p.output_power) for p in probes]
    report = {}
    for name, per_layer in (("dead", dead), ("nearly_dead", nearly), ("low_power", low)):
        report[f"{name}_fraction"] = sum(per_layer) / len(per_layer)
    for name, per_layer in (("dead", dead), ("nearly_dead", nearly), ("low_power", low)):
        report[f"{name}_fraction_per_layer"] = list(per_layer)
    return report


def scalar_path_report(model, probes):
    """Per layer, the parameters no matrix optimizer touches that set the MLP's pre-activations: the MLP
    input norm gains (mean, min), the fc biases (mean, min), and the RMS of the MLP input on the probe."""
    gains = [block.norm2.gains.detach().float() for block in model.blocks]
    biases = [block.mlp.fc.bias.detach().float() for block in model.blocks]
    return {"norm_gain_mean": [g.mean().item() for g in gains], "norm_gain_min": [g.min().item() for g in gains],
            "fc_bias_mean": [b.mean().item() for b in biases], "fc_bias_min": [b.min().item() for b in biases],
            "mlp_input_rms": [p.input_rms for p in probes]}


class UnitRecords:
    """Per MLP unit at every probe, for the definitions of docs/diagnostics.md and any other afterwards: the
    firing rate (fraction of probe tokens with pre-activation > 0) and the output power over the layer's
    mean (NaN where that mean is 0, as at step 0 when proj starts at zero), float16, plus each layer's mean output power; one set per probe (val, train) and trial. Written
    as <run id>.units.npz beside the log (records/stats.py load_unit_records reads it)."""

    def __init__(self, path, probe_tokens):
        self.path = path
        self.arrays = {"probe_tokens": np.array(probe_tokens)}
        self.rows = {}

    def add(self, trial, step, probes_by_name):
        self.rows.setdefault((trial, "steps"), []).append(step)
        for name, probes in probes_by_name.items():
            means = torch.stack([p.output_power.mean() for p in probes])
            self.rows.setdefault((trial, f"{name}_firing_rate"), []).append(
                torch.stack([p.active.float() / p.tokens for p in probes]).half().cpu().numpy())
            self.rows.setdefault((trial, f"{name}_power_over_layer_mean"), []).append(
                torch.stack([p.output_power / m for p, m in zip(probes, means)]).half().cpu().numpy())  # 0/0: NaN
            self.rows.setdefault((trial, f"{name}_layer_mean_power"), []).append(means.cpu().numpy())

    def save(self):
        """Rewritten whole at every probe (beside, then renamed over), so a crash or a full disk keeps the
        earlier probes."""
        arrays = dict(self.arrays)
        arrays |= {f"trial{trial}.{name}": np.stack(rows) for (trial, name), rows in self.rows.items()}
        try:
            with open(self.path + ".tmp", "wb") as f:
                np.savez_compressed(f, **arrays)
            os.replace(self.path + ".tmp", self.path)
        except OSError as e:
            raise write_error(self.path, e, "the records of the earlier probes are kept") from None
        finally:
            if os.path.lexists(self.path + ".tmp"):
                os.remove(self.path + ".tmp")


def units_path(log_path):
    """The per-unit records file of a log: logs/<run id>.units.npz beside logs/<run id>.txt."""
    return os.path.splitext(log_path)[0] + ".units.npz"


# Rows of a layer's fate tensor: one column per MLP unit.
FIRST_DEAD, REVIVALS, DEAD_AT_LAST_PROBE = 0, 1, 2


def new_fate(hidden, device):
    """The fate of a layer's units before any probe: never seen dead, never revived, not dead."""
    fate = torch.zeros(3, hidden, dtype=torch.int64, device=device)
    fate[FIRST_DEAD] = -1
    return fate


def update_fate(fate, dead, step):
    """Records one probe's dead mask in `fate` (in place): the step a unit is first seen dead, and a
    revival each time a unit dead at the last probe is alive at this one."""
    fate[FIRST_DEAD] = torch.where((fate[FIRST_DEAD] < 0) & dead, step, fate[FIRST_DEAD])
    fate[REVIVALS] += (fate[DEAD_AT_LAST_PROBE].bool() & ~dead).long()
    fate[DEAD_AT_LAST_PROBE] = dead.long()


def fate_counts(fate, step):
    """One layer's units (the neurons line counts those dead now): ever seen dead; permanent (dead at
    every probe since first seen dead, so dead now and never revived); revived (seen dead before,
    alive now); revivals (all dead-to-alive transitions so far); newly dead (first seen dead at `step`)."""
    ever = fate[FIRST_DEAD] >= 0
    dead = fate[DEAD_AT_LAST_PROBE].bool()
    return {"ever_dead": int(ever.sum()),
            "permanent": int((dead & (fate[REVIVALS] == 0)).sum()), "revived": int((ever & ~dead).sum()),
            "revivals": int(fate[REVIVALS].sum()), "newly_dead": int((fate[FIRST_DEAD] == step).sum())}


def fate_report(fates, step):
    """Unit counts per layer and, over all layers, each count of units as a fraction of the units (and
    the total number of revivals)."""
    per_layer = [fate_counts(fate, step) for fate in fates]
    units = sum(fate.size(1) for fate in fates)
    report = {f"{name}_fraction": sum(layer[name] for layer in per_layer) / units for name in per_layer[0]
              if name != "revivals"}
    report["revivals"] = sum(layer["revivals"] for layer in per_layer)
    report |= {f"{name}_per_layer": [layer[name] for layer in per_layer] for name in per_layer[0]}
    return {"units_per_layer": [fate.size(1) for fate in fates], **report}


def mean_or_none(values, mask):
    return values[mask].mean().item() if mask.any() else None


def dead_live_updates(weight_before, bias_before, weight, bias, dead, mean_input):
    """What one fc applied to its dead rows (`dead`: the units dead when `weight_before` was kept) and
    to the live ones since then: the mean norm of the row's weight change, and the mean change of
    the unit's pre-activation over the probe tokens (mean_input: their fc input), bias included."""
    delta = (weight - weight_before).float()
    norms = delta.norm(dim=1)
    preact_change = delta @ mean_input + (bias - bias_before).float()
    return {"dead_rows": int(dead.sum()), "live_rows": int((~dead).sum()),
            "dead_update_norm": mean_or_none(norms, dead), "live_update_norm": mean_or_none(norms, ~dead),
            "dead_preact_change": mean_or_none(preact_change, dead),
            "live_preact_change": mean_or_none(preact_change, ~dead)}


@dataclass
class DiagnosticsState:
    """What the diagnostics of one trial keep between probes (rank 0): each layer's fate tensor, and
    each fc's weight, bias and dead mask at the last probe."""
    trial: int
    step: int
    fates: list
    fc_weights: list
    fc_biases: list
    dead: list


def leverage_stats(leverage):
    """Leverage l_i = ||P_i||^2 of the rows of a tall orthogonal update: coefficient of variation
    (std/mean), max/min (None when a row has zero leverage) and the fraction of starved rows."""
    leverage = leverage.double()
    mean = leverage.mean()
    low = leverage.min()
    return {"cv": (leverage.std(unbiased=False) / mean).item(),
            "max_over_min": (leverage.max() / low).item() if low > 0 else None,
            "starved_fraction": (leverage < STARVED_LEVERAGE * mean).double().mean().item()}


def leverage_report(model, optimizers):
    names = {param: name for name, param in model.named_parameters()}
    report = {}
    for optimizer in optimizers:
        if hasattr(optimizer, "leverage"):
            for param, leverage in optimizer.leverage().items():
                report[names[param]] = leverage_stats(leverage)
    return report


def percentages(report):
    """'dead 35.1%' for every scalar `*_fraction` of a report, in its order (new fractions show up as added)."""
    return [f"{key[:-len('_fraction')].replace('_', ' ')} {100 * value:.1f}%" for key, value in report.items()
            if key.endswith("_fraction") and isinstance(value, (int, float))]


def mean_of_matrices(matrices, stat, group=lambda name: None):
    """{group: mean of `stat` over the matrices of that group}, skipping matrices without a number for it."""
    values = {}
    for name, stats in matrices.items():
        if isinstance(stats, dict) and isinstance(stats.get(stat), (int, float)):
            values.setdefault(group(name), []).append(stats[stat])
    return {key: sum(v) / len(v) for key, v in values.items()}


def diagnostics_summary(reports):
    """The console's one line for one validation's diagnostics, from the reports the `diag` lines log
    ({kind: report}): every fraction of the neurons, fate and unknown reports as a percentage, the
    revivals, the probes' seconds, the scalar path's means over layers, the mean leverage CV per kind of matrix (fc, proj) and the mean fc update norms of dead and
    live rows. Keys it does not know are skipped or, if fractions, shown; missing ones are left out."""
    parts = []
    for kind, report in reports.items():
        matrices = report.get("matrices") if isinstance(report.get("matrices"), dict) else {}
        if kind == "leverage":
            cvs = mean_of_matrices(matrices, "cv", group=lambda name: name.split(".")[-2] if "." in name else name)
            fields = [f"{name} {cv:.2f}" for name, cv in cvs.items()]
            label = "leverage cv "
        elif kind == "scalars":
            fields = [f"{name} {sum(report[key]) / len(report[key]):.3g}" for name, key in
                      (("norm gain", "norm_gain_mean"), ("fc bias", "fc_bias_mean"), ("input rms", "mlp_input_rms"))
                      if isinstance(report.get(key), list) and report[key]]
            label = "mlp scalars, mean over layers: "
        elif kind == "fc_updates":
            fields = [f"{row} {norm:.3g}" for row in ("dead", "live")
                      for norm in mean_of_matrices(matrices, f"{row}_update_norm").values()]
            label = "fc update norm "
        else:
            fields = percentages(report)
            if isinstance(report.get("revivals"), int):
                fields.append(f"{report['revivals']} revivals")
            if isinstance(report.get("probe_seconds"), (int, float)):
                fields.append(f"probes {report['probe_seconds']:.1f}s")
            label = "" if kind == "neurons" else f"{kind.replace('_', ' ')}: "
        if fields:
            parts.append(label + ", ".join(fields))
    return "diag: " + " | ".join(parts)


def rounded(value, digits=6):
    """`digits` significant digits: update norms can be far below 1e-6."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# Training loop (docs/benchmark.md#training-loop)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one `error:` line, like every other refusal (no usage text before it), and
    flags only in full: an abbreviation (--rec for --recipe) would slip past run.sh, which reads some flags
    itself."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="aurora")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU preset: small model on data/synthetic/ (python data/synthetic.py); "
                             "1 to 6 minutes on 2 CPU cores")
    parser.add_argument("--steps", type=int, help="training steps T (default: the recipe's; --tiny: 200)")
    parser.add_argument("--batch-seqs", type=int, metavar="N",
                        help="sequences per step over all ranks (default: the benchmark's 512; --tiny: 16); a "
                             "research knob for fewer GPUs: a multiple of the micro-batch (64; --tiny: 8) and of "
                             "the world size. The lr schedule still spans --steps; the log flags the run")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="auto (default): CUDA when torch sees a GPU, else the CPU")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialization of every trial")
    parser.add_argument("--trials", type=int, default=1, help="independent runs in this process (one compile)")
    parser.add_argument("--train-files", help="glob of train shards (default: the preset's)")
    parser.add_argument("--val-files", help="glob of val shards; the first one is used (default: the preset's)")
    parser.add_argument("--no-diagnostics", action="store_true", help="skip neuron and leverage diagnostics")
    parser.add_argument("--mlp-ratio", type=int, metavar="R",
                        help="MLP hidden width = R x model width (default 4, the benchmark's; other values are not a record)")
    parser.add_argument("--mlp", choices=MLP_KINDS, default="relu2",
                        help="the MLP: relu2 (default, the benchmark's) or swiglu (gate and up projections, the "
                             "hidden width chosen to keep the parameter count; not a record)")
    parser.add_argument("--probe-tokens", type=int, metavar="N",
                        help=f"the diagnostics probe N val tokens and N train tokens (default {PROBE_TOKENS['full']}; "
                             f"--tiny: {PROBE_TOKENS['tiny']}), in micro-batches, outside the timed region; a "
                             f"multiple of the sequence length")
    parser.add_argument("--probe-every", type=int, metavar="K",
                        help=f"probe only at validation steps that are multiples of K, and at the last step "
                             f"(default: every validation; --tiny: {PROBE_EVERY['tiny']})")
    parser.add_argument("--freeze-mlp-scalars", action="store_true",
                        help="do not train the MLP input norm gains and the MLP input biases (not a record)")
    parser.add_argument("--aurora", metavar="PATTERN",
                        help="give these matrices Aurora's row-balanced polar instead of the recipe's plain one: "
                             "none, wide, tall, all, or names such as mlp.proj or mlp.fc,mlp.proj (square matrices "
                             "stay as they are); the rest of the recipe is unchanged (not a record unless it is the "
                             "recipe's own choice)")
    parser.add_argument("--aurora-form", choices=sorted(AURORA_FORMS),
                        help="with --aurora: record #17's Aurora (2 passes, beta 0.5, Frobenius pre-norm; default) "
                             "or record #42's (3 passes, beta 0.25, Schatten-4 pre-norm)")
    parser.add_argument("--techniques", action="store_true",
                        help="print the recipe's techniques (after the switches below) as a table, then exit")
    parser.add_argument("--without", action="append", default=[], metavar="NAME[,NAME]",
                        help="leave out these techniques of the recipe (--techniques lists them): each falls back to "
                             "its plain form (not a record)")
    parser.add_argument("--with", dest="with_", action="append", default=[], metavar="NAME[:GROUPS]",
                        help="add a technique of another record, taken from the newest record that has it, on these "
                             "groups or matrices (e.g. soap:mlp, row_floor; default: every group it can act on); "
                             "repeat for several (not a record)")
    parser.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                        help="change one constant of a technique (cautious_wd=0.05, tail_ema.lambda=0.5; step "
                             "constants at the record's horizon), or a group's (mlp.lr=0.04); --techniques lists the "
                             "keys (not a record unless the value is the record's)")
    parser.add_argument("--aux-from", choices=sorted(RECIPES), metavar="RECIPE",
                        help="the AdamW groups' lrs and weight decay of RECIPE; the matrix optimizer stays "
                             "--recipe's (not a record)")
    parser.add_argument("--data-seed", type=int, metavar="S",
                        help="another train batch order and validation/probe slice, drawn from S (not a record)")
    parser.add_argument("--stop-at", type=int, metavar="S",
                        help="follow the lr schedule of --steps but stop after step S (not a record)")
    parser.add_argument("--save", metavar="PATH", help="write a checkpoint (model, optimizers, step, data "
                        "position, RNG, and their SHA-256) here at the end of a trial; refused where an earlier "
                        "run's checkpoints lie, unless --overwrite or this run resumes one of them")
    parser.add_argument("--save-every", type=int, metavar="K",
                        help="with --save: also every K steps, to PATH with .stepS before the extension")
    parser.add_argument("--keep-last", type=int, metavar="N",
                        help="with --save-every: keep only the newest N of this run's periodic checkpoints (default "
                             "2)")
    parser.add_argument("--resume", metavar="PATH", help="continue the run saved in the checkpoint PATH (same "
                        "recipe, --steps, preset, --seed, --data-seed, --aux-from, --freeze-mlp-scalars, --aurora, "
                        "--aurora-form; any world size)")
    parser.add_argument("--init-from", metavar="PATH", help="start every trial from the model weights in PATH")
    parser.add_argument("--run-id", help="log name under logs/ (default: recipe and a random id); refused if "
                                         "logs/RUN_ID.txt exists, unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the log of an earlier run with this --run-id, "
                        "and the checkpoints of an earlier run at the --save path")
    parser.add_argument("--ddp", action="store_true",
                        help="under torchrun, DistributedDataParallel and the optimizers' all-gathers even with "
                             "one process: one GPU then runs the multi-GPU code path (same results)")
    parser.add_argument("--check-args", action="store_true",
                        help="check the arguments, the checkpoints they name and the --save path without reading "
                             "data or training, then exit (0: accepted, 2: refused with an error line)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_seqs", "trials", "save_every", "keep_last", "mlp_ratio", "probe_tokens",
                 "probe_every", "stop_at"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name, highest, why in (("seed", SEED_MAX, "torch's 64-bit seeds"),
                               ("data_seed", DATA_SEED_MAX, f"a shard's batch order is seeded with S x "
                                                            f"{DATA_SEED_STRIDE} + its index, within 64 bits")):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= highest:
            parser.error(f"--{name.replace('_', '-')} must be a whole number from 0 to {highest} ({why}), got {value}")
    if args.run_id is not None and (not args.run_id or "/" in args.run_id or args.run_id.startswith(".")
                                    or not args.run_id.isprintable() or len(args.run_id.encode()) > 240):
        # (240: the longest file it names, <run id>.units.npz.tmp, stays within a file name's 255 bytes)
        parser.error(f"--run-id {args.run_id!r}: give a plain file name of up to 240 bytes, without '/' and not "
                     f"starting with '.' (the log is logs/RUN_ID.txt)")
    if args.keep_last is not None and not args.save_every:
        parser.error("--keep-last keeps the newest checkpoints of --save-every; give --save-every K too, or leave "
                     "it out")
    preset = "tiny" if args.tiny else "full"
    if args.probe_tokens is None:
        args.probe_tokens = PROBE_TOKENS[preset]
    if args.probe_every is None:
        args.probe_every = PROBE_EVERY[preset]
    if args.keep_last is None:
        args.keep_last = 2
    if args.stop_at and args.save:
        parser.error("--stop-at ends a run before its schedule does; leave out --save")
    if args.save_every and not args.save:
        parser.error("--save-every needs --save PATH")
    if args.resume and args.init_from:
        parser.error("--resume restores the weights itself; leave out --init-from")
    if args.aurora_form is not None and args.aurora is None:
        parser.error("--aurora-form picks the form of --aurora's Aurora; give --aurora PATTERN too")
    args.aurora_form = args.aurora_form or "17"
    if args.ddp and "RANK" not in os.environ:
        parser.error("--ddp needs a process group: start under torchrun, e.g. "
                     "torchrun --standalone --nproc_per_node=1 train_gpt.py --ddp")
    return args


def resolve_hyperparameters(args):
    hp = TINY if args.tiny else FULL
    overrides = {}
    if args.train_files is not None:
        overrides["train_files"] = args.train_files
    if args.val_files is not None:
        overrides["val_files"] = args.val_files
    if args.batch_seqs:
        overrides["batch_tokens"] = args.batch_seqs * hp.model.seq_len
    if args.mlp_ratio or args.mlp != hp.model.mlp:
        overrides["model"] = dataclasses.replace(hp.model, mlp_ratio=args.mlp_ratio or hp.model.mlp_ratio,
                                                 mlp=args.mlp)
    return dataclasses.replace(hp, **overrides)


def checkpoint_path(path, trial, trials):
    if trials == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.trial{trial}{ext}"


def periodic_checkpoint_path(path, step):
    root, ext = os.path.splitext(path)
    return f"{root}.step{step}{ext}"


def periodic_checkpoints(path):
    """The periodic checkpoints of `path` on disk, oldest step first."""
    root, ext = os.path.splitext(path)
    found = []
    for name in glob.glob(f"{glob.escape(root)}.step*{glob.escape(ext)}"):
        step = name[len(root) + len(".step"):len(name) - len(ext)]
        if step.isdigit():
            found.append((int(step), name))
    return [name for _, name in sorted(found)]


def earlier_checkpoints(args):
    """(files, own): the checkpoints on disk that a run saving to --save would write over or beside (each trial's
    and their periodic ones), and whether they are the run's own, as when it resumes one of them."""
    files = []
    for trial in range(args.trials):
        final = checkpoint_path(args.save, trial, args.trials)
        files += [final] * os.path.exists(final) + periodic_checkpoints(final)
    own = bool(args.resume) and any(os.path.samefile(args.resume, name) for name in files)
    return files, own


def megabytes(count):
    return count // 2 ** 20


def tensor_bytes(value):
    """The bytes of every tensor in nested dicts, lists and tuples (what torch.save writes, less a little)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    return sum(map(tensor_bytes, value)) if isinstance(value, (list, tuple)) else 0


def weight_bytes(config):
    """The bytes of the model's weights, from a weightless model."""
    with torch.device("meta"):
        return tensor_bytes(GPT(config).state_dict())


def adam_state_bytes(optimizer):
    """Bytes of an AdamW's (exp_avg and exp_avg_sq in the parameter's dtype, a float32 step) or a
    BiasFreeAdam's (exp_avg in the parameter's dtype, exp_avg_sq in float32) state: whole on every rank."""
    per_element = (lambda p: 2 * p.element_size()) if isinstance(optimizer, torch.optim.AdamW) else \
        (lambda p: p.element_size() + 4)
    steps = 4 if isinstance(optimizer, torch.optim.AdamW) else 0
    return sum(p.numel() * per_element(p) + steps for group in optimizer.param_groups for p in group["params"])


def piece_bytes(tensors, world_size, element_size=None):
    """Each rank's bytes of 1/W pieces (optimizers.piece_range) of tensors shaped like `tensors`."""
    return [sum((hi - lo) * (element_size or t.element_size())
                for t in tensors for lo, hi in [piece_range(t.numel(), rank, world_size)])
            for rank in range(world_size)]


def state_bytes_per_rank(model, recipe, optimizer_set, world_size):
    """{part: bytes on each of world_size ranks} of the optimizer state: the matrix optimizer's (its own
    plan), the Adams' (whole on every rank, as in the records), the lookahead's (previous weights and
    buffer) and the readout's (Tail-EMA float32 without the embedding; a reference) in 1/W pieces."""
    matrix = next(opt for opt in optimizer_set if isinstance(opt, tuple(MATRIX_OPTIMIZERS.values())))
    adam = sum(adam_state_bytes(opt) for opt in optimizer_set if opt is not matrix)
    params = list(model.parameters())
    averages = [[0] * world_size]
    if recipe.lookahead is not None:
        averages += [piece_bytes(params, world_size)] * 2
    if isinstance(recipe.readout, TailEMASpec):
        averages.append(piece_bytes([p for p in params if p is not model.embed.weight], world_size, 4))
    elif recipe.readout is not None:
        averages.append(piece_bytes(params, world_size))
    return {"matrix": matrix.state_bytes_per_rank(world_size), "adam": [adam] * world_size,
            "weight_averages": [sum(parts) for parts in zip(*averages)]}


def estimated_checkpoint_bytes(config, recipe):
    """About the size of one checkpoint, never less: the weights and the recipe's whole optimizer state (what
    one process keeps), from a weightless model, plus 5% and 1 MiB for the RNG states, the data position and
    the file's own structure."""
    with torch.device("meta"):
        model = GPT(config)
    state = state_bytes_per_rank(model, recipe, build_optimizers(model, recipe), 1)
    return int(1.05 * (weight_bytes(config) + sum(part[0] for part in state.values()))) + 2 ** 20


def check_memory(args, config, device):
    """The weights, their gradients and two optimizer moments must fit in the device's memory (activations
    come on top), or the run would fail after its log was opened."""
    needed = 4 * weight_bytes(config)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        flag = f"--mlp-ratio {args.mlp_ratio}: " if args.mlp_ratio else ""
        raise SetupError(f"{flag}the model's weights, gradients and optimizer moments need about "
                         f"{needed // 2 ** 30} GB, more than the {memory // 2 ** 30} GB of {device.type} memory; give "
                         f"a smaller --mlp-ratio")


def check_room(what, path, needed_bytes, elsewhere):
    """The deepest folder of `path` that exists must be a folder where a file can be made, with `needed_bytes`
    free; nothing is left behind (a temporary file is made there and removed), and missing folders are made
    only when the file is written. `what` names the file in an error, `elsewhere` says how to avoid the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        if os.path.islink(folder):  # a link to nothing: no folder can be made there
            raise SetupError(f"{what}: {folder} is a symbolic link to {os.readlink(folder)}, which does not exist; "
                             f"make that folder, or {elsewhere}")
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise SetupError(f"{what}: {folder} is a file, not a folder; {elsewhere}")
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SetupError(f"{what}: cannot write in {folder} ({e.strerror or e}); {elsewhere}") from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise SetupError(f"{what}: {folder} has {megabytes(free)} MB free, it needs about {megabytes(needed_bytes)} "
                         f"MB; free space there or {elsewhere}")


NAME_MAX = 255  # the bytes of a file name on Linux's file systems


def check_save_path(args, config, recipe, steps, log_path):
    """A --save path that the run could not write in the end is refused before anything is compiled or
    trained: a folder, this run's log, names too long, an unwritable folder, a disk without room; and one where
    an earlier run's checkpoints lie, unless --overwrite (or this run resumes one of them)."""
    path, trials = args.save, args.trials
    # A path ending in a separator, '.' or '..' names a folder even where none exists yet.
    if os.path.isdir(path) or os.path.basename(path) in ("", ".", ".."):
        raise SetupError(f"--save {path}: names a folder; give a file path such as {os.path.join(path, 'ckpt.pt')}")
    for what, other in (("log", log_path), ("per-unit records file", units_path(log_path))):
        if os.path.abspath(path) == os.path.abspath(other):
            raise SetupError(f"--save {path}: is this run's {what}; give another file path")
    longest = os.path.basename(periodic_checkpoint_path(checkpoint_path(path, trials - 1, trials), steps)) + ".tmp"
    if len(longest.encode()) > NAME_MAX:
        raise SetupError(f"--save {path}: its checkpoints' names (up to {longest!r}) are longer than the {NAME_MAX} "
                         f"bytes a file name may have; give a shorter name")
    check_room(f"--save {path}", path, estimated_checkpoint_bytes(config, recipe), "save elsewhere")
    files, own = earlier_checkpoints(args)
    if files and not own and not args.overwrite:
        listed = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise SetupError(f"--save {path}: an earlier run's checkpoints are there ({listed}); give another --save "
                         f"path, or --overwrite to replace them")


CHECKSUM = "sha256"  # the checkpoint's entry that holds checkpoint_digest of the others


def checkpoint_digest(checkpoint):
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes and every other value, sequences in
    order and dicts by key (a resumed optimizer's groups list their options in another order), so a file whose
    bytes changed after it was written (a flipped bit loads as a wrong weight) is found."""
    digest = hashlib.sha256()

    def feed(value):
        if isinstance(value, torch.Tensor):
            digest.update(f"tensor {value.dtype} {tuple(value.shape)};".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, (dict, list, tuple)):  # (an OrderedDict may load as a dict)
            items = sorted(value.items(), key=lambda item: repr(item[0])) if isinstance(value, dict) else enumerate(value)
            digest.update(f"{'dict' if isinstance(value, dict) else 'sequence'} {len(value)};".encode())
            for key, item in items:
                feed(key)
                feed(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())
    feed({name: value for name, value in checkpoint.items() if name != CHECKSUM})
    return digest.hexdigest()


def save_checkpoint(path, checkpoint):
    """Written with its checksum (checkpoint_digest) beside `path`, then renamed over it, so a failed or
    interrupted save keeps the previous one. A failure is a WriteError; torch reports a full disk as ENOSPC or
    only as a RuntimeError of its zip writer ("unexpected pos"), so the free space then decides which it was."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        torch.save({**checkpoint, CHECKSUM: checkpoint_digest(checkpoint)}, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:
        needed = tensor_bytes(checkpoint)
        full = getattr(e, "errno", None) == errno.ENOSPC or (os.path.isdir(folder)
                                                             and shutil.disk_usage(folder).free < needed)
        problem = f"no space left on device: {path} needs about {megabytes(needed)} MB" if full else \
            f"{path}: the checkpoint could not be written ({str(e).splitlines()[0]})"
        raise WriteError(f"{problem}; the file there before is kept. {'Free space' if full else 'Fix that'}, "
                         f"then --resume the newest checkpoint") from None
    finally:
        if os.path.lexists(path + ".tmp"):
            os.remove(path + ".tmp")


@dataclass
class TrialState:
    """What a trial trains with: the recipe's optimizers, its EMA-Nesterov lookahead and eval-time readout
    (None where it has none), and the train stream."""
    optimizers: list
    lookahead: EMANesterov | None
    readout: ReferenceReadout | TailEMA | None
    stream: TrainStream


def resume_settings(args):
    """The flags that set a run's course beyond its recipe, T, model and batch: a checkpoint records them and
    a run that resumes it must give the same."""
    return {"seed": args.seed, "data_seed": args.data_seed, "aux_from": args.aux_from,
            "freeze_mlp_scalars": args.freeze_mlp_scalars, "aurora": args.aurora, "aurora_form": args.aurora_form,
            **switch_settings(args)}


def switch_settings(args):
    """--without (its names, sorted), --with and --set as a checkpoint records them and a resumed run must repeat."""
    without, added, constants = switch_names(args)
    return {"without": sorted(set(without)), "with": [text for _, text in added], "set": constants}


def checkpoint_state(run, trial, step):
    """Everything a resumed run needs to continue bit-identically, plus what it must match. A collective:
    every rank calls it (state kept in pieces or by owner ranks is gathered); rank 0 gets the whole."""
    rng = {"init": run.generator.get_state(), "torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    if run.sign_generator is not run.generator:
        rng["signs"] = run.sign_generator.get_state()
    return {"model": run.raw_model.state_dict(),
            "optimizers": [getattr(opt, "gathered_state_dict", opt.state_dict)() for opt in trial.optimizers],
            "lookahead": trial.lookahead and trial.lookahead.state_dict(),
            "readout": trial.readout and trial.readout.state_dict(),
            "step": step, "steps": run.steps, "trial": run.trial, "recipe": run.recipe.name,
            "model_config": dataclasses.asdict(run.hp.model), "batch_tokens": run.hp.batch_tokens,
            **resume_settings(run.args), "stream": trial.stream.state_dict(), "rng": rng}


def save_trial_checkpoint(run, checkpoint, step, save_path):
    """The final checkpoint (the run's last step) goes to save_path; the periodic ones beside it, the newest
    --keep-last of this run's own kept (another run's, beside them under --overwrite, are left alone)."""
    if step == run.final_step:
        save_checkpoint(save_path, checkpoint)
        return
    path = periodic_checkpoint_path(save_path, step)
    save_checkpoint(path, checkpoint)
    run.own_checkpoints.add(os.path.abspath(path))
    own = [name for name in periodic_checkpoints(save_path) if os.path.abspath(name) in run.own_checkpoints]
    for old in own[:-run.args.keep_last]:
        os.remove(old)


def read_checkpoint(path):
    """torch.load of a checkpoint (tensors and plain containers only), every failure one SetupError line."""
    if not os.path.exists(path):
        raise SetupError(f"{path}: no such file")
    if os.path.isdir(path):
        raise SetupError(f"{path}: is a directory, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise SetupError(f"{path}: empty file, not a checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports a bad file in many types; its text may suggest unsafe loading
        raise SetupError(f"{path}: not a readable checkpoint ({type(e).__name__}: truncated, corrupt or not "
                         f"written by torch.save)") from None
    if not isinstance(checkpoint, dict):
        raise SetupError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint or a state dict")
    # (A bare state dict, or a checkpoint saved before checksums were written, has none to check.)
    if CHECKSUM in checkpoint and checkpoint.pop(CHECKSUM) != checkpoint_digest(checkpoint):
        raise SetupError(f"{path}: its contents do not match the checksum saved with them (the file changed after "
                         f"it was written: damaged on disk or in a copy); use another checkpoint, or copy it again")
    return checkpoint


def model_state_of(checkpoint, path):
    """The model weights of a checkpoint of this script or of a bare model state dict."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SetupError(f"{path}: holds no model state dict (a dict of tensors, or one under 'model')")
    return state


def load_model_state(model, state, path):
    """Strict load: every parameter present, none extra, every shape equal; else one line saying which."""
    try:
        with warnings.catch_warnings():  # into a meta model (check_model_state) the copy is a no-op, as meant
            warnings.filterwarnings("ignore", message=".*to a meta parameter.*")
            model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:])
        raise SetupError(f"{path}: its weights do not fit this model: {detail[:800]}") from None


def check_model_state(state, config, path):
    """load_model_state into a weightless (meta) model, so a misfit is found before anything runs. (Not
    assign=True: that model then aliases the checkpoint's tensors, and a resumed run diverged; cause not found.)"""
    with torch.device("meta"):
        model = GPT(config)
    load_model_state(model, state, path)


def check_resumable(checkpoint, path, args, recipe, steps, hp):
    """A checkpoint continues only the run it came from: the same recipe, T, model, batch and resume_settings
    (those a checkpoint holds: one saved before they were recorded leaves them to the command line), and
    only a run with steps left to train."""
    if "stream" not in checkpoint:
        raise SetupError(f"{path}: holds weights only, not a run to resume (use --init-from for weights)")
    expected = {"recipe": recipe.name, "steps": steps, "model_config": dataclasses.asdict(hp.model),
                "batch_tokens": hp.batch_tokens}
    expected |= {name: value for name, value in resume_settings(args).items() if name in checkpoint}
    differences = [f"{name} {checkpoint.get(name)!r} (this run: {value!r})"
                   for name, value in expected.items() if checkpoint.get(name) != value]
    if differences:
        raise SetupError(f"{path}: saved by a different run: {'; '.join(differences)}; resume with the saved run's "
                         f"settings")
    check_model_state(checkpoint["model"], hp.model, path)
    if checkpoint["trial"] >= args.trials:
        raise SetupError(f"{path}: saved in trial {checkpoint['trial']}, but this run has --trials {args.trials}")
    step = checkpoint["step"]
    if args.stop_at and args.stop_at <= step:
        raise SetupError(f"--stop-at {args.stop_at}: the checkpoint {path} is at step {step} already, so nothing "
                         f"would be trained; give a later step (up to --steps {steps})")
    if step == (recipe.stop or steps) and checkpoint["trial"] == args.trials - 1:
        raise SetupError(f"--resume {path}: the saved run ended there (step {step} of its last trial), so nothing "
                         f"would be trained; give a checkpoint from before its end")


def read_start_checkpoints(args, hp, recipe, steps):
    """--init-from weights and the --resume checkpoint, read and checked before anything is compiled."""
    init_weights = resume = None
    if args.init_from:
        init_weights = model_state_of(read_checkpoint(args.init_from), args.init_from)
        check_model_state(init_weights, hp.model, args.init_from)
    if args.resume:
        resume = read_checkpoint(args.resume)
        check_resumable(resume, args.resume, args, recipe, steps, hp)
    return init_weights, resume


def restore_checkpoint(run, checkpoint, trial):
    """Puts the model, optimizers, lookahead, readout, data position and RNG back as saved; returns the
    saved step."""
    path = run.args.resume
    load_model_state(run.raw_model, checkpoint["model"], path)
    if len(checkpoint["optimizers"]) != len(trial.optimizers):
        raise SetupError(f"{path}: holds {len(checkpoint['optimizers'])} optimizer states, this run has "
                         f"{len(trial.optimizers)}")
    for optimizer, state in zip(trial.optimizers, checkpoint["optimizers"]):
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError) as e:
            raise SetupError(f"{path}: its {type(optimizer).__name__} state does not fit: {e}") from None
    for name, kept in (("lookahead", trial.lookahead), ("readout", trial.readout)):
        if kept is not None:
            kept.load_state_dict(checkpoint[name])
    trial.stream.load_state_dict(checkpoint["stream"])
    run.generator.set_state(checkpoint["rng"]["init"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if run.device.type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], run.device)
    if "signs" in checkpoint["rng"]:
        run.sign_generator.set_state(checkpoint["rng"]["signs"])
    return checkpoint["step"]


@torch.no_grad()
def evaluate(model, val_buffer, layout, seq_len, val_tokens):
    """Mean token loss over the validation tokens of all ranks (docs/benchmark.md#data)."""
    total = torch.zeros((), dtype=torch.float64, device=val_buffer.device)
    for inputs, targets in micro_batches(val_buffer, seq_len, layout.micro_seqs):
        total += model(inputs, targets).double()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.item() / val_tokens


@dataclass
class Run:
    """What every trial of one process shares; `trial` and `step` say where the run is."""
    args: argparse.Namespace
    hp: Hyperparameters
    recipe: Recipe
    steps: int
    dist: Distributed
    device: torch.device
    layout: BatchLayout
    log: RunLog
    raw_model: GPT
    model: nn.Module  # the compiled raw_model (in DistributedDataParallel when several processes train)
    generator: torch.Generator  # initializations, one draw per trial
    sign_generator: torch.Generator  # record #46's gain signs: the generator itself on the CPU, a CUDA one on a GPU
    train_paths: list
    first_train_shard: torch.Tensor | None  # read before the log, until the first trial's stream takes it
    val_buffer: torch.Tensor
    probe: torch.Tensor  # the diagnostics' val probe, (sequences, seq_len) input tokens
    train_probe: torch.Tensor  # the same number of tokens from the first train shard
    probe_micro_seqs: int  # sequences per forward pass of a probe
    units: UnitRecords | None  # the per-unit records file (rank 0)
    init_weights: dict | None  # --init-from's model state
    resume: dict | None  # --resume's checkpoint, until its trial has taken it
    trial: int = 0
    step: int = 0
    diagnostics: DiagnosticsState | None = None  # what write_diagnostics keeps between probes
    first_calls_done: set = field(default_factory=set)  # what first_call has timed
    own_checkpoints: set = field(default_factory=set)  # absolute paths of the periodic checkpoints --keep-last prunes

    @property
    def final_step(self):
        """Where the run ends when --stop-at does not cut it: the recipe's stop step, or its horizon."""
        return self.recipe.stop or self.steps


def first_call(run, what, call):
    """call(); the first time `what` runs in a process that compiles, the console says that it compiles
    (torch.compile compiles a graph on its first call) and, after, how long that first call took."""
    if what in run.first_calls_done:
        return call()
    run.first_calls_done.add(what)
    if not compile_is_active():
        return call()
    run.log.echo(f"compiling the {what} with torch.compile (on its first call; minutes on a CPU) ...")
    start = time.perf_counter()
    result = call()
    run.log.echo(f"compiled the {what}: its first call took {time.perf_counter() - start:.1f}s")
    return result


def train_step(model, optimizers, params, buffer, seq_len, micro_seqs, found_inf):
    """One optimizer step: forward and backward over every micro-batch of this rank's buffer, gradients
    summed across ranks, every optimizer's step, gradients cleared. Returns the rank's summed train
    loss as a device tensor. Never waits for the device (no host sync).

    found_inf (float32, shape ()) is GradScaler's flag, here sticky: it becomes 1 at the first step whose
    loss, gradients or matrix update is not finite, and from then on fused AdamW and the matrix optimizers
    leave the weights untouched. The caller looks at it outside the timed region."""
    step_loss = torch.zeros((), device=buffer.device)
    batches = list(micro_batches(buffer, seq_len, micro_seqs))
    for index, (inputs, targets) in enumerate(batches):
        # A DistributedDataParallel model sums each gradient bucket across ranks during the last
        # micro-batch's backward; the earlier backward passes only accumulate.
        last = index == len(batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            loss = model(inputs, targets)
            loss.backward()
        step_loss += loss.detach()
    # The loss is this rank's, the gradients are summed: a non-finite loss makes every rank's gradients
    # non-finite, so all ranks agree on the flag.
    finite = all_finite([p.grad for p in params if p.grad is not None]) & step_loss.isfinite()
    found_inf.copy_(torch.where(finite, found_inf, 1.0))
    # Matrix optimizers first: a non-finite update of theirs then stops AdamW's step too.
    for optimizer in sorted(optimizers, key=lambda opt: isinstance(opt, torch.optim.AdamW)):
        optimizer.found_inf = found_inf  # GradScaler's protocol (fused AdamW reads it)
        optimizer.step()
        del optimizer.found_inf
    for p in params:
        p.grad = None
    return step_loss


def train_trial(run):
    """One run from initialization to its final step (or --stop-at), validating (and saving) outside the
    timed region."""
    hp, args, device, seq_len, recipe = run.hp, run.args, run.device, run.hp.model.seq_len, run.recipe
    initialize(run.raw_model, recipe, run.generator, run.sign_generator, args.seed)
    if run.init_weights is not None:
        load_model_state(run.raw_model, run.init_weights, args.init_from)
    broadcast_parameters(run.raw_model)
    optimizers = build_optimizers(run.raw_model, recipe)
    for optimizer in optimizers:
        if isinstance(optimizer, tuple(MATRIX_OPTIMIZERS.values())):
            optimizer.gather_alone = args.ddp  # the all-gather path even in a world of one
    params = list(run.raw_model.parameters())
    trial = TrialState(optimizers, recipe.lookahead and EMANesterov(params, recipe.lookahead.ema),
                       recipe.readout and recipe.readout.make(run.raw_model),
                       TrainStream(run.train_paths, hp.batch_tokens, run.dist.rank, run.dist.world_size,
                                   hp.model.vocab_size, pin_memory=device.type == "cuda", data_seed=args.data_seed,
                                   first_shard=run.first_train_shard))
    run.first_train_shard = None  # later trials read it again rather than keep it for the whole run
    first_step = 0
    if run.resume is not None:  # rank 0 saved it; every rank restores the same state
        first_step = restore_checkpoint(run, run.resume, trial)
        run.resume = None
    save_path = args.save and checkpoint_path(args.save, run.trial, args.trials)
    # The first step whose loss, gradients or update is not finite (-1: none), and train_step's flag;
    # both stay on the device and are looked at only outside the timed region.
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    found_inf = torch.zeros((), dtype=torch.float32, device=device)
    train_time, last_val_time, last_val_step = 0.0, 0.0, 0
    synchronize(device)
    start = time.perf_counter()
    last = args.stop_at or run.final_step
    for step in range(first_step, last + 1):
        run.step = step
        validate = validates_at(step, recipe, hp) or step == last
        save = save_path and (step == run.final_step or (args.save_every and step % args.save_every == 0
                                                         and step > first_step))
        if validate or save:
            synchronize(device)
            train_time += time.perf_counter() - start
            if int(bad_step) >= 0:
                moved = " and the lookahead's moves since" if trial.lookahead else ""
                raise NonFiniteLoss(f"train loss, gradient or update is not finite at step {int(bad_step)} "
                                    f"(trial {run.trial}); the weights are those from before that step{moved}")
            if validate:
                losses, suffix = validation_losses(run, trial, step)
                step_avg = 1000 * (train_time - last_val_time) / max(step - last_val_step, 1)
                run.log.write(val_line(step, run.steps, losses, train_time, step_avg, suffix))
                last_val_time, last_val_step = train_time, step
                if not args.no_diagnostics and run.dist.rank == 0 and (
                        step == last or not args.probe_every or step % args.probe_every == 0):
                    write_diagnostics(run, optimizers)
            if save:
                checkpoint = checkpoint_state(run, trial, step)
                if run.dist.rank == 0:
                    save_trial_checkpoint(run, checkpoint, step, save_path)
            synchronize(device)
            start = time.perf_counter()
        if step == last:
            return
        buffer = trial.stream.next_batch().to(device, dtype=torch.int64, non_blocking=True)
        set_schedules(optimizers, recipe, step)
        if trial.lookahead is not None:
            trial.lookahead.look_ahead(recipe.lookahead.stepsize_at(step, recipe))
        first_call(run, "training step", lambda: train_step(
            run.model, optimizers, params, buffer, seq_len, run.layout.micro_seqs, found_inf))
        if trial.lookahead is not None:
            trial.lookahead.accumulate()
        if trial.readout is not None:
            recipe.readout.after_step(trial.readout, step)
        bad_step = torch.where((bad_step < 0) & (found_inf > 0), step, bad_step)


def validates_at(step, recipe, hp):
    """Whether step is one of the recipe's validation steps (its record's, or the benchmark's rule)."""
    if recipe.validation is not None:
        return recipe.validation.at(step, recipe)
    return is_validation_step(step, recipe.steps, hp.val_every, hp.val_every_tail)


def validation_losses(run, trial, step):
    """(losses, suffix) of the val line of `step`: the raw val loss, and the recipe's readout and logged
    lookahead stepsize where it has them. Every loss must be finite."""
    def evaluate_now():
        return first_call(run, "validation forward", lambda: evaluate(
            run.model, run.val_buffer, run.layout, run.hp.model.seq_len, run.hp.val_tokens))

    raw = evaluate_now()
    losses, suffix = {"val_loss": raw}, {}
    if trial.readout is not None:
        losses, suffix = run.recipe.readout.losses(trial.readout, step, raw, evaluate_now)
    for name, value in losses.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{name.replace('_', ' ')} is {value} at step {step} (trial {run.trial})")
    lookahead = run.recipe.lookahead
    if lookahead is not None and lookahead.logged:
        beta = lookahead.stepsize_at(step - 1, run.recipe) if step else 0.0
        suffix = {"ema_beta": f"{beta:.5g}", **suffix}
    return losses, suffix


def write_diagnostics(run, optimizers):
    """The `diag` lines of one validation: neurons, scalars, fate, fc_updates (from the second probe of a trial
    on; docs/diagnostics.md#neuron-fate-and-what-dead-units-receive) and leverage. Keeps this trial's
    DiagnosticsState in run.diagnostics."""
    started = time.perf_counter()
    probes = probe_mlps(run.raw_model, run.probe, run.probe_micro_seqs)
    train_probes = None if run.train_probe is None else probe_mlps(run.raw_model, run.train_probe,
                                                                   run.probe_micro_seqs)
    probe_seconds = time.perf_counter() - started  # the probes end with .item(), which waits for the device
    fcs = [block.mlp.fc for block in run.raw_model.blocks]
    dead = [p.active == 0 for p in probes]
    state = run.diagnostics
    if state is None or state.trial != run.trial:  # a new trial (or a resumed one) starts afresh
        state = DiagnosticsState(run.trial, run.step, [new_fate(d.numel(), d.device) for d in dead], [], [], [])
    neurons = {"probe_tokens": run.probe.numel(), "probe_seconds": probe_seconds, **neuron_report(probes)}
    if train_probes is not None:
        neurons |= {f"train_{name}": value for name, value in neuron_report(train_probes).items()}
    reports = {"neurons": rounded(neurons), "scalars": rounded(scalar_path_report(run.raw_model, probes))}
    if run.units is not None:
        run.units.add(run.trial, run.step, {"val": probes} | ({"train": train_probes} if train_probes else {}))
        run.units.save()
    for fate, layer_dead in zip(state.fates, dead):
        update_fate(fate, layer_dead, run.step)
    reports["fate"] = rounded(fate_report(state.fates, run.step))
    if state.fc_weights:
        updates = {f"blocks.{i}.mlp.fc.weight": dead_live_updates(w, b, fc.weight, fc.bias, d, p.mean_input)
                   for i, (w, b, fc, d, p) in enumerate(zip(state.fc_weights, state.fc_biases, fcs, state.dead,
                                                            probes))}
        reports["fc_updates"] = {"since_step": state.step, "matrices": rounded(updates)}
    state.step, state.dead = run.step, dead
    state.fc_weights = [fc.weight.detach().clone() for fc in fcs]
    state.fc_biases = [fc.bias.detach().clone() for fc in fcs]
    run.diagnostics = state
    leverage = leverage_report(run.raw_model, optimizers)
    if leverage:
        reports["leverage"] = {"matrices": rounded(leverage)}
    # The JSON goes to the log file (records/stats.py reads it); the console gets one readable line.
    for kind, report in reports.items():
        run.log.event("diag", {"step": run.step, "trial": run.trial, "kind": kind, **report}, echo=False)
    run.log.echo(diagnostics_summary(reports))


def check_run(args, hp, recipe, steps, dist_info, log_path):
    """Every check of the arguments that reads no data: a usable world size and batch, the --init-from
    and --resume checkpoints, the --save path, the log's path, the device. Creates nothing. Returns (layout,
    --init-from weights, --resume checkpoint, device)."""
    ranks_are = "GPUs" if uses_cuda(args.device) else "processes"
    try:
        layout = batch_layout(hp, dist_info.world_size, ranks_are)
    except SetupError as e:
        raise SetupError(f"--batch-seqs {args.batch_seqs}: {e}" if args.batch_seqs else str(e)) from e
    final = recipe.stop or steps
    if args.save_every and args.save_every >= final:
        raise SetupError(f"--save-every {args.save_every}: no periodic checkpoint before the last step {final} (the "
                         f"final one is saved anyway); give K below it, or leave it out")
    if args.stop_at and args.stop_at > steps:
        raise SetupError(f"--stop-at {args.stop_at}: after the last step {steps}; give a step up to --steps")
    for flag, pattern in (("--train-files", args.train_files), ("--val-files", args.val_files)):
        # (Not the preset's own globs: run.sh writes their shards after --check-args.)
        if pattern is not None and not glob.glob(pattern):
            raise glob_matches_nothing(flag, pattern)
    if args.probe_tokens % hp.model.seq_len:
        raise SetupError(f"--probe-tokens {args.probe_tokens}: not a multiple of the sequence length "
                         f"{hp.model.seq_len}")
    init_weights, resume = read_start_checkpoints(args, hp, recipe, steps)
    if dist_info.rank == 0:  # the rank that writes them
        if args.save:
            check_save_path(args, hp.model, recipe, steps, log_path)
        if os.path.exists(log_path) and not args.overwrite:
            raise existing_log(log_path)
        check_room(f"the log {log_path}", log_path, LOG_ROOM_BYTES, LOGS_ELSEWHERE)
    device = resolve_device(args.device, dist_info.local_rank, dist_info.local_world_size)
    check_memory(args, hp.model, device)
    return layout, init_weights, resume, device


def check_data(args, hp, steps):
    """The data: present, valid and long enough for the steps the run trains (headers only; token ids are
    checked as each shard is loaded). Returns (train shard paths, val shard path)."""
    trained = args.stop_at or steps
    train_paths = check_train_shards(find_shards(hp.train_files, hp, trained, "train",
                                                 args.train_files is not None and "--train-files"), trained, hp)
    val_path = find_shards(hp.val_files, hp, steps, "val", args.val_files is not None and "--val-files")[0]
    if read_shard_header(val_path) < hp.val_tokens + 1:
        raise SetupError(f"{val_path}: fewer than the {hp.val_tokens + 1} tokens validation needs")
    return train_paths, val_path


def data_offsets(args, hp, val_path, first_train_path):
    """Where validation (and the val probe) and the train probe start in their shards: 0 and 0, or drawn
    from --data-seed. Checks that the probes fit, before anything is compiled."""
    seq_len, probe_tokens = hp.model.seq_len, args.probe_tokens
    needed = max(hp.val_tokens + 1, 0 if args.no_diagnostics else probe_tokens)
    val_tokens, train_tokens = read_shard_header(val_path), read_shard_header(first_train_path)
    if not args.no_diagnostics:
        for path, available in ((val_path, val_tokens), (first_train_path, train_tokens)):
            if available < probe_tokens:
                raise SetupError(f"{path}: {available} tokens, fewer than --probe-tokens {probe_tokens}; give a "
                                 f"smaller --probe-tokens")
    return (data_offset(args.data_seed, val_tokens, needed, seq_len),
            data_offset(args.data_seed, train_tokens, probe_tokens, seq_len))


def load_start_tokens(args, hp, dist_info, device, train_paths, val_path, val_start, train_probe_start):
    """What a run reads before its first step, each shard once, their token ids checked before the log is
    opened: this rank's validation tokens and (rank 0, with diagnostics) the val probe, both from where
    validation starts, and the first train shard, with the train probe sliced from it. The val shard itself is
    not kept (about 200 MB at full size). Returns (val buffer, val probe, first train shard, train probe)."""
    seq_len, vocab_size = hp.model.seq_len, hp.model.vocab_size
    val_shard = load_shard(val_path, vocab_size)
    first_train_shard = load_shard(train_paths[0], vocab_size, pin_memory=device.type == "cuda")
    val_buffer = val_slice(val_shard, hp.val_tokens, dist_info.rank, dist_info.world_size, val_start).to(device)
    probe = train_probe = None
    if not args.no_diagnostics and dist_info.rank == 0:
        probe = probe_sequences(val_shard, args.probe_tokens, seq_len, val_start).to(device)
        train_probe = probe_sequences(first_train_shard, args.probe_tokens, seq_len, train_probe_start).to(device)
    return val_buffer, probe, first_train_shard, train_probe


def compile_is_active():
    """Whether torch.compile really compiles in this process, as torch itself decides. Two switches turn
    it off in different ways: TORCH_COMPILE_DISABLE=1 sets torch._dynamo.config.disable (checked at every
    call), and TORCHDYNAMO_DISABLE=1 makes torch.compile hand back the module unwrapped."""
    probe = nn.Identity()
    return not torch._dynamo.config.disable and torch.compile(probe) is not probe


def separate_compile_cache_per_cpu_capability(environ):
    """Where ATEN_CPU_CAPABILITY forces torch's CPU kernels (`avx2` on an AVX512 CPU, say) and no
    TORCHINDUCTOR_CACHE_DIR is given, points inductor at a cache folder of that capability's own. Inductor
    takes its vector width from that variable, but its compile cache does not key on it: with torch 2.13 on
    an AVX512 CPU, a graph cached in one mode and loaded in the other had its kernels, written for one
    vector width, built for the other. They gave NaNs (AVX512 kernels with avx2 forced) or overran their
    buffers until glibc aborted the process (AVX2 kernels natively)."""
    capability = environ.get("ATEN_CPU_CAPABILITY")
    if capability and "TORCHINDUCTOR_CACHE_DIR" not in environ:
        environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                          f"torchinductor_uid{os.getuid()}_{capability}")


def compiled_if_active(module):
    """torch.compile(module) where torch compiles in this process, else the module itself, which is what
    the compiled wrapper would run (wrapping it anyway costs an uncompiled start inductor's import, over a
    second)."""
    return torch.compile(module, dynamic=False) if compile_is_active() else module


def knob_differences(args):
    """The research knobs of docs/diagnostics.md#knobs-that-separate-the-causes that this run sets."""
    knobs = [("freeze_mlp_scalars", "trained"), ("aux_from", "the recipe's own AdamW groups"),
             ("data_seed", "the shards in order, the first val tokens"), ("stop_at", "stop at step T")]
    return [f"{name}={getattr(args, name)!r} (record: {record})" for name, record in knobs
            if getattr(args, name) is not None and getattr(args, name) is not False]  # --data-seed 0 counts


def config_record(args, hp, recipe, steps, dist_info, device, layout, train_paths, val_path, run_id,
                  switched=Switched(), resume=None, activation_dtype="bfloat16"):
    differences = record_differences(hp, recipe, steps, args.init_from, switched) + knob_differences(args)
    aurora = switched.aurora
    return {"command": shlex.join([sys.executable] + sys.argv), "run_id": run_id, "recipe": recipe.name,
            "record": recipe.record, "preset": "tiny" if args.tiny else "full",
            "steps": steps, "stop": recipe.stop, "trials": args.trials, "seed": args.seed,
            "record_step": scaled_step(recipe.record_step, steps, recipe.record_steps),
            "world_size": dist_info.world_size, "device": str(device), "compiled": compile_is_active(),
            "hyperparameters": dataclasses.asdict(hp), "recipe_settings": recipe_settings(recipe),
            "aurora": aurora and {"pattern": aurora["pattern"], "form": aurora["form"],
                                  "matrices": sorted(aurora["matrices"])},
            "switches": switch_settings(args),
            "batch_seqs": hp.batch_tokens // hp.model.seq_len, "micro_batch_seqs_used": layout.micro_seqs,
            "train_shards_used": len(train_paths), "val_shard": val_path,
            "init_from": args.init_from, "resume": args.resume,
            # resume_settings that an older --resume checkpoint did not record, so could not be checked
            "resume_unchecked": [name for name in resume_settings(args) if name not in resume] if resume else None,
            "save": args.save, "save_every": args.save_every,
            "keep_last": args.keep_last, "freeze_mlp_scalars": args.freeze_mlp_scalars, "aux_from": args.aux_from,
            "data_seed": args.data_seed, "stop_at": args.stop_at,
            "diagnostics": not args.no_diagnostics, "probe_tokens": args.probe_tokens, "probe_every": args.probe_every,
            "ddp": dist_info.world_size > 1 or args.ddp, "polar_dtype": polar_dtype(recipe),
            "activation_dtype": activation_dtype,
            "is_record_recipe": not differences,
            "differs_from_record": differences}


def recipe_settings(recipe):
    """The recipe as JSON-able data for the log's config line (schedules and readouts by their fields)."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {"type": type(value).__name__, **{f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(recipe)


# The CPU preset's bf16 math (the forward's activations and the polar iterations) runs in float32 where bf16
# matmuls are slow (docs/recipes.md#cpu-kinds): without the CPU's bf16 instructions a 512 x 512 bf16 matmul cost
# 128 ms against 3.4 ms in float32, and the tiny model's forward and backward 2.06 s against 0.17 s (one
# thread, the AVX2 paths forced on an AVX512 Xeon). Full size and the records keep their bf16.
BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")


def cpu_flags():
    """The CPU's feature flags, from /proc/cpuinfo (none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.partition(":")[2].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def bf16_matmuls_are_slow(flags, environ):
    """Whether torch's CPU bf16 matmuls run without bf16 instructions: the CPU has neither avx512_bf16 nor
    amx_bf16 (AMD Zen 2 and 3, Intel before Cooper Lake), or ONEDNN_MAX_CPU_ISA keeps oneDNN, which runs
    them, below its bf16 kernels."""
    isa = environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return not flags & set(BF16_CPU_FEATURES) or not (isa == "ALL" or "BF16" in isa or "AMX" in isa)


def with_polar_dtype(recipe, dtype):
    """The recipe with its matrix optimizers' polar iterations in `dtype` (their groups' polar_dtype)."""
    def matrix_spec(spec):
        return dataclasses.replace(spec, groups=tuple(dataclasses.replace(g, options={**g.options, "polar_dtype": dtype})
                                                      for g in spec.groups))
    return dataclasses.replace(recipe, optimizers=tuple(matrix_spec(spec) if spec.kind in MATRIX_OPTIMIZERS else spec
                                                        for spec in recipe.optimizers))


def cpu_preset_dtype(args, device, flags, environ):
    """The dtype of the run's bf16 math (the forward's activations and the polar iterations): float32 for the
    CPU preset (--tiny on the CPU) where bf16 matmuls are slow; the records' bfloat16 for every other run."""
    slow = args.tiny and device.type == "cpu" and bf16_matmuls_are_slow(flags, environ)
    return "float32" if slow else "bfloat16"


def cpu_preset_recipe(recipe, dtype):
    """The recipe with the CPU preset's dtype for its polar iterations (as it is, in the records' bfloat16)."""
    return recipe if dtype == "bfloat16" else with_polar_dtype(recipe, dtype)


def polar_dtype(recipe):
    """The dtype of the recipe's polar iterations: its matrix groups' polar_dtype, else the records' bf16."""
    return next((g.options["polar_dtype"] for spec in recipe.optimizers if spec.kind in MATRIX_OPTIMIZERS
                 for g in spec.groups if "polar_dtype" in g.options), "bfloat16")


def resolve_recipe(args, hp):
    """(recipe on this run's horizon, steps, hp with the recipe's model options, Switched): --recipe with
    --aux-from, switched by --aurora, --without, --with and --set, scaled to --steps or the preset's. Refuses
    combinations the recipe cannot take (SetupError)."""
    recipe = RECIPES[args.recipe]
    if args.aux_from:
        recipe = with_aux_from(recipe, RECIPES[args.aux_from])
    with torch.device("meta"):
        model = GPT(hp.model)
    check_groups_cover(model, recipe)
    recipe, switched = switched_recipe(recipe, args, model)
    refuse_untaken_options(recipe, f"recipe {recipe.name}")
    if recipe.init is not None and hp.model.mlp != "relu2":
        raise SetupError(f"--mlp {hp.model.mlp}: recipe {recipe.name} initializes its record's relu^2 MLP (fc, proj) "
                         f"and has no draws for a SwiGLU's up projection; use --mlp relu2 (or --without record_init)")
    hp = dataclasses.replace(hp, model=dataclasses.replace(hp.model, **recipe.model))
    steps = args.steps or hp.steps or recipe.steps
    recipe = scaled_recipe(recipe, steps)
    if recipe.stop is not None and args.stop_at and args.stop_at > recipe.stop:
        raise SetupError(f"--stop-at {args.stop_at}: after recipe {recipe.name}'s own stop at step {recipe.stop} "
                         f"of {steps}; give a step up to {recipe.stop}")
    return recipe, steps, hp, switched


def counted(number, noun):
    return f"{number} {noun}{'' if number == 1 else 's'}"


def config_summary(config, log_path):
    """The console's one line for a config record; the log holds the whole JSON."""
    model = config["hyperparameters"]["model"]
    run = (f"{config['recipe']}, {config['preset']} preset, {config['steps']} steps of {config['batch_seqs']} x "
           f"{model['seq_len']} tokens, {counted(config['trials'], 'trial')}, seed {config['seed']}, "
           f"{config['device']}, world size "
           f"{config['world_size']}, {'compiled' if config['compiled'] else 'not compiled'}")
    when = f"every {config['probe_every']} steps" if config["probe_every"] else "at every validation"
    diagnostics = f"diagnostics on {config['probe_tokens']:,}-token probes {when}" if config["diagnostics"] else \
        "no diagnostics"
    differences = len(config["differs_from_record"])
    record = f"not a record ({counted(differences, 'setting')} differing)" if differences else "a record run"
    dtypes = f"activations in {config['activation_dtype']}, polar iterations in {config['polar_dtype']}" + (
        " (this CPU's bf16 matmuls are slow)" if config["activation_dtype"] == "float32" else "")
    return f"config: {run}; {diagnostics}; {dtypes}; {record}; the whole config is in {log_path}"


def main(argv=None):
    separate_compile_cache_per_cpu_capability(os.environ)
    args = parse_args(argv)
    dist_info = Distributed(0, 1, 0, False)  # until the environment is read (rank 0 reports its errors)
    try:
        dist_info = distributed_from_env()
        recipe, steps, hp, switched = resolve_recipe(args, resolve_hyperparameters(args))
        if args.techniques:
            print(f"Techniques of {recipe.name} (record {recipe.record}); docs/recipes.md#techniques\n")
            print(technique_table(recipe))
            return 0
        run_id = args.run_id or f"{recipe.name}-{uuid.uuid4()}"
        log_path = os.path.join("logs", f"{run_id}.txt")
        layout, init_weights, resume, device = check_run(args, hp, recipe, steps, dist_info, log_path)
        math_dtype = cpu_preset_dtype(args, device, cpu_flags(), os.environ)
        recipe = cpu_preset_recipe(recipe, math_dtype)
        if args.check_args:
            return 0
        train_paths, val_path = check_data(args, hp, steps)
        val_start, train_probe_start = data_offsets(args, hp, val_path, train_paths[0])
        setup_device(dist_info, device)
        val_buffer, probe, first_train_shard, train_probe = load_start_tokens(
            args, hp, dist_info, device, train_paths, val_path, val_start, train_probe_start)
        log = RunLog(log_path if dist_info.rank == 0 else None, args.overwrite, args.save)
    except SetupError as e:
        leave_process_group(finished=False)
        # Every rank finds the same problem; rank 0 reports it and fails. The others stop quietly with
        # status 0: a rank that failed first would make torchrun kill rank 0 before it had printed. (A
        # JoinError each rank reports itself: rank 0 may not be there.)
        if dist_info.rank != 0 and not isinstance(e, JoinError):
            return 0
        print(f"error: {e}", file=sys.stderr)
        return 2
    run, finished = None, False
    previous_sigterm = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        log.write(logged_source(), echo=False)
        log.write(SEPARATOR, echo=False)
        log.write(running_line(device, dist_info.world_size))
        log.write(SEPARATOR, echo=False)
        config = config_record(args, hp, recipe, steps, dist_info, device, layout, train_paths, val_path, run_id,
                               switched, resume, math_dtype)
        log.event("config", config, echo=False)
        log.echo(config_summary(config, log_path))
        raw_model = GPT(hp.model, getattr(torch, math_dtype)).to(device)
        if args.freeze_mlp_scalars:
            for param in mlp_scalars(raw_model):
                param.requires_grad_(False)
        units = UnitRecords(units_path(log.path), args.probe_tokens) if probe is not None else None
        generator = torch.Generator().manual_seed(args.seed)
        # Record #46 draws its gain signs from the run device's default generator, seeded as the record seeds it.
        sign_generator = generator if device.type == "cpu" else torch.Generator(device).manual_seed(args.seed)
        run = Run(args, hp, recipe, steps, dist_info, device, layout, log, raw_model,
                  compiled_if_active(distributed_model(raw_model, device, even_alone=args.ddp)),
                  generator, sign_generator, train_paths, first_train_shard, val_buffer, probe, train_probe,
                  hp.micro_batch_seqs, units, init_weights, resume)
        if args.save and dist_info.rank == 0:
            files, own = earlier_checkpoints(args)
            run.own_checkpoints = {os.path.abspath(name) for name in files if own}  # a resumed run's, not another's
        for trial in range(resume["trial"] if resume else 0, args.trials):
            run.trial = trial
            train_trial(run)
        done = {"trials": args.trials}
        if device.type == "cuda":
            done["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) // 2 ** 20
        log.event("done", done)
        finished = True
        return 0
    except KeyboardInterrupt as e:
        signal_name, status = ("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130)
        log.end("interrupted", {**where(run), "note": f"{signal_name}; the log is complete up to here"})
        return status
    except (NonFiniteLoss, SetupError, WriteError) as e:
        log.end("error", {**where(run), "message": str(e)})
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        log.end("error", {**where(run), "message": f"{type(e).__name__}: {e}"})
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        log.close()
        leave_process_group(finished)


def where(run):
    return {"trial": run.trial, "step": run.step} if run else {"trial": None, "step": None}


if __name__ == "__main__":
    sys.exit(main())
