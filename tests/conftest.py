"""Shared fixtures: tiny real checkpoints written once per test session."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def blip2_opt_dir(tmp_path_factory) -> Path:
    """Official-format `Blip2ForConditionalGeneration` checkpoint, OPT LLM."""
    return tiny.save_official_blip2(tmp_path_factory.mktemp("blip2-opt"), "opt")


@pytest.fixture(scope="session")
def blip2_llama_dir(tmp_path_factory) -> Path:
    """Official-format `Blip2ForConditionalGeneration` checkpoint, Llama LLM."""
    return tiny.save_official_blip2(tmp_path_factory.mktemp("blip2-llama"), "llama")


@pytest.fixture(scope="session")
def instructblip_dir(tmp_path_factory) -> Path:
    """Official-format `InstructBlipForConditionalGeneration` checkpoint, Llama LLM."""
    return tiny.save_official_instructblip(tmp_path_factory.mktemp("instructblip"))


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """A `vlm` checkpoint with a chat-template Llama LLM."""
    return tiny.save_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box they lose 5x to contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
