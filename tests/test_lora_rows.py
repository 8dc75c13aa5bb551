"""Each batch row through its own LoRA (`vlm/engine/lora_rows.py`) against peft's own forward on the
same weights: rows of two adapters of different ranks and targets, and of the base, in one batch."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from vlm.engine.lora_rows import BASE, LoraRows
from vlm.errors import VLMError

NAMES = ["a0", "a1", BASE, "a0", "a1"]  # not grouped: runs of one row each


def two_adapters(kind: str, dtype: torch.dtype = torch.float32, **extra):
    """A tiny LLM with LoRA `a0` (rank 4, every Linear) and `a1` (rank 8, attention only), random B."""
    torch.manual_seed(0)
    if kind == "opt":  # OPT flattens (rows, tokens) before its MLP
        llm = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                       num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))
    else:
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = get_peft_model(llm.to(dtype).eval(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False, **extra), adapter_name="a0")
    model.add_adapter("a1", LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.set_adapter("a0")
    return model.eval()


def peft_row(model, ids: torch.Tensor, name: str) -> torch.Tensor:
    """One row's logits from peft itself, its adapter made the active one (or all off)."""
    if name == BASE:
        with model.disable_adapter():
            return model(input_ids=ids).logits
    model.set_adapter(name)
    try:
        return model(input_ids=ids).logits
    finally:
        model.set_adapter("a0")


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("tokens", [1, 6])  # a decode step, a prompt
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: float32 LoRA (peft upcasts it)
@torch.inference_mode()
def test_each_row_gets_what_peft_gives_it_alone(kind, tokens, dtype):
    """To float32 rounding (one fused addmm instead of peft's matmul, scale and add); in bf16 the
    same as peft's one-adapter forward, the LoRA added in float32 and rounded once. (peft's own
    mixed batch, `adapter_names`, rounds a bf16 row's LoRA output before adding it, so it differs
    from what the row gets alone by up to 2e-3 on these weights.)"""
    model = two_adapters(kind, dtype)
    ids = torch.randint(4, 64, (len(NAMES), tokens))
    with LoraRows.of(model).use(NAMES):
        mixed = model(input_ids=ids).logits
    assert mixed.dtype == dtype
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[i:i + 1], peft_row(model, ids[i:i + 1], name), rtol=0,
                                   atol=1e-6 if dtype == torch.float32 else 1e-3)
    # The adapters really differ, so a row through the wrong one would be caught.
    assert (peft_row(model, ids[:1], "a0") - peft_row(model, ids[:1], "a1")).abs().max() > 1e-2


@torch.inference_mode()
def test_outside_a_batch_and_inside_disable_adapter_the_model_is_plain_peft():
    model = two_adapters("opt")
    ids = torch.randint(4, 64, (2, 4))
    before = model(input_ids=ids).logits
    rows = LoraRows.of(model)
    with rows.use(["a1", "a1"]):
        inside = model(input_ids=ids).logits
    torch.testing.assert_close(inside, peft_row(model, ids, "a1"), rtol=0, atol=1e-5)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # a0 again, once each
    with model.disable_adapter(), rows.use(["a0", "a1"]):
        base = model(input_ids=ids).logits
    torch.testing.assert_close(base, peft_row(model, ids, BASE), rtol=0, atol=0)
    assert LoraRows.of(model) is rows  # one set of hooks per model, however many engines use it
    gone = weakref.ref(model)
    del model, rows
    gc.collect()
    assert gone() is None  # the hooks do not keep the model alive


def test_adapters_it_cannot_batch_are_refused_by_name():
    model = two_adapters("llama", use_dora=True)
    with pytest.raises(VLMError, match=r"'a0' on .*q_proj.*DoRA.*vlm export --merge-lora"):
        LoraRows.of(model).refresh()


@torch.inference_mode()
def test_running_batch_keeps_each_adapters_rows_together(blip2_opt_dir):
    """Rows join next to their adapter's rows (their KV cache inserted mid-batch), and each row
    decodes what it decodes alone."""
    from vlm import load_pretrained
    from vlm.engine.adapters import AdapterRouting
    from vlm.engine.decode import RunningBatch, Sequence
    from vlm.engine.encode import Encoded
    from vlm.engine.request import GenerationSettings, Request, Stream

    model, processor = load_pretrained(str(blip2_opt_dir), device="cpu")
    torch.manual_seed(0)
    lora = dict(target_modules=r".*language_model.*\.(q_proj|v_proj|fc1)", init_lora_weights=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, **lora), adapter_name="a0")
    model.add_adapter("a1", LoraConfig(r=8, lora_alpha=16, **lora))
    model.eval()
    routing, tokenizer = AdapterRouting(model), processor.tokenizer
    prompts = [[5, 9, 14], [7, 3, 11, 2], [12, 8], [4, 6, 10, 13, 5], [9, 9]]
    adapters = ["a0", "a1", BASE, "a0", "a1"]

    def sequence(i: int) -> Sequence:
        stream = Stream(Request("q", settings=GenerationSettings(max_new_tokens=6, min_new_tokens=6)))
        return Sequence(stream, Encoded(prompts[i], None), [], tokenizer, max_length=64, adapter=adapters[i])

    def decode(indices: list[int]) -> tuple[list[str], dict[int, list[int]]]:
        batch, seqs = RunningBatch(model, routing), {i: sequence(i) for i in indices}
        for seq in seqs.values():
            assert not batch.prefill(seq)
        order = [seq.adapter for seq in batch.seqs]
        for _ in range(5):
            batch.step()
        return order, {i: seq.tokens for i, seq in seqs.items()}

    order, together = decode(list(range(len(prompts))))
    assert order == ["a0", "a0", "a1", "a1", BASE]
    for i in range(len(prompts)):
        assert together[i] == decode([i])[1][i], adapters[i]
    assert len({tuple(tokens) for tokens in together.values()}) > 1


@torch.inference_mode()
def test_a_layer_that_regroups_the_rows_gets_the_lora_of_a_one_adapter_batch_and_refuses_a_mixed_one():
    """A layer whose input rows are not whole batch rows (an MoE's experts see a subset of the
    tokens): one adapter for every row still reaches every token; a mixed batch is a VLMError,
    never a wrong row."""
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                           LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), adapter_name="a0")
    model.add_adapter("a1", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(5, 8)  # 5 tokens for a batch of 2
    rows = LoraRows.of(model)
    with rows.use(["a1", "a1"]):
        ours = model(x)
    model.set_adapter("a1")
    torch.testing.assert_close(ours, model(x), rtol=0, atol=1e-6)
    with pytest.raises(VLMError, match="sees 5 rows for a batch of 2"), rows.use(["a0", "a1"]):
        model(x)
