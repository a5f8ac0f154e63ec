"""The trainer's distillation mode: the micro-batch loss (1 − α)·CE + α·KD, its metrics and its record.

``DistillLoss`` is the trainer's ``MicroBatchLoss`` when ``[distill]`` is set (``build_distill_loss``). It
computes, from the student's logits of a micro-batch and the same batch,

* the cross entropy summed over the target tokens (``token_loss_sum``, as without distillation), and
* the KD term summed over the same tokens (``kd_loss_sum``: T² · divergence per token, chunked, top-k,
  vocabulary-sharded under loss parallelism),

and returns (1 − α)·CE + α·KD; on plain logits over exactly the vocabulary (no tensor parallelism, no
padding columns) and α > 0 both come from one pass over the logits (``fused_loss_sums``). The trainer
divides the sum by the global number of target tokens, so both terms are normalised exactly like plain training's loss, whatever the micro-batches, ranks or packing.
α = 0 returns the cross entropy itself (the KD term is computed without a graph, for its metric), so the
run is plain training's bit for bit; α = 1 leaves the cross entropy out of the graph.

The teacher's targets come from the teacher in memory (``Teacher.logits`` on exactly the student's inputs:
the same context-parallel shard, positions and document boundaries) or from the offline cache
(``TeacherCache``: the rows of the loader batches of this step, fingerprint-checked, then cut to this
rank's context-parallel shard with the student's own shard indices).

Validation (``eval_sums``) adds the forward KL to the teacher at T = 1 and the top-1 agreement with it
(teacher in memory only: a cache holds training rows), and the teacher's own validation loss once.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from flame.components.loss import MicroBatchLoss, token_loss_sum
from flame.distill.divergences import KDSpec, TopKTargets
from flame.distill.losses import agreement_sums, can_fuse, fused_loss_sums, kd_loss_sum
from flame.distill.schedule import alpha_at

# the [distill] settings that change the training loss: a resume must keep them (besides the teacher)
LOSS_SETTINGS = (
    "loss", "beta", "temperature", "alpha", "alpha_schedule", "alpha_start", "alpha_end", "alpha_warmup_steps",
    "alpha_decay_ratio", "top_k",
)  # fmt: skip


def _local(x: Any) -> torch.Tensor:
    """A replicated loss value as this rank's tensor (the cross entropy under loss parallelism is a DTensor)."""
    return x.to_local() if isinstance(x, DTensor) else x


class DistillLoss(MicroBatchLoss):
    """The micro-batch loss of a distilled student (see the module docstring)."""

    def __init__(
        self,
        base: MicroBatchLoss,
        config: Any,
        vocab_size: int,
        teacher: Any = None,
        cache: Any = None,
        context_parallel: Any = None,
    ) -> None:
        super().__init__(base.model, base.model_inputs, base.device, base.autocast_dtype, base.context, base.compiled)
        if (teacher is None) == (cache is None):
            raise ValueError("DistillLoss needs exactly one of a teacher and a teacher cache")
        self.distill, self.steps = config.distill, config.training.steps
        self.spec = KDSpec.from_config(config.distill, compiled=config.training.compile)
        self.vocab_size = vocab_size
        self.teacher, self.cache, self.context_parallel = teacher, cache, context_parallel
        self.alpha = alpha_at(1, self.steps, self.distill)
        self._targets: deque[TopKTargets] = deque()  # the cached targets of this step's micro-batches
        self._sums = torch.zeros(2, dtype=torch.float32, device=self.device)  # this step's CE and KD sums
        self.teacher_validated = False  # the teacher's own validation loss is logged once

    # ---- the step ----------------------------------------------------------------------------------

    def begin_step(self, step: int, batches: list[dict[str, torch.Tensor]]) -> None:
        """Before the micro-batches of optimizer step ``step`` (1-based) run: α of the step, and the cached
        targets of the loader ``batches`` (before any context-parallel sharding)."""
        self.alpha = alpha_at(step, self.steps, self.distill)
        self._sums.zero_()
        self._targets.clear()
        if self.cache is None:
            return
        for micro, batch in enumerate(batches):
            targets = self.cache.targets(step, micro, batch)
            if self.context_parallel is not None:
                from flame.parallel.context_parallel import shard_indices

                cp = self.context_parallel
                index = shard_indices(batch["input_ids"].shape[1], cp.degree, cp.rank)
                targets = TopKTargets(targets.ids[:, index], targets.logprobs[:, index], targets.log_rest[:, index])
            self._targets.append(
                TopKTargets(*(t.to(self.device) for t in (targets.ids, targets.logprobs, targets.log_rest)))
            )

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> Any:
        """The teacher's logits for ``batch`` (this rank's shard), or the next cached micro-batch's targets."""
        if self.teacher is not None:
            return self.teacher.logits(batch)
        if not self._targets:
            raise RuntimeError("DistillLoss: a micro-batch without cached targets (begin_step was not called)")
        return self._targets.popleft()

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        alpha = self.alpha
        teacher = self.teacher_targets(batch)
        if alpha > 0 and logits.requires_grad and can_fuse(logits, self.vocab_size):  # one pass for both terms
            loss, ce, kd = fused_loss_sums(logits, labels, teacher, self.spec, self.vocab_size, alpha)
            self._sums += torch.stack([ce, kd])
            return loss
        ce = self.token_loss(logits, labels) if alpha < 1 else _detached(token_loss_sum, logits, labels)
        student = logits if alpha > 0 else logits.detach()
        kd = kd_loss_sum(student, labels, teacher, self.spec, self.vocab_size)
        self._sums += torch.stack([_local(ce).detach().float(), kd.detach()])
        if alpha == 0:
            return ce
        if alpha == 1:
            return kd
        return (1 - alpha) * _local(ce) + alpha * kd

    def take_terms(self) -> dict[str, torch.Tensor]:
        """This step's CE and KD sums over its target tokens (and α); the trainer logs them per token."""
        ce, kd = self._sums.clone()
        return {"ce_loss": ce, "kd_loss": kd}

    def step_values(self) -> dict[str, float]:
        return {"alpha": self.alpha}

    # ---- validation --------------------------------------------------------------------------------

    @torch.no_grad()
    def eval_sums(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over the target tokens of a validation batch: the loss (cross entropy), and with a teacher in
        memory the KL to it and the top-1 agreements (plus the teacher's loss at the first validation)."""
        logits, labels = self.logits(batch), self.labels(batch)
        out = {"loss": _full(token_loss_sum(logits, labels))}
        if self.teacher is None:
            return out
        teacher = self.teacher.logits(batch)
        sums = agreement_sums(logits, labels, teacher, self.vocab_size, self.spec.chunk_size)
        out["kl_to_teacher"], out["teacher_agreement"] = sums[0], sums[1]
        if not self.teacher_validated:
            out["teacher_loss"] = _full(token_loss_sum(teacher, labels))
        return out

    def validated(self) -> None:
        """One validation finished (the teacher's loss is not computed again)."""
        if self.teacher is not None:
            self.teacher_validated = True

    # ---- what the checkpoints record -----------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The teacher's identity and the loss settings: a resumed run must have the same."""
        teacher = self.teacher.identity if self.teacher is not None else self.cache.teacher
        return {"teacher": teacher, "loss": {k: getattr(self.distill, k) for k in LOSS_SETTINGS}}


def _detached(fn, logits, labels):
    with torch.no_grad():
        return fn(logits, labels)


def _full(x: Any) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


def record_problems(stored: dict[str, Any] | None, current: dict[str, Any] | None, path: str) -> list[str]:
    """Why the checkpoint at ``path`` (its distillation ``stored`` record; None: trained without) cannot be
    resumed by this run (``current``; None: no distillation). Empty: it can."""
    if stored == current:
        return []
    fix = "resume with the [distill] settings it was trained with, or start in a fresh --job.dump_folder"
    if stored is None:
        return [f"{path} was trained without distillation; this run distils (--distill.teacher/teacher_cache): {fix}"]
    if current is None:
        return [f"{path} was trained with distillation (teacher {stored['teacher']['path']}); this run does not: {fix}"]
    problems = []
    a, b = stored["teacher"], current["teacher"]
    if a != b:
        differ = [
            f"{k} {a.get(k)!r} there, {b.get(k)!r} here"
            for k in ("path", "step", "fingerprint")
            if a.get(k) != b.get(k)
        ]
        problems.append(f"{path} was trained with another teacher ({'; '.join(differ)}): {fix}")
    differ = [
        f"--distill.{k} {stored['loss'].get(k)!r} there, {v!r} here"
        for k, v in current["loss"].items()
        if stored["loss"].get(k) != v
    ]
    if differ:
        problems.append(f"{path} was trained with another distillation loss ({'; '.join(differ)}): {fix}")
    return problems


def build_distill_loss(
    config: Any, base: MicroBatchLoss, tokenizer: Any, parallel_dims: Any, built: Any, layout: Any
) -> DistillLoss:
    """The distilling loss around the plain one: the teacher built on the student's mesh (or the cache of
    this data-parallel rank)."""
    d = config.distill
    teacher = cache = None
    if d.teacher_cache:
        from flame.distill.cache_io import TeacherCache

        cache = TeacherCache(d.teacher_cache, layout.dp_rank, config)
    else:
        from flame.distill.source import resolve_teacher
        from flame.distill.teacher import Teacher

        teacher = Teacher(resolve_teacher(d.teacher, d.teacher_step), tokenizer, config, parallel_dims, base.device)
    return DistillLoss(
        base, config, len(tokenizer), teacher=teacher, cache=cache, context_parallel=built.context_parallel
    )
