"""Released means freed: a model is gone as soon as its last owner is deleted, with no garbage
collector run (no reference cycle through engine callbacks), so a server that unloads a model or a
benchmark that moves to the next one gets the memory back at once."""

from __future__ import annotations

import contextlib
import gc
import weakref

import peft  # noqa: F401 - imported here, not first inside a test: its import leaves cyclic garbage
import pytest
import tiny

from vlm import load_pretrained
from vlm.engine import GenerationSettings, InferenceEngine, Request

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHORT = GenerationSettings(max_new_tokens=2)


@contextlib.contextmanager
def no_collector():
    """Nothing in the block is freed by the cycle collector: what dies there died by refcount."""
    gc.collect()  # earlier tests' garbage must not run a collection in the middle of ours
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_engine_frees_its_model_on_del(blip2_opt_dir):
    model, processor = load_pretrained(str(blip2_opt_dir), device="cpu")
    with no_collector():
        engine = InferenceEngine(model, processor, max_batch_size=2)
        engine.generate([Request("a photo of", [tiny.random_image(0)], SHORT)])
        engine.submit(Request("a photo of", [tiny.random_image(1)], SHORT)).result()
        engine.close()  # the scheduler thread holds the engine until it ends
        ref = weakref.ref(model)
        del model, processor, engine
        assert ref() is None
