"""Calibration: held-out scoring, keyed profiles refusing other setups, a tiny real run, CLI."""

import json
import math
import time

import numpy as np
import pytest
from timebill_ros.core.calibration import fit, report, store, timing
from timebill_ros.core.config import cache_dir, TimeBillConfig
from timebill_ros.core.engine import Engine
from timebill_ros.core.errors import ProfileMismatchError
from timebill_ros.core.time_estimator import ExecutionTimeModel, mape

TRUE = ExecutionTimeModel(a=2.5e-7, b=1.2e-3, c=0.30, p=1.0e-5, q=0.060)
KEY = {
    'model': 'smollm2-135m-instruct',
    'dtype': 'float32',
    'device': 'cpu',
    'threads': '2',
    'torch': '2.13.0+cpu',
    'transformers': '5.24.0',
    'press': 'snapkv',
    'preallocate': 'True',
}


def synthetic(held_off_by=(0.10, 0.04)):
    """Exact timings on the grid; held-out points off by a known fraction."""
    pre = [store.Measurement(n, [TRUE.prefill_s(n)] * 3) for n in timing.PREFILL_GRID]
    pre += [
        store.Measurement(n, [TRUE.prefill_s(n) * (1 + held_off_by[0])] * 3, True)
        for n in timing.PREFILL_HELD_OUT
    ]
    dec = [store.Measurement(n, [TRUE.decode_step_s(n)] * 3) for n in timing.DECODE_GRID]
    dec += [
        store.Measurement(n, [TRUE.decode_step_s(n) * (1 + held_off_by[1])] * 3, True)
        for n in timing.DECODE_HELD_OUT
    ]
    return pre, dec


def test_mape_is_computed_on_held_out_points_only():
    pre, dec = synthetic()
    prof = fit.fit_profile(KEY, pre, dec)
    # the fit never saw the held-out points, so it is exact and they carry all the error
    assert prof.model.a == pytest.approx(TRUE.a, rel=1e-6) and prof.model.q == pytest.approx(
        TRUE.q, rel=1e-6
    )
    assert prof.mape['prefill'] == pytest.approx(100 * 0.10 / 1.10)
    assert prof.mape['decode'] == pytest.approx(100 * 0.04 / 1.04)
    assert prof.fit_mape['prefill'] == pytest.approx(0, abs=1e-6)
    assert prof.fitted_ratios['prefill_a_over_b'] == pytest.approx(TRUE.a / TRUE.b, rel=1e-5)


def test_fit_recovers_known_coefficients_from_noisy_samples():
    rng = np.random.default_rng(3)

    def noisy(t):
        # load only ever adds time
        return list(t * (1 + np.abs(0.01 * rng.standard_normal(7))))

    pre = [store.Measurement(n, noisy(TRUE.prefill_s(n))) for n in timing.PREFILL_GRID]
    pre += [store.Measurement(n, noisy(TRUE.prefill_s(n)), True) for n in timing.PREFILL_HELD_OUT]
    dec = [store.Measurement(n, noisy(TRUE.decode_step_s(n))) for n in timing.DECODE_GRID]
    dec += [
        store.Measurement(n, noisy(TRUE.decode_step_s(n)), True) for n in timing.DECODE_HELD_OUT
    ]
    prof = fit.fit_profile(KEY, pre, dec, statistic='min')
    for name in ('a', 'b', 'c', 'p', 'q'):
        assert getattr(prof.model, name) == pytest.approx(getattr(TRUE, name), rel=0.05), name
    assert prof.mape['prefill'] < 0.5 and prof.mape['decode'] < 0.5
    assert (
        fit.fit_profile(KEY, pre, dec, statistic='median').mape['prefill'] > prof.mape['prefill']
    )


def test_decode_slopes_show_curvature():
    pre, dec = synthetic((0.0, 0.0))
    lo, hi, mid = fit.decode_slopes(fit.fit_profile(KEY, pre, dec))
    assert lo == pytest.approx(TRUE.p, rel=1e-6) and hi == pytest.approx(TRUE.p, rel=1e-6)
    bent = [
        store.Measurement(
            m.n, [TRUE.q + TRUE.p * min(m.n, 4096) + 0.3 * TRUE.p * max(m.n - 4096, 0)], m.held_out
        )
        for m in dec
    ]
    lo, hi, mid = fit.decode_slopes(fit.fit_profile(KEY, pre, bent))
    assert mid == 2048 and hi / lo < 0.6


def test_summarize():
    assert store.summarize([3.0, 1.0, 2.0, 10.0], 'min') == 1.0
    assert store.summarize([3.0, 1.0, 2.0, 10.0], 'median') == 2.5
    with pytest.raises(ValueError):
        store.summarize([1.0], 'mean')


def test_profile_roundtrip(tmp_path):
    prof = fit.fit_profile(KEY, *synthetic())
    path = store.save_profile(prof, tmp_path / 'p.json')
    back = store.load_profile(path, KEY)
    assert back.model == prof.model and back.key == KEY and back.mape == prof.mape
    assert [m.n for m in back.prefill if m.held_out] == list(timing.PREFILL_HELD_OUT)
    doc = json.loads(path.read_text())
    doc['version'] = 0
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match='re-run'):
        store.load_profile(path)


def test_mismatched_key_is_refused_naming_the_fields(tmp_path):
    path = store.save_profile(fit.fit_profile(KEY, *synthetic()), tmp_path / 'p.json')
    running = {**KEY, 'threads': '4', 'torch': '2.14.0'}
    with pytest.raises(ProfileMismatchError) as err:
        store.load_profile(path, running)
    msg = str(err.value)
    assert (
        "threads: profile '2' vs engine '4'" in msg
        and 'torch' in msg
        and 'timebill calibrate' in msg
    )
    assert 'dtype' not in msg and 'model' not in msg.split('(')[1].split(')')[0]
    with pytest.raises(ProfileMismatchError, match="press: profile '<missing>'"):
        store.check_key({k: v for k, v in KEY.items() if k != 'press'}, KEY)
    store.check_key(dict(KEY), dict(KEY))  # same setup: accepted


def test_default_path_is_keyed_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMEBILL_CACHE', str(tmp_path))
    p = store.default_profile_path(KEY)
    assert p.parent == tmp_path / 'profiles' and p.name.startswith(
        'smollm2-135m-instruct-float32-cpu-t2-'
    )
    assert all(store.default_profile_path({**KEY, f: 'other'}) != p for f in KEY)
    with pytest.raises(FileNotFoundError, match='timebill calibrate'):
        store.load_profile_for(KEY)
    store.save_profile(fit.fit_profile(KEY, *synthetic()))
    assert store.load_profile_for(KEY).key == KEY
    assert store.load_time_model(TimeBillConfig(), running_key=KEY) is not None
    # none written
    assert store.load_time_model(TimeBillConfig(), running_key={**KEY, 'model': 'other'}) is None
    cfg = TimeBillConfig(profile_path=str(store.default_profile_path(KEY)))
    with pytest.raises(ProfileMismatchError):
        store.load_time_model(cfg, running_key={**KEY, 'dtype': 'bfloat16'})


def test_held_out_lengths_must_be_unseen(tiny):
    engine = Engine(tiny, None, press='none')
    with pytest.raises(ValueError, match='also grid points'):
        timing.calibrate(engine, prefill_grid=[16, 32, 64], prefill_held_out=[32], progress=False)
    with pytest.raises(ValueError, match='context'):
        timing.calibrate(engine, decode_grid=[16, 32, 5000], decode_held_out=[24], progress=False)


def test_tiny_real_calibration_and_report(tiny, tmp_path):
    engine = Engine(tiny, None, press='snapkv', window_size=8, model_name='tiny-llama')
    prof = timing.calibrate(
        engine,
        timing.QUICK_PREFILL_GRID,
        timing.QUICK_DECODE_GRID,
        timing.QUICK_PREFILL_HELD_OUT,
        timing.QUICK_DECODE_HELD_OUT,
        repeats=2,
        decode_repeats=3,
        warmup=1,
        progress=False,
    )
    assert prof.key == store.profile_key(engine)
    assert [m.n for m in prof.prefill if m.held_out] == list(timing.QUICK_PREFILL_HELD_OUT)
    assert all(len(m.samples) == 2 for m in prof.prefill) and all(
        len(m.samples) == 3 for m in prof.decode
    )
    held = [m for m in prof.decode if m.held_out]
    assert prof.mape['decode'] == pytest.approx(
        mape([min(m.samples) for m in held], [prof.model.decode_step_s(m.n) for m in held])
    )
    assert set(prof.flops_ratios) == {'prefill_a_over_b', 'decode_p_over_q'}
    paths = report.write_report(prof, tmp_path, stem='tiny')
    assert paths['png'].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    md = paths['md'].read_text()
    assert (
        'held-out' in md
        and 'tiny-llama' in md
        and 'prefill_a_over_b' in md
        and 'Decode linearity' in md
    )
    assert store.load_profile(paths['json'], store.profile_key(engine)).model == prof.model
    # another press: other timings
    other = Engine(tiny, None, press='none', model_name='tiny-llama')
    with pytest.raises(ProfileMismatchError, match='press'):
        store.load_profile(paths['json'], store.profile_key(other))


def test_key_from_config_matches_the_engine(tiny):
    cfg = TimeBillConfig(model='tiny-llama', threads=0, press='streaming_llm', weights='fp32')
    engine = Engine(tiny, None, press=cfg.press, model_name=cfg.model)
    assert store.key_from_config(cfg) == store.profile_key(engine)


def test_chooser_drives_engine_eviction(tiny):
    """The engine asks the chooser after prefill and evicts what the verdict says."""
    engine = Engine(tiny, None, press='snapkv', window_size=8)
    ids = list(np.random.default_rng(0).integers(3, 256, 200))
    # decode at α = 0 is predicted at 9 s (9 steps × 5 ms × 200 entries):
    # a 5 s budget needs α ≈ 0.45
    ete = ExecutionTimeModel(a=0.0, b=0.0, c=0.0, p=5e-3, q=0.0)
    from timebill_ros.core.job import Job
    from timebill_ros.core.lengths import FixedLength
    from timebill_ros.core.pipeline import Pipeline

    pipeline = Pipeline(engine, ete, TimeBillConfig(), FixedLength(10), learn=False)
    start = time.monotonic()
    res = pipeline.run(
        Job('c', ids, deadline=start + 5.0, accepted_at=start, max_new_tokens=10, k=1.0)
    )
    out, v = res.result, res.verdict
    assert v.status == 'met' and 0.0 < v.alpha < 0.95
    assert (
        v.total_s == pytest.approx(v.budget_s)
        and v.n_prompt == 200
        and v.prefill_s == out.prefill_s
    )
    assert out.alpha == v.alpha and out.kv_after == round((1 - v.alpha) * 200)


@pytest.mark.slow
def test_cli_quick_smollm2(tmp_path, monkeypatch):
    import argparse

    from timebill_ros.cli import calibrate as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    monkeypatch.setenv('TIMEBILL_CACHE', str(cache_dir()))  # the converted model lives there
    prof_path = tmp_path / 'profile.json'
    args = parser.parse_args(
        ['--quick', '--no-progress', '--out', str(tmp_path / 'out'), '--profile', str(prof_path)]
    )
    assert cli.run(args) == 0
    # the packaged config, as the CLI read it
    cfg = cli.load_config(args).replace(profile_path=str(prof_path))
    outs = sorted(p.name for p in (tmp_path / 'out').iterdir())
    assert outs == [
        f'smollm2-135m-instruct-float32-cpu-t{cfg.threads}-quick.{e}'
        for e in ('json', 'md', 'png')
    ]
    # key_from_config found it valid
    assert store.load_time_model(cfg) == store.load_profile(prof_path).model
    with pytest.raises(ProfileMismatchError, match='threads'):
        store.load_time_model(cfg.replace(threads=cfg.threads + 1))


def test_a_bad_fit_is_named():
    assert fit.profile_problems(fit.fit_profile(KEY, *synthetic((0.0, 0.0)))) == []
    probs = fit.profile_problems(fit.fit_profile(KEY, *synthetic((0.10, 0.0))), max_mape=5.0)
    assert len(probs) == 1 and 'prefill held-out MAPE 9.09% exceeds 5.0%' in probs[0]
    # a busy machine slows the short prompts most: a concave curve, a < 0
    pre = [
        store.Measurement(n, [1e-3 * n + 0.3 + 2e-4 * n**1.5 * (n < 1000)])
        for n in (64, 256, 512, 1024, 2048)
    ]
    pre += [store.Measurement(n, [1e-3 * n + 0.3], True) for n in (128, 1536)]
    probs = fit.profile_problems(fit.fit_profile(KEY, pre, synthetic()[1]), max_mape=1e9)
    assert any(p.startswith('coefficient a =') for p in probs)


# ---------------------------------------------------------------- warm prefill (prefix cache)
WARM_TRUE = ExecutionTimeModel(a=2.5e-7, b=1.2e-3, c=0.30, p=1.0e-5, q=0.060, d=4.0e-7, e=3.0e-5)


def synthetic_warm(model=WARM_TRUE, held_off_by=0.05):
    """Exact warm timings on the grid; held-out points off by a known fraction."""
    warm = [
        store.Measurement(n, [model.prefill_s(n, m)] * 3, False, m) for n, m in timing.WARM_GRID
    ]
    warm += [
        store.Measurement(n, [model.prefill_s(n, m) * (1 + held_off_by)] * 3, True, m)
        for n, m in timing.WARM_HELD_OUT
    ]
    return warm


def test_warm_grid_is_whole_blocks_inside_the_reuse_limit():
    for n, m in timing.WARM_GRID + timing.WARM_HELD_OUT:
        assert m % 64 == 0 and 0 < m <= n - 64, (n, m)
    assert not set(timing.WARM_GRID) & set(timing.WARM_HELD_OUT)
    assert {n for n, _ in timing.WARM_GRID} == {512, 1024, 2048, 4096}
    assert len({m for _, m in timing.QUICK_WARM_GRID}) >= 2


def test_warm_fit_recovers_known_d_e_and_scores_held_out_only():
    pre, dec = synthetic((0.0, 0.0))
    prof = fit.fit_profile(KEY, pre, dec, warm=synthetic_warm())
    assert prof.model.a == pytest.approx(WARM_TRUE.a, rel=1e-6)
    assert prof.model.d == pytest.approx(WARM_TRUE.d, rel=1e-6)
    assert prof.model.e == pytest.approx(WARM_TRUE.e, rel=1e-5)
    assert prof.mape['warm'] == pytest.approx(100 * 0.05 / 1.05)
    assert prof.fit_mape['warm'] == pytest.approx(0, abs=1e-6) and prof.warm_note == ''
    # without warm points: the profile says nothing about them and d = 2a
    cold = fit.fit_profile(KEY, pre, dec)
    assert 'warm' not in cold.mape and cold.model.d == 2 * cold.model.a and cold.model.e == 0


def test_warm_fit_from_noisy_samples():
    rng = np.random.default_rng(5)
    pre, dec = synthetic((0.0, 0.0))
    warm = [
        store.Measurement(
            w.n, list(w.samples[0] * (1 + np.abs(0.01 * rng.standard_normal(5)))), w.held_out,
            w.cached,
        )
        for w in synthetic_warm(held_off_by=0.0)
    ]
    prof = fit.fit_profile(KEY, pre, dec, warm=warm)
    assert prof.model.d == pytest.approx(WARM_TRUE.d, rel=0.05)
    assert prof.mape['warm'] < 1.0
    # the copy-in is a few percent of a warm prefill: e is looser, but positive and close
    assert prof.model.e == pytest.approx(WARM_TRUE.e, rel=0.5)


def test_a_negative_warm_term_is_clamped_to_zero():
    pre, dec = synthetic((0.0, 0.0))
    # cached tokens make the prefill faster than the cold fit says: e would come out < 0
    faster = ExecutionTimeModel(**{**WARM_TRUE.to_dict(), 'e': -2e-5})
    prof = fit.fit_profile(KEY, pre, dec, warm=synthetic_warm(faster, 0.0))
    assert prof.model.e == 0.0 and prof.model.d > 0
    assert 'e = 0' in prof.warm_note and 'd fitted alone' in prof.warm_note


def test_profile_round_trip_keeps_d_e_and_warm_points(tmp_path):
    pre, dec = synthetic()
    prof = fit.fit_profile(KEY, pre, dec, warm=synthetic_warm())
    path = store.save_profile(prof, tmp_path / 'p.json')
    doc = json.loads(path.read_text())
    assert doc['model']['d'] == prof.model.d and doc['model']['e'] == prof.model.e
    back = store.load_profile(path, KEY)
    assert back.model == prof.model and back.model.e == pytest.approx(WARM_TRUE.e, rel=1e-5)
    assert back.warm == prof.warm and back.mape == prof.mape
    assert [(w.n, w.cached) for w in back.warm if w.held_out] == list(timing.WARM_HELD_OUT)
    assert store.load_time_model(
        TimeBillConfig(profile_path=str(path)), running_key=KEY
    ).prefill_s(4096, 3968) == pytest.approx(WARM_TRUE.prefill_s(4096, 3968), rel=1e-5)


def test_a_profile_without_d_e_gets_d_2a(tmp_path):
    """A profile written before the prefix cache (no d, e, warm, cached) still loads."""
    prof = fit.fit_profile(KEY, *synthetic())
    doc = prof.to_dict()
    for k in ('d', 'e'):
        del doc['model'][k]
    for k in ('warm', 'warm_note'):
        del doc[k]
    for m in doc['prefill'] + doc['decode']:
        del m['cached']
    path = tmp_path / 'old.json'
    path.write_text(json.dumps(doc))
    back = store.load_profile(path, KEY)
    assert back.model.d == 2 * back.model.a and back.model.e == 0.0
    assert back.warm == [] and fit.profile_problems(back, max_mape=20) == []
    assert back.model.prefill_s(1024, 512) == pytest.approx(
        back.model.a * 512**2 + back.model.b * 512 + back.model.c + 2 * back.model.a * 512 * 512
    )


def test_a_bad_warm_fit_is_named():
    pre, dec = synthetic((0.0, 0.0))
    prof = fit.fit_profile(KEY, pre, dec, warm=synthetic_warm(held_off_by=0.3))
    probs = fit.profile_problems(prof, max_mape=10.0)
    assert len(probs) == 1 and probs[0].startswith('warm held-out MAPE 23.08%')


def test_warm_points_are_checked_before_any_timing(tiny):
    engine = Engine(tiny, None, press='snapkv', window_size=8)
    kw = {
        'prefill_grid': timing.QUICK_PREFILL_GRID,
        'prefill_held_out': timing.QUICK_PREFILL_HELD_OUT,
        'decode_grid': timing.QUICK_DECODE_GRID,
        'decode_held_out': timing.QUICK_DECODE_HELD_OUT,
        'progress': False,
    }
    for grid, held, match in (
        ([(256, 100), (256, 128)], [], 'whole 64-token blocks'),
        ([(256, 64), (256, 252)], [], 'at most N - 8'),
        ([(256, 64), (256, 128)], [(256, 128)], 'also grid points'),
        ([(256, 64), (512, 64)], [], 'two distinct cached lengths'),
        ([(256, 64), (4096, 128)], [], "model's context"),
    ):
        with pytest.raises(ValueError, match=match):
            timing.calibrate(engine, warm_grid=grid, warm_held_out=held, **kw)


def test_tiny_real_warm_calibration_and_report(tiny, tmp_path):
    engine = Engine(tiny, None, press='snapkv', window_size=8, model_name='tiny-llama')
    prof = timing.calibrate(
        engine,
        timing.QUICK_PREFILL_GRID,
        timing.QUICK_DECODE_GRID,
        timing.QUICK_PREFILL_HELD_OUT,
        timing.QUICK_DECODE_HELD_OUT,
        repeats=2,
        decode_repeats=3,
        progress=False,
        warm_grid=timing.QUICK_WARM_GRID,
        warm_held_out=timing.QUICK_WARM_HELD_OUT,
    )
    assert engine.prefix_cache is None  # the private cache is gone again
    assert [(w.n, w.cached, w.held_out) for w in prof.warm] == sorted(
        [(n, m, False) for n, m in timing.QUICK_WARM_GRID]
        + [(n, m, True) for n, m in timing.QUICK_WARM_HELD_OUT]
    )
    assert all(len(w.samples) == 2 and min(w.samples) > 0 for w in prof.warm)
    assert prof.model.d >= 0 and prof.model.e >= 0 and math.isfinite(prof.mape['warm'])
    held = [w for w in prof.warm if w.held_out]
    assert prof.mape['warm'] == pytest.approx(
        mape([min(w.samples) for w in held], [prof.model.prefill_s(w.n, w.cached) for w in held])
    )
    paths = report.write_report(prof, tmp_path, stem='tiny-warm')
    assert paths['png'].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    md = paths['md'].read_text()
    assert '## warm prefill (prefix cache)' in md and '| warm prefill |' in md
    assert store.load_profile(paths['json'], store.profile_key(engine)).model == prof.model


def test_cli_parses_warm_pairs():
    import argparse

    from timebill_ros.cli import calibrate as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(['--warm-grid', '512:256, 1024:896', '--warm-held-out', '768:640'])
    assert args.warm_grid == [(512, 256), (1024, 896)] and args.warm_held_out == [(768, 640)]
    assert parser.parse_args(['--no-warm']).no_warm
    with pytest.raises(SystemExit):
        parser.parse_args(['--warm-grid', '512'])
