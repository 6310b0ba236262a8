"""
Structured answers through ROS: a goal's JSON schema holds, a bad one is refused, close is valid.

The tiny bringup's random model (SmolLM2's tokenizer) writes noise; only the grammar, applied
in the generator node every step, makes its answer JSON. Goals go through the server, the
generator and the predictor as separate processes, like a planner's.
"""

import json
import os
from pathlib import Path
import subprocess
import sys
import time

import pytest

COLOURS = {  # bounded: the model ends it itself
    'type': 'array',
    'items': {'type': 'string', 'maxLength': 6},
    'minItems': 1,
    'maxItems': 4,
}
OBJECTS = {  # unbounded: only a stop (deadline, cap) ends it; the random model's one string
    'type': 'object',  # runs on (minItems 1) until the cap makes the decoder close it
    'properties': {
        'objects': {
            'type': 'array',
            'items': {'type': 'string', 'minLength': 2},
            'minItems': 1,
        },
    },
    'required': ['objects'],
    'additionalProperties': False,
}
BAD = {'type': 'arry'}
PROMPT = 'List three colours of a traffic light.'
ROOT = Path(__file__).resolve().parents[1]


def _colours(value) -> bool:
    return (
        isinstance(value, list)
        and 1 <= len(value) <= 4
        and all(isinstance(v, str) and len(v) <= 6 for v in value)
    )


@pytest.mark.ros
@pytest.mark.slow
def test_a_schema_goal_succeeds_with_valid_json(tiny_server):
    out = tiny_server.ask(PROMPT, 30.0, max_new_tokens=64, schema=COLOURS, timeout_s=90.0)
    assert out.status_name == 'succeeded', out.reason
    assert out.structured and out.valid and out.completed
    assert _colours(json.loads(out.text)), out.text
    assert out.value == json.loads(out.text) and isinstance(out.value, list)
    # the same as JSON text; the schema is in the prompt the server encodes (schema_in_prompt)
    again = tiny_server.ask(PROMPT, 30.0, max_new_tokens=64, schema=json.dumps(COLOURS))
    assert again.status_name == 'succeeded' and again.valid and _colours(again.value)
    plain = tiny_server.ask(PROMPT, 30.0, max_new_tokens=2)
    assert not plain.structured and plain.value is None
    assert again.prompt_tokens > plain.prompt_tokens + 10, (again.prompt_tokens, plain)


@pytest.mark.ros
@pytest.mark.slow
def test_a_lark_grammar_goal_matches_it(tiny_server):
    out = tiny_server.ask('Yes or no?', 30.0, max_new_tokens=8, grammar='start: "yes" | "no"')
    assert out.status_name == 'succeeded', out.reason
    assert out.structured and out.valid and out.text in ('yes', 'no'), out.text


@pytest.mark.ros
@pytest.mark.slow
def test_an_invalid_schema_is_rejected_with_the_library_message(tiny_server):
    t0 = time.monotonic()
    out = tiny_server.ask(PROMPT, 30.0, max_new_tokens=16, schema=BAD, timeout_s=60.0)
    assert out.status_name == 'rejected', (out.status_name, out.reason)
    assert 'invalid JSON schema' in out.reason and 'arry' in out.reason, out.reason
    assert 'llguidance' in out.reason, out.reason
    assert out.structured and not out.valid and out.value is None and out.tokens_generated == 0
    assert time.monotonic() - t0 < 10.0  # refused at submit, before any model work
    # not JSON at all, and both fields at once: the server refuses them without a round trip
    out = tiny_server.ask(PROMPT, 30.0, schema='{"type": ', timeout_s=60.0)
    assert out.status_name == 'rejected' and 'not JSON' in out.reason, out.reason
    out = tiny_server.ask(PROMPT, 30.0, schema=COLOURS, grammar='start: "a"', timeout_s=60.0)
    assert out.status_name == 'rejected' and 'not both' in out.reason, out.reason
    # the next goal is served
    out = tiny_server.ask(PROMPT, 30.0, max_new_tokens=64, schema=COLOURS, timeout_s=90.0)
    assert out.status_name == 'succeeded' and out.valid, out.reason


@pytest.mark.ros
@pytest.mark.slow
def test_close_ends_an_unbounded_answer_valid(tiny_server):
    cut = 0
    for i in range(3):  # the random model may close an answer itself; the cap cuts the others
        out = tiny_server.ask(
            f'List {i} objects on the table.',
            30.0,
            max_new_tokens=24,
            overrun_policy='close',
            schema=OBJECTS,
            timeout_s=90.0,
        )
        assert out.status_name in ('succeeded', 'truncated'), (out.status_name, out.reason)
        assert out.structured and out.valid, (out.reason, out.text)
        assert isinstance(out.value['objects'], list) and out.tokens_generated <= 24
        cut += out.status_name == 'truncated'
        if out.status_name == 'truncated':
            assert 'close' in out.reason, out.reason
    assert cut, 'the model ended every answer itself: nothing was closed'
    # truncate cuts the same answer mid-string: not valid, no value
    out = tiny_server.ask(
        'List 0 objects on the table.',
        30.0,
        max_new_tokens=24,
        overrun_policy='truncate',
        schema=OBJECTS,
        timeout_s=90.0,
    )
    assert out.status_name == 'truncated' and out.structured, out.reason
    assert not out.valid and out.value is None, out.text


@pytest.mark.ros
@pytest.mark.slow
def test_estimate_budget_compiles_the_schema_and_counts_the_close(tiny_server):
    bad = tiny_server.estimate_budget(PROMPT, 30.0, max_new_tokens=64, schema=BAD)
    assert bad is not None and not bad.ok
    assert 'invalid JSON schema' in bad.reason and 'arry' in bad.reason, bad.reason
    close = tiny_server.estimate_budget(
        PROMPT, 30.0, max_new_tokens=64, schema=OBJECTS, overrun_policy='close'
    )
    cut = tiny_server.estimate_budget(
        PROMPT, 30.0, max_new_tokens=64, schema=OBJECTS, overrun_policy='truncate'
    )
    assert close.ok and cut.ok, (close.reason, cut.reason)
    assert close.close_tokens == 4 and cut.close_tokens == 0  # depth 2 + a string + the end
    assert close.n_hat_w >= cut.n_hat_w
    plain = tiny_server.estimate_budget(PROMPT, 30.0, max_new_tokens=64)
    assert close.prompt_tokens > plain.prompt_tokens  # it sees the prompt a goal encodes
    unknown = tiny_server.estimate_budget(PROMPT, 30.0, overrun_policy='bogus')
    assert not unknown.ok and 'bogus' in unknown.reason


def test_generate_cli_prints_the_answer_as_json(tmp_path):
    schema = tmp_path / 'colours.json'
    schema.write_text(json.dumps(COLOURS))
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    cmd = [sys.executable, '-m', 'timebill_ros.cli', 'generate', PROMPT, '--model', 'tiny',
           '--json-schema', str(schema), '--budget', '60', '--predicted-length', '16',
           '--max-new-tokens', '64']
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _colours(json.loads(run.stdout)), run.stdout  # stdout holds only the JSON answer
    assert 'valid=True' in run.stderr
    bad = subprocess.run(
        cmd[:7] + ['--json-schema', json.dumps(BAD), '--overrun', 'close', '--no-stream'],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert bad.returncode == 1 and not bad.stdout.strip(), bad.stdout
    assert 'arry' in bad.stderr, bad.stderr[-2000:]


@pytest.mark.ros
@pytest.mark.slow
def test_ask_cli_sends_the_schema(tiny_server, tiny_domain_id, tmp_path):
    schema = tmp_path / 'colours.json'
    schema.write_text(json.dumps(COLOURS))
    env = dict(os.environ, ROS_DOMAIN_ID=str(tiny_domain_id))
    code = 'import sys; from timebill_ros.cli import main; sys.exit(main())'
    cmd = [sys.executable, '-P', '-c', code, 'ask', PROMPT, '--budget', '30', '--max-new-tokens',
           '64', '--json-schema', str(schema), '--json']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out['status_name'] == 'succeeded' and out['valid'] and _colours(out['value']), out
