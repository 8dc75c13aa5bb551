"""The inference engine: batched output equals alone, continuous batching, streams, stops, OOM paths."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import tiny
from vlm import load_pretrained
from vlm.engine import (EngineBusy, EngineFailed, FeatureCache, GenerationSettings, InferenceEngine, OutOfMemory,
                        Request, Stream, pixel_digest)
from vlm.engine.decode import Sequence
from vlm.engine.encode import Encoded
from vlm.errors import VLMError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GREEDY = GenerationSettings(max_new_tokens=10)


@pytest.fixture(scope="module")
def mid_blip2_dir(tmp_path_factory):
    """A mid-size random BLIP-2 OPT (wider and deeper than the tiny one): batching must not change replies."""
    return tiny.save_official_blip2(tmp_path_factory.mktemp("mid-blip2"), "opt", num_query_tokens=8,
                                    text={"hidden_size": 128, "ffn_dim": 256, "word_embed_proj_dim": 128,
                                          "num_hidden_layers": 4}, seed=3)


@pytest.fixture(scope="module")
def engine(mid_blip2_dir):
    model, processor = load_pretrained(str(mid_blip2_dir), device="cpu")
    engine = InferenceEngine(model, processor, max_batch_size=8)
    yield engine
    engine.close()


def questions(n: int, settings=GREEDY) -> list[Request]:
    """Prompts of different lengths, each about its own image."""
    return [Request("Question: what is " + "the shape " * i + "here? Short answer:", [tiny.random_image(i)], settings)
            for i in range(n)]


def test_static_and_continuous_batches_equal_each_request_alone(engine):
    requests = questions(8)
    alone = [engine.generate([r])[0] for r in requests]
    assert len({c.text for c in alone}) > 4  # distinct replies: the comparison means something
    assert [c.text for c in engine.generate(requests)] == [c.text for c in alone]
    streams = [engine.submit(r) for r in requests]  # 8 at once: one running batch
    assert [s.result().text.strip() for s in streams] == [c.text for c in alone]
    assert engine.stats["peak_batch"] == 8
    # The same as transformers' BLIP-2 on the same weights.
    model, processor = engine.model, engine.processor
    inputs = processor(images=requests[3].images, text=[requests[3].prompt])
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert processor.decode_generated(out, inputs["input_ids"]) == [alone[3].text]


def test_requests_join_a_running_batch_and_stop_on_their_own(engine):
    requests = questions(6)
    short = GenerationSettings(max_new_tokens=3)
    alone_long = [engine.generate([r])[0].text for r in requests[:3]]
    alone_short = [engine.generate([Request(r.prompt, r.images, short)])[0] for r in requests[3:]]
    first = [engine.submit(r) for r in requests[:3]]
    next(iter(first[0]))  # the batch is running
    later = [engine.submit(Request(r.prompt, r.images, short)) for r in requests[3:]]
    assert [s.result().text.strip() for s in first] == alone_long
    results = [s.result() for s in later]
    assert [c.text.strip() for c in results] == [c.text for c in alone_short]
    assert all(c.finish_reason == "length" and c.completion_tokens == 3 for c in results)
    assert engine.stats["peak_batch"] >= 4  # the later ones decoded alongside the first


def test_stream_pieces_add_up_and_stop_strings_cut(engine):
    (request,) = questions(1)
    full = engine.generate([request])[0].text
    stream = engine.submit(request)
    pieces = list(stream)
    assert len(pieces) > 2 and "".join(pieces) == stream.completion.text and stream.completion.text.strip() == full
    word = full.split()[1] if len(full.split()) > 1 else full[2:4]
    stop = GenerationSettings(max_new_tokens=10, stop=(word,))
    cut = engine.submit(Request(request.prompt, request.images, stop))
    text = "".join(cut)
    assert text == cut.completion.text and text.strip() == full[: full.find(word)].strip()
    assert cut.completion.finish_reason == "stop" and word not in text
    assert engine.generate([Request(request.prompt, request.images, stop)])[0].text == text.strip()


def test_cancel_stops_one_request_only(engine):
    requests = questions(3, GenerationSettings(max_new_tokens=40))
    alone = engine.generate([requests[1]])[0].text
    streams = [engine.submit(r) for r in requests]
    next(iter(streams[0]))
    streams[0].cancel()
    assert streams[0].result().finish_reason == "cancelled"
    assert streams[1].result().text.strip() == alone


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    requests = questions(4, GenerationSettings(max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=7))
    once = engine.submit(requests[2]).result().text
    streams = [engine.submit(r) for r in requests]
    assert streams[2].result().text == once
    greedy = engine.generate([Request(requests[2].prompt, requests[2].images, GREEDY)])[0].text
    assert once != greedy  # it sampled


def test_one_decode_behaviour_offline_and_streamed(engine):
    """A seeded sampled request gives the same text through `generate` and `submit`, alone and
    inside a batch of 8 (each request samples with its own generator); different seeds differ."""
    requests = [Request(r.prompt, r.images, GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.95,
                                                               seed=100 + i)) for i, r in enumerate(questions(8))]
    alone_offline = [engine.generate([r])[0].text for r in requests]
    alone_streamed = [engine.submit(r).result().text for r in requests]
    in_batch_offline = [c.text for c in engine.generate(requests)]
    in_batch_streamed = [s.result().text for s in [engine.submit(r) for r in requests]]
    assert alone_offline == alone_streamed == in_batch_offline == in_batch_streamed
    reseeded = [Request(r.prompt, r.images, GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.95,
                                                               seed=7)) for r in requests]
    assert [c.text for c in engine.generate(reseeded)] != in_batch_offline
    assert all(text == text.strip() for text in alone_offline)  # one whitespace rule on both paths


def test_beam_search_requests_run_beside_the_batch(engine):
    (request,) = questions(1)
    beams = GenerationSettings(max_new_tokens=6, num_beams=3)
    want = engine.generate([Request(request.prompt, request.images, beams)])[0].text
    streams = [engine.submit(r) for r in questions(3)] + [engine.submit(Request(request.prompt, request.images, beams))]
    assert streams[-1].result().text.strip() == want
    assert all(s.result().finish_reason in ("stop", "length") for s in streams)


def test_each_image_is_encoded_once(mid_blip2_dir):
    model, processor = load_pretrained(str(mid_blip2_dir), device="cpu")
    engine = InferenceEngine(model, processor)
    image = tiny.random_image(11)
    prompts = ["Question: what is it? Short answer:", "Question: what colour? Short answer:"]
    engine.generate([Request(p, [image], GREEDY) for p in prompts])
    engine.submit(Request(prompts[0], [image.copy()], GREEDY)).result()  # same pixels, another object
    assert engine.encoder.vision_encodes == 1
    engine.generate([Request(prompts[0], [tiny.random_image(12)], GREEDY)])
    assert engine.encoder.vision_encodes == 2


def test_feature_cache_is_bounded_in_bytes():
    cache = FeatureCache(max_bytes=3 * 400)
    for i in range(5):
        cache.put(str(i), torch.zeros(100))  # 400 bytes each
    assert len(cache) == 3 and cache.nbytes == 1200 and cache.get("0") is None and cache.get("4") is not None
    cache.get("2")
    cache.put("5", torch.zeros(100))
    assert cache.get("2") is not None and cache.get("3") is None  # least recently used left first
    cache.put("big", torch.zeros(1000))
    assert cache.get("big") is None and cache.nbytes <= 1200


def test_full_queue_is_refused_and_the_engine_recovers(mid_blip2_dir):
    model, processor = load_pretrained(str(mid_blip2_dir), device="cpu")
    engine = InferenceEngine(model, processor, max_batch_size=1, max_waiting=1)
    long = GenerationSettings(max_new_tokens=30)
    streams = [engine.submit(questions(1, long)[0])]
    next(iter(streams[0]))  # running; the queue is empty again
    streams.append(engine.submit(questions(1, long)[0]))
    with pytest.raises(EngineBusy, match="busy"):
        engine.submit(questions(1, long)[0])
    assert all(s.result().finish_reason == "length" for s in streams)
    assert engine.submit(questions(1)[0]).result().text
    engine.close()


def test_bad_request_fails_alone(engine):
    good = questions(2)
    bad = Request("two <image> markers <image> for one image", [tiny.random_image(0)], GREEDY)
    streams = [engine.submit(good[0]), engine.submit(bad), engine.submit(good[1])]
    assert streams[1].result().finish_reason == "error"
    with pytest.raises(Exception, match="2 <image> markers for 1 images"):
        list(streams[1])
    assert all(s.result().text for s in (streams[0], streams[2]))


def test_bad_or_too_long_requests_fail_alone_on_every_path(engine):
    """Beam search runs outside the decode loop; a prompt that fills the context would run past
    the LLM's positions (an index error, or a CUDA assert that stops the engine)."""
    image = tiny.random_image(0)
    bad = "two <image> markers <image> for one image"
    long = "Question: " + "fox " * 200 + "Short answer:"
    for settings in (GREEDY, GenerationSettings(max_new_tokens=4, num_beams=2)):
        for prompt, words in ((bad, "2 <image> markers for 1 images"), (long, r"the prompt needs \d+ tokens")):
            stream = engine.submit(Request(prompt, [image], settings))
            assert stream.result().finish_reason == "error"
            with pytest.raises(VLMError, match=words):
                list(stream)
    assert engine.submit(questions(1)[0]).result().text  # still serving
    out = engine.generate([Request(long, [image], GREEDY), questions(1)[0]])
    assert out[0].finish_reason == "error" and "reads at most 128" in str(out[0].error) and out[1].text


def test_waiting_counts_only_requests_beyond_the_free_places(mid_blip2_dir):
    model, processor = load_pretrained(str(mid_blip2_dir), device="cpu")
    engine = InferenceEngine(model, processor, max_batch_size=2, max_waiting=0)
    streams = [engine.submit(r) for r in questions(2, GenerationSettings(max_new_tokens=60))]  # both fit at once
    with pytest.raises(EngineBusy, match="busy"):
        engine.submit(questions(1)[0])
    assert all(s.result().error is None for s in streams)
    assert engine.submit(questions(1)[0]).result().text
    engine.close()


def test_a_reply_cut_short_by_the_context_is_length_not_stop(engine):
    request = Request("Question: what is " + "the shape " * 49 + "here? Short answer:", [tiny.random_image(5)],
                      GenerationSettings(max_new_tokens=10))
    offline, online = engine.generate([request])[0], engine.submit(request).result()
    room = engine.context_length - offline.prompt_tokens
    assert 0 < room < 10
    assert offline.finish_reason == online.finish_reason == "length"
    assert offline.completion_tokens == online.completion_tokens == room


def test_a_row_stopped_by_a_stop_string_counts_its_own_tokens(engine):
    requests = questions(2)
    word = engine.generate([requests[1]])[0].text.split()[2]  # early in row 1's reply
    stop = GenerationSettings(max_new_tokens=10, stop=(word,))
    cut = [Request(r.prompt, r.images, stop) for r in requests]
    alone = [engine.generate([r])[0] for r in cut]
    assert alone[1].finish_reason == "stop" and alone[1].completion_tokens < alone[0].completion_tokens
    together = engine.generate(cut)  # row 1 is padded while row 0 goes on
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in alone]
    assert engine.submit(cut[1]).result().completion_tokens == alone[1].completion_tokens


def test_seeded_requests_leave_the_global_random_state_alone(engine):
    (request,) = questions(1, GenerationSettings(max_new_tokens=4, temperature=0.9, seed=3))
    before = torch.random.get_rng_state()
    first = engine.generate([request])[0].text
    assert torch.equal(torch.random.get_rng_state(), before)
    assert engine.generate([request])[0].text == first


def test_cached_features_hold_only_their_own_memory(engine):
    images = [tiny.random_image(40), tiny.random_image(41)]
    engine.generate([Request("Question: what? Short answer:", [image], GREEDY) for image in images])  # one vision pass
    for image in images:
        value = engine.feature_cache.get(pixel_digest(engine.encoder.pixels(image)))
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


def test_processor_truncation_off_by_name_cuts_nothing(engine):
    processor = engine.processor
    prompt = "Question: what is the shape here? Short answer:"
    full = processor(text=[prompt])["input_ids"].shape[1]
    assert processor(text=[prompt], truncation="do_not_truncate", max_length=3)["input_ids"].shape[1] == full
    assert processor(text=[prompt], truncation=True, max_length=3)["input_ids"].shape[1] == 3


# -- streamed text ------------------------------------------------------------------------------
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with all 256 bytes in its alphabet: characters it has not
    learnt are one token per UTF-8 byte, as in GPT-2's, OPT's and Llama 3's tokenizers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tiny.CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def test_streamed_pieces_add_up_with_multi_byte_characters():
    tokenizer = byte_level_tokenizer()
    text = "a naïve café 🙂, 東京 and the quick brown fox"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # tokens that end inside a character
    eos = tokenizer.eos_token_id
    # The reply's text is cut before a stop string, then stripped (`sampling.final_text`).
    for stop, want in (((), text), (("東",), text[:text.find("東")].strip()), (("fox",), text[:text.find("fox")].strip())):
        stream = Stream(Request("q", settings=GenerationSettings(max_new_tokens=100, stop=stop)))
        seq = Sequence(stream, Encoded([0], None), [eos], tokenizer, max_length=1000)
        for token in ids + [eos]:
            if seq.accept(token):
                break
        stream.finish(seq.completion())
        pieces = list(stream)
        assert "".join(pieces) == seq.text.strip() == stream.completion.text == want
        assert len(pieces) > 3 and not any("\ufffd" in piece for piece in pieces)
        # The stop token counts as generated; a stop string is not a token.
        assert stream.completion.completion_tokens == len(seq.tokens) + (not stop)


# -- out-of-memory and other device errors, injected with forward hooks ---------------------------
class InjectFault:
    """Raise `error` from the LLM's first layer whenever `when(batch_rows, tokens)` is true."""

    def __init__(self, model, error, when):
        self.error, self.when, self.raised = error, when, 0
        layer = model.language_model.model.decoder.layers[0]
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, module, args):
        hidden = args[0]
        if self.when(hidden.shape[0], hidden.shape[1]):
            self.raised += 1
            raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_out_of_memory_in_a_batch_splits_it(engine):
    requests = questions(4)
    alone = [c.text for c in engine.generate(requests)]
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    counted = engine.stats["out_of_memory"]
    with InjectFault(engine.model, oom, lambda rows, tokens: rows > 1) as fault:
        out = engine.generate(requests)
    assert fault.raised >= 3 and [c.text for c in out] == alone  # halved down to single rows
    assert engine.stats["out_of_memory"] - counted == fault.raised  # what /metrics reports
    with InjectFault(engine.model, oom, lambda rows, tokens: True):
        out = engine.generate(requests[:2])
    assert [c.finish_reason for c in out] == ["error", "error"]
    assert all(isinstance(c.error, OutOfMemory) and "even alone" in str(c.error) for c in out)
    assert all(c.error.__traceback__ is None for c in out)  # torch's error would hold the failed activations


def test_out_of_memory_while_decoding_evicts_and_resumes(engine):
    requests = questions(4, GenerationSettings(max_new_tokens=12))
    alone = [c.text for c in engine.generate(requests)]
    evicted_before = engine.stats["evicted"]
    oom = torch.OutOfMemoryError("CUDA out of memory.")
    count = {"steps": 0}

    def when(rows, tokens):  # the 3rd decode step of a 4-row batch fails, once
        if rows == 4 and tokens == 1:
            count["steps"] += 1
            return count["steps"] == 3
        return False

    with InjectFault(engine.model, oom, when):
        streams = [engine.submit(r) for r in requests]
        texts = [s.result().text.strip() for s in streams]
    assert texts == alone  # the evicted half resumed from its tokens: same replies
    assert engine.stats["evicted"] - evicted_before == 2


def test_a_prefill_out_of_memory_waits_for_the_batch_to_shrink(mid_blip2_dir):
    """Retrying the prefill at every decode step would empty the feature cache at every step."""
    model, processor = load_pretrained(str(mid_blip2_dir), device="cpu")
    engine = InferenceEngine(model, processor, max_batch_size=4)
    first, second = questions(2, GenerationSettings(max_new_tokens=40))
    want = engine.generate([second])[0].text
    running = engine.submit(first)
    next(iter(running))  # decoding
    oom = torch.OutOfMemoryError("CUDA out of memory.")
    with InjectFault(model, oom, lambda rows, tokens: tokens > 1 and running.completion is None) as fault:
        assert engine.submit(second).result().text.strip() == want  # it ran once the batch had emptied
    assert running.result().error is None
    assert fault.raised <= 1  # one failed prefill, then no retry while the first request decoded
    engine.close()


def test_a_cuda_error_that_is_not_oom_stops_the_engine(mid_blip2_dir):
    model, processor = load_pretrained(str(mid_blip2_dir), device="cpu")
    engine = InferenceEngine(model, processor)
    assert engine.submit(questions(1)[0]).result().text
    error = RuntimeError("CUDA error: device-side assert triggered")
    with InjectFault(model, error, lambda rows, tokens: True):
        with pytest.raises(RuntimeError, match="device-side assert"):
            engine.generate(questions(2))  # offline: the run stops, no retries
        stream = engine.submit(questions(1)[0])
        assert stream.result().finish_reason == "error"
    with pytest.raises(EngineFailed, match="device-side assert"):
        list(stream)
    with pytest.raises(EngineFailed, match="stopped after an error"):
        engine.submit(questions(1)[0])


def test_instructblip_and_chat_models_run_on_the_engine(instructblip_dir, tiny_vlm_dir):
    for folder, prompt in ((instructblip_dir, "what is this?"), (tiny_vlm_dir, "<image> a <image> b")):
        model, processor = load_pretrained(str(folder), device="cpu")
        engine = InferenceEngine(model, processor)
        images = [tiny.random_image(1), tiny.random_image(2)][: prompt.count("<image>") or 1]
        request = Request(prompt, images, GREEDY)
        want = engine.generate([request])[0].text
        inputs = processor(images=images, text=[prompt])
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=engine.stop_token_ids)
        assert processor.decode_generated(out, inputs["input_ids"]) == [want]
        assert engine.submit(request).result().text.strip() == want
        engine.close()


def test_many_threads_submit_at_once(engine):
    requests = questions(8)
    alone = [c.text for c in engine.generate(requests)]
    results = [None] * 8

    def ask(i):
        time.sleep(0.01 * (i % 3))
        results[i] = engine.submit(requests[i]).result().text.strip()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone


def test_an_unexpected_error_fails_its_request_only_and_the_engine_goes_on(mid_blip2_dir, caplog):
    """A bug met by one request (here in its prefill, then in a decode step) is that request's (or
    that step's) failure, logged with its traceback; the engine keeps serving, and only `VLMError`
    reads as bad input."""
    from vlm.engine import RequestFailed

    model, processor = load_pretrained(str(mid_blip2_dir), device="cpu")
    failures: list = []
    engine = InferenceEngine(model, processor, on_failure=lambda: failures.append(engine.failure))
    first, second = questions(2, GenerationSettings(max_new_tokens=6))
    want = engine.generate([second])[0].text
    _, long = engine.encoder.prompt_lengths([first, second])
    bug = IndexError("index out of range in self")
    with InjectFault(model, bug, lambda rows, tokens: tokens == long):  # the longer prompt's prefill
        streams = [engine.submit(first), engine.submit(second)]
        results = [s.result() for s in streams]
    failed = [r for r in results if r.error is not None]
    assert len(failed) == 1 and isinstance(failed[0].error, RequestFailed) and not isinstance(failed[0].error, VLMError)
    assert "IndexError" in str(failed[0].error) and "index out of range" in caplog.text
    with InjectFault(model, bug, lambda rows, tokens: tokens == 1):  # every decode step
        stream = engine.submit(second)
        assert isinstance(stream.result().error, RequestFailed)
    assert engine.submit(second).result().text.strip() == want  # still serving, same answer
    assert engine.failure is None and not failures and engine.stats["failed_requests"] == 2
    engine.close()


def test_a_device_fault_stops_the_engine_and_tells_its_owner(mid_blip2_dir):
    model, processor = load_pretrained(str(mid_blip2_dir), device="cpu")
    stopped = threading.Event()
    engine = InferenceEngine(model, processor, on_failure=stopped.set)
    fault = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    with InjectFault(model, fault, lambda rows, tokens: True):
        assert engine.submit(questions(1)[0]).result().finish_reason == "error"
    assert stopped.wait(10) and engine.failure is fault
    with pytest.raises(EngineFailed):
        engine.submit(questions(1)[0])


def test_an_empty_prompt_never_stops_the_engine(engine):
    """No text and no image (it used to reach the running batch and stop it): a tokenizer that adds
    BOS gives the model one token to start from; one that adds nothing is bad input, never a crash."""
    empty = Request("", [], GREEDY)
    tokens = engine.encoder.prompt_lengths([empty])[0]
    completion = engine.submit(empty).result()
    if tokens == 0:
        assert completion.finish_reason == "error" and "the prompt is empty" in str(completion.error)
    else:
        assert completion.error is None
    out = engine.generate([empty, questions(1)[0]])
    assert out[1].text and (out[0].error is None) == (tokens > 0)
    assert engine.submit(questions(1)[0]).result().text
    from vlm.engine.encode import prompt_problem

    assert "the prompt is empty" in str(prompt_problem(0, 100)) and prompt_problem(1, 100) is None
