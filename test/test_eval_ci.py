"""Bootstrap CIs in the benchmark report: the interval itself, the report cells, re-rendering."""

import math
import re
import runpy
import sys

import numpy as np
import pytest
from timebill_ros.core.evaluation import policies as P
from timebill_ros.core.evaluation import report as R
from timebill_ros.core.evaluation import report_markdown as M

CELL = re.compile(r'\d+% \[\d+–\d+\] / \d\.\d\d \[\d\.\d\d–\d\.\d\d\]')


# ------------------------------------------------------------------------------ bootstrap_ci
def test_ci_contains_the_mean_and_matches_the_normal_approximation():
    v = [0.0, 1.0] * 50  # mean 0.5, standard error 0.05
    lo, hi = P.bootstrap_ci(v)
    assert lo < 0.5 < hi
    assert lo == pytest.approx(0.5 - 1.96 * 0.05, abs=0.012)  # a 90 % interval would fail
    assert hi == pytest.approx(0.5 + 1.96 * 0.05, abs=0.012)
    x = np.random.default_rng(3).normal(2.0, 1.0, 40)
    lo, hi = P.bootstrap_ci(x)
    assert lo < x.mean() < hi


def test_ci_narrows_with_more_jobs_and_a_lower_level():
    def width(n, level=0.95):
        lo, hi = P.bootstrap_ci([0.0, 1.0] * (n // 2), level=level)
        return hi - lo

    assert width(400) < 0.6 * width(25)  # ~1/sqrt(n): a quarter, with resampling noise
    assert width(100, level=0.5) < 0.5 * width(100)


def test_ci_is_deterministic_with_a_seed():
    v = np.random.default_rng(1).random(30)
    assert P.bootstrap_ci(v, seed=7) == P.bootstrap_ci(v, seed=7)
    assert P.bootstrap_ci(v, seed=7) != P.bootstrap_ci(v, seed=8)


def test_ci_degenerate_cases():
    lo, hi = P.bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)
    assert P.bootstrap_ci([0.7]) == (0.7, 0.7)
    assert P.bootstrap_ci([0.3] * 9) == pytest.approx((0.3, 0.3))
    lo, hi = P.bootstrap_ci([1.0, 2.0, 3.0, 100.0], stat=np.median)
    assert 1.0 <= lo <= 2.5 <= hi <= 100.0


def test_summarize_carries_cis():
    jobs = [P.Trace(str(i), 1.0 + i % 2 * 9, True, 0.1 * (i % 10)) for i in range(20)]
    out = P.run_kill(jobs, 5.0)  # every other job (10 s) misses the 5 s deadline
    s = P.summarize(out)
    assert s['completion_rate'] == 0.5
    lo, hi = s['completion_ci']
    assert 0.2 < lo < 0.5 < hi < 0.8
    lo, hi = s['score_ci']
    assert lo <= s['avg_score'] <= hi
    empty = P.summarize([])
    assert all(math.isnan(x) for x in empty['completion_ci'] + empty['score_ci'])


# ------------------------------------------------------------------------------------ verdicts
def test_verdict():
    assert M.verdict(0.8, [0.7, 0.9], 0.4, [0.3, 0.5]) == 'win'
    assert M.verdict(0.4, [0.3, 0.5], 0.8, [0.7, 0.9]) == 'loss'
    assert M.verdict(0.6, [0.45, 0.75], 0.5, [0.4, 0.6]) == 'tie'  # overlapping
    assert M.verdict(0.6, None, 0.5, [0.4, 0.6]) == 'n/a'


# ------------------------------------------------------------------------------------- reports
N = 16
BUDGETS = [2.0, 5.0, 12.0]


def _jobs(finish, score, spread=0.1):
    """N prompts with the same run time and scores spread around ``score``."""
    return [
        P.Trace(f't{i}', finish, True, min(1.0, max(0.0, score + spread * math.sin(i))))
        for i in range(N)
    ]


def _policy_jobs(name, b):
    """
    Synthetic runs: vanilla is slow, α=0.5 medium and worse, TimeBill fits every budget.

    At T=12 TimeBill keeps everything (as vanilla: a tie); its re-planning variant is made to
    lose there, so the report must show a win, a tie and a loss.
    """
    if name == 'vanilla':
        return _jobs(10.0, 0.8)
    if name == 'alpha=0.5':
        return _jobs(4.0, 0.5)
    if name == 'timebill+replan' and b == 12.0:
        return _jobs(1.0, 0.2)
    return _jobs(min(b, 10.0) * 0.9, 0.8 if b == 12.0 else 0.7)


def _results(with_cis=True, k_outcomes=True):
    table = []
    for name in ('vanilla', 'alpha=0.5', 'timebill', 'timebill+replan'):
        for b in BUDGETS:
            for ov in ('kill', 'skip-next'):
                outs = P.simulate(_policy_jobs(name, b), b, ov)
                row = {
                    'policy': name,
                    'overrun': ov,
                    'budget_s': b,
                    **P.summarize(outs),
                    'outcomes': [o.to_dict() for o in outs],
                }
                if name.startswith('timebill'):
                    row['alphas'] = [0.0] * N
                table.append(row)
    ks = []
    for k in (1.0, 5.0):
        for ov in ('kill', 'skip-next'):
            outs = P.simulate(_jobs(4.0 * k / 5, 0.7), 5.0, ov)
            row = {'k': k, 'overrun': ov, 'budget_s': 5.0, **P.summarize(outs)}
            row['alphas'] = [0.5] * N
            if k_outcomes:
                row['outcomes'] = [o.to_dict() for o in outs]
            else:  # as old files: neither outcomes nor CIs in the k sweep
                del row['completion_ci'], row['score_ci']
            ks.append(row)
    if not with_cis:  # as written before the CIs existed
        for row in table + ks:
            row.pop('completion_ci', None), row.pop('score_ci', None)
    group = {
        'budgets_s': BUDGETS,
        'k_budget_s': 5.0,
        'n_prompts': N,
        'prompt_tokens': [1000 + i for i in range(N)],
        'table': table,
        'k_sweep': ks,
    }
    return {'groups': {'1024': group}}


def _kill_rows(md):
    kill = md.split('### Kill', 1)[1].split('###', 1)[0]
    return {ln.split('|')[1].strip(): ln for ln in kill.splitlines() if ln.startswith('| ')}


def test_report_cells_show_cis():
    md = M.markdown(_results())
    assert md.count(M.CI_NOTE) == 1
    rows = _kill_rows(md)
    # vanilla (10 s) misses T=2 and T=5, makes T=12: every job, so a zero-width interval
    cells = rows['vanilla'].split('|')[2:-1]
    assert cells[0].strip() == '0% [0–0] / 0.00 [0.00–0.00]'
    assert cells[2].strip().startswith('100% [100–100] / 0.8')
    assert all(len(CELL.findall(rows[p])) == len(BUDGETS) for p in rows if p != 'policy')
    ksec = md.split('### Pessimism factor k', 1)[1]
    assert len(CELL.findall(ksec.split('\n\n', 2)[1])) == 4  # 2 k × (Kill, Skip-Next)


def test_report_win_tie_loss_table():
    md = M.markdown(_results())
    sec = md.split('### Where TimeBill wins, ties or loses', 1)[1].split('###', 1)[0]
    lines = {ln.split('|')[1].strip(): ln for ln in sec.splitlines() if ln.startswith('| T=')}
    assert set(lines) == {f'T={b:g}s' for b in BUDGETS}
    # T=2: only TimeBill finishes; T=5: α=0.5 (score 0.5) finishes too, TimeBill scores 0.7
    assert lines['T=2s'].count('win:') == 2
    assert 'alpha=0.5: 0.5' in lines['T=5s'] and lines['T=5s'].count('win:') == 2
    # T=12: vanilla is the best baseline; TimeBill ties it, the re-planning variant loses
    assert 'vanilla: 0.8' in lines['T=12s']
    cells = lines['T=12s'].split('|')
    assert cells[3].strip().startswith('tie:') and cells[4].strip().startswith('loss:')
    assert 'timebill 2 win, 1 tie, 0 loss' in sec and 'timebill+replan 2 win, 0 tie, 1 loss' in sec


def test_report_says_timebills_alpha_once_per_budget():
    """The α TimeBill and its re-planning variant both plan shows once per budget."""
    md = M.markdown(_results())
    lines = [ln for ln in md.splitlines() if ln.startswith("TimeBill's α per budget")]
    assert len(lines) == 1
    assert 'timebill and timebill+replan: ' in lines[0]
    assert [lines[0].count(f'T={b:g}s:') for b in BUDGETS] == [1] * len(BUDGETS)


def test_rerender_old_json_recomputes_cis(tmp_path):
    """A results.json without CIs (and k rows without outcomes) renders; CIs match summarize."""
    path = R.write_json(_results(with_cis=False, k_outcomes=False), tmp_path / 'results.json')
    before = path.read_text()
    R.rerender(path, plots=False)
    assert path.read_text() == before  # the measured data is left alone
    md = (tmp_path / 'report.md').read_text()
    assert md == M.markdown(_results(with_cis=True, k_outcomes=False))
    ksec = md.split('### Pessimism factor k', 1)[1]
    assert not CELL.search(ksec) and '%' in ksec  # no outcomes: point values only


@pytest.mark.filterwarnings('ignore:.*found in sys.modules:RuntimeWarning')
def test_rerender_cli_and_plots(tmp_path):
    path = R.write_json(_results(with_cis=False), tmp_path / 'results.json')
    argv = sys.argv
    sys.argv = ['report', str(path), '--no-plots']
    try:  # as `python -m timebill_ros.core.evaluation.report PATH`, in this process (fast)
        with pytest.raises(SystemExit) as done:
            runpy.run_module('timebill_ros.core.evaluation.report', run_name='__main__')
    finally:
        sys.argv = argv
    assert done.value.code == 0
    assert CELL.search((tmp_path / 'report.md').read_text())
    paths = R.rerender(path)
    assert sorted(p.name for p in tmp_path.glob('*.png')) == [
        'fig7_completion_score_1024.png',
        'fig8_k_sweep_1024.png',
        'lateness_1024.png',
    ]
    md = paths['markdown'].read_text()
    assert '![fig7_completion_score_1024](fig7_completion_score_1024.png)' in md
