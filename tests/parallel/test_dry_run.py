"""``--job.dry_run``: a 64-rank plan checked in one CPU process, in seconds."""

from __future__ import annotations

import json

from tests.helpers import ROOT, run


def _args(tmp_path, byte_tokenizer, fixed_docs, *extra: str) -> list[str]:
    config = tmp_path / "llama_7b.json"
    config.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
    }))  # fmt: skip
    return [
        "bash", str(ROOT / "train.sh"), "--job.dry_run", "--model.config", str(config),
        "--model.tokenizer_path", byte_tokenizer, "--training.dataset", "json", "--training.data_files", fixed_docs,
        "--training.seq_len", "4096", "--training.batch_size", "2", "--job.dump_folder", str(tmp_path / "dry"), *extra,
    ]  # fmt: skip


def test_dry_run_of_64_ranks_fsdp_tp_pp_cp(tmp_path, byte_tokenizer, fixed_docs):
    args = _args(
        tmp_path, byte_tokenizer, fixed_docs,
        "--training.tensor_parallel_degree", "4", "--experimental.pipeline_parallel_degree", "2",
        "--experimental.context_parallel_degree", "2",
    )  # fmt: skip
    proc = run(args, NGPU="8", NNODE="8", timeout=120)
    out = proc.stdout
    assert "dry run for 64 ranks" in out
    assert "'pp': 2, 'dp_replicate': 1, 'dp_shard': 4, 'cp': 2, 'tp': 4" in out
    # a CUDA target: torch's ring attention; FSDP shards over dp_shard x cp
    assert "context parallel: degree 2 over mesh axis ('cp',)" in out and "attention path ring" in out
    assert "FSDP2 over mesh axes ('fsdp',) (shape (8,))" in out
    assert "layers per pipeline stage [16, 16]" in out
    # 6.48B parameters with the 257-token vocabulary; rank 0 holds 1/64 of them
    total = float(out.split("M parameters, ")[0].split(";")[-1])
    on_rank_0 = float(out.split("M parameters, ")[1].split("M on rank 0")[0])
    assert abs(on_rank_0 * 64 - total) / total < 0.01
    assert not (tmp_path / "dry").exists()  # nothing written, nothing launched


def test_dry_run_reports_impossible_degrees(tmp_path, byte_tokenizer, fixed_docs):
    args = _args(tmp_path, byte_tokenizer, fixed_docs, "--training.tensor_parallel_degree", "5")
    proc = run(args, check=False, NGPU="8", NNODE="8")
    assert proc.returncode == 2
    assert "num_attention_heads (32) is not divisible" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_plans_float8_with_fsdp_float8_all_gather(tmp_path, byte_tokenizer, fixed_docs):
    """A GPU target on this CPU machine: validation passes for CUDA and the plan converts the linears."""
    args = _args(
        tmp_path, byte_tokenizer, fixed_docs, "--float8.enable_float8_linear", "--float8.enable_fsdp_float8_all_gather",
        "--float8.precompute_float8_dynamic_scale_for_fsdp",
    )  # fmt: skip
    out = run(args, NGPU="8", NNODE="2", timeout=120).stdout
    assert "float8: 224 linear layers in float8 (dynamic tensorwise scaling, float8 FSDP all-gather)" in out
    assert "dry run for 16 ranks" in out
