"""Fixtures for the vLLM integration tests (real vLLM 0.29 on CPU).

The whole directory is skipped, with the reason printed, only when ``import vllm``
fails (the base install has no ``vllm`` extra). Everything else must run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

try:
    # A submodule, not bare `import vllm`: without vLLM installed, this directory
    # itself (tests/vllm, no __init__.py) would import as a namespace package `vllm`.
    import vllm.v1.core.sched.async_scheduler  # noqa: F401
except Exception as exc:  # ImportError, or a broken torch/vLLM install
    pytest.skip(
        f"tests/vllm skipped: `import vllm` failed ({exc!r}); install the vllm extra to run them",
        allow_module_level=True,
    )

#: a tiny llama: the shapes vLLM needs, nothing to load (SimulatedExecutor has no model)
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 2048,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the tiny llama's ``config.json``."""
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path
