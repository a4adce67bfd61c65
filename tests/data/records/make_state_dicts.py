"""Makes before_the_chain.pt: optimizer state_dicts written by optimizers.py as it was before the one chain
(the classes Muon, NorMuon, Aurora on one design and MuonChain on another), for the test that an old
checkpoint still loads. Run by hand, on a CPU, with the old file's path (git show 1226797:optimizers.py):

    python tests/data/records/make_state_dicts.py PATH/optimizers.py

For each optimizer below: 9 matrices of make_problem's shapes, 3 steps of fixed gradients, eagerly, in
one process and one thread. The file holds the weights at the start, the gradients, the CPU kind it was
made on (torch's CPU capability: bf16 matmuls round differently on AVX2 and AVX512) and, per optimizer,
its constructor's arguments, the state_dict and the weights after 2 steps, and the weights after the third.
"""
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(48, 16), (48, 16), (48, 16), (16, 48), (16, 48), (24, 24), (24, 24), (24, 24), (32, 24)]
SOAP = dict(beta2=0.90, frequency=1, denom_power=0.50)
OPTIMIZERS = {  # name: (class, constructor arguments); the MuonChain ones are records #42's and #46's stages
    "muon": ("Muon", dict(lr=0.025, weight_decay=0.05)),
    "normuon": ("NorMuon", dict(lr=0.035, weight_decay=0.025)),
    "aurora": ("Aurora", dict(lr=0.0375, contra=0.4, uw_floor=0.35)),
    "muon-chain-42": ("MuonChain", dict(lr=0.0375, soap=dict(SOAP, frequency=2), contra_muon=True, contra=-0.2,
                                        normuon_beta2=1.0, radial_brake=(0.5, 1.0), floor=("scalar", 0.3825),
                                        polar_backend="aurora_schatten")),
    "muon-chain-46": ("MuonChain", dict(lr=0.0375, soap=SOAP, soap_combine="trust_gate",
                                        trust=dict(min_agree=0.20, min_grad_align=0.0, power=1.0),
                                        trust_floor=0.45, trust_cap=0.85, radial_brake=(0.5, 1.0),
                                        floor=("row", 0.3825, 1.0), cautious_weight_decay=0.025)),
}


def main(path):
    spec = importlib.util.spec_from_file_location("old_optimizers", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True
    gen = torch.Generator().manual_seed(0)
    weights = [0.1 * torch.randn(*s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(*s, generator=gen) * torch.logspace(-2, 1, s[0])[:, None] for s in SHAPES] for _ in range(3)]
    out = {"cpu": torch.backends.cpu.get_cpu_capability(), "torch": str(torch.__version__), "weights": weights,
           "grads": grads}
    for name, (cls, arguments) in OPTIMIZERS.items():
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = getattr(old, cls)(params, **arguments)
        for step, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
            if step == 1:
                state_dict = opt.state_dict()
                saved = {"state_dict": {"state": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                                                  for i, s in state_dict["state"].items()},
                                        "param_groups": state_dict["param_groups"]},
                         "weights_after_2": [p.detach().clone() for p in params]}
        out[name] = {"class": cls, "arguments": arguments, "weights_after_3": [p.detach().clone() for p in params],
                     **saved}
    torch.save(out, os.path.join(HERE, "before_the_chain.pt"))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isfile(sys.argv[1]):
        sys.exit("error: give the path of optimizers.py as it was before the one chain (git show 1226797:optimizers.py)")
    main(sys.argv[1])
