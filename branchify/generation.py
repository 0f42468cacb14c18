"""Self-speculative greedy decoding from an LM exit (``bx.generate``): draft with the first layers, verify.

Each step, the first ``k`` decoder layers (up to the exit) and the exit's head draft ``draft_tokens`` tokens one at
a time; the remaining layers then run once on the drafted block, starting from the hidden states the draft already
computed, and with the draft's own keys and values in the first ``k`` layers' cache: no token is ever recomputed by
the shared layers. The model's greedy choice at each drafted position decides: the drafted tokens are kept up to the
first disagreement, and the model's own token there (or after the last draft) is added, so every step adds at least
one token and the output is the model's greedy output.

In a batch, each row keeps its own number of tokens per step. The cache stays one rectangle: slots of a row's
rejected drafts are masked out for that row (and cropped once no row needs them), and each row's positions count
only its own tokens, so no row waits for another's rejection. Left padding is handled the same way. A row that has
finished (eos, or ``max_new_tokens``) leaves the batch, so the steps the slowest rows still need compute only them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BranchifyError
from .lm import Decoder, LMExitModule, decoder_of

__all__ = ["GenerateResult", "generate"]


@dataclass(frozen=True)
class GenerateResult:
    """What ``bx.generate`` returns.

    ``sequences``: ``(batch, prompt + new)`` token ids, as ``model.generate(..., do_sample=False)`` returns them (rows
    that ended at ``eos_token_id`` padded with ``pad_token_id``); ``accepted``: the share of drafted tokens the model
    kept; ``tokens_per_step``: the mean number of tokens a verification step added to a row still generating;
    ``steps``: the verification steps (the prefill not counted); ``drafted``/``kept``: drafted and kept tokens.

    >>> r = GenerateResult(torch.zeros(1, 3, dtype=torch.long), accepted=0.5, tokens_per_step=2.0, steps=1,
    ...                    drafted=2, kept=1)
    >>> r.sequences.shape
    torch.Size([1, 3])
    """

    sequences: torch.Tensor
    accepted: float
    tokens_per_step: float
    steps: int
    drafted: int
    kept: int


class _Stack:
    """The decoder run layer by layer on one shared cache, with an explicit per-row mask of valid slots."""

    def __init__(self, model: nn.Module, decoder: Decoder, batch: int, device: torch.device, dtype: torch.dtype):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model, self.d, self.dtype = model, decoder, dtype
        self.cache = DynamicCache(config=model.config)
        if any(type(layer) is not DynamicLayer for layer in self.cache.layers):
            raise BranchifyError(
                f"{type(model).__name__}'s cache has sliding-window or other non-plain layers, which bx.generate "
                "cannot roll back per row; use a config without sliding windows")
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # per row: slots it may attend to
        self.length = [0] * len(decoder.layers)  # slots held by each layer's cache

    def mask(self, start: int, q: int, valid_new: torch.Tensor) -> torch.Tensor:
        """The additive mask of a ``q``-token block written at slots ``start..start+q-1``."""
        past = self.valid[:, :start, None].expand(-1, -1, q).transpose(1, 2)  # (B, q, start)
        causal = torch.ones(q, q, dtype=torch.bool, device=self.valid.device).tril()
        block = causal & valid_new[:, None, :]
        block = block | torch.eye(q, dtype=torch.bool, device=self.valid.device)  # a pad query sees itself: no NaN
        allowed = torch.cat([past, block], dim=2)[:, None]
        zero = torch.zeros((), dtype=self.dtype, device=self.valid.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.d.embed(ids)
        if self.d.positions is not None:
            hidden = self.d.drop(hidden + self.d.positions(positions))
        return hidden

    def run(self, hidden: torch.Tensor, lo: int, hi: int, positions: torch.Tensor, start: int,
            valid_new: torch.Tensor) -> torch.Tensor:
        """Layers ``lo..hi-1`` on a block written at slots ``start..``; each layer's cache must end at ``start``."""
        if lo >= hi:
            return hidden
        for i in range(lo, hi):
            if self.length[i] != start:
                raise BranchifyError(f"internal: layer {i} holds {self.length[i]} slots, not {start}")
        mask = self.mask(start, hidden.shape[1], valid_new)
        kwargs = {}
        if self.d.rotary is not None:
            kwargs["position_embeddings"] = self.d.rotary(hidden, position_ids=positions)
        for i in range(lo, hi):
            out = self.d.layers[i](hidden, attention_mask=mask, position_ids=positions, cache=self.cache,
                                   use_cache=True, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            self.length[i] = start + hidden.shape[1]
        return hidden

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` (the rows still generating) in the cache and the mask."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.valid = self.valid[index]

    def crop(self, length: int) -> None:
        """Drop every slot from ``length`` on, in every layer (a rejected draft's keys and values)."""
        for i, layer in enumerate(self.cache.layers):
            if self.length[i] > length:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
                self.length[i] = length
        self.valid = self.valid[:, :length]


def _eos_set(eos_token_id, model: nn.Module) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id) \
        if isinstance(eos_token_id, Iterable) else None
    if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BranchifyError(f"eos_token_id={eos_token_id!r} must be a token id or a list of them")
    return set(ids)


# generation-config settings under which HF's greedy generate is no longer the argmax of the logits, with the value
# that means "off"; bx.generate applies none of them, so it refuses rather than differ silently
_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
               "min_new_tokens": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None, "num_beams": 1}


def _check_generation_config(model: nn.Module) -> None:
    config = getattr(model, "generation_config", None)
    found = {name: getattr(config, name, None) for name in _PROCESSORS}
    changed = {name: value for name, value in found.items() if value not in (None, _PROCESSORS[name])}
    if changed:
        name = next(iter(changed))
        raise BranchifyError(
            f"the model's generation_config sets {', '.join(f'{k}={v!r}' for k, v in changed.items())}, which change "
            f"HF's greedy choice, and bx.generate applies none of them (its output is the argmax of the logits); "
            f"unset them (model.generation_config.{name} = None) to decode greedily")


def _checked(module, input_ids, attention_mask, max_new_tokens, draft_exit, draft_tokens):
    if not isinstance(module, LMExitModule):
        raise BranchifyError(
            f"bx.generate drafts with an LM exit, so it needs a module made by bx.attach_exits with "
            f"HeadSpec(kind='lm') exits on a causal LM, got "
            f"{type(module).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long \
            or input_ids.shape[1] == 0:
        raise BranchifyError(f"input_ids must be a (batch, length) tensor of token ids, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("draft_tokens", draft_tokens, 0),
                             ("draft_exit", draft_exit, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BranchifyError(f"{name}={value!r} must be an integer >= {low}")
    if draft_exit >= len(module.exit_heads):
        raise BranchifyError(f"draft_exit={draft_exit} but the module has {len(module.exit_heads)} exit(s); "
                             f"pick 0..{len(module.exit_heads) - 1}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise BranchifyError(f"attention_mask is {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    attention_mask = attention_mask.bool()
    if not bool(attention_mask[:, -1].all()):
        raise BranchifyError("the prompts are right-padded (attention_mask is 0 at the end of a row); greedy "
                             "generation continues each row from its last token: pad on the left "
                             "(tokenizer.padding_side = 'left')")
    return attention_mask


@torch.no_grad()
def generate(module: LMExitModule, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, draft_exit: int = 0, draft_tokens: int = 4,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> GenerateResult:
    """Greedy generation with self-speculative decoding from exit ``draft_exit``; the model's greedy output.

    ``sequences`` equals ``module.model.generate(input_ids, attention_mask=..., max_new_tokens=...,
    do_sample=False)`` token for token, up to ties within floating-point rounding (the block verification rounds
    differently from one-token steps, as in HF's own assisted generation: exact in float64 barring near ties).
    ``draft_tokens=0`` is plain greedy decoding. ``eos_token_id`` (default: the model's ``generation_config``)
    ends a row, which is then padded with ``pad_token_id`` (default: the generation config's, else the first eos).
    Prompts with padding must be left-padded.

    >>> import torch, transformers, branchify as bx
    >>> config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64)
    >>> model = transformers.GPT2LMHeadModel(config).eval()
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="transformer.h.0", head=bx.HeadSpec(kind="lm"))])
    >>> module = bx.attach_exits(model, spec)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> out = bx.generate(module, ids, max_new_tokens=6)
    >>> torch.equal(out.sequences, model.generate(ids, max_new_tokens=6, do_sample=False))
    True
    """
    mask = _checked(module, input_ids, attention_mask, max_new_tokens, draft_exit, draft_tokens)
    model = module.model
    _check_generation_config(model)
    decoder = decoder_of(model)
    head = module.exit_heads[draft_exit]
    k, n_layers = module.exit_depths[draft_exit], len(decoder.layers)
    eos = _eos_set(eos_token_id, model)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        if pad_token_id is None and eos:
            pad_token_id = min(eos) if len(eos) > 1 else next(iter(eos))
    batch, device = input_ids.shape[0], input_ids.device
    dtype = next(decoder.lm_head.parameters()).dtype
    was_training = module.training
    module.eval()
    try:
        stack = _Stack(model, decoder, batch, device, dtype)
        # prefill: every layer on the prompt; positions count each row's own tokens (HF's cumsum rule)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        stack.valid = mask.clone()
        hidden = stack.run(stack.embed(input_ids, positions), 0, n_layers, positions, 0, mask)
        pending = decoder.lm_head(decoder.norm(hidden[:, -1:]))[:, 0].argmax(-1)  # (B,)
        count = mask.sum(1)  # each row's tokens in the cache: the next position
        new: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        steps = drafted = kept = added = active_steps = 0

        def append(row: int, tokens: list[int]) -> None:
            for token in tokens:
                if done[row]:
                    return
                new[row].append(token)
                if token in eos or len(new[row]) >= max_new_tokens:
                    done[row] = True

        for row in range(batch):
            append(row, [int(pending[row])])
        rows = list(range(batch))  # the original row of each row still in the cache
        while not all(done):
            if any(done[row] for row in rows):  # finished rows leave the batch: later steps do not compute them
                keep = [i for i, row in enumerate(rows) if not done[row]]
                index = torch.tensor(keep, device=device)
                stack.keep_rows(index)
                pending, count, rows = pending[index], count[index], [rows[i] for i in keep]
            active = len(rows)
            remaining = max(max_new_tokens - len(new[row]) for row in rows)
            d = min(draft_tokens, remaining - 1)  # drafts past the last needed token would be thrown away
            start = stack.valid.shape[1]
            ones = torch.ones(active, 1, dtype=torch.bool, device=device)
            token, states, drafts = pending[:, None], [], []
            for j in range(d + 1):
                pos = (count + j)[:, None]
                stack.valid = torch.cat([stack.valid, ones], dim=1)
                h = stack.run(stack.embed(token, pos), 0, k, pos, start + j, ones[:, :1])
                states.append(h)
                if j < d:
                    token = head(h).argmax(-1)
                    drafts.append(token)
            block = torch.cat(states, dim=1)  # (B, d + 1, hidden): the shared layers' output, reused
            pos = count[:, None] + torch.arange(d + 1, device=device)
            valid_new = torch.ones(active, d + 1, dtype=torch.bool, device=device)
            hidden = stack.run(block, k, n_layers, pos, start, valid_new)
            choice = decoder.lm_head(decoder.norm(hidden)).argmax(-1)  # (B, d + 1): the model's greedy tokens
            if d:
                drafted_block = torch.cat(drafts, dim=1)
                agree = (drafted_block == choice[:, :d]).long().cumprod(dim=1)
                accepted = agree.sum(1)  # (B,)
            else:
                drafted_block = choice[:, :0]
                accepted = torch.zeros(active, dtype=torch.long, device=device)
            steps += 1
            for i, row in enumerate(rows):
                a = int(accepted[i])
                before = len(new[row])
                append(row, [*drafted_block[i, :a].tolist(), int(choice[i, a])])
                drafted += d
                kept += a
                added += len(new[row]) - before
                active_steps += 1
            # slot start + j holds the pending token (j = 0) and draft j; a row keeps slots up to start + accepted
            slots = torch.arange(d + 1, device=device)[None, :]
            stack.valid[:, start:] = slots <= accepted[:, None]
            stack.crop(start + int(accepted.max()) + 1)
            pending = choice.gather(1, accepted[:, None])[:, 0]
            count = count + accepted + 1
    finally:
        module.train(was_training)
    length = max(len(r) for r in new)
    fill = pad_token_id if pad_token_id is not None else 0
    out = torch.full((batch, length), fill, dtype=input_ids.dtype, device=device)
    for row, tokens in enumerate(new):
        out[row, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype, device=device)
    return GenerateResult(torch.cat([input_ids, out], dim=1), accepted=kept / drafted if drafted else 0.0,
                          tokens_per_step=added / active_steps if active_steps else 0.0, steps=steps,
                          drafted=drafted, kept=kept)
