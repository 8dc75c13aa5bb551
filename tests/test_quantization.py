"""4-bit / 8-bit loading quantizes the LLM only (bitsandbytes' CPU backend; widths multiple of 64)."""

import pytest
import torch

import tiny
from vlm import load_pretrained

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def wide_vlm_dir(tmp_path_factory):
    return tiny.save_tiny_vlm(tmp_path_factory.mktemp("wide"), width=64)


def test_4bit_quantizes_llm_linears_only(wide_vlm_dir):
    model, processor = load_pretrained(wide_vlm_dir, quantization="4bit", device="cpu")
    llm_linears = {
        name: type(module) for name, module in model.language_model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    assert llm_linears and all(cls is bnb.nn.Linear4bit for cls in llm_linears.values()), llm_linears
    for part in (model.vision_model, model.qformer, model.language_projection):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in part.modules())
    assert model.qformer.layernorm.weight.dtype == torch.float32
    assert model.query_tokens.dtype == torch.float32
    assert next(model.vision_model.parameters()).dtype in (torch.float32, torch.bfloat16)

    batch = processor(images=[tiny.random_image(0)], text=["a photo of"])
    out = model.generate(**batch, max_new_tokens=5)
    assert out.shape[1] > batch["input_ids"].shape[1]
    # 4-bit weights are a lossy copy of the full-precision ones: logits are close, not equal.
    full, _ = load_pretrained(wide_vlm_dir, device="cpu")
    with torch.no_grad():
        q = model(**batch).logits[0, -1]
        f = full(**batch).logits[0, -1]
    assert not torch.equal(q, f)
    # Random weights through two layers amplify NF4's error; far from random (cosine ~0) all the same.
    assert torch.nn.functional.cosine_similarity(q, f, dim=0) > 0.5
    # One layer alone: NF4 keeps a linear layer's output within ~10% of the original.
    x = torch.randn(8, 64)
    with torch.no_grad():
        quantized = model.language_model.model.layers[0].self_attn.q_proj(x).float()
        original = full.language_model.model.layers[0].self_attn.q_proj(x)
    assert (quantized - original).norm() / original.norm() < 0.15


def test_unknown_quantization_is_a_clear_error(wide_vlm_dir):
    from vlm import VLMError

    with pytest.raises(VLMError, match="--quantization must be one of 4bit, 8bit, none; got '3bit'"):
        load_pretrained(wide_vlm_dir, quantization="3bit")
