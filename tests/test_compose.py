"""`vlm build`: composed models (CLIP/SigLIP/DINOv2 x Llama/Qwen2/OPT) train, save, reload, generate."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny
from vlm import load_pretrained
from vlm.build import compose_model


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    paths = {kind: tiny.save_vision_part(root / kind, kind) for kind in ("clip", "siglip", "dinov2")}
    paths |= {kind: tiny.save_llm_part(root / kind, kind) for kind in ("llama", "qwen2", "opt")}
    (root / "bert").mkdir()
    paths["bert"] = tiny.make_bert(root / "bert")
    return paths


@pytest.mark.parametrize("vision", ["clip", "siglip", "dinov2"])
@pytest.mark.parametrize("llm", ["llama", "qwen2", "opt"])
def test_composed_model_trains_saves_reloads_generates(parts, vision, llm, tmp_path):
    torch.manual_seed(0)
    model, processor = compose_model(str(parts[vision]), str(parts[llm]), str(parts["bert"]), num_query_tokens=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("query_tokens", "qformer.", "language_projection.")) for n in trainable)

    batch = processor(images=[tiny.random_image(0), tiny.random_image(1)], text=["a photo of", "a blue square"])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[batch["input_ids"] == processor.image_token_id] = -100
    model.train()
    frozen_before = model.language_model.lm_head.weight.clone()
    bridge_before = model.language_projection.weight.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(bridge_before, model.language_projection.weight)  # the bridge trained
    assert torch.equal(frozen_before, model.language_model.lm_head.weight)  # the LLM did not

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reprocessor = load_pretrained(tmp_path)
    saved = model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, saved[name]), name
    model.eval()
    expected = model.generate(**batch, max_new_tokens=5)
    assert torch.equal(reloaded.generate(**reprocessor(images=[tiny.random_image(0), tiny.random_image(1)],
                                                       text=["a photo of", "a blue square"]), max_new_tokens=5),
                       expected)
    new_tokens = expected[:, batch["input_ids"].shape[1]:]
    assert new_tokens.shape[1] >= 1
    # Each row has 5 new tokens, or stopped early at EOS (and was padded after it).
    eos = reloaded.generation_config.eos_token_id
    for row in new_tokens:
        assert len(row) == 5 or eos in row.tolist()


def test_qformer_initialised_from_bert_as_blip2(parts):
    from transformers import AutoModel

    model, _ = compose_model(str(parts["clip"]), str(parts["llama"]), str(parts["bert"]), num_query_tokens=4)
    bert = AutoModel.from_pretrained(parts["bert"]).state_dict()
    q = model.qformer.state_dict()
    for layer in range(2):
        b, f = f"encoder.layer.{layer}.", f"encoder.layer.{layer}."
        assert torch.equal(q[f + "attention.attention.query.weight"], bert[b + "attention.self.query.weight"])
        assert torch.equal(q[f + "attention.output.dense.weight"], bert[b + "attention.output.dense.weight"])
        # The query FFN is a copy of BERT's text FFN.
        assert torch.equal(q[f + "intermediate_query.dense.weight"], bert[b + "intermediate.dense.weight"])
        assert torch.equal(q[f + "output_query.LayerNorm.weight"], bert[b + "output.LayerNorm.weight"])
    assert torch.equal(q["layernorm.weight"], bert["embeddings.LayerNorm.weight"])
    # Cross-attention reads the vision width and starts fresh.
    assert q["encoder.layer.0.crossattention.attention.key.weight"].shape[1] == 32


def test_instruction_aware_qformer_reads_the_prompt(parts, tmp_path):
    model, processor = compose_model(
        str(parts["dinov2"]), str(parts["llama"]), str(parts["bert"]), num_query_tokens=4,
        qformer_reads_instruction=True,
    )
    image = tiny.random_image(0)
    a = processor(images=[image], text=["what colour is the shape?"])
    b = processor(images=[image], text=["is there a cat?"])
    assert "qformer_input_ids" in a
    fa = model.get_image_features(a["pixel_values"], qformer_input_ids=a["qformer_input_ids"])
    fb = model.get_image_features(b["pixel_values"], qformer_input_ids=b["qformer_input_ids"])
    assert not torch.allclose(fa, fb)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reprocessor = load_pretrained(tmp_path)
    assert reprocessor.qformer_tokenizer is not None
    assert torch.equal(model.generate(**a, max_new_tokens=4), reloaded.generate(**reprocessor(images=[image],
                       text=["what colour is the shape?"]), max_new_tokens=4))


def test_vlm_build_cli(parts, tmp_path):
    out = tmp_path / "built"
    result = subprocess.run(
        [sys.executable, "-m", "vlm.cli", "build", "--vision", str(parts["siglip"]), "--llm", str(parts["qwen2"]),
         "--qformer-init", str(parts["bert"]), "--num-query-tokens", "8", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "trainable" in result.stdout
    weights = load_file(out / "model.safetensors")
    assert weights["query_tokens"].shape == (1, 8, 64)
    model, _ = load_pretrained(out)
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert model.config.text_config.model_type == "qwen2"


def test_vlm_build_cli_errors(parts, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "vlm.cli", "build", *args], capture_output=True, text=True,
                              timeout=300)

    r = run("--vision", str(parts["clip"]))
    assert r.returncode != 0 and "needs --llm, --output-dir" in r.stderr and "Traceback" not in r.stderr
    r = run("--vision", str(parts["llama"]), "--llm", str(parts["llama"]), "--output-dir", str(tmp_path / "x"))
    assert r.returncode != 0 and "not a supported vision tower" in r.stderr and str(parts["llama"]) in r.stderr
    r = run("--vision", str(parts["clip"]), "--llm", str(parts["llama"]), "--qformer-init", str(parts["clip"]),
            "--output-dir", str(tmp_path / "x"))
    assert r.returncode != 0 and "expected a BERT-family checkpoint" in r.stderr


def test_loaded_model_keeps_vision_and_llm_frozen(tiny_vlm_dir):
    model, _ = load_pretrained(tiny_vlm_dir)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"query_tokens", "qformer", "language_projection"}
