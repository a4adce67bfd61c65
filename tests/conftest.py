import os
import signal
import sys

# Tests import the project's top-level modules (optimizers, train_gpt, data/, records/) by path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt  # noqa: E402

# Before torch._dynamo's import fixes inductor's cache folder, for this process and those the tests start: a
# suite run with the AVX2 paths forced (.ci/run's second pass) must neither load what a native run cached nor
# leave it kernels.
train_gpt.separate_compile_cache_per_cpu_capability(os.environ)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch._inductor.config  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `cuda` cleanly on machines without a GPU (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def process_settings():
    """What one test could change for every test after it in this process."""
    return {"torch._dynamo.config": torch._dynamo.config.get_config_copy(),
            "torch._inductor.config": torch._inductor.config.get_config_copy(),
            "torch threads": torch.get_num_threads(), "cwd": os.getcwd(),
            # Not pytest's own variable, nor the private ones a library sets for itself (inductor's, on compiling).
            "environment": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST" and k[0] != "_"},
            "SIGTERM handler": signal.getsignal(signal.SIGTERM), "SIGINT handler": signal.getsignal(signal.SIGINT)}


@pytest.fixture(autouse=True)
def settings_restored():
    """Every test leaves the process as it found it, so the suite passes in any order and for any marker
    selection (a compile setting left on once failed three later tests, but only under -m slow)."""
    before = process_settings()
    yield
    after = process_settings()
    changed = {name: sorted(key for key in before[name].keys() | after[name].keys()
                            if before[name].get(key) != after[name].get(key))
               if isinstance(before[name], dict) else (before[name], after[name])
               for name in before if before[name] != after[name]}
    assert not changed, f"the test left these settings changed: {changed}"
