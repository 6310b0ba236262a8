"""
Structured answers: the schema holds for every answer, a bad schema is refused, close is valid.

The tiny random model (SmolLM2's tokenizer) writes noise; only the grammar makes it JSON, so
these tests fail if the mask is not applied at every step.
"""

import json
import math
import time

import pytest
from timebill_ros.core.config import TimeBillConfig
from timebill_ros.core.engine import Engine
from timebill_ros.core.generation import GenerationRequest
from timebill_ros.core.job import Job
from timebill_ros.core.lengths import FixedLength
from timebill_ros.core.pipeline import Pipeline
from timebill_ros.core.structured import (
    GrammarError,
    JsonNesting,
    schema_depth,
    SCHEMA_HINT,
    with_schema,
)
from timebill_ros.core.time_estimator import ExecutionTimeModel

COLOURS = {
    'type': 'array',
    'items': {'type': 'string', 'maxLength': 6},
    'minItems': 1,
    'maxItems': 4,
}
OBJECTS = {  # unbounded: only a stop (deadline, cap) ends it
    'type': 'object',
    'properties': {
        'objects': {'type': 'array', 'items': {'type': 'string', 'minLength': 2}},
    },
    'required': ['objects'],
    'additionalProperties': False,
}
FAST = ExecutionTimeModel(a=0.0, b=1e-5, c=0.001, p=1e-7, q=0.001)


@pytest.fixture(scope='module')
def engine():
    from timebill_ros.core.model import load_model, TINY_MODEL

    model, tok = load_model(TINY_MODEL)
    return Engine(model, tok, press='snapkv', window_size=8)


def _pipeline(engine, **cfg):
    config = TimeBillConfig(max_new_tokens=64, prefill_chunk=64, window_size=8, **cfg)
    return Pipeline(engine, FAST, config, FixedLength(16), learn=False)


def _job(engine, rid, schema=None, **kw):
    ids = engine.encode('List three colours of a traffic light.')
    return Job(rid, ids, json_schema=json.dumps(schema) if schema else '', **kw)


def _shape_ok(value) -> bool:
    return (
        isinstance(value, list)
        and 1 <= len(value) <= 4
        and all(isinstance(v, str) and len(v) <= 6 for v in value)
    )


def test_every_answer_of_a_random_model_validates_against_the_schema(engine):
    for seed in range(3):
        res = engine.generate(
            GenerationRequest(
                prompt=f'colours {seed}',
                max_new_tokens=200,
                json_schema=json.dumps(COLOURS),
                do_sample=True,
                seed=seed,
            )
        )
        assert res.completed and res.valid, (res.stop_reason, res.text)
        assert _shape_ok(json.loads(res.text)), res.text
        assert res.mask_s > 0


def test_without_a_schema_the_random_model_writes_no_json(engine):
    res = engine.generate(GenerationRequest(prompt='colours', max_new_tokens=40))
    with pytest.raises(ValueError):
        json.loads(res.text)
    assert res.valid is None


def test_an_invalid_schema_is_rejected_with_the_library_message(engine):
    p = _pipeline(engine)
    out = p.run(_job(engine, 'bad', {'type': 'arry'}, deadline=time.monotonic() + 30))
    assert out.status == 'rejected'
    assert 'invalid JSON schema' in out.reason and 'arry' in out.reason, out.reason
    out = p.run(Job('bad2', [5, 6, 7], json_schema='{"type": ', deadline=math.inf))
    assert out.status == 'rejected' and 'not JSON' in out.reason
    # the pipeline goes on
    assert p.run(_job(engine, 'ok', COLOURS, deadline=time.monotonic() + 30)).status == (
        'succeeded'
    )
    with pytest.raises(GrammarError):
        engine.compile_grammar(grammar='start: foo')
    p.close()


@pytest.mark.parametrize('overrun', ['close', 'truncate', 'kill'])
def test_close_returns_a_valid_shorter_answer_where_truncate_cuts_it(engine, overrun):
    p = _pipeline(engine)
    cut = 0
    for i in range(6):  # the random model may end an answer itself; the cap cuts most
        ids = engine.encode(f'List {i} objects.')
        out = p.run(Job(f'{overrun}{i}', ids, json_schema=json.dumps(OBJECTS), overrun=overrun,
                        max_new_tokens=24, deadline=time.monotonic() + 60))
        assert out.structured
        if out.completed:
            assert out.status == 'succeeded' and out.valid
            continue
        cut += 1
        if overrun == 'close':
            assert out.status == 'truncated' and out.valid, (out.reason, out.text)
            assert 'closed early' in out.reason
            assert isinstance(json.loads(out.text)['objects'], list)
            assert out.tokens_generated <= 24
        elif overrun == 'truncate':
            assert out.status == 'truncated' and not out.valid and out.text
            with pytest.raises(ValueError):
                json.loads(out.text)
        else:
            assert out.status == 'killed' and out.text == '' and not out.valid
    assert cut >= 2, 'the cap cut too few answers to test anything'
    p.close()


def test_close_at_the_deadline_is_valid_and_on_time(engine):
    p = _pipeline(engine)
    deadline = time.monotonic() + 1.5
    slow = lambda *a: time.sleep(0.01)  # noqa: E731 - ~10 ms per token: the deadline binds
    out = p.run(_job(engine, 'dl', OBJECTS, overrun='close', max_new_tokens=2000,
                     deadline=deadline, on_token=slow))
    assert time.monotonic() <= deadline + 0.05
    assert out.status == 'truncated' and out.valid, (out.reason, out.text[-60:])
    json.loads(out.text)
    assert out.result.closed_at is not None and out.result.closed_at < out.tokens_generated
    p.close()


def test_the_plan_counts_the_closing_tokens(engine):
    p = _pipeline(engine)
    job = _job(engine, 'plan', OBJECTS, overrun='close', deadline=time.monotonic() + 30)
    assert p._check(job) == '' and job.close_tokens == schema_depth(OBJECTS) + 2 == 4
    plain = _job(engine, 'plain', OBJECTS, overrun='truncate', deadline=job.deadline)
    assert p._check(plain) == '' and plain.close_tokens == 0
    job.accepted_at = plain.accepted_at = time.monotonic()
    v_close = p.plan(job, 0.01, 16, 0.0)[1]
    v_plain = p.plan(plain, 0.01, 16, 0.0)[1]
    assert v_close.n_hat == v_plain.n_hat + 4
    p.close()


def test_json_nesting_reads_open_strings_and_brackets():
    n = JsonNesting()
    n.feed('{"a": ["x}", "y\\"')
    assert n.in_string and n.closing() == '"]}'
    n.feed('"]')
    assert n.closing() == '}'
    assert schema_depth({'type': 'string'}) == 0
    assert schema_depth(COLOURS) == 1


def test_with_schema_appends_the_schema_once():
    """A prompt that already ends with the schema's text (a replayed Request) is left as it is."""
    ids = {'type': 'string', 'enum': [f'id{i}' for i in range(20)]}  # shortened in the text
    for schema in (json.dumps(COLOURS), json.dumps(ids), '{"type": '):  # last: not JSON
        once = with_schema('Name them.', schema)
        assert once.startswith('Name them.\n' + SCHEMA_HINT) and once.count(SCHEMA_HINT) == 1
        assert with_schema(once, schema) == once
        assert with_schema(with_schema(once, schema), schema) == once
    assert 'id19' not in with_schema('q', json.dumps(ids))
    assert with_schema('q', '') == 'q'
    # another schema's text is not this one's: it is appended after it
    other = with_schema(with_schema('q', json.dumps(COLOURS)), json.dumps(OBJECTS))
    assert other.count(SCHEMA_HINT) == 2
