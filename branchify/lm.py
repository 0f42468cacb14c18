"""Exits on Hugging Face causal language models: per-token vocabulary logits from part-way up the decoder.

``HeadSpec(kind="lm")`` is the model's own final norm and ``lm_head``, shared with the model and frozen, behind a
small trainable adapter on the residual stream. The default adapter is a full ``Linear(hidden, hidden)`` added
residually and initialised to zero, so an untrained exit is exactly LayerSkip's "final norm and lm_head on an
intermediate state", and training can only move it from there; ``HeadSpec(kind="lm", hidden=r)`` makes the adapter
low rank (``hidden -> r -> hidden``), ``options={"adapter": "none"}`` drops it (nothing to train).

``attach_lm_exits`` (what ``bx.attach_exits`` calls for a spec of LM heads) builds the multi-output module:
``forward(input_ids, attention_mask=None)`` returns ``(exit_0, ..., final)``, each ``(batch, length, vocab)``; the
final logits are the model's own forward, bit for bit (the exits read the decoder layers' outputs through forward
hooks). ``bx.fit(module, loader, mode="distill")`` trains
the adapters; ``bx.generate`` drafts with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ._inputs import Inputs
from .errors import BranchifyError
from .exits import ExitPointInfo, Exits
from .heads import register_head
from .layout import Layout
from .spec import ExitSpec, spec_attribute

__all__ = ["LMExitModule", "LMHead", "attach_lm_exits", "decoder_of", "distill_agreement", "distill_loss",
           "token_batch"]

ADAPTERS = ("linear", "none")


@dataclass(frozen=True)
class Decoder:
    """Where a supported causal LM keeps its parts (the families differ only in names and positions)."""

    family: str  # "gpt2" (learned positions) or "rope" (Llama, Qwen2, ...: rotary embeddings)
    prefix: str  # module path of the decoder layers' list
    embed: nn.Module
    positions: nn.Module | None  # GPT-2's wpe
    rotary: nn.Module | None
    drop: nn.Module | None
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module


def decoder_of(model: nn.Module) -> Decoder:
    """The parts of a GPT-2 or Llama-style (``model.model.layers``) causal LM; anything else is refused."""
    inner = getattr(model, "transformer", None)
    if inner is not None and all(hasattr(inner, a) for a in ("wte", "wpe", "h", "ln_f")):
        return Decoder("gpt2", "transformer.h", inner.wte, inner.wpe, None, inner.drop, inner.h, inner.ln_f,
                       model.lm_head)
    inner = getattr(model, "model", None)
    if inner is not None and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return Decoder("rope", "model.layers", inner.embed_tokens, None, inner.rotary_emb, None, inner.layers,
                       inner.norm, model.lm_head)
    raise BranchifyError(
        f"{type(model).__name__} is not a causal LM branchify can put LM exits on: it supports GPT-2 "
        "(transformer.h, ln_f, lm_head) and Llama-style decoders (model.layers, model.norm, lm_head), e.g. "
        "GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM")


class LMHead(nn.Module):
    """An LM exit: ``lm_head(norm(h + adapter(h)))`` with the model's own ``norm`` and ``lm_head``.

    Only the adapter is registered (and trained); the norm and ``lm_head`` are the model's, referenced, not owned, so
    they stay frozen and appear once in the state dict.

    >>> import torch
    >>> head = LMHead(torch.nn.LayerNorm(8), torch.nn.Linear(8, 11), hidden=8, rank=None)
    >>> head(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 11])
    """

    def __init__(self, norm: nn.Module, lm_head: nn.Module, *, hidden: int, rank: int | None,
                 adapter: str = "linear") -> None:
        super().__init__()
        self._shared = (norm, lm_head)  # a tuple: not submodules, so never trained or saved here
        if adapter == "none":
            self.adapter = None
        elif rank is None:
            self.adapter = nn.Linear(hidden, hidden, bias=False)
            nn.init.zeros_(self.adapter.weight)
        else:
            self.adapter = nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.Linear(rank, hidden, bias=False))
            nn.init.zeros_(self.adapter[1].weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        norm, lm_head = self._shared
        if self.adapter is not None:
            hidden = hidden + self.adapter(hidden)
        return lm_head(norm(hidden))


def _refuse_lm_head(shape, layout, num_classes, spec):
    raise BranchifyError(
        "HeadSpec(kind='lm') reads a causal LM's own final norm and lm_head, so it is built only as an LM exit, "
        "never as a classifier's head: bx.attach_exits(causal_lm, spec) with every exit of kind='lm'")


def _check_lm(spec) -> str | None:
    adapter = spec.options.get("adapter", "linear")
    if adapter not in ADAPTERS or set(spec.options) - {"adapter"}:
        return (f"HeadSpec(kind='lm') takes options={{'adapter': one of {list(ADAPTERS)}}}, got "
                f"options={spec.options!r}")
    return None


register_head("lm", _refuse_lm_head, fields=("hidden", "options"))


class LMExitModule(nn.Module, Exits):
    """A causal LM with LM exits; ``forward(input_ids, attention_mask=None)`` returns ``(exit_0, ..., final)``.

    Each output is ``(batch, length, vocab)`` logits; ``final`` is the model's own ``logits``. ``exit_depths`` are
    the number of decoder layers below each exit (``bx.generate`` drafts with them). ``exit_path == "hooks"``.
    """

    exit_path = "hooks"

    def __init__(self, model: nn.Module, heads: list[LMHead], *, exit_spec: ExitSpec,
                 exit_points: list[ExitPointInfo], exit_depths: list[int]) -> None:
        super().__init__()
        self.model = model
        self.exit_heads = nn.ModuleList(heads)
        self.exit_spec = exit_spec
        self.exit_points = exit_points
        self.exit_depths = list(exit_depths)
        self.num_classes = int(model.config.vocab_size)
        self.training = model.training
        self.exit_heads.train(model.training)

    exit_spec = spec_attribute("depth order")

    def _count_exit_costs(self, inputs):
        raise BranchifyError("exit_costs is not counted for LM exits yet; bx.generate reports tokens per step")

    def exit_stages(self):
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        decoder = decoder_of(self.model)
        logits: dict[int, torch.Tensor] = {}

        def run_head(index: int, _module, _args, out) -> None:
            hidden = out[0] if isinstance(out, tuple) else out
            logits[index] = self.exit_heads[index](hidden)

        handles = [decoder.layers[depth - 1].register_forward_hook(partial(run_head, i))
                   for i, depth in enumerate(self.exit_depths)]
        try:
            final = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        return (*(logits[i] for i in range(len(self.exit_heads))), final)


def attach_lm_exits(model: nn.Module, spec: ExitSpec) -> LMExitModule:
    """LM exits on ``model`` (GPT-2 or Llama-style HF causal LM) at the decoder layers ``spec`` names by path.

    Every exit must name a decoder layer (``"transformer.h.1"``, ``"model.layers.1"``) and have
    ``HeadSpec(kind="lm")``. The model's parameters are shared, never copied.

    >>> import torch, transformers, branchify as bx
    >>> from branchify.lm import attach_lm_exits
    >>> config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32)
    >>> model = transformers.GPT2LMHeadModel(config).eval()
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="transformer.h.0", head=bx.HeadSpec(kind="lm"))])
    >>> exit0, final = attach_lm_exits(model, spec)(torch.tensor([[1, 2, 3]]))
    >>> exit0.shape, final.shape
    (torch.Size([1, 3, 50]), torch.Size([1, 3, 50]))
    """
    decoder = decoder_of(model)
    paths = [f"{decoder.prefix}.{i}" for i in range(len(decoder.layers))]
    depths, heads, points = [], [], []
    hidden = int(model.config.hidden_size)
    for index, point in enumerate(spec.exits):
        what = f"exit {index} (layer {point.layer!r})"
        if point.head.kind != "lm":
            raise BranchifyError(f"{what}: LM exits need HeadSpec(kind='lm'), got kind={point.head.kind!r}")
        if point.layer not in paths:
            raise BranchifyError(f"{what}: LM exits attach to a decoder layer, one of {paths[0]!r}..{paths[-1]!r}")
        problem = _check_lm(point.head)
        if problem:
            raise BranchifyError(f"{what}: {problem}")
        depth = paths.index(point.layer) + 1
        if depth == len(paths):
            raise BranchifyError(f"{what}: the last decoder layer is the model's own output; exit at an earlier one")
        depths.append(depth)
        head = LMHead(decoder.norm, decoder.lm_head, hidden=hidden, rank=point.head.hidden,
                      adapter=point.head.options.get("adapter", "linear"))
        param = next(decoder.lm_head.parameters())
        heads.append(head.to(device=param.device, dtype=param.dtype))
        points.append(ExitPointInfo(point.layer, point.layer, (hidden,), Layout.NLC, 0.0, depth / len(paths)))
    spec.check_order(depths, "decoder depth")
    return LMExitModule(model, heads, exit_spec=spec, exit_points=points, exit_depths=depths)


def token_batch(batch) -> tuple[Inputs, torch.Tensor]:
    """A text loader's batch as ``(inputs, token mask)``: token ids, an ``(input_ids, attention_mask)`` pair, or a
    dict with ``input_ids`` (and ``attention_mask``); any ``labels`` are ignored (distillation needs none)."""
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, Sequence) and batch and isinstance(batch[0], torch.Tensor):
        ids = batch[0]
        mask = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) and batch[1].shape == ids.shape \
            else None
    else:
        raise BranchifyError(
            f"mode='distill' reads batches of token ids: a (batch, length) tensor, an (input_ids, attention_mask) "
            f"pair or a dict with 'input_ids'; got a {type(batch).__name__}")
    if ids.ndim != 2 or ids.dtype != torch.long:
        raise BranchifyError(
            f"mode='distill' needs (batch, length) int64 token ids, got {tuple(ids.shape)} {ids.dtype}")
    mask = torch.ones_like(ids) if mask is None else mask
    return Inputs((), {"input_ids": ids, "attention_mask": mask}), mask.float()


def distill_loss(num_exits: int):
    """The distillation loss: per exit, KL(model || exit) of the next-token distributions, averaged over real tokens
    (``target`` is the token mask), summed over exits (their adapters are disjoint)."""

    def loss(outputs, target: torch.Tensor) -> torch.Tensor:
        teacher = F.log_softmax(outputs[-1].detach().float(), dim=-1)
        weights = target.float()
        total = 0.0
        for z in outputs[:num_exits]:
            kl = F.kl_div(F.log_softmax(z.float(), dim=-1), teacher, log_target=True, reduction="none").sum(-1)
            total = total + (kl * weights).sum() / weights.sum().clamp(min=1)
        return total  # type: ignore[return-value]

    return loss


def distill_agreement(module: nn.Module, loader, device: torch.device) -> tuple[float, ...]:
    """Each exit's share of real tokens whose greedy choice is the model's (the final one's is 1), over ``loader``:
    the draft's acceptance rate at one drafted token."""
    agree: list[float] = []
    tokens = 0.0
    with torch.no_grad():
        was = module.training
        module.eval()
        try:
            for batch in loader:
                inputs, mask = token_batch(batch)
                outputs = inputs.map(lambda x: x.to(device)).call(module)
                mask = mask.to(device)
                final = outputs[-1].argmax(-1)
                row = [float(((z.argmax(-1) == final).float() * mask).sum()) for z in outputs]
                agree = row if not agree else [a + b for a, b in zip(agree, row)]
                tokens += float(mask.sum())
        finally:
            module.train(was)
    if not tokens:
        raise BranchifyError("the validation loader yielded no tokens; give it text, or pass val_loader=None")
    return tuple(a / tokens for a in agree)
