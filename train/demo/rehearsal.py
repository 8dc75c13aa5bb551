"""Text-only chat rows for the demo's training mix: the base LLM's own answers (self-distillation).

A LoRA trained only on easy-vqa's one-word answers makes the LLM answer *everything* in one word
("What is the capital of France?" -> "france"). Mixing in text-only conversations whose answers
are what the untouched LLM itself says teaches the adapter to change nothing when there is no
image (the reason LLaVA mixes text-only chat into its instruction data).

`vlm/demo/text_prompts.txt` holds general prompts (no question about France or Paris: that one is
the demo's test). `vlm/demo/text_chat.jsonl` holds the answers, written once by

    python -m vlm.train.demo.rehearsal --model UNTRAINED_DEMO_CHECKPOINT

from a demo checkpoint built with no trained weights (so its LLM is plain SmolLM2-135M-Instruct),
greedy, at most 24 new tokens, of which the first full sentence is kept. One sentence is enough
to teach the adapter to answer in a sentence, not a word, and it keeps a text row as short as an
easy-vqa row: a longer row widens the whole padded batch it lands in (most batches hold one),
and the demo is trained on a CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from vlm.demo import PROMPTS_FILE, TEXT_CHAT_FILE

MAX_NEW_TOKENS = 24
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def read_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    """One prompt a line; blank lines skipped."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def first_sentence(text: str) -> str:
    """`text` up to its first sentence end ('.', '!' or '?' before a space or the end), or all of it."""
    end = _SENTENCE_END.search(text)
    return text[: end.end()] if end else text


def generate_rows(model_path: str, prompts: list[str], batch_size: int = 16) -> list[dict]:
    """Greedy answers of the checkpoint's LLM (with its chat template) as `messages` rows."""
    import torch
    from tqdm.auto import tqdm

    from vlm.loading import load_pretrained

    model, processor = load_pretrained(model_path)
    llm, tokenizer = model.language_model, processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation needs left padding
    rows = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="text answers", unit="batch"):
        batch = prompts[start : start + batch_size]
        texts = [processor.format_chat([{"role": "user", "content": p}]) for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = llm.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        for prompt, ids in zip(batch, out[:, enc["input_ids"].shape[1] :]):
            answer = first_sentence(tokenizer.decode(ids, skip_special_tokens=True).strip())
            rows.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": answer}]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm.train.demo.rehearsal", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an untrained demo checkpoint, e.g. vlm-demo-base (its LLM is the plain SmolLM2)")
    p.add_argument("--prompts", type=Path, default=PROMPTS_FILE)
    p.add_argument("--out", type=Path, default=TEXT_CHAT_FILE)
    args = p.parse_args(argv)
    rows = generate_rows(args.model, read_prompts(args.prompts))
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{args.out}: {len(rows)} conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
