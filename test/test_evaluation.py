"""The benchmark: overrun strategies by hand, tasks, the sweep on the real model, reports, CLIs."""

import argparse
import json
from pathlib import Path

import pytest
from timebill_ros.core.evaluation import policies as P
from timebill_ros.core.evaluation import tasks as T

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- overrun strategies
def _jobs():
    # durations 3, 7, 2, 5 s; scores 0.1, 0.2, 0.3, 0.4; job 1 produced a token every 1.4 s
    return [
        P.Trace('a', 3.0, True, 0.1),
        P.Trace(
            'b',
            7.0,
            True,
            0.2,
            token_times_s=[1.4, 2.8, 4.2, 5.6, 7.0],
            partial_score=lambda t: t / 10,
        ),
        P.Trace('c', 2.0, True, 0.3),
        P.Trace('d', 5.0, True, 0.4, token_times_s=[4.5, 5.0]),
    ]


def test_kill_by_hand():
    out = P.run_kill(_jobs(), 4.0)
    assert [o.status for o in out] == ['succeeded', 'killed', 'succeeded', 'killed']
    assert [o.release_s for o in out] == [0, 4, 8, 12]
    assert [o.score for o in out] == [0.1, 0.0, 0.3, 0.0]
    assert [o.late_s for o in out] == [0.0, 3.0, 0.0, 1.0]  # how long they would have run on
    s = P.summarize(out)
    assert s['completion_rate'] == 0.5 and s['avg_score'] == pytest.approx(0.1)
    assert (s['late_count'], s['late_s_max']) == (2, 3.0)


def test_skip_next_by_hand():
    # releases 0, 4, 8, 12: b runs 4 → 11 (late 3, scored), c released at 8 < 11 is skipped,
    # d released at 12 ≥ 11 runs 12 → 17 (late 1, scored)
    out = P.run_skip_next(_jobs(), 4.0)
    want = ['succeeded', 'deadline_missed', 'rejected', 'deadline_missed']
    assert [o.status for o in out] == want
    assert [o.score for o in out] == [0.1, 0.2, 0.0, 0.4]
    assert [o.late_s for o in out] == [0.0, 3.0, 0.0, 1.0]
    s = P.summarize(out)
    assert s['completion_rate'] == 0.25 and s['avg_score'] == pytest.approx(0.7 / 4)


def test_truncate_by_hand():
    out = P.run_truncate(_jobs(), 4.0)
    assert [o.status for o in out] == ['succeeded', 'truncated', 'succeeded', 'killed']
    # partial_score(4.0): text of the 2 tokens ready by 4 s
    assert out[1].score == pytest.approx(0.4)
    assert out[1].finish_s == 2.8 and out[3].score == 0.0  # d had no token by the deadline
    assert P.summarize(out)['completion_rate'] == 0.5


def test_a_job_stopped_early_never_counts_as_completed():
    job = P.Trace('x', 1.0, False, 0.9, stop_reason='max_new_tokens')
    assert not P.run_kill([job], 5.0)[0].completed
    out = P.run_skip_next([job], 5.0)[0]
    assert out.status == 'killed' and out.score == 0.0 and 'max_new_tokens' in out.reason


def test_policies():
    names = [p.name for p in P.standard_policies()]
    assert names == [
        'vanilla',
        'alpha=0.25',
        'alpha=0.5',
        'alpha=0.75',
        'alpha=0.95',
        'truncate',
        'close',
        'timebill',
        'timebill+replan',
    ]
    assert P.parse_policy('timebill+replan').replan and not P.parse_policy('timebill').replan
    assert P.parse_policy('alpha=0.5') == P.fixed(0.5) and P.parse_policy('0') == P.vanilla()
    assert P.parse_policy('timebill:k=3').k == 3.0 and P.parse_policy('timebill').budget_dependent
    assert P.truncate().overruns == ('truncate',) and P.vanilla().overruns == ('kill', 'skip-next')
    assert P.parse_policy('close').overruns == ('close',) and P.close().budget_dependent
    with pytest.raises(ValueError):
        P.parse_policy('alpha=1.2')
    with pytest.raises(ValueError):
        P.simulate(_jobs(), 1.0, 'drop')


# ---------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize('target', [400, 1500])
def test_tasks_fit_the_target_and_contain_their_answer(target):
    tasks = T.build_tasks(T.word_counter, lengths=(target,), per_kind=2, seed=3)
    assert [t.kind for t in tasks] == [k for k in T.KINDS for _ in range(2)]
    for t in tasks:
        assert 0.9 * target <= t.n_tokens <= target == t.meta['target_tokens']
        assert t.n_tokens == T.word_counter(t.prompt, t.system_prompt)
        assert t.metric == T.METRIC_OF[t.kind] and t.references and all(t.references)
        if t.kind in ('passkey', 'needle', 'qa'):
            assert t.references[0] in t.prompt  # the planted fact is there to be found
        else:
            assert t.meta['n_hops'] >= 2 and t.meta['question'] in t.prompt
    assert len({t.id for t in tasks}) == len(tasks) and tasks[0].prompt != tasks[1].prompt


def test_tasks_are_deterministic_by_seed(tmp_path):
    a = T.build_tasks(T.word_counter, lengths=(600,), seed=1)
    b = T.build_tasks(T.word_counter, lengths=(600,), seed=1)
    c = T.build_tasks(T.word_counter, lengths=(600,), seed=2)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, c))
    T.save_tasks(a, tmp_path / 't.jsonl')
    assert [t.to_dict() for t in T.load_tasks(tmp_path / 't.jsonl')] == [t.to_dict() for t in a]


def test_task_lengths_with_the_target_tokenizer(smollm2):
    from timebill_ros.core.engine import Engine

    engine = Engine(*smollm2, press='none')
    for t in T.build_tasks(T.counter_for(engine), lengths=(1024,), seed=0):
        ids = engine.encode(t.prompt, t.system_prompt)
        assert len(ids) == t.n_tokens and 900 < t.n_tokens <= 1024


def test_too_small_target_is_refused():
    with pytest.raises(ValueError, match='too small'):
        T.make_task('qa', 5, T.word_counter)


# ---------------------------------------------------------------------- sweep on the real model
@pytest.fixture(scope='module')
def sweep_run(smollm2):
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.evaluation import sweep as S
    from timebill_ros.core.evaluation.budgets import choose_budgets
    from timebill_ros.core.evaluation.runs import SweepConfig
    from timebill_ros.core.length_predictor import NMaxPredictor
    from timebill_ros.core.time_estimator import ExecutionTimeModel

    engine = Engine(*smollm2, press='snapkv')
    # magnitudes of SmolLM2 on 2 cores (model-and-kv.md);
    # the sweep measures, this only sets budgets and α
    model = ExecutionTimeModel(a=1.5e-7, b=1.2e-3, c=0.15, p=1.2e-5, q=0.06)
    tasks = T.build_tasks(T.counter_for(engine), lengths=(256,), kinds=('passkey', 'qa'), seed=0)
    for t in tasks:
        t.max_new_tokens = 6
    budgets = choose_budgets(model, tasks, 3)
    cfg = SweepConfig(budgets=budgets, ks=(1, 5))
    sweeper, results, out = S.run_sweep(
        engine, model, NMaxPredictor(8192), tasks, cfg, log=lambda m: None
    )
    return engine, sweeper, results, out, budgets


def test_sweep_covers_every_policy_overrun_and_budget(sweep_run):
    _, sweeper, results, out, budgets = sweep_run
    ((g, d),) = out['groups'].items()
    assert d['budgets_s'] == budgets[g] and len(budgets[g]) == 3
    got = {(r['policy'], r['overrun'], r['budget_s']) for r in d['table']}
    want = {
        (p.name, ov, b) for p in P.standard_policies() for ov in p.overruns for b in budgets[g]
    }
    assert got == want
    assert {(r['k'], r['overrun']) for r in d['k_sweep']} == {
        (1.0, 'kill'),
        (1.0, 'skip-next'),
        (5.0, 'kill'),
        (5.0, 'skip-next'),
    }
    # a longer budget never completes fewer jobs
    for pol in ('vanilla', 'alpha=0.5', 'alpha=0.95'):
        rates = [
            r['completion_rate']
            for r in sorted(d['table'], key=lambda r: r['budget_s'])
            if r['policy'] == pol and r['overrun'] == 'kill'
        ]
        assert rates == sorted(rates)
    tb = sorted(
        (r for r in d['table'] if r['policy'] == 'timebill' and r['overrun'] == 'kill'),
        key=lambda r: r['budget_s'],
    )
    for i in range(len(results)):  # more time, never more eviction
        alphas = [r['alphas'][i] for r in tb]
        assert alphas == sorted(alphas, reverse=True) and all(0 <= a <= 0.95 for a in alphas)
    assert tb[0]['alphas'] == [
        0.95,
        0.95,
    ]  # the lowest budget is below the prefill: α_max, and still late
    for r in results:  # re-planning runs once per budget, each steered to its own deadline
        assert sorted(r.replan_runs) == sorted(f'5|{b:.6f}' for b in budgets[g])
        for run in r.replan_runs.values():
            assert run.token_ids and run.kv_after <= r.n_prompt


def test_sweep_shares_prefill_and_runs(sweep_run):
    from timebill_ros.core.eviction import n_keep

    _, sweeper, results, out, _ = sweep_run
    for r in results:
        fixed = {n_keep(r.n_prompt, a) for a in (0, 0.25, 0.5, 0.75, 0.95)}
        assert fixed <= set(r.runs)  # vanilla and truncate share the α = 0 run
        extra = set(r.runs) - fixed
        assert len(extra) <= len(r.timebill_alpha)  # at most one run per distinct TimeBill choice
    assert out['timing_spread']['prefills'] == len(results)
    assert out['timing_spread']['decode_runs'] == sum(len(r.runs) for r in results)


def test_copied_prefill_decodes_like_a_fresh_request(sweep_run):
    """Reusing one prefill for every policy must not change an answer: compare with generate()."""
    from timebill_ros.core.eviction import n_keep
    from timebill_ros.core.generation import GenerationRequest

    engine, _, results, _, _ = sweep_run
    r = results[0]
    for alpha in (0.0, 0.5):
        fresh = engine.generate(
            GenerationRequest(
                prompt=r.task.prompt,
                system_prompt=r.task.system_prompt,
                max_new_tokens=r.task.max_new_tokens,
                alpha=alpha,
            )
        )
        assert fresh.token_ids == r.runs[n_keep(r.n_prompt, alpha)].token_ids


def test_report_files(sweep_run, tmp_path):
    from timebill_ros.core.evaluation.report import write_report

    _, _, _, out, budgets = sweep_run
    paths = write_report(dict(out), tmp_path)
    md = paths['markdown'].read_text()
    for p in P.standard_policies():
        assert f'| {p.name} |' in md
    for b in next(iter(budgets.values())):
        assert f'T={b:g}s' in md
    data = json.loads(paths['json'].read_text())
    assert 'NaN' not in paths['json'].read_text() and data['estimator']['times']
    pngs = sorted(p.name for p in tmp_path.glob('*.png'))
    assert pngs == [
        'estimator_error.png',
        'fig7_completion_score_256.png',
        'fig8_k_sweep_256.png',
        'lateness_256.png',
    ]
    assert all((tmp_path / n).stat().st_size > 10_000 for n in pngs)


# ------------------------------------------------------------------------------------ CLIs
def _cli(name, argv):
    import importlib

    from timebill_ros.cli import COMMANDS

    mod = importlib.import_module(COMMANDS[name][0])
    p = argparse.ArgumentParser()
    mod.add_arguments(p)
    return mod.run(p.parse_args([str(a) for a in argv]))


def test_generate_help_lists_every_registered_press(capsys):
    """A press added to the registry shows in ``timebill generate --help`` with no CLI edit."""
    from timebill_ros.cli import main
    from timebill_ros.core.eviction import PRESSES

    with pytest.raises(SystemExit):
        main(['generate', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert len(PRESSES) > 3 and all(name in text for name in PRESSES)


@pytest.fixture(scope='module')
def cli_config(tmp_path_factory):
    """Return a config whose timing profile is written by hand (no calibration), no predictor."""
    from timebill_ros.core.calibration.store import key_from_config, Profile, save_profile
    from timebill_ros.core.config import TimeBillConfig
    from timebill_ros.core.time_estimator import ExecutionTimeModel

    d = tmp_path_factory.mktemp('cfg')
    cfg = TimeBillConfig(
        profile_path=str(d / 'profile.json'), predictor_checkpoint=str(d / 'no-predictor')
    )
    prof = Profile(
        key=key_from_config(cfg),
        model=ExecutionTimeModel(1.5e-7, 1.2e-3, 0.15, 1.2e-5, 0.06),
        statistic='min',
        prefill=[],
        decode=[],
        mape={},
        fit_mape={},
    )
    save_profile(prof, Path(cfg.profile_path))
    path = d / 'timebill.yaml'
    path.write_text(
        '/**:\n  ros__parameters:\n'
        + ''.join(f'    {k}: {json.dumps(v)}\n' for k, v in cfg.to_dict().items())
    )
    return path


def test_eval_cli_report_has_every_policy_and_budget(cli_config, tmp_path):
    assert (
        _cli(
            'eval',
            [
                '--config',
                cli_config,
                '--out',
                tmp_path,
                '--lengths',
                '200',
                '--kinds',
                'passkey',
                '--workload',
                'retrieval',
                '--per-kind',
                '1',
                '--budgets',
                '2',
                '--ks',
                '5',
                '--max-new-tokens',
                '4',
                '--no-plots',
            ],
        )
        == 0
    )
    res = json.loads((tmp_path / 'results.json').read_text())
    ((g, d),) = res['groups'].items()
    assert len(d['budgets_s']) == 2
    md = (tmp_path / 'report.md').read_text()
    assert all(f'| {p.name} |' in md for p in P.standard_policies())
    assert all(f'T={b:g}s' in md for b in d['budgets_s'])
    assert res['meta']['predictor'].startswith('none')


def test_replay_offline_of_a_bag_written_the_ros2_way(cli_config, tmp_path):
    """Read a stock rosbags bag (chunked MCAP, types from the .msg text), as `ros2 bag` writes."""
    import numpy as np
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import get_types_from_msg, get_typestore, Stores

    store = get_typestore(Stores.ROS2_KILTED)
    store.register(
        get_types_from_msg((REPO / 'msg' / 'Request.msg').read_text(), 'timebill_ros/msg/Request')
    )
    Req, Time = store.types['timebill_ros/msg/Request'], store.types['builtin_interfaces/msg/Time']
    with Writer(tmp_path / 'bag', version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conn = w.add_connection('/timebill/requests', 'timebill_ros/msg/Request', typestore=store)
        for i, (prompt, budget) in enumerate([('Name a colour.', 60.0), ('Say hello.', 45.5)]):
            msg = Req(
                request_id=f'{i:032x}',
                accepted_at=Time(sec=100, nanosec=0),
                deadline=Time(sec=100 + int(budget), nanosec=int(budget % 1 * 1e9)),
                prompt=prompt,
                system_prompt='',
                input_ids=np.array([], dtype=np.uint32),
                max_new_tokens=5,
                overrun_policy='kill',
                min_quality=-1.0,
                max_alpha=-1.0,
                json_schema='',
                grammar='',
            )
            w.write(conn, (i + 1) * 10**9, store.serialize_cdr(msg, 'timebill_ros/msg/Request'))
    out = tmp_path / 'report'
    assert (
        _cli('replay', [tmp_path / 'bag', '--offline', '--config', cli_config, '--out', out]) == 0
    )
    rep = json.loads((out / 'replay.json').read_text())
    assert [r['request_id'] for r in rep['requests']] == [f'{i:032x}' for i in range(2)]
    assert [r['budget_s'] for r in rep['requests']] == [60.0, 45.5]
    for r in rep['requests']:  # generous budgets: served in full, on time, by TimeBill
        assert r['status'] == 'succeeded' and r['deadline_met'] and 0 < r['tokens_generated'] <= 5
        assert r['alpha'] == 0.0 and r['score'] is None  # no task metadata, nothing to score
    assert rep['summary']['completion_rate'] == 1.0 and (out / 'replay.md').is_file()


def test_make_tasks_then_replay_scores_the_answers(cli_config, tmp_path):
    bag = tmp_path / 'tasks'
    assert (
        _cli(
            'make-tasks',
            [
                bag,
                '--config',
                cli_config,
                '--lengths',
                '200',
                '--kinds',
                'passkey,qa',
                '--per-kind',
                '1',
                '--max-new-tokens',
                '8',
                '--budget-factor',
                '20',
            ],
        )
        == 0
    )
    from timebill_ros.core.evaluation.bags import read_requests

    reqs = read_requests(bag)
    assert [r.task['kind'] for r in reqs] == ['passkey', 'qa'] and all(
        r.budget_s > 0 for r in reqs
    )
    out = tmp_path / 'rep'
    assert (
        _cli(
            'replay',
            [
                bag,
                '--offline',
                '--policy',
                'vanilla',
                '--config',
                cli_config,
                '--out',
                out,
                '--pace',
                'recorded',
                '--speed',
                '100',
            ],
        )
        == 0
    )
    rep = json.loads((out / 'replay.json').read_text())
    assert [r['task_id'] for r in rep['requests']] == [r.task['id'] for r in reqs]
    assert all(r['score'] is not None and 0 <= r['score'] <= 1 for r in rep['requests'])
    assert rep['summary']['scored'] == 2
    from timebill_ros.core.evaluation.scoring import score

    for r, req in zip(rep['requests'], reqs):  # the score is the task's metric on the served text
        assert r['score'] == score(req.task['metric'], r['text'], req.task['references'])


def test_replay_online_against_the_running_server(ready_server, ros_domain_id, tmp_path):
    """Run `timebill replay BAG` as a separate planner process: every goal answered, reported."""
    import os
    import subprocess
    import sys

    from timebill_ros.core.evaluation.bags import write_request_bag

    write_request_bag(
        tmp_path / 'bag',
        [
            {'prompt': 'Name one colour.', 'time_budget': 90.0, 'max_new_tokens': 8},
            {
                'prompt': 'Say hello to the operator.',
                'time_budget': 90.0,
                'max_new_tokens': 8,
                'task': {'id': 'hello', 'references': ['hello'], 'metric': 'contains'},
            },
        ],
        period_s=0.2,
    )
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain_id))
    code = 'import sys; from timebill_ros.cli import main; sys.exit(main())'
    proc = subprocess.run(
        [
            sys.executable,
            '-P',
            '-c',
            code,
            'replay',
            str(tmp_path / 'bag'),
            '--pace',
            'recorded',
            '--out',
            str(tmp_path / 'rep'),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / 'rep' / 'replay.json').read_text())
    assert rep['mode'] == 'online' and len(rep['requests']) == 2
    for r in rep['requests']:
        assert r['status'] == 'succeeded' and r['deadline_met'] and 0 < r['tokens_generated'] <= 8
        assert r['goal_id'] and r['budget_s'] == 90.0
    assert rep['requests'][0]['score'] is None and rep['requests'][1]['score'] in (0.0, 1.0)
