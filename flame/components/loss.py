"""The training loss of one micro-batch: forward under the run's layout, then the summed token loss.

flame's loss is the mean over every target token of the global batch, so each micro-batch contributes
a *sum* over its target tokens (``IGNORE_INDEX`` labels excluded) and the trainer divides by the global
target count. ``MicroBatchLoss`` is the one place that computes it from a batch: it turns the batch
into model inputs (the family's varlen route, or the context-parallel shard), runs the forward (under
autocast on one process) and calls ``loss_sum(logits, labels, batch)``.

``loss_sum`` is the hook for losses computed from the same logits and batch: a distiller subclasses
``MicroBatchLoss`` and returns the student's token loss plus its KD term (summed over the same target
tokens, so the trainer's scaling applies unchanged). Validation uses ``token_loss_sum`` alone
(``eval_loss_sum``), whatever the training loss adds.

With ``--training.compile`` (``compiled``) the training cross entropy on plain logits goes through
``torch.compile`` too (``compiled_token_loss_sum``: the log-softmax, the gather and their backward in a
few fused loops instead of eager's log-softmax, its backward and a zero-filled gradient); vocabulary-sharded
logits (loss parallelism), the pipeline schedule's loss and validation stay eager.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flame.data.varlen import IGNORE_INDEX
from flame.models.adapters import ModelAdapter


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy summed over the target tokens (``IGNORE_INDEX`` targets excluded), in float32."""
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class CompiledOnDemand:
    """``fn`` through ``torch.compile(fn, dynamic=True)``, built at the first call: importing this module
    must not import dynamo (start-up time), and most runs never call it. Dynamic shapes and floats, so that
    chunks of every size and a changing weight do not recompile. ``compiled``: None until the first call."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        return self.compiled(*args)


compiled_token_loss_sum = CompiledOnDemand(token_loss_sum)


def num_targets(labels: torch.Tensor) -> torch.Tensor:
    """How many positions of ``labels`` have a target (a tensor on the labels' device)."""
    return (labels != IGNORE_INDEX).sum()


class MicroBatchLoss:
    """Forward and summed token loss of one (sharded) micro-batch; see the module docstring.

    ``model_inputs(batch, device)``: the forward's keyword arguments (the adapter's, or the
    context-parallel shard's). ``autocast_dtype``: autocast's dtype on one process (None: off).
    ``context``: the loss-parallel context the forward, the loss and its backward run in (tensor
    parallelism: the cross entropy on vocabulary shards). ``compiled``: the training cross entropy on
    plain logits through ``compiled_token_loss_sum``."""

    def __init__(
        self,
        model: nn.Module,
        model_inputs: Callable[[dict[str, torch.Tensor], torch.device], dict[str, Any]],
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        compiled: bool = False,
    ) -> None:
        self.model, self.model_inputs, self.device = model, model_inputs, device
        self.autocast_dtype, self.context, self.compiled = autocast_dtype, context, compiled

    @classmethod
    def for_adapter(
        cls, model: nn.Module, adapter: ModelAdapter, device: torch.device, **kwargs: Any
    ) -> MicroBatchLoss:
        """The loss of a model without context parallelism: inputs through the family adapter."""
        return cls(model, adapter.model_inputs, device, **kwargs)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits for ``batch`` (all but its labels are inputs)."""
        inputs = self.model_inputs(batch, self.device)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.model(**inputs).logits

    def labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["labels"].to(self.device, non_blocking=True)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss sum of ``batch`` (call inside ``context``; the trainer scales and backpropagates)."""
        return self.loss_sum(self.logits(batch), self.labels(batch), batch)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one micro-batch from its logits, summed over its target tokens. The hook a
        distiller overrides to add a KD term computed from the same ``logits`` and ``batch``."""
        return self.token_loss(logits, labels)

    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training cross entropy summed over the target tokens: compiled on plain logits when
        ``compiled``, else ``token_loss_sum``."""
        if self.compiled and type(logits) is torch.Tensor:
            return compiled_token_loss_sum(logits, labels)
        return token_loss_sum(logits, labels)

    def begin_step(self, step: int, batches: list[dict[str, torch.Tensor]]) -> None:
        """Called before the micro-batches of optimizer step ``step`` run, with the loader batches (before
        any context-parallel sharding); a distiller reads its cached teacher targets here."""

    def take_terms(self) -> dict[str, torch.Tensor]:
        """The sums over target tokens of the loss's parts since ``begin_step`` (``{}``: the loss is one
        term); the trainer logs each per target token, like the loss."""
        return {}

    def step_values(self) -> dict[str, float]:
        """Numbers the loss logs as they are at the step (a distiller's alpha)."""
        return {}

    def validated(self) -> None:
        """Called after each validation."""

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed token loss of ``batch`` alone (validation), without what ``loss_sum`` adds."""
        return token_loss_sum(self.logits(batch), self.labels(batch))
