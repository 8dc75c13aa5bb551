"""Continuous batching: the running batch of sequences, one decode step at a time.

Each new request is prefilled alone (its prompt, image soft prompts spliced in, through the LLM
with a fresh KV cache), then its cache joins the running batch's: both are left-padded to the
same length and stacked, with the attention mask marking the padding and explicit position ids,
so every row computes what it would compute alone (the same layout transformers' `generate`
uses for a left-padded batch). A decode step runs the LLM once for every row; rows that finish
(end of sequence, a stop string, `max_new_tokens`, cancellation) leave the batch at once, and
the padding columns no row needs any more are cut away.

Changes to the batch are all-or-nothing: new tensors are built first and assigned after, so an
out-of-memory part way leaves the batch as it was, and the engine can go on with it.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn import functional as F
from transformers import DynamicCache

from ..novelty import WARNING as NOVELTY_WARNING
from .adapters import AdapterRouting
from .encode import Encoded
from .request import Completion, GenerationSettings, Stream
from .sampling import Sampler, find_stop

REPLACEMENT_CHAR = "\ufffd"  # a byte-level token that ends inside a UTF-8 character decodes to this


class Sequence:
    """One request in the running batch: its tokens so far, its sampler, its stop rules."""

    def __init__(self, stream: Stream, encoded: Encoded, stop_token_ids: list[int], tokenizer, max_length: int,
                 adapter: str | None = None):
        self.stream = stream
        self.adapter = adapter  # the LoRA adapter this row runs (`adapters.py`)
        self.settings: GenerationSettings = stream.request.settings
        self.encoded = encoded
        self.stop_token_ids = stop_token_ids
        self.tokenizer = tokenizer
        # No more tokens than the LLM's context holds (prompt included).
        self.max_new_tokens = max(1, min(self.settings.max_new_tokens, max_length - len(encoded.input_ids)))
        self.tokens: list[int] = []  # generated, end-of-sequence token excluded
        self.text = ""  # decoded text of `tokens`, stop string cut; only ever appended to
        self.sent = 0  # characters of `text` pushed to the stream
        # Incremental decoding (vLLM's and TGI's offsets): `tokens[:_read]` are in `text`;
        # `tokens[_prefix:_read]` is the context the next window is decoded with.
        self._prefix = 0
        self._read = 0
        self.stopped = False  # by a stop token or a stop string (finish reason "stop", not "length")
        self.stop_token_seen = False  # the model generated a stop token: it counts as generated
        self.sampler = Sampler(self.settings, stop_token_ids)

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded.input_ids)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits `(vocab,)`, float32, on the CPU."""
        return self.sampler.choose(logits, len(self.tokens))

    # -- stopping and streaming ----------------------------------------------------------------
    def accept(self, token: int) -> bool:
        """Record `token` and stream the text that is final; True when the sequence is done.

        The streamed pieces add up to the completion's text (`sampling.final_text`: cut before a
        stop string, no leading or trailing whitespace, as offline batches give it); text that
        could still turn into a stop string or end up trailing whitespace, or that ends inside a
        character, is held back."""
        if token in self.stop_token_ids:
            self.stopped = self.stop_token_seen = True
            self._extend(final=True)
            return self._finish()
        self.tokens.append(token)
        at_limit = len(self.tokens) >= self.max_new_tokens
        if self._extend(final=at_limit):
            self.stopped = True
            return self._finish()
        if at_limit:
            return self._finish()
        held = max((len(s) - 1 for s in self.settings.stop), default=0)
        self._push(min(len(self.text) - held, len(self.text.rstrip())))
        return False

    def _push(self, end: int) -> None:
        """Stream `text` up to `end`, leading whitespace left out."""
        start = max(self.sent, len(self.text) - len(self.text.lstrip()))
        if end > start:
            self.stream.push(self.text[start:end])
            self.sent = end

    def _extend(self, final: bool) -> bool:
        """Append the text the new tokens complete to `text`, cut at a stop string; True when one
        was found. `final`: the last call, text ending inside a character is added too."""
        start = len(self.text)
        self.text += self._new_text(final)
        # Only a stop string that ends in the new text can be new (an earlier one ended the sequence).
        cut = find_stop(self.text, self.settings.stop, start)
        if cut is not None:  # never before `sent`: the held-back tail covers it
            self.text = self.text[:cut]
        return cut is not None

    def _new_text(self, final: bool) -> str:
        """The text `tokens[_read:]` add, decoding only a window of recent tokens (decoding all
        of them each step would cost O(n^2)). The window starts a few tokens back so that what a
        tokenizer does at the start of a text (a dropped leading space) cancels out."""
        before = self.tokenizer.decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith(REPLACEMENT_CHAR) and not final):
            return ""  # nothing new yet, or the last token ends inside a UTF-8 character
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before):]

    def _finish(self) -> bool:
        self._push(len(self.text.rstrip()))
        return True

    def completion(self, reason: str | None = None, error: BaseException | None = None) -> Completion:
        if reason is None:
            reason = "stop" if self.stopped else "length"
        generated = len(self.tokens) + self.stop_token_seen
        warning = NOVELTY_WARNING if self.encoded.novel else None
        return Completion(self.text.strip(), reason, self.prompt_tokens, generated, error, warning)

    def resume_inputs(self) -> tuple[list[int], int | None]:
        """What a (re-)prefill feeds the LLM, and the token pending for the next decode step:
        a sequence evicted after an out-of-memory continues where it was."""
        if not self.tokens:
            return self.encoded.input_ids, None
        return self.encoded.input_ids + self.tokens[:-1], self.tokens[-1]


class RunningBatch:
    """The sequences being decoded together, with their stacked KV cache."""

    def __init__(self, model, routing: AdapterRouting | None = None):
        self.model = model
        self.routing = routing or AdapterRouting(model)
        self.llm = getattr(model, "language_model", None)  # None: an image-text model, nothing to decode
        # transformers 5.24 names the KV cache argument `cache`; earlier releases `past_key_values`.
        params = inspect.signature(self.llm.forward).parameters if self.llm is not None else {}
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.seqs: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cached length): 0 = left padding
        self.pending: torch.Tensor | None = None  # (rows,): the token each row feeds next

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> bool:
        """Run `seq`'s prompt (or, resumed, prompt and tokens so far) and add it to the batch.
        Returns True when its first token already ended it (it is then not added)."""
        ids, pending = seq.resume_inputs()
        input_ids = torch.tensor([ids], device=self.device)
        features = seq.encoded.image_features
        embeds = self.model.embed_inputs(input_ids, image_features=features)
        cache = DynamicCache()
        with self.routing.rows([seq.adapter]):
            out = self.llm(
                inputs_embeds=embeds,
                attention_mask=torch.ones_like(input_ids),
                position_ids=torch.arange(len(ids), device=self.device)[None],
                use_cache=True,
                **{self.cache_arg: cache},
                logits_to_keep=1,
            )
        if pending is None:
            pending = seq.choose(out.logits[0, -1].float().cpu())
            if seq.accept(pending):
                return True
        self._join(seq, cache, len(ids), pending)
        return False

    def _join(self, seq: Sequence, cache: DynamicCache, length: int, pending: int) -> None:
        """Add `seq` to the batch, next to the rows of its adapter (`lora_rows.py` runs each
        adapter's rows as one block)."""
        mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        token = torch.tensor([pending], device=self.device)
        if self.cache is None:
            self.seqs, self.cache, self.mask, self.pending = [seq], cache, mask, token
            return
        at = 1 + max((i for i, other in enumerate(self.seqs) if other.adapter == seq.adapter), default=len(self.seqs) - 1)
        width = max(self.mask.shape[1], length)

        def insert(rows: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
            return torch.cat([rows[:at], row, rows[at:]])

        states = [(insert(_pad_left(old.keys, width), _pad_left(new.keys, width)),
                   insert(_pad_left(old.values, width), _pad_left(new.values, width)))
                  for old, new in zip(self.cache.layers, cache.layers)]
        joined_mask = insert(F.pad(self.mask, (width - self.mask.shape[1], 0)), F.pad(mask, (width - length, 0)))
        joined_pending = insert(self.pending, token)
        self._assign(states)  # every new tensor exists: nothing below allocates
        self.mask, self.pending = joined_mask, joined_pending
        self.seqs.insert(at, seq)

    def _assign(self, states: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (keys, values) in zip(self.cache.layers, states):
            layer.keys, layer.values = keys, values

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One decode step for every row; returns the rows that finished (still in the batch:
        take them out with `remove`).

        On out-of-memory the batch is left as it was before the step (the layers that already
        stored this step's keys and values drop them), so the caller can evict rows and go on."""
        length = self.mask.shape[1]
        try:
            mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            with self.routing.rows([seq.adapter for seq in self.seqs]):
                out = self.llm(
                    input_ids=self.pending[:, None],
                    attention_mask=mask,
                    position_ids=mask.sum(dim=1, keepdim=True) - 1,
                    use_cache=True,
                    **{self.cache_arg: self.cache},
                )
            chosen = self._choose(out.logits[:, -1].float().cpu())
            pending = torch.tensor(chosen, device=self.device)
        except torch.OutOfMemoryError:
            for layer in self.cache.layers:
                if layer.keys is not None and layer.keys.shape[-2] > length:
                    layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
            raise
        self.mask, self.pending = mask, pending
        return [i for i, (seq, token) in enumerate(zip(self.seqs, chosen)) if seq.accept(token)]

    def _choose(self, logits: torch.Tensor) -> list[int]:
        """Each row's next token from the step's logits `(rows, vocab)` (greedy rows at once)."""
        greedy = torch.argmax(logits, dim=-1).tolist()
        chosen = []
        for i, seq in enumerate(self.seqs):
            # Greedy with no stop token left to bar: the batch's argmax is this row's token.
            argmax = seq.settings.greedy and len(seq.tokens) >= seq.settings.min_new_tokens
            chosen.append(greedy[i] if argmax else seq.choose(logits[i]))
        return chosen

    def remove(self, rows: list[int]) -> list[Sequence]:
        """Take `rows` out of the batch (finished, cancelled or evicted); returns their sequences.

        Keeping the other rows copies their KV cache, which can run out of memory; the batch is
        then unchanged. Removing every row copies nothing."""
        if not rows:
            return []
        gone = [self.seqs[i] for i in rows]
        dropped = set(rows)
        keep = [i for i in range(len(self.seqs)) if i not in dropped]
        if not keep:
            self.seqs, self.cache, self.mask, self.pending = [], None, None, None
            return gone
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        # Columns that are padding in every remaining row cost attention for nothing.
        first = int(mask.any(dim=0).nonzero()[0])
        states = [(layer.keys[index, :, first:], layer.values[index, :, first:]) for layer in self.cache.layers]
        pending = self.pending[index]
        self._assign(states)
        self.seqs = [self.seqs[i] for i in keep]
        self.mask, self.pending = mask[:, first:], pending
        return gone


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    """`(rows, heads, length, dim)` states left-padded with zeros to `width` positions."""
    return F.pad(states, (0, 0, width - states.shape[-2], 0))
