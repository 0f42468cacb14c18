"""Training a module with exits: the one training loop of the package (``bx.fit``) and its history.

Two recipes. ``mode="joint"`` trains the backbone and every head together on Distiller's weighted
loss (``bx.EarlyExitLoss``). ``mode="heads"`` is the two-stage recipe (earlyon's, and the sweep's):
the backbone is frozen (``branchify.freeze``: parameters out of autograd) and runs in eval mode, so
its weights and BatchNorm statistics stay exactly as they were and one backbone forward per batch
feeds every head; only the heads learn. Either way each step is: forward, loss, zero the gradients,
backward, optimizer step, then the ``on_step`` hook (a per-step learning-rate schedule steps there).
"""

from __future__ import annotations

import contextlib
import html
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ._distributed import data_parallel, distributed_world
from ._distributed import summed as summed_over_ranks
from ._inputs import split_batch
from ._outputs import split_outputs
from ._tables import html_table, text_table
from ._trace import eval_mode, kept_modes
from .calibration.cache import module_device
from .errors import BranchifyError
from .exits import exit_module
from .freeze import frozen_backbone
from .lm import distill_agreement, distill_loss, token_batch
from .loss import EarlyExitLoss
from .stats import ExitStats

__all__ = ["FitEpoch", "FitHistory", "FitStep", "fit"]

Mode = Literal["joint", "heads", "distill"]
Loss = Callable[[Sequence, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

FROZEN = ("heads", "distill")  # the modes that train only the heads, on a frozen backbone in eval mode
# Adam needs no schedule to train from scratch on small data; the heads' rate is the sweep's.
DEFAULT_LR = {"joint": 1e-3, "heads": 3e-3, "distill": 1e-3}


@dataclass(frozen=True)
class FitStep:
    """One optimizer step, as ``fit`` hands it to ``on_step`` (after ``optimizer.step()``).

    ``epoch`` counts from 0, ``step`` from 1 within the epoch (``steps``: the loader's length, None
    when it has none); ``outputs`` are every exit's logits, the final one last, detached; ``loss`` is
    the batch's loss (detached, a 0-dim tensor on the module's device); ``lr`` the first parameter
    group's learning rate for this step; ``seconds`` the time since the epoch began.

    >>> import torch
    >>> outputs = (torch.zeros(2, 3), torch.zeros(2, 3))
    >>> step = FitStep(0, 1, 4, outputs, torch.tensor([0, 1]), torch.tensor(1.5), 0.1, 0.5)
    >>> step.outputs[-1].shape, float(step.loss)
    (torch.Size([2, 3]), 1.5)
    """

    epoch: int
    step: int
    steps: int | None
    outputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    loss: torch.Tensor
    lr: float
    seconds: float


@dataclass(frozen=True)
class FitEpoch:
    """One epoch of ``fit``: the training loss, and each exit's top-1 on the validation data.

    ``loss`` is the mean training loss per sample; ``val_accuracy`` the top-1 (a fraction) of each
    exit, the final one last, if every validation sample left there (None without ``val_loader``);
    ``lr`` the learning rate of the epoch's last step; ``seconds`` the time of the training pass.

    >>> FitEpoch(epoch=0, loss=0.5, val_accuracy=(0.8, 0.9), lr=1e-3, samples=64, steps=1, seconds=0.5).loss
    0.5
    """

    epoch: int
    loss: float
    val_accuracy: tuple[float, ...] | None
    lr: float
    samples: int
    steps: int
    seconds: float


@dataclass(repr=False)
class FitHistory:
    """What ``bx.fit`` did, epoch by epoch: ``epochs`` holds one ``FitEpoch`` each.

    ``layers`` names the exits (the final one as ``"final"``), in the order of ``val_accuracy``.
    ``repr`` and ``str`` give a text table, ``_repr_html_`` the same as HTML (notebooks),
    ``to_dict()`` plain data for JSON, ``plot()`` a matplotlib figure.

    >>> epochs = [FitEpoch(0, 1.2, (0.5, 0.6), 1e-3, 64, 1, 0.5), FitEpoch(1, 0.9, (0.6, 0.8), 1e-3, 64, 1, 0.5)]
    >>> history = FitHistory("joint", ("layer1", "final"), epochs)
    >>> print(history)
    FitHistory(joint, 2 epochs, 64 training samples per epoch)
      epoch  train loss  val top-1 layer1  val top-1 final  lr     seconds
      0      1.2000      50.0%             60.0%            0.001  0.5
      1      0.9000      60.0%             80.0%            0.001  0.5
    >>> history.to_dict()["epochs"][1]["val_accuracy"]
    [0.6, 0.8]
    """

    mode: str
    layers: tuple[str, ...]
    epochs: list[FitEpoch] = field(default_factory=list)

    @property
    def loss(self) -> list[float]:
        """The training loss of each epoch."""
        return [e.loss for e in self.epochs]

    @property
    def val_accuracy(self) -> list[tuple[float, ...] | None]:
        """Each epoch's validation top-1 per exit (the final one last)."""
        return [e.val_accuracy for e in self.epochs]

    def to_dict(self) -> dict[str, Any]:
        """The history as JSON-ready values."""
        epochs = []
        for e in self.epochs:
            row = asdict(e)
            row["val_accuracy"] = None if e.val_accuracy is None else list(e.val_accuracy)
            epochs.append(row)
        return {"mode": self.mode, "layers": list(self.layers), "epochs": epochs}

    def _header(self) -> list[str]:
        validated = any(e.val_accuracy is not None for e in self.epochs)
        tops = [f"val top-1 {layer}" for layer in self.layers] if validated else []
        return ["epoch", "train loss", *tops, "lr", "seconds"]

    def _rows(self) -> list[list[str]]:
        validated = any(e.val_accuracy is not None for e in self.epochs)
        rows = []
        for e in self.epochs:
            tops = ([f"{a:.1%}" for a in e.val_accuracy] if e.val_accuracy is not None else ["-"] * len(self.layers)) \
                if validated else []
            rows.append([str(e.epoch), f"{e.loss:.4f}", *tops, f"{e.lr:.3g}", f"{e.seconds:.1f}"])
        return rows

    def _headline(self) -> str:
        samples = self.epochs[-1].samples if self.epochs else 0
        epochs = f"{len(self.epochs)} epoch{'' if len(self.epochs) == 1 else 's'}"
        return f"FitHistory({self.mode}, {epochs}, {samples} training samples per epoch)"

    def __repr__(self) -> str:
        return "\n".join([self._headline(), text_table(self._header(), self._rows())])

    def _repr_html_(self) -> str:
        return f"<div><p>{html.escape(self._headline())}</p>{html_table(self._header(), self._rows())}</div>"

    def plot(self, path: str | Path | None = None):
        """The training loss and each exit's validation top-1 against the epoch, as a matplotlib ``Figure``.

        Saved to ``path`` when given. Needs matplotlib (``pip install 'branchify[plot]'``).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise BranchifyError(
                "FitHistory.plot needs matplotlib, which is not installed; pip install 'branchify[plot]'") from None
        validated = [e for e in self.epochs if e.val_accuracy is not None]
        fig = Figure(figsize=(10 if validated else 5, 3.6), layout="constrained")
        axes = fig.subplots(1, 2 if validated else 1, squeeze=False)[0]
        axes[0].plot([e.epoch for e in self.epochs], self.loss, marker="o")
        axes[0].set_xlabel("epoch")
        axes[0].set_ylabel("training loss (per sample)")
        axes[0].set_title(f"bx.fit, mode={self.mode!r}")
        if validated:
            for i, layer in enumerate(self.layers):
                axes[1].plot([e.epoch for e in validated], [100 * e.val_accuracy[i] for e in validated], marker="o",
                             label=layer)
            axes[1].set_xlabel("epoch")
            axes[1].set_ylabel("validation top-1 (%), every sample forced out")
            axes[1].legend(fontsize=8)
        for ax in axes:
            ax.grid(True, alpha=0.3)
        if path is not None:
            fig.savefig(Path(path), dpi=120)
        return fig


def fit(module: nn.Module, train_loader: Iterable, *, epochs: int, mode: Mode = "joint",
        val_loader: Iterable | None = None, optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
        lr: float | None = None, loss: Loss | None = None, on_step: Callable[[FitStep], object] | None = None,
        on_epoch_end: Callable[[FitEpoch], object] | None = None, progress: bool = True) -> FitHistory:
    """Train ``module`` (from ``bx.attach_exits``) for ``epochs`` passes over ``train_loader``.

    ``mode="joint"``: the backbone and the heads train together on ``bx.EarlyExitLoss(module.exit_spec)``
    (Distiller's recipe; the exits need loss weights). ``mode="heads"``: the backbone is frozen and in
    eval mode (weights and BatchNorm statistics unchanged) and only the heads train, on the sum of
    their cross-entropies. ``mode="distill"`` (LM exits, ``HeadSpec(kind="lm")``): the same frozen
    backbone, and the heads' adapters learn the model's own next-token distribution (the KL divergence to the final
    logits, per real token; no labels: batches are token ids, ``(input_ids, attention_mask)`` pairs or dicts of
    them); its ``val_accuracy`` is each exit's greedy agreement with the model. Afterwards every ``requires_grad``
    flag and train/eval mode is as before.

    ``optimizer``: a ``torch.optim.Optimizer``, or a factory ``optimizer(params)`` given the trainable
    parameters; by default ``torch.optim.Adam`` at ``lr`` (default 1e-3 joint, 3e-3 heads). ``loss``:
    any ``loss(outputs, target)`` in place of the default. ``on_step(FitStep)`` runs after every
    optimizer step (step a per-step LR schedule there), ``on_epoch_end(FitEpoch)`` after every epoch.
    With ``val_loader``, each exit's top-1 (every sample forced out there) is measured after each
    epoch. Batches are ``(inputs, target)`` pairs or dicts with ``"labels"``, moved to the module's
    device. Nothing here draws random numbers: seed the loader and dropout with ``torch.manual_seed``
    and the same seed gives the same weights. Returns a ``FitHistory``.

    >>> import torch, branchify as bx
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                             torch.nn.Linear(288, 4))
    >>> spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", weight=0.3)])
    >>> module = bx.attach_exits(model, spec, torch.randn(1, 3, 8, 8))
    >>> data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,)))
    >>> loader = torch.utils.data.DataLoader(data, batch_size=8)
    >>> history = bx.fit(module, loader, epochs=2, val_loader=loader, progress=False)
    >>> len(history.epochs), history.layers, len(history.epochs[-1].val_accuracy)
    (2, ('1', 'final'), 2)
    """
    spec = exit_module(module, "fit").exit_spec
    epochs = _checked_epochs(epochs)
    if mode not in ("joint", "heads", "distill"):
        raise BranchifyError(
            f"mode={mode!r}; use 'joint' (backbone and heads together, Distiller's loss), 'heads' (only the "
            "heads, on a frozen backbone) or 'distill' (LM exits matching the model's own next-token distribution)")
    for name, value in (("train_loader", train_loader), ("val_loader", val_loader)):
        if value is not None and not isinstance(value, Iterable):
            raise BranchifyError(f"{name} must be an iterable of (inputs, target) batches such as a DataLoader, "
                                 f"got {type(value).__name__}")
    for name, value in (("loss", loss), ("on_step", on_step), ("on_epoch_end", on_epoch_end)):
        if value is not None and not callable(value):
            raise BranchifyError(f"{name} must be callable or None, got {value!r}")
    params = _trainable(module, mode)
    loss_fn = loss if loss is not None else _default_loss(spec, mode)
    opt = _optimizer(optimizer, lr, params, mode)
    device = module_device(module)
    history = FitHistory(mode, (*spec.layers, "final"))
    with kept_modes(module), (frozen_backbone(module) if mode in FROZEN else contextlib.nullcontext()):
        # Under torch.distributed: DistributedDataParallel, built after freezing (it synchronises the parameters
        # that require gradients when it is built); a loss of the caller's may leave some of them out.
        model, joined = data_parallel(module, find_unused_parameters=loss is not None)
        for epoch in range(epochs):
            with joined():  # ranks whose shards hold fewer batches keep the others' all-reduces going
                record = _epoch(module, model, train_loader, loss_fn, opt, mode=mode, epoch=epoch, epochs=epochs,
                                device=device, on_step=on_step, progress=progress)
            if val_loader is not None:
                check = distill_agreement if mode == "distill" else _validate
                record = FitEpoch(**{**asdict(record), "val_accuracy": check(module, val_loader, device)})
            history.epochs.append(record)
            if on_epoch_end is not None:
                on_epoch_end(record)
    return history


def _train_mode(module: nn.Module, mode: Mode) -> None:
    module.train()
    if mode in FROZEN:
        module.eval()  # the whole backbone: dropout too, so the heads learn the features they will see
        module.exit_heads.train()  # heads with dropout or normalisation train as heads


def _epoch(module: nn.Module, model: nn.Module, loader: Iterable, loss_fn: Loss, optimizer: torch.optim.Optimizer, *,
           mode: Mode, epoch: int, epochs: int, device: torch.device, on_step: Callable[[FitStep], object] | None,
           progress: bool) -> FitEpoch:
    """One pass over ``loader``: the package's one loop of forward, loss, backward and optimizer step (``model``
    is ``module``, or its DistributedDataParallel wrapper)."""
    _train_mode(module, mode)  # again each epoch: on_epoch_end may have switched modes
    k = len(module.exit_spec.exits)
    steps = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    total = torch.zeros((), dtype=torch.float64, device=device)
    samples = step = 0
    lr = float(optimizer.param_groups[0]["lr"])
    start = time.perf_counter()
    buffers = _Buffers(module)
    bar = tqdm(loader, total=steps, desc=f"fit ({mode}): epoch {epoch + 1}/{epochs}", disable=not progress,
               leave=False)
    for step, batch in enumerate(bar, start=1):
        inputs, target = token_batch(batch) if mode == "distill" else split_batch(batch)
        target = target.to(device, non_blocking=True)
        buffers.keep()  # the forward updates BatchNorm's running statistics before the loss can be checked
        outputs = inputs.map(lambda x: x.to(device, non_blocking=True)).call(model)
        value = loss_fn(outputs, target)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise BranchifyError(f"the loss must return a scalar tensor, got {_describe(value)}")
        if not value.requires_grad:
            raise BranchifyError(
                "the loss does not depend on any trainable parameter (nothing to train): check that the heads "
                f"(mode={mode!r}) require gradients and that the loss reads the exits' outputs")
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        # Checked before the step (one read of the device per step): a step on a NaN gradient would make
        # every weight NaN; stopping here leaves the weights and the optimizer's state as the last good step left them.
        if not _finite(value, optimizer):
            optimizer.zero_grad(set_to_none=True)
            buffers.restore()
            raise _diverged(outputs, target, value, k, epoch=epoch, step=step, layers=module.exit_spec.layers)
        optimizer.step()
        n = int(target.shape[0])
        total += value.detach() * n
        samples += n
        if progress:
            bar.set_postfix(loss=f"{float(total) / samples:.3f}")
        if on_step is not None:
            exits, final = split_outputs(outputs, k)
            on_step(FitStep(epoch=epoch, step=step, steps=steps, outputs=(*(z.detach() for z in exits), final.detach()),
                            target=target, loss=value.detach(), lr=lr, seconds=time.perf_counter() - start))
    summed, samples = summed_over_ranks(float(total), samples, device)  # every rank's batches
    if not samples:
        raise BranchifyError(f"the training loader yielded no batches in epoch {epoch}; give it training samples")
    return FitEpoch(epoch=epoch, loss=summed / samples, val_accuracy=None, lr=lr, samples=samples,
                    steps=step, seconds=time.perf_counter() - start)


class _Buffers:
    """The module's buffers (BatchNorm's running statistics and counts) as they were before a step's forward,
    so that a step refused for a non-finite loss leaves them as the last good step did."""

    def __init__(self, module: nn.Module) -> None:
        self.buffers = list(module.buffers())
        self.kept: list[torch.Tensor] = []

    def keep(self) -> None:
        if self.kept:
            torch._foreach_copy_(self.kept, self.buffers)
        else:
            self.kept = [b.detach().clone() for b in self.buffers]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, kept in zip(self.buffers, self.kept):
                buffer.copy_(kept)


def _finite(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    flags = [loss.detach().isfinite().reshape(1)]
    if grads:
        flags.append(torch.nn.utils.get_total_norm(grads, norm_type=math.inf).isfinite().reshape(1))
    return bool(torch.cat([f.to(loss.device) for f in flags]).all())


def _diverged(outputs: Sequence, target: torch.Tensor, loss: torch.Tensor, k: int, *, epoch: int, step: int,
              layers: Sequence[str]) -> BranchifyError:
    """The error for a step whose loss or gradients are not finite, naming the exits whose outputs or
    cross-entropy are not finite (what the default losses add up)."""
    exits, final = split_outputs(outputs, k)
    names = [*(f"exit {i} ({layer!r})" for i, layer in enumerate(layers)), "the final exit"]
    bad = []
    with torch.no_grad():
        for name, z in zip(names, (*exits, final)):
            z = z.detach().float()
            if not bool(z.isfinite().all()):
                bad.append(f"{name} (its logits)")
            elif not target.is_floating_point() and not bool(F.cross_entropy(z, target.long()).isfinite()):
                bad.append(f"{name} (its cross-entropy)")
    what = "the loss" if not bool(loss.detach().isfinite()) else "the gradients"
    where = ("; non-finite: " + ", ".join(bad)) if bad else (
        "; every exit's logits and cross-entropy are finite, so the loss function itself gave it")
    return BranchifyError(
        f"fit stopped at epoch {epoch}, step {step}: {what} went non-finite ({float(loss.detach()):g}){where}. "
        "The weights, buffers and optimizer state are as they were before this step. Lower the "
        "learning rate (lr=...), look for NaN or infinite values in that batch's inputs, or clip the gradients in "
        "the loss")


def _validate(module: nn.Module, loader: Iterable, device: torch.device) -> tuple[float, ...]:
    """Each exit's top-1 over ``loader`` if every sample left there (``ExitStats`` in forced mode)."""
    stats = ExitStats(module.exit_spec, mode="forced", topk=(1,))
    batches = 0
    with eval_mode(module), torch.no_grad():
        for batch in loader:
            inputs, target = split_batch(batch)
            stats.update(inputs.map(lambda x: x.to(device, non_blocking=True)).call(module), target)
            batches += 1
    if distributed_world() is not None:
        stats.all_reduce()  # each rank saw its shard; every rank reports all of them
    elif not batches:
        raise BranchifyError("the validation loader yielded no batches; give it samples, or pass val_loader=None")
    return tuple(row.accuracy["top1"] / 100 for row in stats.summary().exits)


def _heads_loss(num_exits: int) -> Loss:
    def heads_loss(outputs: Sequence, target: torch.Tensor) -> torch.Tensor:
        # Summed, not weighted: the heads' parameters are disjoint, so each head trains as it would alone.
        # The final exit is left out: with the backbone frozen its loss is a constant.
        target = target if target.is_floating_point() else target.long()
        return sum(F.cross_entropy(z, target) for z in outputs[:num_exits])  # type: ignore[return-value]

    return heads_loss


def _default_loss(spec, mode: Mode) -> Loss:
    if mode == "distill":
        return distill_loss(len(spec.exits))
    if mode == "heads":
        return _heads_loss(len(spec.exits))
    try:
        return EarlyExitLoss(spec)
    except BranchifyError as err:
        raise BranchifyError(
            f"fit(mode='joint') trains with Distiller's loss, bx.EarlyExitLoss(module.exit_spec): {err}; or pass "
            "loss=bx.EarlyExitLoss(module.exit_spec, weights=[...]), or train only the heads with mode='heads'"
        ) from None


def _trainable(module: nn.Module, mode: Mode) -> list[nn.Parameter]:
    if mode in FROZEN:
        params = [p for p in module.exit_heads.parameters() if p.requires_grad]
        if not params:
            raise BranchifyError(
                f"mode={mode!r} trains the exit heads, but none of the {len(module.exit_heads)} head(s) has a "
                "parameter that requires gradients; give the exits heads with weights (e.g. the default "
                "bx.HeadSpec()) or set requires_grad_(True) on module.exit_heads")
        return params
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise BranchifyError(
            "mode='joint': no parameter of the module requires gradients (is it frozen? bx.unfreeze_backbone(module) "
            "undoes bx.freeze_backbone)")
    return params


def _optimizer(optimizer, lr: float | None, params: list[nn.Parameter], mode: Mode) -> torch.optim.Optimizer:
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):
        raise BranchifyError(f"lr={lr!r} must be a positive number, e.g. {DEFAULT_LR[mode]:g}")
    if optimizer is None:
        return torch.optim.Adam(params, lr=DEFAULT_LR[mode] if lr is None else float(lr))
    if lr is not None:
        raise BranchifyError(
            f"lr={lr!r} sets the default optimizer's rate, but an optimizer was given; set the rate there, e.g. "
            f"optimizer=lambda params: torch.optim.SGD(params, lr={lr!r}, momentum=0.9)")
    if isinstance(optimizer, torch.optim.Optimizer):
        built = optimizer
    elif callable(optimizer):
        built = optimizer(params)
        if not isinstance(built, torch.optim.Optimizer):
            raise BranchifyError(
                f"the optimizer factory returned {type(built).__name__}, not a torch.optim.Optimizer; pass e.g. "
                "optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)")
    else:
        raise BranchifyError(
            f"optimizer must be a torch.optim.Optimizer or a factory optimizer(params), got {type(optimizer).__name__}")
    wanted = {id(p) for p in params}
    held = {id(p) for group in built.param_groups for p in group["params"]}
    if not wanted & held:
        what = "exit heads'" if mode == "heads" else "module's trainable"
        raise BranchifyError(
            f"the optimizer holds none of the {what} parameters, so the step would train nothing; build it on "
            f"them, e.g. torch.optim.Adam({'module.exit_heads' if mode == 'heads' else 'module'}.parameters())")
    return built


def _checked_epochs(epochs) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise BranchifyError(f"epochs={epochs!r} must be a positive integer (the passes over train_loader), e.g. 3")
    return epochs


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
