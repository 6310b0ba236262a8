"""Engine behaviour a caller relies on: exactness at α = 0, deadlines, cancel, clear errors."""

import math
import threading
import time

import pytest
from timebill_ros.core.engine import Engine
from timebill_ros.core.errors import (
    DeadlinePassedError,
    EmptyPromptError,
    InvalidAlphaError,
    InvalidRequestError,
    PromptTooLongError,
    UnknownPressError,
)
from timebill_ros.core.generation import GenerationRequest
import torch


def _ids(n, seed=0, vocab=256):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize('press', ['none', 'snapkv', 'streaming_llm'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_alpha_zero_matches_hf_generate_tiny(tiny, press, seed):
    ids = _ids(50 + 17 * seed, seed)
    ref = tiny.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[
        0, len(ids):
    ].tolist()
    engine = Engine(tiny, None, press=press, window_size=8)
    out = engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=24))
    assert out.token_ids == ref
    assert len(set(ref)) > 3, 'degenerate reference: the test would not catch a wrong cache'
    assert out.alpha == 0.0 and out.kv_after == out.kv_before == len(ids)


@pytest.mark.slow
def test_alpha_zero_matches_hf_generate_smollm2(smollm2):
    model, tok = smollm2
    engine = Engine(model, tok)
    ids = engine.encode('List three uses of a robot arm in a kitchen.')
    ref = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[
        0, len(ids):
    ].tolist()
    out = engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=48))
    assert out.token_ids == ref
    assert out.text.strip() == tok.decode(ref, skip_special_tokens=True).strip()


def test_preallocated_and_dynamic_cache_agree_after_eviction(tiny):
    ids = _ids(120, 5)
    a = Engine(tiny, None, press='snapkv', window_size=8, preallocate=True)
    b = Engine(tiny, None, press='snapkv', window_size=8, preallocate=False)
    ra = a.generate(GenerationRequest(input_ids=ids, max_new_tokens=20, alpha=0.5))
    rb = b.generate(GenerationRequest(input_ids=ids, max_new_tokens=20, alpha=0.5))
    assert ra.token_ids == rb.token_ids
    assert ra.kv_after == rb.kv_after == 60


def test_eviction_changes_the_cache_and_positions_stay_original(tiny):
    """
    Check the eviction mechanics: kv_after is exact and decoding afterwards runs to the end.

    With original position ids, evicting nothing of importance keeps the answer close; with
    wrong (shortened) positions the model would see a different sequence. Here decoding after
    eviction must still run to max_new_tokens.
    """
    ids = _ids(200, 7)
    engine = Engine(tiny, None, press='snapkv', window_size=16)
    for alpha, keep in [(0.25, 150), (0.5, 100), (0.9, 20)]:
        out = engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=10, alpha=alpha))
        assert (out.kv_before, out.kv_after) == (200, keep)
        assert out.tokens_generated == 10


def _sleep_past_deadline_at(step_to_stall, deadline_box):
    def on_token(step, token, text):
        if step == step_to_stall:
            time.sleep(max(0.0, deadline_box[0] - time.monotonic()) + 0.01)

    return on_token


@pytest.mark.parametrize('policy', ['kill', 'truncate'])
def test_deadline_mid_decode(tiny, policy):
    engine = Engine(tiny, None, press='none')
    box = [time.monotonic() + 3.0]
    req = GenerationRequest(
        input_ids=_ids(30),
        max_new_tokens=200,
        deadline=box[0],
        overrun=policy,
        on_token=_sleep_past_deadline_at(3, box),
    )
    out = engine.generate(req)
    assert out.stop_reason == 'deadline'
    assert not out.completed and not out.deadline_met
    assert out.tokens_generated == 4  # tokens 0..3; no step started after the deadline
    assert out.finished_at - box[0] < 0.5
    if policy == 'kill':
        assert out.text == ''
    else:
        assert out.token_ids[:4] == out.token_ids and len(out.token_ids) == 4


def test_truncate_returns_text_so_far_with_a_tokenizer(smollm2):
    model, tok = smollm2
    engine = Engine(model, tok, press='none')
    box = [time.monotonic() + 5.0]
    out = engine.generate(
        GenerationRequest(
            prompt='Write a long story about a robot.',
            max_new_tokens=200,
            deadline=box[0],
            overrun='truncate',
            on_token=_sleep_past_deadline_at(5, box),
        )
    )
    assert out.stop_reason == 'deadline' and not out.completed
    assert out.text and out.text == tok.decode(out.token_ids, skip_special_tokens=True)


def test_cancel_stops_within_one_step(tiny):
    engine = Engine(tiny, None, press='none')
    cancel = threading.Event()

    def on_token(step, token, text):
        if step == 5:
            cancel.set()

    out = engine.generate(
        GenerationRequest(input_ids=_ids(30), max_new_tokens=200, cancel=cancel, on_token=on_token)
    )
    assert out.stop_reason == 'cancelled'
    assert out.tokens_generated == 6 and out.text == ''


def test_eos_stops_and_counts_as_completed(tiny):
    engine = Engine(tiny, None, press='none')
    ids = _ids(30)
    first = engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=5)).token_ids
    engine.eos_ids = {first[2]}  # pretend the third token is EOS
    out = engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=50))
    assert out.stop_reason == 'eos' and out.completed and out.token_ids == first[:3]


def test_seeded_sampling_is_reproducible(tiny):
    engine = Engine(tiny, None, press='none')
    ids = _ids(30)
    runs = [
        engine.generate(
            GenerationRequest(
                input_ids=ids, max_new_tokens=15, do_sample=True, seed=s, temperature=1.5
            )
        ).token_ids
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_result_reports_timings(tiny):
    engine = Engine(tiny, None, press='snapkv', window_size=8)
    out = engine.generate(
        GenerationRequest(
            input_ids=_ids(64), max_new_tokens=12, alpha=0.5, deadline=time.monotonic() + 60
        )
    )
    assert out.completed and out.deadline_met
    assert len(out.decode_step_s) == out.tokens_generated - 1
    assert out.prefill_s > 0 and all(s > 0 for s in out.decode_step_s)
    assert out.total_s >= out.prefill_s + sum(out.decode_step_s)


# ----------------------------------------------------------------- bad input
def test_bad_input_raises_specific_errors(tiny, smollm2):
    engine = Engine(tiny, None, press='snapkv')
    with pytest.raises(EmptyPromptError):
        engine.generate(GenerationRequest(input_ids=[]))
    model, tok = smollm2
    real = Engine(model, tok)
    for empty in ('', '   \n'):
        with pytest.raises(EmptyPromptError, match='empty'):
            real.generate(GenerationRequest(prompt=empty))
    for alpha in (1.0, -0.1, 1.5, math.nan):
        with pytest.raises(InvalidAlphaError, match=r'\[0, 1\)'):
            engine.generate(GenerationRequest(input_ids=_ids(10), alpha=alpha))
    with pytest.raises(PromptTooLongError, match='context is 1024'):
        engine.generate(GenerationRequest(input_ids=_ids(1100)))
    with pytest.raises(UnknownPressError, match='known: .*snapkv, streaming_llm'):
        Engine(tiny, None, press='h2o')
    with pytest.raises(DeadlinePassedError, match='already passed'):
        engine.generate(GenerationRequest(input_ids=_ids(10), deadline=time.monotonic() - 0.1))
    with pytest.raises(InvalidRequestError, match='overrun'):
        engine.generate(GenerationRequest(input_ids=_ids(10), overrun='explode'))
    with pytest.raises(InvalidRequestError, match='max_new_tokens'):
        engine.generate(GenerationRequest(input_ids=_ids(10), max_new_tokens=0))
