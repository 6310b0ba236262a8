"""
A planner in another process sends TimedInference goals to the three node processes.

Real rclpy, real DDS between processes, real SmolLM2. Budgets are generous because the
2-core test machine is shared: the assertions are about outcomes and stage order, never
about how fast the machine is.
"""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

PROMPT = 'Name three colors.'


def test_goal_returns_real_answer_before_deadline_with_estimate_during_prefill(ready_server):
    from timebill_ros.goal_result import STAGE_NAMES

    feedback = []
    out = ready_server.ask(PROMPT, budget_s=90.0, max_new_tokens=24, on_feedback=feedback.append)

    assert out.status_name == 'succeeded', out.reason
    assert out.deadline_met and out.completed
    assert out.total_s < out.budget_s
    assert out.text.strip() and out.tokens_generated > 1  # a real model answer, not a stub
    assert any(c.isalpha() for c in out.text)
    # what the answer is worth: no eviction, so the measured curve's value at α = 0; and the
    # default quality floor's limit for this press
    assert out.alpha == 0.0 and out.expected_quality == pytest.approx(1.0)
    assert 0.0 < out.alpha_limit < 0.95
    # the stages, in seconds since acceptance, in the order TimeBill runs them
    t = out.timeline
    assert (
        0
        <= t['dispatch']
        <= t['prefill_start']
        < t['prefill_end']
        <= t['decode_start']
        < t['finished_at']
    )
    # the predictor's estimate arrived while the generator was busy with prefill (it was in hand
    # when prefill ended), so N̂ came from the estimate, not from the no-estimate fallback
    assert not out.estimate_fallback
    assert t['dispatch'] <= t['estimate_received'] <= t['prefill_end']
    assert out.estimate_overlapped_prefill
    assert out.prompt_tokens > 5 and out.predicted_length >= 1 and out.wcet_s > 0
    # streaming feedback: prefill, then decoding with growing partial text ending in the answer
    stages = [STAGE_NAMES[f.stage] for f in feedback]
    assert 'prefill' in stages and 'decoding' in stages
    assert stages.index('prefill') < stages.index('decoding')
    counts = [f.tokens_so_far for f in feedback if STAGE_NAMES[f.stage] == 'decoding']
    # feedback is a stream beside the result, not before it: the last message may still be in
    # flight when the result arrives, but what came is a prefix of the answer
    assert counts == sorted(counts) and 0 < counts[-1] <= out.tokens_generated
    assert out.text.startswith(feedback[-1].partial_text)


def test_estimate_budget_service_before_sending(ready_server):
    plan = ready_server.estimate_budget(PROMPT, budget_s=90.0, max_new_tokens=24)
    assert plan is not None and plan.ok, plan
    assert plan.prompt_tokens > 5 and 1 <= plan.predicted_length <= 24
    assert plan.feasible and plan.guaranteed and plan.alpha == 0.0
    assert plan.wcet_s > 0
    assert plan.expected_quality == pytest.approx(1.0) and 0.0 < plan.quality_floor <= 1.0
    free = ready_server.estimate_budget(PROMPT, budget_s=90.0, max_new_tokens=24, min_quality=0.0)
    assert free.quality_floor == -1.0 and free.alpha_limit == pytest.approx(0.95)
    unjudged = ready_server.estimate_budget(PROMPT, 90.0, max_new_tokens=24, min_quality=2.0)
    assert not unjudged.ok and 'min_quality' in unjudged.reason

    tight = ready_server.estimate_budget(PROMPT, budget_s=0.001, max_new_tokens=24)
    assert tight.ok and not tight.feasible and tight.verdict == 'infeasible_prefill'
    # the most eviction allowed (the default quality floor's limit): all that is left to try
    assert tight.alpha == pytest.approx(tight.alpha_limit, abs=1e-6) and tight.alpha_limit > 0

    empty = ready_server.estimate_budget('  ', budget_s=5.0)
    assert not empty.ok and 'empty' in empty.reason


def test_timebill_ask_cli_from_a_separate_process(ready_server, ros_domain_id):
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain_id))
    code = 'import sys; from timebill_ros.cli import main; sys.exit(main())'
    proc = subprocess.run(
        [
            sys.executable,
            '-P',
            '-c',
            code,
            'ask',
            PROMPT,
            '--budget',
            '90',
            '--max-new-tokens',
            '12',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'status: succeeded' in proc.stdout and 'deadline met: True' in proc.stdout
    assert '[decoding]' in proc.stdout  # feedback was streamed


def test_infeasible_budget_is_rejected_at_once_without_prefill(ready_server):
    long_prompt = 'The robot logged an obstacle near the loading dock. ' * 600  # ~6k tokens
    out = ready_server.ask(long_prompt + 'Summarise.', budget_s=3.0, max_new_tokens=16)
    # admission control: refused at acceptance, with the numbers the planner needs
    assert out.status_name == 'rejected', out.reason
    # the most eviction this goal allows is quoted (here the default quality floor's cap)
    assert 'cannot finish even at α=' in out.reason and 'prefill of 6' in out.reason
    assert (
        not out.deadline_met and not out.completed and out.tokens_generated == 0 and out.text == ''
    )
    # the hopeless prefill was never started (-1: never)
    assert out.timeline['prefill_end'] == -1.0
    assert out.total_s < out.budget_s  # ended at once instead of overrunning
