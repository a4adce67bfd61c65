"""Makes the reference values that pin recipes aurora-ema-ref (record #42) and soap-muon (record #46) to
their records' own scripts. Run by hand, on a CPU, against a copy of the public script:

    python tests/data/records/make_reference.py 42 PATH/train_gpt_simple_aurora_ema_ref.py
    python tests/data/records/make_reference.py 46 PATH/train_gpt_cwd_SOTA.py

It runs the record's script itself, whole, with the patches listed in PATCHES (CPU and gloo instead of
CUDA and NCCL, a reduced model, no compile, logs in a temporary folder, synthetic batches) and one
stand-in: the model's forward pass. In training it sets every parameter's gradient to
synthetic_gradient(step, index) (index: the parameter's place in the record's model.parameters()) and
in validation it returns 0 after noting the weights being evaluated. Everything else, the training
loop included, is the record's code. Hooks on the record's optimizers note the schedules at every step,
the weights after chosen steps and the state around chosen SOAP steps. Writes record<N>.pt beside this
file (see README.md for its contents).
"""
import argparse
import copy
import datetime
import hashlib
import json
import os
import socket
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

SIZES = {  # the reduced model: (vocab, layers, width, head dim); #46's 8 layers reach its paired gains (from layer 6)
    42: dict(vocab=32, layers=2, width=16, head_dim=8),
    46: dict(vocab=32, layers=8, width=16, head_dim=8),
}
TRAJECTORY_STEPS = {  # weights after these many steps (as the validation of that step sees them before a readout)
    42: [1, 301, 1000, 1951, 2375, 2500, 2850, 2851, 2860],
    46: [1, 301, 1000, 1951, 2400, 2401, 2690, 2900],
}
SOAP_STEPS = {42: [0, 10, 2500], 46: [0, 1, 2600]}  # the first step, the first basis refresh, a late step
SOAP_MATRICES = {
    42: ["blocks.1.mlp.fc.weight", "blocks.1.mlp.proj.weight", "blocks.1.attn.v.weight"],
    46: ["blocks.7.mlp.fc.weight", "blocks.7.mlp.proj.weight", "blocks.7.attn.q.weight",
         "blocks.7.attn.proj.weight"],
}
READOUT_STEPS = {42: [2850, 2860], 46: [2500, 2690, 2900]}  # validations whose evaluated weights are kept


def synthetic_gradient(step, index, shape, dtype):
    """The gradient of parameter `index` at `step`: standard normal draws from their own seed."""
    generator = torch.Generator().manual_seed(1_000_003 * step + index)
    return torch.randn(shape, generator=generator).to(dtype)


def patches(record, size):
    """(old, new) text replacements, each of which must match exactly once."""
    common = [
        ('device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))', 'device = torch.device("cpu")'),
        ("torch.cuda.set_device(device)", "pass"),
        ('dist.init_process_group(backend="nccl", device_id=device)', 'dist.init_process_group(backend="gloo")'),
        ("torch.cuda.get_device_name(device)", "'cpu'"),
        ("model = GPT(vocab_size=50304, num_layers=12, model_dim=768).cuda()",
         f"model = GPT(vocab_size={size['vocab']}, num_layers={size['layers']}, model_dim={size['width']})"),
        ("model.compile(dynamic=False)", "pass"),
        ("def __init__(self, dim: int, head_dim=128):", f"def __init__(self, dim: int, head_dim={size['head_dim']}):"),
        ('train_loader = distributed_data_generator("data/fineweb10B/fineweb_train_*.bin", batch_size)',
         "train_loader = SYNTHETIC_BATCHES()"),
        ('val_inputs, val_targets = next(distributed_data_generator("data/fineweb10B/fineweb_val_*.bin", val_tokens))',
         "val_inputs, val_targets = SYNTHETIC_VALIDATION"),
        ("########################################\n#        Training and Validation       #",
         "INSTALL_PROBES(globals())\n########################################\n#        Training and Validation       #"),
    ]
    if record == 46:
        common += [("HEAD_DIM = 128", f"HEAD_DIM = {size['head_dim']}"),
                   ('LOG_DIR = Path("logs")', "LOG_DIR = Path(LOG_FOLDER)")]
    return common


def patched_source(path, record, size):
    with open(path) as f:
        source = f.read()
    for old, new in patches(record, size):
        if source.count(old) != 1:
            sys.exit(f"error: {path}: expected exactly one {old!r}; is this record #{record}'s script?")
        source = source.replace(old, new)
    return source


def tensor_digest(t):
    """SHA-256 of a tensor's bytes, with its dtype and shape: equal digests mean bit-for-bit equal tensors."""
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}:{tuple(t.shape)}:" + hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


class Probes:
    """What the hooks note while the record's loop runs."""

    def __init__(self, record, ns):
        self.record, self.ns = record, ns
        self.out = {"schedule": {}, "trajectory": {}, "soap": {}, "readout": {}, "validation_steps": []}
        model = ns["model"]
        self.names = [name for name, _ in model.named_parameters()]
        self.params = list(model.parameters())
        self.out["parameter_names"] = self.names
        self.out["init_digests"] = {name: tensor_digest(t) for name, t in model.state_dict().items()}
        # The weights kept: those SOAP does not touch (by the record's own should_soap_param).
        self.kept = [i for i, name in enumerate(self.names) if not ns["should_soap_param"](name)]
        model.forward = self.forward
        muon = ns["optimizer2"]
        muon.register_step_pre_hook(self.before_muon)
        muon.register_step_post_hook(self.after_muon)
        ns["optimizers"][0].register_step_post_hook(self.after_step)
        self.soap_names = {name: p for name, p in model.named_parameters() if name in SOAP_MATRICES[record]}
        self.pending = {}
        self.last_ema = None

    def step(self):
        return self.ns["step"]

    def forward(self, inputs, targets):
        step = self.step()
        if self.ns["model"].training:
            for index, p in enumerate(self.params):
                p.grad = synthetic_gradient(step, index, p.shape, p.dtype)
            return torch.zeros((), requires_grad=True)
        if not self.out["validation_steps"] or self.out["validation_steps"][-1] != step:
            self.out["validation_steps"].append(step)
        elif step in READOUT_STEPS[self.record]:  # #46's second evaluation of a step: the Tail-EMA readout
            self.out["readout"][step] = self.weights()
        if self.record == 42 and step in READOUT_STEPS[42]:  # the readout is applied before the one evaluation
            self.out["readout"][step] = self.weights()
        return torch.zeros(())

    def weights(self):
        return {self.names[i]: self.params[i].detach().clone() for i in self.kept}

    def before_muon(self, optimizer, args, kwargs):
        ns, step = self.ns, self.step()
        row = {"muon_lr": optimizer.param_groups[0]["lr"], "mu": optimizer.param_groups[0]["mu"],
               "lookahead": ns["optimizers"][0].current_lookahead_stepsize, "step_count": optimizer.step_count}
        row["adam_lr"] = [g["lr"] for g in ns["optimizer1"].param_groups]
        if self.record == 42:
            row["contra"] = ns["contra_coeff_for_step"](optimizer.step_count)
            row["ref_gamma"] = ns["ref_extrap_gamma_for_step"](step)
        else:
            row["aux_lr"] = [g["lr"] for g in ns["optimizer3"].param_groups]
            row["trust_floor"] = float(ns["bounded_trust_gate"](torch.tensor(-1.0, dtype=torch.float64), optimizer.step_count))
            row["trust_cap"] = float(ns["bounded_trust_gate"](torch.tensor(2.0, dtype=torch.float64), optimizer.step_count))
            row["tail_ema_started"] = ns["_tailema"] is not None
            self.note_tail_ema_update(step)
        self.out["schedule"][step] = row
        if step in SOAP_STEPS[self.record]:
            self.pending = {name: {"weight": p.detach().clone(), "grad": p.grad.clone(),
                                   "state": copy.deepcopy(dict(optimizer.state[p]))}
                            for name, p in self.soap_names.items()}

    def note_tail_ema_update(self, step):
        """Whether the loop's Tail-EMA update after step - 1 changed the EMA (its first averaged tensor)."""
        ema = self.ns["_tailema"]
        current = None if ema is None else next(t for t in ema if t is not None).clone()
        if step > 0:
            changed = current is not None and (self.last_ema is None or not torch.equal(current, self.last_ema))
            self.out["schedule"][step - 1]["tail_ema_updated"] = changed
        self.last_ema = current

    def after_muon(self, optimizer, args, kwargs):
        step = self.step()
        if step in SOAP_STEPS[self.record]:
            for name, p in self.soap_names.items():
                self.pending[name]["after_weight"] = p.detach().clone()
                self.pending[name]["after_state"] = copy.deepcopy(dict(optimizer.state[p]))
            self.out["soap"][step] = self.pending

    def after_step(self, optimizer, args, kwargs):
        if self.step() + 1 in TRAJECTORY_STEPS[self.record]:
            self.out["trajectory"][self.step() + 1] = self.weights()


def columns(rows):
    """{step: {key: value or list}} as {key: float64 tensor over the steps 0..} (lists: one column each)."""
    steps = sorted(rows)
    assert steps == list(range(len(steps)))
    keys = sorted({key for row in rows.values() for key in row})
    return {key: torch.tensor([rows[s].get(key, float("nan")) for s in steps], dtype=torch.float64)
            if not isinstance(rows[0][key], list) else
            torch.tensor([rows[s][key] for s in steps], dtype=torch.float64) for key in keys}


# Where a file was made, kept in made_on.json beside it: bf16 matmuls and some float32 kernels round
# differently on other CPU kinds (README.md, "Where the files were made").
MADE_ON = os.path.join(HERE, "made_on.json")
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # those that pick torch's CPU kernels
FORCING = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")  # variables that force other kernels


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def this_cpu():
    """The CPU's model name and the features of CPU_FEATURES it has (Linux's /proc/cpuinfo)."""
    with open("/proc/cpuinfo") as f:
        first = f.read().split("\n\n")[0]  # the first processor's block
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
    flags = fields.get("flags", "").split()
    return {"model": fields.get("model name", ""), "features": [f for f in CPU_FEATURES if f in flags]}


def note_where_made(target):
    """Records in made_on.json the file's SHA-256 and the CPU, torch and forced kernels that made it."""
    made_on = json.load(open(MADE_ON)) if os.path.exists(MADE_ON) else {}
    made_on[os.path.basename(target)] = {
        "sha256": file_digest(target), "made": datetime.date.today().isoformat(), "torch": torch.__version__,
        "cpu": this_cpu(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "forced": {name: os.environ[name] for name in FORCING if name in os.environ}}
    with open(MADE_ON, "w") as f:
        json.dump(made_on, f, indent=2, sort_keys=True)
        f.write("\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record", type=int, choices=sorted(SIZES))
    parser.add_argument("script", help="a copy of the record's public script")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = SIZES[args.record]
    source = patched_source(args.script, args.record, size)
    torch.set_num_threads(1)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    logs = tempfile.mkdtemp(prefix="record_reference_")
    sys.argv = [args.script, "--seed", str(args.seed)] + (["--log-dir", logs] if args.record == 42 else [])
    probes = {}

    def install(ns):
        probes["p"] = Probes(args.record, ns)

    def batches():
        while True:  # one micro-batch per step: the forward's stand-in ignores the tokens
            yield torch.zeros(64, 1, dtype=torch.int32), torch.zeros(64, 1, dtype=torch.int64)

    ns = {"__name__": "__record__", "SYNTHETIC_BATCHES": batches, "INSTALL_PROBES": install,
          "SYNTHETIC_VALIDATION": (torch.zeros(64, 1, dtype=torch.int32), torch.zeros(64, 1, dtype=torch.int64)),
          "LOG_FOLDER": logs}
    exec(compile(source, args.script, "exec"), ns)
    out = probes["p"].out
    horizon = ns["train_steps"]
    if args.record == 46:  # the update after the last step the loop trained
        probes["p"].note_tail_ema_update(max(out["schedule"]) + 1)
    # The steps the loop did not reach (record #42 stops at 2860 of its 2900): the record's set_hparams.
    later = {}
    for step in range(max(out["schedule"]) + 1, horizon):
        ns["set_hparams"](step)
        later[step] = {"muon_lr": ns["optimizer2"].param_groups[0]["lr"], "mu": ns["optimizer2"].param_groups[0]["mu"],
                       "adam_lr": [g["lr"] for g in ns["optimizer1"].param_groups]}
        if args.record == 46:
            later[step]["aux_lr"] = [g["lr"] for g in ns["optimizer3"].param_groups]
    out["schedule"] = columns(out["schedule"] | later)
    out["seed"], out["size"], out["horizon"] = args.seed, size, horizon
    if args.record == 42:
        out["reference_captured_step"] = ns["ref_extrap_captured_step"]
    target = os.path.join(HERE, f"record{args.record}.pt")
    torch.save(out, target)
    note_where_made(target)
    print(f"wrote {target} ({os.path.getsize(target)} bytes): {len(out['schedule'])} steps of schedules, "
          f"trajectory at {sorted(out['trajectory'])}, SOAP steps {sorted(out['soap'])}, "
          f"validations at {len(out['validation_steps'])} steps")


if __name__ == "__main__":
    main()
