"""
Length dataset: prompt mix, fixed hash split, labeller, label files.

The continuous-batching labeller is checked against plain ``generate`` (real SmolLM2), label
files for resuming, and the committed label file itself.
"""

from collections import Counter
import json

import pytest
from timebill_ros.core.length_data import (
    build_prompts,
    clamp_labels,
    ContinuousGreedyLabeler,
    DEFAULT_LABEL_FILE,
    label_file,
    load_labels,
    read_meta,
    split_of,
    stable_hash,
)


@pytest.fixture(scope='module')
def prompts():
    return build_prompts(3300)


def test_prompt_mix(prompts):
    assert len(prompts) >= 3000
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({p.prompt for p in prompts}) == len(prompts)
    kinds = Counter(p.template for p in prompts)
    assert set(kinds) == {
        'raw',
        'short',
        'items',
        'sentences',
        'words',
        'paragraph',
        'story',
        'code',
        'robot',
        'essay',
    }
    assert min(kinds.values()) >= 100
    sources = Counter(p.source for p in prompts)
    assert sources['fanoutqa'] > 0 and sources['fanoutqa-sub'] > 0 and sources['chatterbot'] > 0


def test_prompts_are_deterministic(prompts):
    again = build_prompts(3300)
    assert [p.prompt for p in again] == [p.prompt for p in prompts]


def test_split_is_fixed_and_grouped(prompts):
    assert stable_hash('hello') == 0xAAF4C61DDCC5  # sha1, not Python's per-process salted hash
    assert split_of('What is AI?') == split_of('What is AI?')
    frac = Counter(p.split for p in prompts)
    n = len(prompts)
    assert (
        0.7 < frac['train'] / n < 0.9
        and 0.05 < frac['val'] / n < 0.15
        and 0.05 < frac['test'] / n < 0.15
    )
    by_group = {}
    for p in prompts:
        by_group.setdefault(p.group, set()).add(p.split)
    assert all(len(s) == 1 for s in by_group.values())  # one question never straddles the split


@pytest.mark.slow
def test_continuous_batching_matches_generate(smollm2, prompts):
    """Refilling rows mid-flight must not change greedy lengths (compare with plain generate)."""
    import torch

    model, tok = smollm2
    sel = prompts[:7]
    lab = ContinuousGreedyLabeler(model, tok, max_new_tokens=24, batch_size=3, refill_at=1)
    got = {}
    lab.run(
        [(p.id, lab.encode(p.prompt)) for p in sel], lambda k, n, c: got.__setitem__(k, (n, c))
    )
    assert set(got) == {p.id for p in sel}
    for p in sel:
        ids = torch.tensor([lab.encode(p.prompt)])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
        )
        gen = out[0, ids.shape[1]:].tolist()
        n = gen.index(tok.eos_token_id) if tok.eos_token_id in gen else len(gen)
        assert got[p.id] == (n, tok.eos_token_id not in gen), p.prompt


@pytest.mark.slow
def test_label_file_is_resumable(tmp_path, prompts, smollm2):
    out = tmp_path / 'labels.jsonl'
    lines = []
    label_file(
        out,
        'smollm2-135m-instruct',
        prompts,
        max_new_tokens=6,
        batch_size=4,
        limit=3,
        log=lines.append,
    )
    first = load_labels(out)
    assert [r['id'] for r in sorted(first, key=lambda r: r['id'])] == sorted(
        p.id for p in prompts[:3]
    )
    assert all(r['length'] <= 6 and r['capped'] == (r['length'] == 6) for r in first)
    with out.open('a') as fh:
        fh.write('{"id": "torn')  # an interrupted write
    label_file(
        out,
        'smollm2-135m-instruct',
        prompts,
        max_new_tokens=6,
        batch_size=4,
        limit=5,
        log=lines.append,
    )
    second = load_labels(out)
    assert sorted(r['id'] for r in second) == sorted(p.id for p in prompts[:5])
    assert {r['id']: r['length'] for r in second if r['id'] in {x['id'] for x in first}} == {
        r['id']: r['length'] for r in first
    }
    assert read_meta(out)['max_new_tokens'] == 6


@pytest.mark.slow
def test_raising_the_cap_relabels_only_the_capped_prompts(tmp_path, prompts, smollm2):
    """
    Extend a file from cap 6 to 40: finished answers stay, capped ones get relabelled.

    Every finished answer stays as it was and the capped ones get the lengths a direct labelling
    at cap 40 gives.
    """
    sel = prompts[:6]
    ext, direct = tmp_path / 'ext.jsonl', tmp_path / 'direct.jsonl'
    label_file(
        ext, 'smollm2-135m-instruct', sel, max_new_tokens=6, batch_size=3, log=lambda m: None
    )
    before = {r['id']: r for r in load_labels(ext)}
    assert any(r['capped'] for r in before.values())
    label_file(
        ext, 'smollm2-135m-instruct', sel, max_new_tokens=40, batch_size=3, log=lambda m: None
    )
    label_file(
        direct, 'smollm2-135m-instruct', sel, max_new_tokens=40, batch_size=3, log=lambda m: None
    )
    after = {r['id']: (r['length'], r['capped']) for r in load_labels(ext)}
    assert after == {r['id']: (r['length'], r['capped']) for r in load_labels(direct)}
    assert all(after[k] == (r['length'], False) for k, r in before.items() if not r['capped'])
    assert all(after[k][0] >= 6 for k, r in before.items() if r['capped'])
    meta = read_meta(ext)
    assert meta['max_new_tokens'] == 40 and meta['extended_from'] == 6


def test_clamping_lowers_the_cap_losslessly(tmp_path):
    path = tmp_path / 'l.jsonl'
    recs = [
        {'id': 'a', 'prompt': 'p', 'length': 50, 'capped': False, 'group': 'g'},
        {'id': 'b', 'prompt': 'q', 'length': 120, 'capped': False, 'group': 'h'},
        {'id': 'c', 'prompt': 'r', 'length': 384, 'capped': True, 'group': 'i'},
    ]
    path.write_text(
        json.dumps({'_meta': {'max_new_tokens': 384}})
        + '\n'
        + ''.join(json.dumps(r) + '\n' for r in recs)
    )
    clamp_labels(path, 100, log=lambda m: None)
    got = {r['id']: (r['length'], r['capped']) for r in load_labels(path)}
    assert got == {'a': (50, False), 'b': (100, True), 'c': (100, True)}
    assert read_meta(path)['max_new_tokens'] == 100
    with pytest.raises(ValueError, match='extend_cap'):
        clamp_labels(path, 200)


def test_committed_label_file():
    """Check the shipped labels: enough prompts, every split present, capped at the cap, small."""
    assert DEFAULT_LABEL_FILE.is_file()
    assert DEFAULT_LABEL_FILE.stat().st_size < 2 * 1024 * 1024
    meta = read_meta(DEFAULT_LABEL_FILE)
    cap = meta['max_new_tokens']
    assert meta['model'] == 'smollm2-135m-instruct' and 'timebill dataset' in meta['command']
    recs = load_labels(DEFAULT_LABEL_FILE)
    assert len(recs) >= 3000
    assert len({r['id'] for r in recs}) == len(recs)
    assert all(0 <= r['length'] <= cap for r in recs)
    assert all(r['capped'] == (r['length'] == cap) for r in recs)
    splits = Counter(r['split'] for r in recs)
    assert splits['test'] >= 200 and splits['val'] >= 200
    lengths = sorted(r['length'] for r in recs)
    # lengths really vary
    assert lengths[len(lengths) // 10] < 40 and lengths[len(lengths) * 9 // 10] > 200
