"""`vlm chat` internals with a real tiny model, in-process: history, images, trimming, uploads, CLI."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import random_image

from vlm import load_pretrained
from vlm.engine import GenerationSettings, InferenceEngine
from vlm.errors import VLMError
from vlm.serve.app import make_respond
from vlm.serve.chat import build_parser, exposure_warnings, is_loopback, main, make_frontend, parse_auth
from vlm.serve.conversation import NOTICE_PREFIX, history_to_turns, new_turn
from vlm.serve.frontend import ChatFrontend
from vlm.serve.uploads import open_upload


@pytest.fixture(scope="module")
def loaded(tiny_vlm_dir):
    return load_pretrained(str(tiny_vlm_dir), device="cpu")


def frontend_for(model, processor, upload_dirs=None) -> ChatFrontend:
    return ChatFrontend(InferenceEngine(model, processor), upload_dirs=upload_dirs)


@pytest.fixture()
def engine(loaded, tmp_path):
    """The chat's front end on a fresh inference engine (the test images stand in for uploads)."""
    return frontend_for(*loaded, upload_dirs=[str(tmp_path)])


@pytest.fixture()
def images(tmp_path):
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"img{seed}.png"
        random_image(seed).save(path)
        paths.append(str(path))
    return paths


def direct_greedy(model, processor, messages, images, max_new_tokens):
    """The reference: the model's own generate on the same prompt and images, no chat code."""
    prompt = processor.format_chat(messages)
    enc = processor(images=[Image.open(p).convert("RGB") for p in images] or None, text=prompt)
    tok = processor.tokenizer
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id
    )
    return processor.decode_generated(out, enc["input_ids"])[0]


# -- history -> turns -------------------------------------------------------------------------------
def test_history_shapes_from_api_and_page_give_the_same_turns():
    api = [  # what ChatInterface appends for API clients
        {"role": "user", "content": [{"path": "/u/a.png"}, "what is it?"]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": ["and the colour?"]},
        {"role": "assistant", "content": "red"},
    ]
    page = [  # what the Chatbot component hands back after a page round trip
        {"role": "user", "content": [{"type": "file", "file": {"path": "/u/a.png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": [{"type": "text", "text": "and the colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    a, b = history_to_turns(api), history_to_turns(page)
    assert [(t.images, t.parts, t.reply) for t in a] == [(t.images, t.parts, t.reply) for t in b]
    assert a[0].images == ["/u/a.png"] and a[0].parts[0] == {"type": "image"} and a[1].reply == "red"


def test_turns_answered_by_a_notice_are_left_out():
    history = [
        {"role": "user", "content": [{"path": "/u/bad.png"}, "look"]},
        {"role": "assistant", "content": NOTICE_PREFIX + "bad.png: not an image"},
        {"role": "user", "content": ["hello"]},
        {"role": "assistant", "content": "hi"},
    ]
    turns = history_to_turns(history)
    assert len(turns) == 1 and turns[0].reply == "hi" and turns[0].images == []


# -- engine -----------------------------------------------------------------------------------------
def test_images_placed_per_turn_match_direct_generate(engine, loaded, images):
    model, processor = loaded
    first = new_turn("what colour is the shape?", [images[0]])
    first.reply = engine.reply([first], max_new_tokens=6)
    second = new_turn("describe the image.", [images[1]])
    answer = engine.reply([first, second], max_new_tokens=10)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape?"}]},
        {"role": "assistant", "content": first.reply},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]},
    ]
    assert answer, "the tiny model should say something here, or the comparison proves nothing"
    assert answer == direct_greedy(model, processor, messages, images, 10)
    swapped = direct_greedy(model, processor, messages, images[::-1], 10)
    assert answer != swapped, "the answer should depend on which image sits in which turn"


def test_each_image_encoded_once(engine, loaded, images, tmp_path):
    model, _ = loaded
    calls = []
    hook = model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        turns = [new_turn("describe", [images[0]])]
        for question in ("and the colour?", "and the shape?"):
            turns[-1].reply = engine.reply(turns, max_new_tokens=3)
            turns.append(new_turn(question, []))
        turns[-1].reply = engine.reply(turns, max_new_tokens=3)
        assert len(calls) == 1, "three turns about one image must run the vision tower once"
        turns.append(new_turn("compare", [images[1]]))
        engine.reply(turns, max_new_tokens=3)
        assert len(calls) == 2
        copy = tmp_path / "same-picture-another-name.png"
        copy.write_bytes(open(images[0], "rb").read())
        engine.reply([new_turn("describe", [str(copy)])], max_new_tokens=3)
        assert len(calls) == 2, "the same picture in another conversation is found by content"
    finally:
        hook.remove()


def test_long_conversation_is_trimmed_oldest_first_not_crashing(engine, images):
    assert engine.context_length == 128  # the tiny LLM's window
    turns = []
    for i in range(12):
        turns.append(new_turn(f"question {i} about the quick brown fox", [images[i % 2]] if i % 3 == 0 else []))
        prepared = engine.prepare(turns, settings=GenerationSettings(max_new_tokens=16))
        assert prepared.input_ids.shape[1] <= engine.context_length - 16
        turns[-1].reply = "a blue square and a green triangle"
    assert prepared.dropped_turns > 0
    assert engine.reply(turns, max_new_tokens=16)
    with pytest.raises(VLMError, match="tokens"):
        engine.prepare([new_turn("fox " * 300, [])], settings=GenerationSettings(max_new_tokens=16))


def _reference(model, processor, engine, prompt, image_paths, max_new_tokens, qformer_text=None):
    """Direct `generate` on `processor(images, text=prompt)`: no chat code involved."""
    enc = processor(images=[Image.open(p).convert("RGB") for p in image_paths], text=prompt, qformer_text=qformer_text)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=engine.engine.stop_token_ids,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    return enc, processor.decode_generated(out, enc["input_ids"])[0]


def test_blip2_without_chat_template_is_asked_in_its_trained_prompt(blip2_opt_dir, images):
    model, processor = load_pretrained(str(blip2_opt_dir), device="cpu")
    assert not processor.has_chat_template
    engine = frontend_for(model, processor, upload_dirs=[str(Path(images[0]).parent)])
    question, n = "what colour is the shape?", processor.num_query_tokens
    # BLIP-2's own VQA prompt, then a template saved by `vlm train`.
    for template in (None, "Question: {} Answer:"):
        processor.question_template = template
        turn = new_turn(question, [images[0]])
        assert engine.prompt_text([turn]) == processor.format_question(question)
        prepared = engine.prepare([turn], settings=GenerationSettings(max_new_tokens=8))
        enc, expected = _reference(model, processor, engine, processor.format_question(question), images[:1], 8)
        assert torch.equal(prepared.input_ids, enc["input_ids"])
        ids = prepared.input_ids[0].tolist()  # image in front, then BOS, as BLIP-2 was trained
        assert ids[:n] == [processor.image_token_id] * n and ids[n] == processor.tokenizer.bos_token_id
        answer = engine.reply([turn], max_new_tokens=8)
        assert answer and answer == expected
        # Later turns: every image of the conversation in front, no marker anywhere after BOS.
        turn.reply = answer
        later = engine.prepare([turn, new_turn("and this one?", [images[1]])], settings=GenerationSettings(max_new_tokens=8))
        ids = later.input_ids[0].tolist()
        assert ids[: 2 * n] == [processor.image_token_id] * (2 * n) and processor.image_token_id not in ids[2 * n :]
        assert ids[2 * n] == processor.tokenizer.bos_token_id


def test_instructblip_qformer_reads_what_the_processor_gives_it(instructblip_dir, images):
    model, processor = load_pretrained(str(instructblip_dir), device="cpu")
    engine = frontend_for(model, processor, upload_dirs=[str(Path(images[0]).parent)])
    assert engine.engine.encoder.reads_instruction
    question = "what colour is the shape?"
    turn = new_turn(question, [images[0]])
    prompt = engine.prompt_text([turn])
    assert processor.qformer_instruction(prompt) != question  # the full prompt, not the bare question
    enc, expected = _reference(model, processor, engine, prompt, images[:1], 8)
    other, different = _reference(model, processor, engine, prompt, images[:1], 8, qformer_text=[question])
    assert not torch.equal(enc["qformer_input_ids"], other["qformer_input_ids"])
    answer = engine.reply([turn], max_new_tokens=8)
    assert answer and answer == expected


def test_cancel_ends_generation_early(engine, images):
    prepared = engine.prepare([new_turn("describe", [images[0]])], settings=GenerationSettings(max_new_tokens=60))
    stream = engine.submit(prepared)
    for _ in stream:
        stream.cancel()
    completion = stream.result()
    assert completion.finish_reason == "cancelled" and completion.completion_tokens < 20


def test_respond_turns_errors_into_readable_messages(engine, images, tmp_path):
    respond = make_respond(engine)
    empty = list(respond({"text": "  ", "files": []}, [], "", 0.0, 1.0, 8))
    assert empty == [NOTICE_PREFIX + "Empty message: type a question, attach an image, or both."]
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    bad = list(respond({"text": "what?", "files": [str(fake)]}, [], "", 0.0, 1.0, 8))
    assert bad[-1].startswith(NOTICE_PREFIX) and "notes.png" in bad[-1] and str(tmp_path) not in bad[-1]
    failed = list(respond({"text": "hi", "files": [images[0]]}, [], "", 1.0, -0.5, 8))
    assert failed == [NOTICE_PREFIX + "top_p must be in (0, 1], got -0.5"]
    marker = list(respond({"text": "what is <image>?", "files": [images[0]]}, [], "", 0.0, 1.0, 8))
    assert marker[-1].startswith(NOTICE_PREFIX) and "may not contain <image>" in marker[-1]
    ok = list(respond({"text": "hi", "files": [images[0]]}, [], "be brief", 0.0, 1.0, 8))
    assert ok and not ok[-1].startswith(NOTICE_PREFIX)


def test_out_of_memory_is_a_notice_and_the_chat_goes_on(loaded, images, tmp_path):
    """An out-of-memory reply (injected at the LLM's first layer) gets a notice; memory is freed
    (the feature cache emptied) and the next reply works."""
    model, processor = loaded
    frontend = frontend_for(model, processor, upload_dirs=[str(tmp_path)])
    respond = make_respond(frontend)
    assert not list(respond({"text": "hi", "files": [images[0]]}, [], "", 0.0, 1.0, 4))[-1].startswith(NOTICE_PREFIX)
    assert len(frontend.engine.feature_cache) == 1

    def fail(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    handle = model.language_model.model.layers[0].register_forward_pre_hook(fail)
    try:
        out = list(respond({"text": "hi", "files": [images[0]]}, [], "", 0.0, 1.0, 4))
    finally:
        handle.remove()
    assert out == [NOTICE_PREFIX + "Generation failed: out of memory for this request even alone"]
    assert len(frontend.engine.feature_cache) == 0
    assert not list(respond({"text": "hi", "files": [images[0]]}, [], "", 0.0, 1.0, 4))[-1].startswith(NOTICE_PREFIX)


# -- uploads ----------------------------------------------------------------------------------------
def test_max_file_size_flag_is_the_limit_of_the_page_and_the_engine(loaded, tmp_path, monkeypatch):
    uploads = tmp_path / "gradio"
    uploads.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))  # gradio.utils.get_upload_folder() reads it
    big = uploads / "big.bmp"
    Image.new("RGB", (3000, 2500), "red").save(big)  # 22.5 MB: over the old fixed 20 MB limit
    assert big.stat().st_size > 21 * 2**20
    message = {"text": "what is this?", "files": [str(big)]}
    model, processor = loaded
    engine = InferenceEngine(model, processor)
    default = make_frontend(engine, build_parser().parse_args([]))
    refused = list(make_respond(default)(message, [], "", 0.0, 1.0, 2))
    assert refused == [NOTICE_PREFIX + "big.bmp: 21.5 MB is over the 20 MB upload limit"]
    raised = make_frontend(engine, build_parser().parse_args(["--max-file-size", "30"]))
    assert raised.max_upload_bytes == 30 * 2**20
    # The app's check and the engine's (the history image is encoded on every turn) both pass.
    history = [
        {"role": "user", "content": [{"path": str(big)}, "what is this?"]},
        {"role": "assistant", "content": "x"},
    ]
    reply = list(make_respond(raised)(message, history, "", 0.0, 1.0, 2))
    assert reply and not reply[-1].startswith(NOTICE_PREFIX), reply


def test_history_paths_outside_the_upload_folder_are_never_read(loaded, tmp_path, monkeypatch):
    """A client can send its own history: `/dev/zero` must not hang the server, and a server
    image outside Gradio's upload folder must not be described."""
    uploads = tmp_path / "gradio"
    uploads.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    secret = tmp_path / "private.png"
    random_image(5).save(secret)
    (uploads / "link.png").symlink_to(secret)  # a link in the folder still points outside it
    engine = frontend_for(*loaded)
    assert engine.upload_dirs == [str(uploads)]
    respond = make_respond(engine)
    for path in ("/dev/zero", str(secret), str(uploads / "link.png"), str(uploads / ".." / "private.png")):
        history = [{"role": "user", "content": [{"path": path}, "what?"]}, {"role": "assistant", "content": "x"}]
        out: list = []
        worker = threading.Thread(
            target=lambda h=history, out=out: out.extend(
                respond({"text": "and now?", "files": []}, h, "", 0.0, 1.0, 2)
            ),
            daemon=True,
        )
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), f"{path}: the server is still reading it"
        name = path.rsplit("/", 1)[-1]
        assert out == [
            NOTICE_PREFIX + f"{name}: that file is not an upload to this chat; please attach the image again"
        ]
    fifo = uploads / "pipe.png"
    os.mkfifo(fifo)  # inside the folder but not a regular file: opening it would block
    with pytest.raises(VLMError, match="pipe.png: that file is not an upload"):
        engine.open_upload(str(fifo))


def test_upload_checks(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # ~10 KB on disk, 81M pixels decoded
    assert bomb.stat().st_size < 200_000
    with pytest.raises(VLMError, match=r"^bomb.png: .*pixels"):
        open_upload(bomb)
    good = tmp_path / "photo.png"
    random_image(3, (300, 300)).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VLMError, match=r"^cut.png: cannot decode"):
        open_upload(truncated)
    with pytest.raises(VLMError, match=r"^photo.png: .*MB is over"):
        open_upload(good, max_bytes=1000)
    text = tmp_path / "a.txt"
    text.write_text("hello")
    with pytest.raises(VLMError, match=r"^a.txt: not an image"):
        open_upload(text)
    assert open_upload(good).size == (300, 300)


def test_cli_flags_and_exposure_warnings(capsys):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert exposure_warnings("127.0.0.1", False, None) == []
    assert "without --auth" in exposure_warnings("0.0.0.0", False, None)[0]
    assert exposure_warnings("0.0.0.0", False, ("a", "b"), "key") == []
    assert exposure_warnings("0.0.0.0", False, ("a", "b")) == ["note: the /v1 API is off on 0.0.0.0 without --api-key"]
    assert "--share" in exposure_warnings("127.0.0.1", True, None)[0]
    assert parse_auth("alice:s3:cret") == ("alice", "s3:cret")
    for argv, match in (
        (["--auth", "alice"], "--auth must be USER:PASS"),
        (["--port", "0"], "--port"),
        (["--top-p", "0"], "--top-p"),
        (["--max-queue", "0"], "--max-queue"),
    ):
        with pytest.raises(VLMError, match=match):
            main(argv)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "127.0.0.1" in capsys.readouterr().out
