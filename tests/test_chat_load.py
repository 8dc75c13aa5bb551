"""Load: 16 concurrent `gradio_client` users x 3 turns against one `vlm chat` subprocess.

Every turn must be answered (no error, no notice), replies must be decoded in batches (the
engine's peak batch), and the server's resident memory must come back near where it started once
the users are gone (no per-session leak).
"""

from __future__ import annotations

import gc
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from gradio_client import Client, handle_file
from scrape import scrape, totals
from server_process import NOTICE, ChatServer
from tiny import random_image

USERS, TURNS = 16, 3


@pytest.fixture(scope="module")
def server(tiny_vlm_dir, tmp_path_factory):
    srv = ChatServer(
        tiny_vlm_dir, tmp_path_factory.mktemp("chat-load") / "server.log", "--concurrency", "16", "--max-queue", "64"
    )
    yield srv
    srv.stop()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def one_user(url: str, image_path: str, user: int) -> list[str]:
    client = Client(url, verbose=False)
    replies = []
    try:
        for turn in range(TURNS):
            files = [handle_file(image_path)] if turn == 0 else []
            replies.append(
                client.predict(
                    message={"text": f"user {user} question {turn}", "files": files},
                    max_new_tokens=12,
                    api_name="/chat",
                )
            )
    finally:
        client.close()
    return replies


def run_round(server, images) -> tuple[list[list[str]], float]:
    start = time.monotonic()
    with ThreadPoolExecutor(USERS) as pool:
        results = list(pool.map(lambda u: one_user(server.url, images[u % len(images)], u), range(USERS)))
    return results, time.monotonic() - start


def test_16_users_3_turns_all_answered_and_memory_settles(server, tmp_path):
    images = []
    for seed in range(4):
        images.append(str(tmp_path / f"user{seed}.png"))
        random_image(seed, (64, 48)).save(images[-1])
    # A warm-up round: first-use allocations (thread pools, caches) are not a leak.
    run_round(server, images[:1])
    time.sleep(1)
    before = rss_mb(server.pid)
    results, seconds = run_round(server, images)
    for replies in results:
        assert len(replies) == TURNS
        for reply in replies:
            assert isinstance(reply, str) and reply.strip() and not reply.startswith(NOTICE), reply
    gc.collect()
    time.sleep(2)
    after = rss_mb(server.pid)
    print(f"\n{USERS} users x {TURNS} turns in {seconds:.1f}s; server RSS {before:.0f} MB -> {after:.0f} MB")
    assert after - before < max(60.0, 0.15 * before), f"server RSS grew {before:.0f} -> {after:.0f} MB"
    assert server.alive()
    # Answered in batches: the engine decoded several users' replies together.
    metrics = totals(scrape(server.url + "metrics"))
    print(f"peak batch {metrics['vlm_peak_batch_size']}, {metrics['vlm_decode_steps_total']} decode steps")
    assert int(metrics["vlm_peak_batch_size"]) >= 4
