"""`mpiserve run` with tensor-parallel engines (`--tp`, `--prefill-tp`, `--decode-tp`): real
mpiexec jobs whose engines are groups of ranks. Greedy output equals that of one-rank
engines under every shape of the layout; bad layouts are refused before any model loads."""

import json

import pytest
from batch_jobs import read_records, reference_tokens, run_job, tokens_by_id, write_requests
from test_mpi_runtime import describe, mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(600)]

# (options, ranks, router): world size = 1 + P * prefill_tp + D * decode_tp
LAYOUTS = [(("--tp", 2), 5, "round_robin"),
           (("--prefill-tp", 2), 4, "balanced_pd"),
           (("--decode-tp", 2), 4, "pd")]


@pytest.mark.parametrize("options,ranks,router", LAYOUTS,
                         ids=["tp2-round_robin", "prefill_tp2-balanced_pd", "decode_tp2-pd"])
def test_tensor_parallel_job_matches_one_rank_engines(tmp_path, options, ranks, router):
    source = write_requests(tmp_path / "in.jsonl", count=8, max_tokens=16)
    expected = reference_tokens(source, tmp_path)
    output = tmp_path / "out.jsonl"
    code, log = run_job(source, output, *options, "--router", router, ranks=ranks)
    assert code == 0, log
    assert tokens_by_id(read_records(output)) == expected
    summary = json.loads((tmp_path / "out.run" / "summary.json").read_text())
    tp = {int(lead): size for lead, size in summary["config"]["tensor_parallel"].items()}
    assert sum(tp.values()) == ranks - 1 and max(tp.values()) == 2
    for lead, stats in summary["engines"].items():
        assert stats["tp"] == tp[int(lead)], lead
        assert stats["weight_bytes_per_rank"] > 0


def test_world_size_that_does_not_add_up_is_refused_with_the_arithmetic(tmp_path):
    source = write_requests(tmp_path / "in.jsonl", count=1)
    result = mpirun(4, "--tp", 2, "--prefill", 1, "--decode", 1, "--input", source,
                    "--output", tmp_path / "out.jsonl", cwd=tmp_path, timeout=60)
    assert result.returncode == 2, describe(result)
    assert ("world size 4 does not match 1 router + 1 prefill x TP 2 + 1 decode x TP 2 = 5 "
            "ranks") in result.stderr, describe(result)
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()


def test_heads_that_do_not_split_are_refused_before_loading(tmp_path):
    source = write_requests(tmp_path / "in.jsonl", count=1)
    result = mpirun(4, "--tp", 3, "--prefill", 0, "--decode", 1, "--input", source,
                    "--output", tmp_path / "out.jsonl", cwd=tmp_path, timeout=60)
    assert result.returncode == 2, describe(result)
    assert "cannot be split over 3 ranks: 8 attention heads do not divide by " \
           "tensor-parallel size 3" in result.stderr, describe(result)
