"""Validation loss: the mean over every target token of ``validation.steps`` fixed batches.

The batches come from the same data path as training (a fresh loader each time, so every
validation sees exactly the same tokens), sharded over the data-parallel ranks and, under context
parallelism, each batch over the sequence as in training; the loss sums and token counts are reduced
over all of them, so the number does not depend on the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from flame.components.loss import num_targets
from flame.config.schema import JobConfig


class Validator:
    """Computes the validation loss of a model on fixed batches."""

    def __init__(
        self,
        config: JobConfig,
        tokenizer,
        *,
        dp_rank: int,
        dp_world_size: int,
        loss_mesh,
        device,
        shard_batch: Callable[[dict], dict] | None = None,
    ) -> None:
        """``shard_batch`` maps a loader batch to this rank's part of it (the context-parallel shard)."""
        from flame.data import build_dataloader

        self.config = config
        self.shard_batch = shard_batch or (lambda batch: batch)
        self.steps = config.validation.steps
        self.loss_mesh = loss_mesh
        self.dp_world_size = dp_world_size
        self.device = device
        # The [validation] datasets (or the training ones, read with validation.dataset_split), its batch size.
        self._build = lambda: build_dataloader(
            config.training, tokenizer, dp_rank=dp_rank, dp_world_size=dp_world_size, validation=config.validation
        )
        self._build()  # fail on bad validation data now, before any training step

    def should_run(self, step: int, last_step: bool) -> bool:
        return self.config.validation.enable and (step % self.config.validation.freq == 0 or last_step)

    @torch.no_grad()
    def validate(
        self, model_parts: list[torch.nn.Module], loss_sum: Callable, bytes_of: Callable[[dict], int] | None = None
    ) -> dict[str, float]:
        """``{"validation_loss", "validation_perplexity", "validation_tokens"}`` over the fixed batches.

        ``loss_sum(batch)`` is the trainer's summed token loss of a batch under its layout (loss
        parallel, pipeline schedule, ...), the same value on every rank of a data-parallel replica; or a
        dict of sums over the batch's target tokens with the loss under ``"loss"``: every other entry is
        reduced the same way and reported per target token as ``validation_<name>`` (a distiller's KL to
        the teacher, top-1 agreement, the teacher's own loss).
        With ``bytes_of(batch)`` (the UTF-8 bytes of a loader batch's target text; flame.evaluate
        passes it) also ``validation_bytes`` and ``validation_bits_per_byte``: the summed loss in bits
        over the bytes, a number that does not depend on the tokenizer."""
        modes = [part.training for part in model_parts]
        for part in model_parts:
            part.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, target tokens, bytes
        extra: dict[str, torch.Tensor] = {}
        # The loss group spans data- and context-parallel ranks; the cp ranks of a replica share a batch.
        group_size = self.loss_mesh.size() if self.loss_mesh is not None else 1
        share = group_size // max(self.dp_world_size, 1)
        loader = iter(self._build())
        for _ in range(self.steps):
            raw = next(loader)
            if bytes_of is not None:
                totals[2] += bytes_of(raw) / share
            batch = self.shard_batch(raw)
            sums = loss_sum(batch)
            if isinstance(sums, dict):
                for name, value in sums.items():
                    if name != "loss":
                        extra.setdefault(name, torch.zeros((), dtype=torch.float64, device=self.device))
                        extra[name] += value.double()
                sums = sums["loss"]
            totals[0] += sums.double()
            totals[1] += num_targets(batch["labels"]).item()
        names = sorted(extra)
        if names:
            totals = torch.cat([totals, torch.stack([extra[n] for n in names])])
        if self.loss_mesh is not None:
            dist.all_reduce(totals, group=self.loss_mesh.get_group())
        for part, mode in zip(model_parts, modes, strict=True):
            part.train(mode)
        loss = (totals[0] / totals[1]).item()
        out = {
            "validation_loss": loss,
            "validation_perplexity": math.exp(min(loss, 700.0)),
            "validation_tokens": int(totals[1].item()),
        }
        for i, name in enumerate(names):
            out[f"validation_{name}"] = (totals[3 + i] / totals[1]).item()
        if bytes_of is not None:
            out["validation_bytes"] = round(totals[2].item())
            out["validation_bits_per_byte"] = (totals[0] / totals[2]).item() / math.log(2)
        return out
