"""Every figure the demo's README states, from one command (release tooling).

    python -m vlm.train.demo.evaluate RUN_DIR --out runs/demo-eval.json

RUN_DIR is a demo training output (or the demo itself with `--model vlm-demo`). Measures, on
easy-vqa's test split (never trained on):
- single questions (`vlm eval --task vqa`, greedy, 4 new tokens);
- captions of the test images ("a red circle": exact match, CIDEr);
- conversations (`vlm eval --task chat`): follow-ups without the image, two-image questions,
  held-out paraphrases;
- text-only chat: "What is the capital of France?", and held-out general prompts answered as
  served, with the LoRA on for them too, and by the base SmolLM2 (the LoRA off): how many first
  sentences are the base's;
- novelty warnings: the chat page's scikit-image photos, and all test images;
- retrieval recall@1/5/10 on the test captions (ITC re-ranked by ITM), when the model has the
  stage-1 heads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vlm.errors import VLMError

HELD_OUT_PROMPTS = [  # general prompts that are not among the rehearsal rows (vlm/demo/text_prompts.txt)
    "What is the capital of France?", "Name a planet in our solar system.", "What do bees make?",
    "How many days are in a week?", "What is the opposite of hot?", "Give me a synonym for happy.",
    "What language is spoken in Spain?", "What is 7 times 8?", "What color is grass?",
    "Write a short greeting for a birthday card.", "Name an animal that can fly.", "Name a fruit that is yellow.",
]


def run_eval(model: str, data: str, task: str, extra: list[str]) -> dict:
    """`vlm eval` in this process; its JSON summary."""
    import contextlib
    import io

    from vlm.train.evaluate import main as eval_main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = eval_main(["--model", model, "--data", data, "--task", task, *extra])
    if status != 0:
        raise SystemExit(f"vlm eval {task} {data} exited {status}")
    return json.loads(buffer.getvalue())


def text_chat(model_dir: str) -> dict:
    """Answers to general prompts through the engine (greedy, first sentence), three ways: as
    served (image-free conversations run the base LLM, `vlm.engine.adapters`), with the LoRA on
    for them too (`--adapter-for-text`), and the base LLM itself (the LoRA off)."""
    from vlm import load_pretrained
    from vlm.engine import GenerationSettings, InferenceEngine, Request
    from vlm.train.demo.rehearsal import MAX_NEW_TOKENS, first_sentence

    model, processor = load_pretrained(model_dir)
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    requests = [Request(processor.format_chat([{"role": "user", "content": p}]), [], settings)
                for p in HELD_OUT_PROMPTS]

    def answers(adapter_for_text: bool) -> list[str]:
        engine = InferenceEngine(model, processor, max_batch_size=len(requests), adapter_for_text=adapter_for_text)
        return [first_sentence(c.text) for c in engine.generate(requests)]

    served, tuned = answers(False), answers(True)
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = answers(True)
    else:  # a merged LoRA: the base is not here to ask, so there is nothing to compare
        base = [None] * len(served)

    def same(these: list[str]) -> int | None:
        return None if base[0] is None else sum(a == b for a, b in zip(these, base))

    return {"prompts": len(HELD_OUT_PROMPTS), "same_first_sentence_as_base": same(served),
            "with_adapter_same_first_sentence_as_base": same(tuned), "paris": "paris" in served[0].lower(),
            "answers": [{"prompt": p, "served": a, "with_adapter": t, "base": b}
                        for p, a, t, b in zip(HELD_OUT_PROMPTS, served, tuned, base)]}


def novelty(model_dir: str) -> dict:
    """How many of the page's photos and of the test images get the novelty warning."""
    from PIL import Image

    from vlm import load_pretrained
    from vlm.data import load_examples
    from vlm.demo import demo_photos
    from vlm.engine import GenerationSettings, InferenceEngine, Request

    model, processor = load_pretrained(model_dir)
    if getattr(model, "novelty", None) is None:
        return {"statistics": False}
    engine = InferenceEngine(model, processor, max_batch_size=64)
    settings = GenerationSettings(max_new_tokens=1)

    def flagged(images) -> int:
        requests = [Request("<image>", [image], settings) for image in images]
        return sum(c.warning is not None for c in engine.generate(requests))

    photos = {name: Image.open(path).convert("RGB") for name, path in demo_photos(progress=False).items()}
    tests = sorted({e.image for e in load_examples("easyvqa:test_captions")})
    return {"photos": len(photos), "photos_flagged": flagged(photos.values()), "test_images": len(tests),
            "test_images_flagged": flagged(Image.open(p).convert("RGB") for p in tests)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm.train.demo.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a demo training output folder, or vlm-demo")
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON summary")
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows of each set (a quick look)")
    args = p.parse_args(argv)
    limit = ["--limit", str(args.limit)] if args.limit else []
    started = time.perf_counter()
    greedy = ["--num-beams", "1", "--max-new-tokens", "4", "--batch-size", "64", *limit]
    summary = {"model": args.model, "vqa": run_eval(args.model, "easyvqa:test_vqa", "vqa", greedy)["metrics"]}
    summary["captions"] = run_eval(args.model, "easyvqa:test_captions", "caption",
                                   ["--num-beams", "1", "--max-new-tokens", "8", "--min-new-tokens", "0",
                                    "--batch-size", "64", *limit])["metrics"]
    for name in ("followups", "two_images", "paraphrases"):
        result = run_eval(args.model, f"easyvqa:test_{name}", "chat", ["--batch-size", "64", *limit])
        summary[name] = result["metrics"]
    summary["text_chat"] = text_chat(args.model)
    summary["novelty"] = novelty(args.model)
    try:
        summary["retrieval"] = run_eval(args.model, "easyvqa:test_captions", "retrieval",
                                        ["--k-test", "16", "--batch-size", "64", *limit])["metrics"]
    except VLMError as e:  # a model without the stage-1 heads
        summary["retrieval"] = str(e)
    summary["seconds"] = round(time.perf_counter() - started)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "text_chat"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
