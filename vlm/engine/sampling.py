"""Each request's next token and the one rule for its text, shared by every decode path.

`Sampler` chooses a request's tokens: greedy, or sampled through transformers' own logits warpers
(temperature, top-k, top-p) with the request's own random generator, so a seeded request gives the
same text alone, inside a batch of others, offline or streamed. `find_stop` / `final_text` are the
text rule: a reply ends before its first stop string and has no leading or trailing whitespace.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .request import GenerationSettings

_NO_IDS = torch.empty(1, 0, dtype=torch.long)  # the warpers take the ids so far; these read none


class Sampler:
    """One request's token choices (call `choose` with each step's logits for its row)."""

    def __init__(self, settings: GenerationSettings, stop_token_ids: list[int]):
        self.settings, self.stop_token_ids = settings, stop_token_ids
        self.warpers = LogitsProcessorList()
        self.generator: torch.Generator | None = None
        if settings.greedy:
            return
        self.warpers.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            self.warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(settings.top_p))
        # Unseeded requests still get a generator of their own, seeded from the global one: no
        # other request's sampling moves their random stream.
        seed = settings.seed if settings.seed is not None else int(torch.randint(2**62, ()))
        self.generator = torch.Generator().manual_seed(seed)

    def choose(self, logits: torch.Tensor, generated: int) -> int:
        """The next token from this row's logits `(vocab,)` (float32, on the CPU), after `generated`
        tokens (stop tokens are barred until `min_new_tokens`)."""
        if generated < self.settings.min_new_tokens:
            logits = logits.clone()
            logits[self.stop_token_ids] = -float("inf")
        if self.generator is None:
            return int(torch.argmax(logits))
        scores = self.warpers(_NO_IDS, logits[None])
        return int(torch.multinomial(torch.softmax(scores[0], dim=-1), 1, generator=self.generator))


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Where the first stop string in `text[start:]` begins (a stop string may start before
    `start` if it ends after it), else None."""
    cuts = [i for s in stops if s and (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(cuts) if cuts else None


def final_text(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """A reply's text: cut before its first stop string (OpenAI's convention: the stop string is
    not part of it), then stripped; and whether a stop string was found."""
    cut = find_stop(text, stops)
    return (text if cut is None else text[:cut]).strip(), cut is not None
