"""`vlm chat` as users meet it: a real server subprocess on a free loopback port, driven by
`gradio_client` and by a real headless chromium (Playwright).

One server for the module (start-up costs ~15-20 s on 2 cores). It runs with a small queue
(--concurrency 1 --max-queue 3) so the busy path can be tested too; the 16-client load test
lives in test_chat_load.py with its own server.
"""

from __future__ import annotations

import itertools
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from server_process import NOTICE, ChatServer
from tiny import random_image

from vlm import load_pretrained

NO_TEXT = "produced no text"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


# -- running a server -------------------------------------------------------------------------------

def ask(client: Client, text: str, files=(), **settings) -> str:
    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    return client.predict(message=message, api_name="/chat", **settings)


def client_for(server: ChatServer) -> Client:
    return Client(server.url, verbose=False)


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_vlm_dir, tmp_path_factory):
    srv = ChatServer(
        tiny_vlm_dir,
        tmp_path_factory.mktemp("chat-log") / "server.log",
        "--concurrency",
        "1",
        "--max-queue",
        "3",
        "--max-file-size",
        "1",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir):
    """The model loaded here, to check what the server answers against direct `generate`."""
    return load_pretrained(str(tiny_vlm_dir), device="cpu")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for seed in (1, 2):
        paths.append(folder / f"picture{seed}.png")
        random_image(seed).save(paths[-1])
    return paths


def direct_greedy(reference, messages, images, max_new_tokens) -> str:
    model, processor = reference
    prompt = processor.format_chat(messages)
    enc = processor(images=[Image.open(p).convert("RGB") for p in images] or None, text=prompt)
    tok = processor.tokenizer
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
    )
    return processor.decode_generated(out, enc["input_ids"])[0]


# -- tests ------------------------------------------------------------------------------------------
def test_second_turn_sees_first_turns_image(server, reference, pictures):
    q1, q2 = "what colour is the shape?", "and its shape?"  # a question the random tiny model answers
    a = client_for(server)
    r1 = ask(a, q1, [pictures[0]], max_new_tokens=6)
    r2 = ask(a, q2, max_new_tokens=10)  # no file: refers to the first turn's image
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
        {"role": "assistant", "content": r1},
        {"role": "user", "content": [{"type": "text", "text": q2}]},
    ]
    expected = direct_greedy(reference, messages, [pictures[0]], 10)
    assert expected, "the tiny model should say something here, or the comparison proves nothing"
    assert r2.strip() == expected
    assert r2.strip() != direct_greedy(reference, messages, [pictures[1]], 10), "answer must depend on the image"
    # Another client is another conversation: it has no image and no first turn.
    b = client_for(server)
    alone = ask(b, q2, max_new_tokens=10)
    assert alone.strip() == direct_greedy(reference, [messages[-1]], [], 10)
    assert alone.strip() != r2.strip()


def test_streaming_through_submit(server, pictures):
    client = client_for(server)
    job = client.submit(
        message={"text": "what shape is it?", "files": [handle_file(str(pictures[1]))]},
        max_new_tokens=24,
        api_name="/chat",
    )
    partials = list(job)
    final = job.result()
    assert len(partials) >= 3, f"expected several streamed updates, got {partials}"
    for before, after in itertools.pairwise(partials):
        assert after.startswith(before)
    assert partials[-1] == final and final.strip()


def test_bad_uploads_and_empty_message_get_readable_replies(server, pictures, tmp_path):
    client = client_for(server)
    fake = tmp_path / "holiday.png"
    fake.write_text("this is text, not a png")
    good_bytes = pictures[0].read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(good_bytes[: len(good_bytes) // 2])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    cases = {
        fake: "holiday.png: not an image",
        cut: "cut.png: cannot decode",
        bomb: "bomb.png: 9000x9000 pixels",
        notes: "notes.txt: not an image",
    }
    for path, expected in cases.items():
        reply = ask(client, "what is this?", [path], max_new_tokens=4)
        assert reply.startswith(NOTICE) and expected in reply, reply
        assert "/tmp" not in reply and str(tmp_path) not in reply  # no server paths leak
    assert ask(client, "   ").startswith(NOTICE + "Empty message")
    big = tmp_path / "big.bmp"
    Image.new("RGB", (700, 700), "red").save(big)  # 1.4 MB, over --max-file-size 1
    with pytest.raises(Exception, match="(?i)size|large"):
        ask(client, "what is this?", [big])
    # The failed turns are not part of the conversation: this answer equals a fresh client's.
    after = ask(client, "what shape is it?", [pictures[0]], max_new_tokens=8)
    fresh = ask(client_for(server), "what shape is it?", [pictures[0]], max_new_tokens=8)
    assert after == fresh and not after.startswith(NOTICE)
    assert server.alive()


def test_no_path_outside_the_upload_area_is_served(server, tiny_vlm_dir, pictures):
    with open(pictures[0], "rb") as f:
        uploaded = httpx.post(server.url + "gradio_api/upload", files={"files": f}).json()[0]
    assert httpx.get(server.url + f"gradio_api/file={uploaded}").status_code == 200  # uploads do work
    for path in (
        "/etc/passwd",
        str(tiny_vlm_dir / "config.json"),
        str(pictures[1]),
        str(Path(uploaded).parent / ".." / ".." / "etc" / "passwd"),
    ):
        response = httpx.get(server.url + f"gradio_api/file={path}")
        assert response.status_code in (403, 404), (path, response.status_code)


def test_full_queue_says_busy_and_server_recovers(server, pictures):
    """12 long requests at once against --concurrency 1 --max-queue 3: the overflow is told to retry."""

    def one(i):
        try:
            return ask(client_for(server), f"question {i}", [pictures[i % 2]], max_new_tokens=60)
        except Exception as e:  # noqa: BLE001 -- QueueError (full queue) is what we are counting
            return e

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    errors = [r for r in results if isinstance(r, Exception)]
    answers = [r for r in results if isinstance(r, str)]
    assert errors and all("try again" in str(e).lower() for e in errors), errors
    # A random tiny model may pick EOS first (numerics differ with batch make-up and CPU kernels):
    # that reply is a model outcome, not a failure; any other notice is.
    assert answers and all(not a.startswith(NOTICE) or NO_TEXT in a for a in answers), answers
    recovered = ask(client_for(server), "still there?", max_new_tokens=3)
    assert isinstance(recovered, str) and recovered.strip(), recovered
    assert not recovered.startswith(NOTICE) or NO_TEXT in recovered, recovered


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_browser_upload_ask_and_see_an_answer(server, pictures):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            outside = []  # the page must load with no request leaving this machine
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None)
            page.goto(server.url, wait_until="domcontentloaded")
            expect(page.get_by_text("Quantization")).to_be_visible(timeout=30_000)
            # An example picture first: the page sends its cached copy, which the file guard lets through.
            page.get_by_text("What shape is in this picture?").first.click()
            bot = page.locator("[data-testid='bot']")
            expect(bot.first).to_be_visible(timeout=60_000)
            expect(bot.first).not_to_have_text("", timeout=60_000)
            box = page.locator("#vlm-input textarea")
            expect(box).to_be_editable(timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(str(pictures[0]))
            box.fill("what shape is it?")
            page.wait_for_timeout(1000)  # the upload finishes before the message can be sent
            box.press("Enter")
            expect(bot).to_have_count(2, timeout=60_000)
            expect(bot.nth(1)).not_to_have_text("", timeout=60_000)
            # A follow-up without an image: answered from the earlier turns' images.
            expect(box).to_be_editable(timeout=60_000)
            box.fill("describe the image.")
            box.press("Enter")
            expect(bot).to_have_count(3, timeout=60_000)
            expect(bot.nth(2)).not_to_have_text("", timeout=60_000)
            page.wait_for_timeout(1500)  # let the stream finish before the screenshot
            page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
            for i in range(3):
                text = bot.nth(i).inner_text().strip()
                assert text and not text.startswith(NOTICE), text
            assert page.locator("[data-testid='user'] img").count() >= 1, "the uploaded image should show"
            assert not [u for u in outside if not u.startswith(("data:", "blob:"))], outside
        finally:
            browser.close()
    assert server.alive()
