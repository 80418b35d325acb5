"""A step's inputs and outputs without a model: the flat slot indices and token slices the
batch builder gathers, and the tokens StepTokens picks from a step's logits."""

import pytest
import torch

from mpiserve.engine.kv_cache import slot_indices
from mpiserve.engine.sampler import new_generator, sample
from mpiserve.engine.sampling_params import SamplingParams
from mpiserve.engine.sequence import Sequence
from mpiserve.engine.step_tokens import StepTokens
from mpiserve.engine.token_logprobs import token_logprob


@pytest.mark.parametrize("begin,end", [(0, 0), (0, 1), (0, 13), (3, 4), (3, 9), (4, 8), (5, 14)])
def test_slot_indices_follow_the_page_list(begin, end):
    page_ids, page_size = [7, 2, 9, 0], 4
    expected = [page_ids[p // page_size] * page_size + p % page_size for p in range(begin, end)]
    assert slot_indices(page_ids, page_size, begin, end) == expected


def test_tokens_between_is_a_slice_of_all_tokens():
    seq = Sequence("s", [10, 11, 12], SamplingParams())
    seq.output.extend([20, 21])
    for start in range(6):
        for end in range(start, 6):
            assert seq.tokens_between(start, end) == seq.tokens[start:end], (start, end)


def _logits(rows=5, vocab=50):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(3))


def _seq(**params):
    return Sequence("s", [1, 2], SamplingParams(**params))


def test_greedy_rows_are_each_rows_argmax():
    logits = _logits()
    tokens = StepTokens(logits, eos_ids=(0,), generators={})
    picked = [tokens.pick(_seq(temperature=0.0), row) for row in range(len(logits))]
    assert picked == [int(torch.argmax(row)) for row in logits]


def test_greedy_rows_take_the_first_of_tied_maxima():
    """bfloat16 logits tie often; a greedy row takes the lowest tied id, as transformers'
    argmax does."""
    logits = _logits().bfloat16().float()
    logits[:, 7] = logits[:, 40] = logits.max(dim=-1).values + 1
    logits[2, 3] = logits[2, 7]
    tokens = StepTokens(logits, eos_ids=(0,), generators={})
    picked = [tokens.pick(_seq(temperature=0.0), row) for row in range(len(logits))]
    assert picked == [3 if row == 2 else 7 for row in range(len(logits))]
    assert picked == [int(torch.argmax(row)) for row in logits]


def test_sampled_rows_draw_from_their_own_generator():
    logits = _logits()
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    seq = Sequence("s", [1, 2], params)
    tokens = StepTokens(logits, eos_ids=(0,), generators={id(seq): new_generator(params)})
    expected = sample(logits[3], params, new_generator(params))
    assert tokens.pick(seq, 3) == expected


def test_reshaped_greedy_rows_are_not_the_plain_argmax():
    logits = _logits()
    favourite = int(torch.argmin(logits[1]))
    seq = _seq(temperature=0.0, logit_bias={favourite: 100.0})
    assert StepTokens(logits, eos_ids=(0,), generators={}).pick(seq, 1) == favourite


def test_logprobs_are_of_the_picked_row():
    logits = _logits()
    seq = _seq(temperature=0.0, logprobs=2)
    token = StepTokens(logits, eos_ids=(0,), generators={}).pick(seq, 2)
    assert seq.logprobs == [token_logprob(logits[2], token, 2)]
