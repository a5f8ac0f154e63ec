"""The builders ``Trainer.__init__`` calls, each on its own, and the micro-batch loss with its hook."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flame.builders import build_model, build_tokenizer, data_parallel_layout, step_options
from flame.components.loss import MicroBatchLoss, num_targets
from flame.config.loader import parse_args
from flame.data.varlen import IGNORE_INDEX
from flame.distributed.parallel_dims import build_parallel_dims
from flame.models.adapters import ModelAdapter
from tests.conftest import SEQ_LEN

CPU = torch.device("cpu")


class TableModel(nn.Module):
    """Logits looked up per token: enough of a causal LM for the loss."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table(input_ids))


def test_micro_batch_loss_sums_the_token_loss_and_its_hook_adds_a_term_from_the_same_logits():
    torch.manual_seed(0)
    model = TableModel(11)
    batch = {"input_ids": torch.randint(0, 11, (2, 5)), "labels": torch.randint(0, 11, (2, 5))}
    batch["labels"][0, 2] = IGNORE_INDEX
    logits = model.table(batch["input_ids"])
    manual = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    loss = MicroBatchLoss.for_adapter(model, ModelAdapter(family="table"), CPU)
    assert int(num_targets(batch["labels"])) == 9
    assert torch.allclose(loss(batch), manual) and torch.allclose(loss.eval_loss_sum(batch), manual)

    class WithExtraTerm(MicroBatchLoss):  # what a distiller does: one more term from the same logits and batch
        def loss_sum(self, logits, labels, batch):
            self.seen = (logits.detach(), batch)
            return super().loss_sum(logits, labels, batch) + 0.5 * logits.float().square().sum()

    extended = WithExtraTerm.for_adapter(model, ModelAdapter(family="table"), CPU)
    total = extended(batch)
    assert extended.seen[1] is batch and torch.equal(extended.seen[0], logits.detach())
    assert torch.allclose(total, manual + 0.5 * logits.square().sum())
    assert torch.allclose(extended.eval_loss_sum(batch), manual)  # validation keeps the token loss alone


def test_build_model_alone_gives_the_trainers_initial_weights(train_args):
    config = parse_args(train_args())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dims = build_parallel_dims(config, 1)
        layout = data_parallel_layout(dims)
        built = build_model(config, build_tokenizer(config), dims, CPU)
    finally:
        dist.destroy_process_group()
    assert (layout.dp_rank, layout.dp_world_size, layout.num_gradient_ranks) == (0, 1, 1)
    assert built.pipeline is None and built.context_parallel is None and built.name == "LlamaForCausalLM"
    model = built.parts[0]
    assert built.num_params == sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()  # untied head: counted; attention: 12 L h seq_len
    assert built.flops_per_token == 6 * (built.num_params - embedding) + 12 * 4 * 64 * SEQ_LEN
    assert step_options(config).precompute_float8_scales is False

    from flame.trainer import Trainer

    trainer = Trainer(config)
    try:
        for (name, ours), (_, theirs) in zip(model.named_parameters(), trainer.model.named_parameters(), strict=True):
            assert torch.equal(ours, theirs), name
    finally:
        trainer.close()
