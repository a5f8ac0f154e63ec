"""fla families on the CPU path (flame/models/fla_reference.py): one process, and tensor/context
parallelism against it on gloo ranks (tests.helpers.torchrun).

The CPU path swaps fla's Triton kernels for PyTorch (exact up to rounding); the parallel plans around
them are the ones that run on the GPU with fla's kernels. Tolerances as in test_layouts.py: losses
within 1e-5, gradient norms within 1e-4 relative (fp32). The default suite runs GLA under TP x2 and CP x2
and the op-level state passing on 2 ranks; the compositions, Gated DeltaNet's layouts, the checkpoint
switches and 3 ranks are `slow` (20-46 s each here), run by CI's slow tier.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import read_metrics, slow, torchrun, train
from tests.parallel.test_layouts import STEPS, assert_same

# Every optional part of fla's GLA layer that has a TP style: short convolutions, the output gate with
# the fused gated norm, the low-rank key gate, fused residual norms and fused SwiGLU.
GLA_TINY = {
    "model_type": "gla", "num_hidden_layers": 2, "vocab_size": 257, "tie_word_embeddings": False,
    "hidden_size": 64, "num_heads": 4, "expand_k": 0.5, "expand_v": 1, "use_short_conv": True,
    "conv_size": 4, "fuse_norm": True, "fuse_swiglu": True, "use_output_gate": True,
    # larger than fla's default 0.02, so that attention over earlier tokens visibly moves the logits
    "initializer_range": 0.2,
}  # fmt: skip


# Gated DeltaNet with grouped value heads (2 q/k heads, 4 value heads), short convolutions with their
# fused three-way kernel path, the gated output norm, negative eigenvalues.
GDN_TINY = {
    "model_type": "gated_deltanet", "num_hidden_layers": 2, "vocab_size": 257, "tie_word_embeddings": False,
    "hidden_size": 64, "num_heads": 2, "num_v_heads": 4, "head_dim": 16, "expand_v": 1, "use_short_conv": True,
    "conv_size": 4, "use_gate": True, "allow_neg_eigval": True, "fuse_norm": True, "fuse_swiglu": True,
    "initializer_range": 0.2,
}  # fmt: skip


@pytest.fixture(scope="module")
def gla_tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gla") / "gla_tiny.json"
    path.write_text(json.dumps(GLA_TINY))
    return str(path)


def test_gated_delta_rule_reference_matches_fla_naive_recurrence():
    """The PyTorch Gated DeltaNet op, with the in-kernel options fla's layer uses (q/k L2 norm, gate from
    A_log/dt_bias, sigmoid beta with negative eigenvalues, grouped value heads), equals fla's own
    reference (fla.ops.gated_delta_rule.naive) fed the same preprocessing by hand."""
    import torch.nn.functional as F
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    from flame.models.fla_reference import gated_delta_rule_reference

    torch.manual_seed(0)
    B, T, H, HV, K, V = 2, 40, 2, 4, 8, 6
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, HV, V)
    a, b, A_log, dt_bias = torch.randn(B, T, HV), torch.randn(B, T, HV), torch.randn(HV), torch.randn(HV)
    h0 = torch.randn(B, HV, K, V)
    o, h = gated_delta_rule_reference(
        q, k, v, a, b, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
        use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True, use_gate_in_kernel=True, A_log=A_log,
        dt_bias=dt_bias,
    )  # fmt: skip
    qn, kn = (F.normalize(x, dim=-1).repeat_interleave(HV // H, dim=2) for x in (q, k))
    g = -A_log.exp() * F.softplus(a + dt_bias)
    o_ref, h_ref = naive_recurrent_gated_delta_rule(
        qn, kn, v, 2 * b.sigmoid(), g, initial_state=h0, output_final_state=True
    )
    assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(h, h_ref, atol=1e-5)


def test_delta_rule_reference_matches_fla_naive_recurrence():
    """DeltaNet's op (the delta rule without a gate) against fla.ops.delta_rule.naive, with a start state."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    from flame.models.fla_reference import delta_rule_reference

    torch.manual_seed(0)
    B, T, H, K, V = 2, 30, 3, 8, 6
    q, k, v = (
        torch.randn(B, T, H, K),
        torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1),
        torch.randn(B, T, H, V),
    )
    beta, h0 = torch.rand(B, T, H), torch.randn(B, H, K, V)
    o, h = delta_rule_reference(q, k, v, beta, initial_state=h0, output_final_state=True)
    o_ref, h_ref = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)), initial_state=h0)
    assert torch.allclose(o, o_ref.transpose(1, 2), atol=1e-5) and torch.allclose(h, h_ref, atol=1e-5)


def test_gla_reference_matches_fla_naive_recurrence():
    """The chunked PyTorch GLA equals fla's own step-by-step reference (fla.ops.gla.naive), with an
    initial state, and per document with cu_seqlens."""
    from fla.ops.gla.naive import naive_recurrent_gla

    from flame.models.fla_reference import gla_reference

    torch.manual_seed(0)
    B, T, H, K, V = 2, 150, 3, 8, 5
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K)) / 4
    h0 = torch.randn(B, H, K, V)
    o_ref, h_ref = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o, h = gla_reference(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=32)
    assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(h, h_ref, atol=1e-5)
    cu = torch.tensor([0, 40, 100, 150])
    o, h = gla_reference(*(x[:1] for x in (q, k, v, g)), cu_seqlens=cu, output_final_state=True, state_v_first=True)
    for n, (start, end) in enumerate([(0, 40), (40, 100), (100, 150)]):
        o_doc, h_doc = naive_recurrent_gla(*(x[:1, start:end] for x in (q, k, v, g)), output_final_state=True)
        assert torch.allclose(o[:, start:end], o_doc, atol=1e-5)
        assert torch.allclose(h[n].transpose(-1, -2), h_doc[0], atol=1e-5)


@pytest.fixture(scope="module")
def gla_one_process(tmp_path_factory, byte_tokenizer, fixed_docs, gla_tiny) -> list[dict]:
    """One process, global batch 4, 5 steps (the flags of test_layouts.py's reference, on GLA)."""
    from tests.conftest import SEQ_LEN

    dump = tmp_path_factory.mktemp("gla_one")
    train([
        "--job.dump_folder", str(dump), "--model.config", gla_tiny, "--model.tokenizer_path", byte_tokenizer,
        "--training.dataset", "json", "--training.data_files", fixed_docs, "--training.seq_len", str(SEQ_LEN),
        "--training.batch_size", "4", "--training.steps", str(STEPS), "--training.mixed_precision_param", "float32",
        "--lr_scheduler.warmup_steps", "2", "--optimizer.lr", "3e-3", "--metrics.log_freq", "1",
    ])  # fmt: skip
    one = read_metrics(dump)
    assert one[-1]["loss"] < one[0]["loss"]  # it learns on the CPU path
    return one


@pytest.mark.parametrize(
    ("nproc", "flags", "expect"),
    [
        (2, {"training__tensor_parallel_degree": 2}, "tensor parallel: degree 2"),
        slow(
            2, {"training__tensor_parallel_degree": 2, "training__disable_loss_parallel": "true"}, "loss parallel False"
        ),
        (2, {"experimental__context_parallel_degree": 2}, "attention path state_passing"),
        slow(
            4, {"training__tensor_parallel_degree": 2, "experimental__context_parallel_degree": 2}, "path state_passing"
        ),
        slow(4, {"training__tensor_parallel_degree": 2, "training__data_parallel_shard_degree": 2}, "degree 2"),
        # the recomputation in the backward runs the attention module again, inside the CP state
        slow(2, {"experimental__context_parallel_degree": 2, "activation_checkpoint__mode": "full"}, "state_passing"),
    ],
    ids=["tp2", "tp2-no-loss-parallel", "cp2", "tp2xcp2", "fsdp2xtp2", "cp2-ac-full"],
)
def test_gla_layout_matches_one_process(gla_one_process, train_args, gla_tiny, tmp_path, nproc, flags, expect):
    """Sequences of 32 tokens: CP x2 cuts them into 4 chunks of 8, so every state and convolution halo
    crosses ranks and chunk boundaries (the first layer's short convolution needs 3 tokens before each)."""
    tp, cp = (
        int(flags.get(f, 1)) for f in ("training__tensor_parallel_degree", "experimental__context_parallel_degree")
    )
    dp = nproc // (tp * cp)
    args = train_args("many", model__config=gla_tiny, training__steps=STEPS, training__batch_size=4 // dp, **flags)
    proc = torchrun(nproc, args)
    assert expect in proc.stdout
    assert_same(gla_one_process, read_metrics(tmp_path / "many"))


@pytest.fixture(scope="module")
def gdn_tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gdn") / "gdn_tiny.json"
    path.write_text(json.dumps(GDN_TINY))
    return str(path)


@pytest.fixture(scope="module")
def gdn_one_process(tmp_path_factory, byte_tokenizer, fixed_docs, gdn_tiny) -> list[dict]:
    from tests.conftest import SEQ_LEN

    dump = tmp_path_factory.mktemp("gdn_one")
    train([
        "--job.dump_folder", str(dump), "--model.config", gdn_tiny, "--model.tokenizer_path", byte_tokenizer,
        "--training.dataset", "json", "--training.data_files", fixed_docs, "--training.seq_len", str(SEQ_LEN),
        "--training.batch_size", "4", "--training.steps", str(STEPS), "--training.mixed_precision_param", "float32",
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", *GDN_SGD,
    ])  # fmt: skip
    one = read_metrics(dump)
    assert one[-1]["loss"] < one[0]["loss"]
    return one


# SGD, not AdamW: every parameter's gradient under TP equals one process's within 4e-6 relative
# (tests/parallel/tp_families.py), but AdamW turns the rounding noise of near-zero gradients into
# full-size updates (m / sqrt(v)), and this tiny model amplifies them: with AdamW at 3e-3 the grad norms
# of TP x2 and one process part by 2.6e-4 relative at step 4 (losses still within 1e-6); with SGD by 2e-5.
GDN_SGD = ["--optimizer.name", "SGD", "--optimizer.lr", "0.05"]


@pytest.mark.parametrize(
    ("nproc", "flags", "expect"),
    [
        slow(2, {"training__tensor_parallel_degree": 2}, "tensor parallel: degree 2"),
        slow(2, {"experimental__context_parallel_degree": 2}, "attention path state_passing"),
    ],
    ids=["tp2", "cp2"],
)
def test_gated_deltanet_layout_matches_one_process(
    gdn_one_process, gdn_tiny, train_args, tmp_path, nproc, flags, expect
):
    """Gated DeltaNet through the trainer: its TP plan (heads split with their A_log/dt_bias, grouped
    value heads, convolutions by channels instead of the fused three-way kernel) and its state-passing
    CP (chunks of 8 tokens) against one process."""
    dp = nproc // (
        int(flags.get("training__tensor_parallel_degree", 1))
        * int(flags.get("experimental__context_parallel_degree", 1))
    )
    args = train_args("two", model__config=gdn_tiny, training__steps=STEPS, training__batch_size=4 // dp,
                      optimizer__name="SGD", optimizer__lr=0.05, **flags)  # fmt: skip
    proc = torchrun(nproc, args)
    assert expect in proc.stdout
    assert_same(gdn_one_process, read_metrics(tmp_path / "two"))


@pytest.mark.parametrize("nproc", [2, slow(3)])
def test_gla_state_passing_equals_the_whole_sequence_under_torchrun(nproc):
    """Op level: the CP-wrapped GLA, gated delta rule and delta rule recurrences and short convolution on each rank's chunks give the
    outputs and input gradients of the unsharded sequence within 1e-5 (2 and 3 ranks: 4 and 6 chunks)."""
    proc = torchrun(nproc, [], module="tests.parallel.fla_cp_check")
    assert "FLA CP OK" in proc.stdout, proc.stdout
    assert proc.stdout.count('"ok": true') == 4 * nproc


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gla", "gated_deltanet"])
def test_cpu_path_equals_fla_kernels_on_gpu(family, tmp_path):
    """On CUDA (the device machine): the same fla model on the GPU (fla's Triton kernels) and on the CPU
    (flame's PyTorch path) gives the same logits and gradients, fp32 (Triton may use tf32: 2e-2)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import copy

    from transformers import AutoModelForCausalLM

    from flame.models.build import import_family, load_model_config

    import_family(family)
    path = tmp_path / "model.json"  # head dims of at least 16: Triton's dot products need them
    sizes = {"hidden_size": 256} if family == "gla" else {}
    path.write_text(json.dumps({**(GLA_TINY if family == "gla" else GDN_TINY), **sizes, "initializer_range": 0.02}))
    config = load_model_config(str(path))
    torch.manual_seed(0)
    cpu = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gpu = copy.deepcopy(cpu).cuda()
    tokens = torch.randint(0, config.vocab_size, (2, 128))
    logits_cpu = cpu(input_ids=tokens).logits
    logits_gpu = gpu(input_ids=tokens.cuda()).logits
    assert (logits_cpu - logits_gpu.cpu()).abs().max().item() < 2e-2
    logits_cpu.float().pow(2).mean().backward()
    logits_gpu.float().pow(2).mean().backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        scale = a.grad.abs().max().item() + 1e-6
        assert (a.grad - b.grad.cpu()).abs().max().item() / scale < 2e-2, name


@pytest.mark.parametrize(
    "flags",
    [
        slow({"training__tensor_parallel_degree": 2}),
        slow({"experimental__context_parallel_degree": 2}),
    ],
    ids=["tp2-to-1", "cp2-to-1"],
)
def test_gla_checkpoint_resumes_on_one_process_and_converts(
    gla_one_process, gla_tiny, byte_tokenizer, train_args, tmp_path, flags
):
    """GLA steps 1-3 under TP x2 (convolutions sharded by channels) or CP x2, steps 4-5 on one process: the
    losses are the uninterrupted single-process run's. The step-3 checkpoint written under that layout
    converts to a Hugging Face folder with every tensor whole (the shapes of a freshly built model)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from flame.utils.convert_dcp_to_hf import convert_dcp_to_hf

    args = dict(model__config=gla_tiny, training__steps=STEPS, checkpoint__enable_checkpoint="true",
                checkpoint__interval=3)  # fmt: skip
    torchrun(2, train_args("switch", training__batch_size=4, **args, **flags))
    shutil.rmtree(tmp_path / "switch" / "checkpoint" / "step-5")
    train(train_args("switch", training__batch_size=4, **args))
    assert_same(gla_one_process, read_metrics(tmp_path / "switch"))

    out = convert_dcp_to_hf(str(tmp_path / "switch"), 3, gla_tiny, byte_tokenizer, output=str(tmp_path / "hf"))
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    assert {n: p.shape for n, p in converted.named_parameters()} == {n: p.shape for n, p in fresh.named_parameters()}
    tokens = torch.randint(0, 200, (1, 32), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(converted(input_ids=tokens).logits).all()
