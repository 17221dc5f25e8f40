"""The BD3LM sampler on a tiny random student in float64 (docs/method.md §13.1)."""

from __future__ import annotations

import pytest
import torch

from tide_ds.models.qwen3 import BD3LMStudent, build_student, tiny_student_config
from tide_ds.sampling import (
    BD3LMDenoiser,
    SamplerConfig,
    generate,
    propose_tokens,
    transfer_counts,
)
from tide_ds.sampling.masks import block_causal_mask, left_pad, logical_positions

MASK, EOS, PAD = 1010, 1002, 1000
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3], list(range(20, 47))]


@pytest.fixture(scope="module")
def model():
    return build_student(tiny_student_config(), seed=0, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def eager_model():
    return build_student(tiny_student_config(), seed=0, dtype=torch.float64, attn_implementation="eager").eval()


def run(model, prompts, *, use_cache=True, stop_ids=(), seed=None, **config):
    cfg = SamplerConfig(**{"max_new_tokens": 20, "block_size": 8, "steps": 20, **config}, use_cache=use_cache)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    denoiser = BD3LMDenoiser(model, block_size=cfg.block_size, use_cache=use_cache)
    return generate(denoiser, prompts, config=cfg, mask_id=MASK, pad_id=PAD, stop_ids=stop_ids, generator=generator)


def test_transfer_counts_follow_the_linear_schedule():
    assert transfer_counts(32, 32) == [1] * 32
    assert transfer_counts(32, 8) == [4] * 8
    assert transfer_counts(3, 3) == [1, 1, 1]
    assert transfer_counts(3, 8) == [1, 1, 1]  # more steps than masks: zero entries dropped
    assert transfer_counts(5, 2) == [2, 3]  # round half to even
    for masks in range(1, 40):
        for steps in range(1, 40):
            counts = transfer_counts(masks, steps)
            assert sum(counts) == masks and len(counts) <= steps and min(counts) >= 1


def test_left_pad_aligns_generation_to_a_block_boundary():
    ids, valid = left_pad([[7, 8, 9], [1] * 9], block_size=4, pad_id=PAD)
    assert ids.shape == (2, 12)
    assert ids[0].tolist() == [PAD] * 9 + [7, 8, 9]
    assert valid.sum(1).tolist() == [3, 9]
    assert logical_positions(valid)[0].tolist() == [0] * 9 + [0, 1, 2]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        left_pad([[1], []], block_size=4, pad_id=PAD)


def test_block_causal_mask_rows():
    valid = torch.tensor([[False, True, True, True, True, True]])
    keep = block_causal_mask(valid, block_size=2, q_start=0, q_end=6, kv_end=6)[0, 0].int()
    assert keep.tolist() == [
        [1, 0, 0, 0, 0, 0],  # a padded query sees itself only
        [0, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1],
    ]


def test_block_logits_equal_the_training_forward(model):
    """A noisy block next to its clean prefix gets the logits the training layout [x_t ; x_0] gives it."""
    k, length = 8, 32
    g = torch.Generator().manual_seed(3)
    x_0 = torch.randint(0, 1000, (2, length), generator=g)
    block = 2
    x_t = x_0.clone()
    x_t[:, block * k:(block + 1) * k][:, ::2] = MASK
    hidden = BD3LMStudent(model, block_size=k)(x_t, x_0)
    expected = model.lm_head(hidden)[:, block * k:(block + 1) * k]

    canvas = torch.cat([x_0[:, :block * k], x_t[:, block * k:(block + 1) * k]], dim=1)
    valid = torch.ones_like(canvas, dtype=torch.bool)
    for use_cache in (True, False):
        denoiser = BD3LMDenoiser(model, block_size=k, use_cache=use_cache)
        denoiser.start(canvas, valid, logical_positions(valid), block * k)
        rows = torch.arange(k).expand(2, k)
        got = denoiser.block_logits(canvas, block * k, (block + 1) * k, rows)
        torch.testing.assert_close(got.double(), expected.float().double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("steps,temperature", [(20, 0.0), (6, 0.0), (20, 0.9)], ids=["greedy-1pt", "greedy-3pt", "sampled"])
def test_cached_and_uncached_decoding_give_the_same_tokens(model, eager_model, backend, steps, temperature):
    m = model if backend == "sdpa" else eager_model
    cached = run(m, PROMPTS, use_cache=True, steps=steps, temperature=temperature, top_p=0.9, seed=11)
    uncached = run(m, PROMPTS, use_cache=False, steps=steps, temperature=temperature, top_p=0.9, seed=11)
    assert torch.equal(cached.canvas, uncached.canvas)
    assert (cached.canvas[:, cached.prompt_width:] != MASK).all()
    # blocks of 8, 8, 4: the cache runs the prompt once, each step on the block only, each committed block once
    assert cached.forward_tokens < uncached.forward_tokens
    per_block = [len(transfer_counts(n, -(-steps // 3))) for n in (8, 8, 4)]
    assert uncached.forward_calls == sum(per_block)
    assert cached.forward_calls == sum(per_block) + 1 + 2


def test_greedy_decoding_is_deterministic(model):
    first = run(model, PROMPTS)
    second = run(model, PROMPTS)
    assert torch.equal(first.canvas, second.canvas)
    assert first.tokens == second.tokens and all(len(t) == 20 for t in first.tokens)


def test_sampling_is_seeded(model):
    a = run(model, PROMPTS, temperature=1.0, seed=5)
    b = run(model, PROMPTS, temperature=1.0, seed=5)
    c = run(model, PROMPTS, temperature=1.0, seed=6)
    greedy = run(model, PROMPTS)
    assert torch.equal(a.canvas, b.canvas)
    assert not torch.equal(a.canvas, c.canvas)
    assert not torch.equal(a.canvas, greedy.canvas)
    # top_p that keeps only the most likely token turns sampling into greedy decoding
    narrow = run(model, PROMPTS, temperature=1.0, top_p=1e-9, seed=5)
    assert torch.equal(narrow.canvas, greedy.canvas)


def test_left_padded_batch_equals_individual_decoding(model):
    batch = run(model, PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        alone = run(model, [prompt])
        assert alone.prompt_width <= batch.prompt_width  # fewer pad blocks alone
        assert alone.tokens[0] == batch.tokens[row]


def test_stop_token_ends_a_sequence_and_the_batch(model):
    free = run(model, PROMPTS, max_new_tokens=32, steps=32)
    # make the token generated by row 0 at position 3 the stop token: row 0 ends there
    stop = free.tokens[0][3]
    stopped = run(model, PROMPTS, max_new_tokens=32, steps=32, stop_ids=[stop])
    first = free.tokens[0].index(stop)
    assert stopped.tokens[0] == free.tokens[0][:first] and stopped.finished[0]
    for row in range(len(PROMPTS)):
        if stop in free.tokens[row]:
            assert stopped.tokens[row] == free.tokens[row][: free.tokens[row].index(stop)] and stopped.finished[row]
        else:
            assert stopped.tokens[row] == free.tokens[row] and not stopped.finished[row]

    # a finished sequence leaves the batch: same tokens with and without the cache, less work than without stops
    assert len({len(t) // 8 for t in stopped.tokens}) > 1  # rows stop in different blocks: the batch shrinks
    uncached = run(model, PROMPTS, max_new_tokens=32, steps=32, stop_ids=[stop], use_cache=False)
    assert uncached.tokens == stopped.tokens and uncached.finished == stopped.finished
    assert stopped.forward_tokens < free.forward_tokens

    # once every sequence holds a stop token, no further block is decoded
    single = run(model, [PROMPTS[0]], max_new_tokens=32, steps=32, stop_ids=[stop])
    assert single.tokens[0] == free.tokens[0][:first]
    blocks_needed = first // 8 + 1
    assert single.forward_calls == 1 + 8 * blocks_needed + (blocks_needed - 1)
    assert (single.canvas[0, single.prompt_width + 8 * blocks_needed:] == MASK).all()


def test_proposals_never_take_the_mask_token():
    logits = torch.zeros(1, 3, 1024)
    logits[..., MASK] = 50.0
    logits[0, :, 7] = 1.0
    tokens, confidence = propose_tokens(
        logits, temperature=0.0, top_p=1.0, remasking="low_confidence", generator=None,
        suppress_ids=torch.tensor([MASK]),
    )
    assert tokens.tolist() == [[7, 7, 7]]
    expected = torch.tensor(1.0).exp() / (torch.tensor(1.0).exp() + 1022)
    torch.testing.assert_close(confidence, expected.double().expand(1, 3), rtol=1e-6, atol=0)


def test_bad_settings_fail_early(model):
    with pytest.raises(ValueError, match="top_p=0"):
        SamplerConfig(top_p=0.0)
    with pytest.raises(ValueError, match="remasking='sideways'"):
        SamplerConfig(remasking="sideways")
    flex = build_student(tiny_student_config(), seed=0, attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        BD3LMDenoiser(flex, block_size=8)
