"""--request-timeout: a request whose router has not finished in time gets a request_timeout
error record, and the engines drop it (pages freed, generation stopped); the job goes on and
exits 0. Real mpiexec jobs on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
from test_mpi_runtime import completion, describe, random_prompts, serve, token_ids

pytestmark = pytest.mark.mpi

# "hang" requests: generation starts, the router takes the first tokens and then waits for
# ever (a stuck external call); "stuck" requests reserve pages and wait before generating
HANGING_ROUTER = '''
import asyncio

async def route(request, cluster):
    decode = cluster.decode[0]
    if request.id.startswith("stuck"):
        await decode.prep_recv(request, end=None)
        await asyncio.sleep(3600)
    async for tokens in decode.start_generate(request):
        yield tokens
        if request.id.startswith("hang"):
            await asyncio.sleep(3600)
'''


@pytest.fixture(scope="module")
def model_dir(tiny_hf_model):
    return tiny_hf_model("llama")


def test_request_over_its_time_is_aborted_and_gets_an_error_record(tmp_path, model_dir):
    path = tmp_path / "hanging_router.py"
    path.write_text(HANGING_ROUTER)
    ids = ["ok-0", "hang-0", "stuck-0", "ok-1", "hang-1"]
    prompts = random_prompts([20] * len(ids), seed=31)
    # long generations: without the abort the hanging ones would hold their pages to the end
    lines = [completion(i, p, max_tokens=12 if i.startswith("ok") else 400)
             for i, p in zip(ids, prompts)]
    result, by_id = serve(tmp_path, model_dir, lines, "--request-timeout", 3,
                          "--max-inflight", 8, "--max-model-len", 512,
                          router=f"{path}:route")
    assert sorted(by_id) == sorted(ids), describe(result)
    for i in ("ok-0", "ok-1"):
        assert len(token_ids(by_id[i])) == 12, by_id[i]
    for i in ("hang-0", "hang-1", "stuck-0"):
        error = by_id[i]["error"]
        assert error is not None and error["code"] == "request_timeout", by_id[i]
        assert "--request-timeout 3 s" in error["message"] and i in error["message"], error
    assert "2 completed, 3 errors" in result.stderr, describe(result)
    engines = json.loads((tmp_path / "out.run" / "summary.json").read_text())["engines"]
    decode = engines["2"]
    # a hanging request whose generation already ended (a fast machine makes 400 tokens of
    # this tiny model within the 3 s) has nothing left to abort on the engine
    assert decode["requests_aborted"] <= 2, decode
    assert decode["pages_used"] == 0, decode                # the stuck reservation freed too
