"""
Response length predictor: bucket maths, prompt compression, training, save/load, fallback.

Training runs on a synthetic set where the length depends on the prompt; the fallback is
N_max; the backbone is the real MiniLM.
"""

import logging
import random

from hypothesis import given
from hypothesis import strategies as st
import pytest
from timebill_ros.core.config import TimeBillConfig
from timebill_ros.core.length_data import split_of
from timebill_ros.core.length_predictor import (
    bucket_upper_edge,
    compress_ids,
    edges_to_class,
    equal_width_edges,
    length_to_bucket,
    LengthPredictor,
    load_length_predictor,
    make_backbone,
    NMaxPredictor,
    PredictorMeta,
    regression_metrics,
    train_predictor,
)


# ----------------------------------------------------------------------------- bucket maths
def test_bucket_labels_are_ceil_n_over_b():
    assert length_to_bucket(1, 16, 512) == 1
    assert length_to_bucket(16, 16, 512) == 1
    assert length_to_bucket(17, 16, 512) == 2
    assert length_to_bucket(32, 16, 512) == 2
    assert length_to_bucket(33, 16, 512) == 3
    assert length_to_bucket(8192, 16, 512) == 512


def test_bucket_label_edge_cases():
    assert length_to_bucket(0, 16, 512) == 1  # an immediate EOS shares the first bucket
    assert length_to_bucket(8193, 16, 512) == 512  # beyond N_max: the last bucket
    assert length_to_bucket(10**6, 16, 512) == 512
    with pytest.raises(ValueError):
        length_to_bucket(-1, 16, 512)


def test_upper_edges_and_cap():
    assert bucket_upper_edge(1, 16, 512) == 16
    assert bucket_upper_edge(3, 16, 512) == 48
    assert bucket_upper_edge(512, 16, 512) == 8192
    assert bucket_upper_edge(700, 16, 512) == 8192  # capped at N_max
    assert bucket_upper_edge(5, 8, 4) == 32  # small config: N_max = 32
    with pytest.raises(ValueError):
        bucket_upper_edge(0, 16, 512)


@given(n=st.integers(0, 20000), b=st.integers(1, 64), k=st.integers(1, 1024))
def test_upper_edge_bounds_the_length_within_one_bucket(n, b, k):
    edge = bucket_upper_edge(length_to_bucket(n, b, k), b, k)
    assert edge <= b * k
    if 1 <= n <= b * k:
        assert n <= edge < n + b  # pessimistic, but by less than one bucket
    elif n > b * k:
        assert edge == b * k


def test_coarse_edges():
    assert equal_width_edges(5, 500) == [100, 200, 300, 400, 500]
    edges = equal_width_edges(10, 384)
    assert len(edges) == 10 and edges[-1] == 384 and edges == sorted(edges)
    assert edges_to_class(0, [100, 200]) == 0
    assert edges_to_class(100, [100, 200]) == 0
    assert edges_to_class(101, [100, 200]) == 1
    assert edges_to_class(999, [100, 200]) == 1  # beyond the last edge: last class


# ----------------------------------------------------------------------------- prompt compression
def test_compression_keeps_short_prompts_unchanged():
    assert compress_ids([1, 2, 3], 8) == [1, 2, 3]
    assert compress_ids(list(range(8)), 8) == list(range(8))


def test_compression_keeps_head_and_tail():
    ids = list(range(1000))
    out = compress_ids(ids, 10)
    assert out == [0, 1, 2, 3, 4, 995, 996, 997, 998, 999]
    out = compress_ids(ids, 7)
    assert len(out) == 7 and out[0] == 0 and out[-1] == 999


@given(n=st.integers(0, 3000), np_=st.integers(1, 512))
def test_compression_length_bound(n, np_):
    ids = list(range(n))
    out = compress_ids(ids, np_)
    assert len(out) == min(n, np_)
    if n > np_:
        head = round(np_ * 0.5)
        assert out[:head] == ids[:head]
        assert out[head:] == ids[n - (np_ - head):]


def test_compression_rejects_nonpositive_budget():
    with pytest.raises(ValueError):
        compress_ids([1, 2], 0)


def test_metrics():
    m = regression_metrics([1, 2, 3, 4], [1, 2, 3, 4])
    assert m['mae'] == 0 and m['rmse'] == 0 and m['r2'] == 1
    m = regression_metrics([1, 2, 3, 4], [2.5] * 4)
    assert m['r2'] == pytest.approx(0.0) and m['mae'] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- synthetic training
KINDS = [
    ('Answer with one word: what colour is {t}?', 3),
    ('Describe {t} in one sentence.', 30),
    ('Write a paragraph about {t}.', 110),
    ('Write a long story about {t}.', 300),
]
TOPICS = [
    'a fire truck',
    'the ocean',
    'a lemon',
    'autumn leaves',
    'a robot arm',
    'snow',
    'a parrot',
    'the moon',
    'a forklift',
    'coffee',
    'a violin',
    'a bridge',
    'a tiger',
    'rain',
    'a lighthouse',
    'bread',
    'a glacier',
    'a train',
    'a cactus',
    'a drone',
    'a castle',
    'honey',
    'a volcano',
    'a piano',
    'a submarine',
    'tea',
    'a desert',
    'a bicycle',
    'a whale',
    'a library',
]


def synthetic_records(seed=0):
    """Length is a function of the instruction (plus noise): a predictor must read the prompt."""
    rng = random.Random(seed)
    recs = []
    for t in TOPICS:
        for tmpl, base in KINDS:
            prompt = tmpl.format(t=t)
            length = max(1, int(base * rng.uniform(0.8, 1.2)))
            recs.append({'prompt': prompt, 'length': length, 'split': split_of(t, 0.15, 0.25)})
    return recs


@pytest.fixture(scope='module')
def minilm():
    return make_backbone('minilm', threads=1)


@pytest.fixture(scope='module')
def synthetic_predictor(minilm):
    recs = synthetic_records()
    meta = PredictorMeta(backbone='minilm', bucket_size=16, num_buckets=512)
    pred, info = train_predictor(
        recs,
        meta,
        mode='frozen',
        threads=1,
        backbone=minilm,
        feature_cache=False,
        log=lambda m: None,
    )
    return pred, recs


def test_classifier_beats_constant_on_synthetic(synthetic_predictor):
    pred, recs = synthetic_predictor
    test = [r for r in recs if r['split'] == 'test']
    train = [r for r in recs if r['split'] == 'train']
    assert len(test) >= 20 and len(train) >= 40
    y = [r['length'] for r in test]
    const = sum(r['length'] for r in train) / len(train)
    m_const = regression_metrics(y, [const] * len(y))
    m_rlp = regression_metrics(y, pred.predict_many([r['prompt'] for r in test]))
    assert m_const['r2'] < 0.1
    assert m_rlp['r2'] > 0.8, m_rlp
    assert m_rlp['mae'] < 0.4 * m_const['mae'], (m_rlp, m_const)


def test_regression_and_coarse_heads_train(minilm):
    recs = synthetic_records()
    test = [r for r in recs if r['split'] == 'test']
    y = [r['length'] for r in test]
    reg, _ = train_predictor(
        recs,
        PredictorMeta(backbone='minilm', head='regression'),
        threads=1,
        backbone=minilm,
        feature_cache=False,
        log=lambda m: None,
    )
    coarse_meta = PredictorMeta(backbone='minilm', head='edges', edges=equal_width_edges(5, 360))
    coarse, _ = train_predictor(
        recs, coarse_meta, threads=1, backbone=minilm, feature_cache=False, log=lambda m: None
    )
    r_reg = reg.predict_many([r['prompt'] for r in test])
    r_coarse = coarse.predict_many([r['prompt'] for r in test])
    assert set(r_coarse) <= set(coarse_meta.edges)
    assert regression_metrics(y, r_reg)['r2'] > 0.5
    assert regression_metrics(y, r_coarse)['r2'] > 0.3


def test_predict_returns_upper_edge_and_latency(synthetic_predictor):
    pred, _ = synthetic_predictor
    p = pred.predict('Write a long story about a harbour.')
    assert p.source == 'model'
    assert p.n_hat == bucket_upper_edge(p.bucket, 16, 512)
    assert p.n_hat >= 200  # stories are ~300 tokens in this set
    assert p.latency_s > 0
    q = pred.predict('Answer with one word: what colour is a banana?')
    assert q.n_hat <= 32
    ids = pred.backbone.tokenize('Answer with one word: what colour is a banana?')
    # ids in the backbone's tokenizer give the same answer
    assert pred.predict(ids).n_hat == q.n_hat


def test_long_prompt_is_compressed_before_the_backbone(synthetic_predictor):
    pred, _ = synthetic_predictor
    long_prompt = 'Some context about the harbour. ' * 400 + 'Write a long story about a harbour.'
    ids, n_in = pred.prepare(long_prompt)
    assert n_in > 1000 and len(ids) == pred.meta.max_prompt_tokens
    assert ids[-5:] == pred.backbone.tokenize(long_prompt)[-5:]  # the ask at the end survives
    assert pred.predict(long_prompt).prompt_tokens == n_in


def test_save_load_roundtrip_and_config_loader(synthetic_predictor, tmp_path, monkeypatch):
    pred, recs = synthetic_predictor
    monkeypatch.setenv('TIMEBILL_CACHE', str(tmp_path))
    cfg = TimeBillConfig()
    d = tmp_path / 'predictor' / 'minilm'
    pred.save(d)
    loaded = load_length_predictor(cfg, threads=1)
    assert isinstance(loaded, LengthPredictor)
    prompts = [r['prompt'] for r in recs[:20]]
    assert loaded.predict_many(prompts) == pred.predict_many(prompts)
    assert loaded.predict(prompts[0]).source == 'model'
    # the predictor follows the configured device; one
    # that is not there is a logged fallback, not a crash
    import torch

    if not torch.cuda.is_available():
        reasons = []
        p = load_length_predictor(
            cfg.replace(predictor_device='cuda'), threads=1, logger=reasons.append
        )
        assert isinstance(p, NMaxPredictor) and 'could not load' in reasons[0]
        assert isinstance(
            load_length_predictor(cfg.replace(device='cuda', predictor_device='cpu'), threads=1),
            LengthPredictor,
        )


def test_fallback_when_no_checkpoint(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv('TIMEBILL_CACHE', str(tmp_path))
    cfg = TimeBillConfig()
    with caplog.at_level(logging.WARNING, logger='timebill.length_predictor'):
        p = load_length_predictor(cfg)
    assert isinstance(p, NMaxPredictor) and p.meta is None
    assert (
        'no trained length predictor' in p.reason and 'no trained length predictor' in caplog.text
    )
    out = p.predict('anything')
    assert out.n_hat == cfg.n_max == 16 * 512 and out.source == 'fallback'


def test_fallback_when_checkpoint_is_broken(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMEBILL_CACHE', str(tmp_path))
    d = tmp_path / 'predictor' / 'minilm'
    d.mkdir(parents=True)
    (d / 'meta.json').write_text('{not json')
    reasons = []
    p = load_length_predictor(TimeBillConfig(), logger=reasons.append)
    assert isinstance(p, NMaxPredictor) and 'could not load' in reasons[0]


def test_prediction_in_the_cap_bucket_means_run_to_n_max(synthetic_predictor):
    """Capped labels are censored ('ran to the cap'): predicting that bucket plans for N_max."""
    import copy

    pred, _ = synthetic_predictor
    story = 'Write a long story about a harbour.'
    raw = pred.predict(story)
    assert not raw.censored  # synthetic predictor has no label cap
    capped = copy.copy(pred)
    capped.meta = copy.copy(pred.meta)
    capped.meta.label_cap = raw.n_hat
    p = capped.predict(story)
    assert p.censored and p.n_hat == capped.meta.n_max
    q = capped.predict('Answer with one word: what colour is a banana?')
    assert not q.censored and q.n_hat < raw.n_hat
    assert capped.predict_many([story]) == [raw.n_hat]  # evaluation keeps the raw edge


@pytest.mark.slow
def test_causal_lm_backbone_by_configuration(smollm2):
    """Train the paper's choice: a small causal LM's last-token state, frozen, and a head."""
    from timebill_ros.core.length_predictor import CausalLMBackbone

    bb = CausalLMBackbone('smollm2-135m-instruct', loaded=smollm2)
    assert bb.dim == 576
    recs = synthetic_records()
    pred, _ = train_predictor(
        recs,
        PredictorMeta(backbone='smollm2-135m-instruct'),
        threads=1,
        backbone=bb,
        feature_cache=False,
        log=lambda m: None,
    )
    test = [r for r in recs if r['split'] == 'test']
    y = [r['length'] for r in test]
    assert regression_metrics(y, pred.predict_many([r['prompt'] for r in test]))['r2'] > 0.8
    ids = bb.tokenize('Write a long story about a harbour.')
    assert pred.predict(ids).n_hat == pred.predict('Write a long story about a harbour.').n_hat


def _write_labels(path, recs, cap=400):
    import json

    with open(path, 'w') as fh:
        fh.write(json.dumps({'_meta': {'model': 'synthetic', 'max_new_tokens': cap}}) + '\n')
        for i, r in enumerate(recs):
            fh.write(
                json.dumps(
                    {
                        'id': str(i),
                        'prompt': r['prompt'],
                        'length': r['length'],
                        'capped': False,
                        'group': r['prompt'].split(' about ')[-1],
                    }
                )
                + '\n'
            )


def test_train_predictor_cli_if_missing(tmp_path, monkeypatch, capsys):
    from timebill_ros.cli import main

    monkeypatch.setenv('TIMEBILL_CACHE', str(tmp_path / 'cache'))
    labels = tmp_path / 'labels.jsonl'
    _write_labels(labels, synthetic_records())
    out = tmp_path / 'ckpt'
    assert (
        main(['train-predictor', '--labels', str(labels), '--out', str(out), '--mode', 'frozen'])
        == 0
    )
    meta = (out / 'meta.json').read_text()
    assert '"label_cap": 400' in meta and '"finetuned": false' in meta
    mtime = (out / 'head.pt').stat().st_mtime_ns
    assert (
        main(['train-predictor', '--labels', str(labels), '--out', str(out), '--if-missing']) == 0
    )
    assert 'already trained' in capsys.readouterr().out
    assert (out / 'head.pt').stat().st_mtime_ns == mtime
    p = LengthPredictor.load(out, threads=1).predict('Write a long story about a harbour.')
    assert p.n_hat >= 200 and p.source == 'model'


@pytest.mark.slow
def test_eval_predictor_cli_writes_report(tmp_path, monkeypatch):
    from timebill_ros.cli import main

    monkeypatch.setenv('TIMEBILL_CACHE', str(tmp_path / 'cache'))
    labels = tmp_path / 'labels.jsonl'
    _write_labels(labels, synthetic_records())
    out = tmp_path / 'report'
    assert (
        main(
            [
                'eval-predictor',
                '--labels',
                str(labels),
                '--finetune-epochs',
                '0',
                '--latency-lengths',
                '16',
                '--latency-repeats',
                '1',
                '--folds',
                '3',
                '--lm-backbone',
                'tiny',
                '--out',
                str(out),
            ]
        )
        == 0
    )
    table = (out / 'table.md').read_text()
    assert 'RLP-512 classifier, frozen MiniLM' in table and 'S3-style 10 classes' in table
    assert '3-fold cross-validation' in table
    assert (out / 'pred_vs_actual.png').stat().st_size > 10_000
    import json

    report = json.loads((out / 'metrics.json').read_text())
    rows = {r['method']: r for r in report['rows']}
    assert (
        rows['RLP-512 classifier, frozen MiniLM']['r2'] > rows['constant (train mean)']['r2'] + 0.5
    )
    cv = {(r['backbone'], r['method']): r for r in report['cross_validation']}
    assert {b for b, _ in cv} == {'MiniLM'} | {
        b for b, _ in cv if b.startswith('LM tiny')
    } and len(cv) == 10
    rlp = cv[('MiniLM', 'RLP-512, argmax upper edge (paper)')]
    assert rlp['folds'] == 3 and rlp['r2'] > 0.5 and rlp['mae_sd'] >= 0
    assert any(k.startswith('predict_s[tiny') for k in report['latency'][0])


def test_feature_layer_view_matches_the_full_model_and_leaves_it_whole():
    """
    Check that a middle-layer backbone runs only k layers and matches the full model.

    It gives exactly the full model's state after layer k, and does not cut the shared model
    (the engine may be using it).
    """
    from timebill_ros.core.length_predictor import CausalLMBackbone
    from timebill_ros.core.model import load_model
    import torch

    lm, tok = load_model('tiny', threads=1)
    n = lm.config.num_hidden_layers
    full = CausalLMBackbone('tiny', loaded=(lm, tok))
    ids = [full.tokenize('a robot waits at the door'), full.tokenize('stop')]
    with torch.no_grad():
        every = full.all_layers(ids)
        for k in range(1, n):
            view = full.at_layer(k)
            assert len(view.model.layers) == k
            assert torch.allclose(view.forward(ids), every[:, k], atol=1e-6)
            assert not torch.allclose(every[:, k], every[:, -1], atol=1e-3)
        assert torch.allclose(full.forward(ids), every[:, -1], atol=1e-6)
    assert len(lm.model.layers) == n and lm.config.num_hidden_layers == n
    assert full.at_layer(n).layer == 0  # the last layer is the plain backbone
    with pytest.raises(ValueError):
        full.at_layer(n + 1)
    with pytest.raises(ValueError):
        make_backbone('minilm', layer=2)


def test_feature_layer_is_chosen_on_validation_and_survives_save_load(tmp_path):
    from timebill_ros.core.length_predictor import candidate_layers, CausalLMBackbone
    from timebill_ros.core.model import load_model

    lm, tok = load_model('tiny', threads=1)
    n = lm.config.num_hidden_layers
    bb = CausalLMBackbone('tiny', loaded=(lm, tok))
    recs = synthetic_records()
    pred, info = train_predictor(
        recs,
        PredictorMeta(backbone='tiny'),
        threads=1,
        backbone=bb,
        feature_cache=False,
        select_layer=True,
        log=lambda m: None,
    )
    k = pred.meta.feature_layer
    assert info['feature_layer'] == k
    assert (
        set(info['layer_val_mae']) == {str(c or n) for c in candidate_layers(n)}
        and len(info['layer_val_mae']) >= 2
    )
    assert info['layer_val_mae'][str(k or n)] == min(info['layer_val_mae'].values())
    assert len(pred.backbone.model.layers) == (k or n)
    pred.save(tmp_path / 'p')
    again = LengthPredictor.load(tmp_path / 'p', threads=1)
    prompts = [r['prompt'] for r in recs[:20]]
    assert again.meta.feature_layer == k and again.predict_many(prompts) == pred.predict_many(
        prompts
    )


def test_causal_lm_fine_tunes_only_its_top_layers_and_saves_only_those(tmp_path):
    """
    Fine-tune only the top layers of a causal-LM predictor, and save only those.

    The top layers under the feature and the head train; everything below stays the stock model,
    and the checkpoint holds only what was trained.
    """
    from safetensors.torch import load_file
    from timebill_ros.core.length_predictor import CausalLMBackbone
    from timebill_ros.core.model import load_model
    import torch

    lm, tok = load_model('tiny', threads=1)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    n = lm.config.num_hidden_layers
    recs = synthetic_records()
    pred, info = train_predictor(
        recs,
        PredictorMeta(backbone='tiny'),
        mode='finetune',
        epochs=2,
        threads=1,
        backbone=CausalLMBackbone('tiny', loaded=(lm, tok)),
        finetune_layers=1,
        log=lambda m: None,
    )
    assert info['finetune_layers'] == 1 and pred.meta.finetuned and pred.meta.finetune_layers == 1
    after = lm.model.state_dict()
    top = f'layers.{n - 1}.'
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(top) for k in changed)
    assert not any(p.requires_grad for p in lm.parameters())  # left ready for inference
    d = pred.save(tmp_path / 'ft')
    saved = load_file(str(d / 'backbone.safetensors'))
    assert saved and all(k.startswith(top) for k in saved)
    again = LengthPredictor.load(d, threads=1)
    prompts = [r['prompt'] for r in recs[:20]]
    assert again.predict_many(prompts) == pred.predict_many(prompts)
