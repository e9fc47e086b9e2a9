"""Test configuration shared by every test file.

Loaded for tests/ and bench/ alike. Without a GPU, Triton kernels run under the interpreter; TRITON_INTERPRET must be set
before any kernel module is imported, so it is set here, at collection time.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter computes bf16 on bit patterns; tests/interpreter_bf16.py makes it compute
    # on values, so the bf16 paths of the kernels are checked on the CPU too.
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))
    import interpreter_bf16

    interpreter_bf16.install()

# Deterministic CPU numerics and a bounded thread count on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests/benchmarks marked slow (full model configuration on CPU)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny SIPL-PromptIR checkpoint whose dictionaries are not zero (so refinement steps differ)."""
    from sipl_fast import SIPLPromptIR
    from sipl_fast.checkpoint import save_weights

    torch.manual_seed(0)
    model = SIPLPromptIR.from_preset("tiny")
    with torch.no_grad():
        for k in (1, 2, 3):
            getattr(model, f"privileged_dictionary{k}").normal_(std=0.1)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.safetensors"
    save_weights(path, model.state_dict(), model.config)
    return path
