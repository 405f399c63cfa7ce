"""Shared fixtures. Real models only: the bundled SmolLM2 (converted once into the cache dir) and a tiny
random Llama that reuses its tokenizer, for tests that need speed rather than quality."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

# Set here, before any test module loads torch: `import advantage` sets nothing (advantage.environment).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# dtype="auto" means fp32 in the tests on any machine (a GPU box included): their tolerances are fp32's. The
# bf16 paths have tests of their own that ask for it.
os.environ.setdefault("ADVANTAGE_DTYPE", "float32")


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The bundled SmolLM2, or the directory in ADVANTAGE_TEST_MODEL_DIR: a machine without the bundled GGUF
    (a GPU box) gives a directory with SmolLM2's config and tokenizer files there (its weights may be
    random: tests that need the real model's quality then fail, the others run)."""
    override = os.environ.get("ADVANTAGE_TEST_MODEL_DIR")
    if override:
        return Path(override)
    from advantage.engine.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64) with SmolLM2's tokenizer and chat template: ~16 MB, fast."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the engines a module starts (a thread reads the setting on its first op).

    On a shared two-core box, two OpenMP threads spin at every barrier whenever another process holds a
    core: a 1 s request then takes 15-50 s at random. One thread is slower on an idle box but steady.
    Use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _live_weights() -> tuple[int, float]:
    """Live torch modules that hold parameters, and the MB of those parameters (shared storage counted once)."""
    import gc

    import torch

    gc.collect()
    seen: set[int] = set()
    mods = 0
    nbytes = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Module) and obj.__class__.__name__.endswith("ForCausalLM"):
            mods += 1
            for p in obj.parameters():
                ptr = p.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    nbytes += p.untyped_storage().nbytes()
    return mods, nbytes / 2**20


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """With ADVANTAGE_TEST_MEMLOG=FILE, after each test module: the process's RSS and the causal LMs still
    alive (a test that leaves a backend open keeps its model's weights for the rest of the run)."""
    yield
    path = os.environ.get("ADVANTAGE_TEST_MEMLOG")
    if not path or (nextitem is not None and nextitem.path == item.path):
        return
    mods, mb = _live_weights()
    with open(path, "a") as f:
        f.write(f"{item.path.name}\trss_mb={_rss_mb():.0f}\tlive_lms={mods}\tlive_lm_mb={mb:.0f}\n")



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each schemathesis operation's item (tests/test_fuzz.py) gets its operation in its node id.

    schemathesis names them `test_no_server_error[POST /v1/chat/completions]`, but pytest 9 builds a node id
    from a test's original name and parametrization only, so all 25 had the function's id, and pytest-xdist's
    `--dist loadfile` (`make test`) queues tests by node id: it ran one operation of the 25."""
    for item in items:
        if type(item).__name__ == "SchemathesisFunction" and "[" not in item.nodeid:
            item._id = item._id.with_params(item.name.partition("[")[2].removesuffix("]"))  # pytest 9's NodeId
    twice = sorted(nodeid for nodeid, n in Counter(item.nodeid for item in items).items() if n > 1)
    if twice:  # pytest-xdist would run one of each and report nothing about the rest
        raise pytest.UsageError(f"Tests share a node id, and make test's workers would run only one: {twice}")
