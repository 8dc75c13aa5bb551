"""Official BLIP-2 / InstructBLIP checkpoints load through load_pretrained and match transformers."""

import pytest
import torch
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

import tiny
from vlm import VisionLanguageModel, load_pretrained

PROMPTS = ["a photo of", "question: is there a cat? short answer:", ""]


def _reference(path, instruct=False):
    cls, proc = (
        (InstructBlipForConditionalGeneration, InstructBlipProcessor) if instruct
        else (Blip2ForConditionalGeneration, Blip2Processor)
    )
    processor = proc.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return cls.from_pretrained(path).eval(), processor


def _new_text(sequences, input_ids, tokenizer):
    return tokenizer.batch_decode(sequences[:, input_ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("fixture", ["blip2_opt_dir", "blip2_llama_dir", "instructblip_dir"])
def test_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ref, ref_proc = _reference(path, instruct=fixture == "instructblip_dir")
    model, processor = load_pretrained(path)
    assert isinstance(model, VisionLanguageModel)
    images = [tiny.random_image(i) for i in range(3)]
    for image, prompt in zip(images, PROMPTS):
        theirs = ref_proc(images=[image], text=[prompt], return_tensors="pt")
        ours = processor(images=[image], text=[prompt])
        # Same tokens and pixels from our processor as from theirs...
        for key in theirs:
            assert torch.equal(theirs[key], ours[key]), key
        with torch.no_grad():
            expected = ref(**theirs).logits
            got = model(**ours).logits
        # ...and the same logits, fp32.
        assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()


@pytest.mark.parametrize("fixture", ["blip2_opt_dir", "blip2_llama_dir", "instructblip_dir"])
@pytest.mark.parametrize("decoding", [{"num_beams": 1}, {"num_beams": 3}], ids=["greedy", "beam3"])
def test_generation_matches_transformers_single_and_batched(fixture, decoding, request):
    path = request.getfixturevalue(fixture)
    ref, ref_proc = _reference(path, instruct=fixture == "instructblip_dir")
    model, processor = load_pretrained(path)
    images = [tiny.random_image(10 + i) for i in range(3)]
    kwargs = dict(max_new_tokens=8, do_sample=False, **decoding)

    theirs = ref_proc(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    expected = _new_text(ref.generate(**theirs, **kwargs), theirs["input_ids"], ref_proc.tokenizer)
    ours = processor(images=images, text=PROMPTS)
    batched = _new_text(model.generate(**ours, **kwargs), ours["input_ids"], processor.tokenizer)
    single = []
    for image, prompt in zip(images, PROMPTS):
        one = processor(images=[image], text=[prompt])
        single += _new_text(model.generate(**one, **kwargs), one["input_ids"], processor.tokenizer)
    assert batched == expected
    assert single == expected
    assert any(t.strip() for t in expected)  # the comparison is not between empty strings


def test_repetition_penalty_and_sampling_match(blip2_llama_dir):
    ref, ref_proc = _reference(blip2_llama_dir)
    model, processor = load_pretrained(blip2_llama_dir)
    image = tiny.random_image(3)
    theirs = ref_proc(images=[image], text=["a photo of"], return_tensors="pt")
    ours = processor(images=[image], text=["a photo of"])
    kwargs = dict(max_new_tokens=10, repetition_penalty=1.5)
    assert torch.equal(ref.generate(**theirs, **kwargs), model.generate(**ours, **kwargs))
    sample = dict(max_new_tokens=10, do_sample=True, top_p=0.9, temperature=0.8)
    torch.manual_seed(0)
    expected = ref.generate(**theirs, **sample)
    torch.manual_seed(0)
    assert torch.equal(expected, model.generate(**ours, **sample))


def test_eos_stops_generation(blip2_opt_dir):
    model, processor = load_pretrained(blip2_opt_dir)
    batch = processor(images=[tiny.random_image(0)], text=["a photo of"])
    first = model.generate(**batch, max_new_tokens=1)[0, -1].item()
    # Make the first generated token the EOS: generation must stop right there.
    model.generation_config.eos_token_id = first
    out = model.generate(**batch, max_new_tokens=10)
    assert out.shape[1] == batch["input_ids"].shape[1] + 1


def test_images_encoded_once_for_many_prompts(blip2_opt_dir):
    model, processor = load_pretrained(blip2_opt_dir)
    image = tiny.random_image(5)
    prompts = ["a photo of", "question: what colour? short answer:"]
    calls = []
    hook = model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    features = model.get_vision_features(processor(images=[image], text=[""])["pixel_values"])
    batch = processor(images=[image, image], text=prompts)
    shared = model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        vision_features=features.expand(2, -1, -1), max_new_tokens=6,
    )
    hook.remove()
    assert len(calls) == 1
    assert torch.equal(shared, model.generate(**batch, max_new_tokens=6))


def test_several_images_each_where_placed(tiny_vlm_dir):
    model, processor = load_pretrained(tiny_vlm_dir)
    a, b = tiny.random_image(1), tiny.random_image(2)
    text = "first <image> then <image> which differs?"
    batch = processor(images=[a, b], text=[text])
    ids = batch["input_ids"][0]
    positions = (ids == processor.image_token_id).nonzero().flatten()
    assert len(positions) == 2 * processor.num_query_tokens
    assert positions[processor.num_query_tokens] - positions[processor.num_query_tokens - 1] > 1  # text between
    with torch.no_grad():
        swapped = model(**processor(images=[b, a], text=[text])).logits
        logits = model(**batch).logits
    assert not torch.allclose(logits[0, -1], swapped[0, -1])
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        processor(images=[a], text=[text])
