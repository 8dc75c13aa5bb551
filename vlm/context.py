"""The one context-length rule: how much of the LLM's context a prompt may take, and its answer.

A prompt (images included) must leave room for its answer: the `max_new_tokens` asked for, but at
most half the context (so a long conversation still gets an answer), or one token when none was
asked for (an API request without `max_tokens` may use whatever is left). A conversation that
does not fit either drops its oldest turns (the chat page) or is refused with an error naming the
limit (the API, as OpenAI refuses). The answer may then use all the room the prompt leaves, up to
`max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import VLMError

T = TypeVar("T")


@dataclass
class Fitted:
    """What `fit_context` kept: the turns, how many oldest ones it dropped, the prompt's tokens and
    the answer's token limit."""

    turns: list
    dropped: int
    prompt_tokens: int
    max_new_tokens: int


def answer_reserve(context_length: int, max_new_tokens: int | None) -> int:
    """The tokens a prompt must leave for the answer (see the module doc)."""
    return max(1, min(max_new_tokens or 1, context_length // 2))


def fit_context(turns: Sequence[T], count_tokens: Callable[[list[T]], int], context_length: int,
                max_new_tokens: int | None, drop_oldest: bool) -> Fitted:
    """Fit a conversation into the context. `count_tokens(turns)` measures the prompt exactly as it
    will be encoded (image tokens included). With `drop_oldest`, the oldest turns go first (never
    the last one); a prompt that still does not fit is a `VLMError` naming the numbers."""
    turns = list(turns)
    reserve = answer_reserve(context_length, max_new_tokens)
    tokens, dropped = count_tokens(turns), 0
    while drop_oldest and tokens + reserve > context_length and len(turns) > 1:
        turns, dropped = turns[1:], dropped + 1
        tokens = count_tokens(turns)
    if tokens + reserve > context_length:
        raise VLMError(f"the conversation needs {tokens} tokens (images included) and its answer {reserve}, but this "
                       f"model reads at most {context_length}; shorten it, send fewer images or ask a shorter answer")
    return Fitted(turns, dropped, tokens, min(max_new_tokens or context_length, context_length - tokens))
