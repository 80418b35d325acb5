"""`mpiserve run` with tensor-parallel engines (`--tp`, `--prefill-tp`, `--decode-tp`): real
mpiexec jobs whose engines are groups of ranks. Greedy output equals that of one-rank
engines under every shape of the layout; bad layouts are refused before any model loads."""

import json
from pathlib import Path

import pytest
from batch_jobs import read_records, reference_tokens, run_job, tokens_by_id, write_requests
from test_mpi_runtime import describe, mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(600)]

# (options, ranks): world size = 1 + P * prefill_tp + D * decode_tp. Each job runs every
# built-in router in turn (routers_in_turn.py), so the KV of the disaggregating ones moves
# between groups of sizes 2->1, 1->2 and 2->2.
EVERY_ROUTER = str(Path(__file__).with_name("routers_in_turn.py")) + ":every_builtin"
LAYOUTS = [(("--prefill-tp", 2), 4), (("--decode-tp", 2), 4), (("--tp", 2), 5)]
IDS = ["prefill_tp2", "decode_tp2", "tp2"]


def run_layout(tmp_path, options, ranks, router, *extra):
    """Run the layout on 10 requests; check the tokens against one-rank engines and return the
    run report."""
    source = write_requests(tmp_path / "in.jsonl", count=10, max_tokens=8)
    expected = reference_tokens(source, tmp_path)
    output = tmp_path / "out.jsonl"
    code, log = run_job(source, output, *options, "--router", router, *extra, ranks=ranks)
    assert code == 0, log
    assert tokens_by_id(read_records(output)) == expected
    return json.loads((tmp_path / "out.run" / "summary.json").read_text())


@pytest.mark.parametrize("options,ranks", LAYOUTS, ids=IDS)
def test_every_router_on_tensor_parallel_engines_matches_one_rank_engines(tmp_path, options,
                                                                          ranks):
    summary = run_layout(tmp_path, options, ranks, EVERY_ROUTER)
    assert sum(summary["strategies"].values()) == 10 and len(summary["strategies"]) >= 3
    tp = {int(lead): size for lead, size in summary["config"]["tensor_parallel"].items()}
    assert sum(tp.values()) == ranks - 1 and max(tp.values()) > 1
    engines = summary["engines"]
    for lead, stats in engines.items():
        assert stats["tp"] == tp[int(lead)], lead
        assert stats["weight_bytes_per_rank"] > 0
        assert stats["fallbacks"] == 0 and stats["transfers_failed"] == 0, (lead, stats)
    sent = sum(e["kv_bytes_sent"] for e in engines.values())
    assert sent == sum(e["kv_bytes_received"] for e in engines.values())
    assert sent > 0


def test_failed_transfer_into_a_tensor_parallel_engine_falls_back(tmp_path):
    summary = run_layout(tmp_path, ("--decode-tp", 2), 4, "pd", "--fail-transfers", 2)
    decode = next(e for e in summary["engines"].values() if e["role"] == "decode")
    assert decode["fallbacks"] == 2 and decode["transfers_failed"] == 2


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


@pytest.mark.parametrize("option", ["--tp", "--decode-tp"])
def test_a_size_below_one_is_refused_naming_it(option):
    from mpiserve.cluster.layout import JobLayout
    layout = JobLayout.infer(3, None, None, *((0, 0) if option == "--tp" else (1, 0)))
    assert "tensor-parallel sizes must be >= 1" in layout.problem()
