"""
One accepted TimedInference goal, from validation to its result, on the server's fleet.

Validated (a refusal ends it at once), refused when it cannot finish even alone on any present
generator, then dispatched to the generator ``core.fleet.rank`` puts first. When that generator
is lost mid-goal (heartbeat stopped, or it restarted) the goal goes to the next one if its
deadline still allows -- same goal id, the request published again for the predictor -- and the
result's reason says so with the times; when none can finish it, it ends with why.
"""

from __future__ import annotations

from collections import Counter

from rclpy.task import Future
from timebill_ros.action import Generate, TimedInference
from timebill_ros.msg import Request
from timebill_ros.nodes.admission import grace_s, hopeless
from timebill_ros.nodes.dispatch import dispatch
from timebill_ros.nodes.fleet import Lost
from timebill_ros.nodes.results import copy_fields
from timebill_ros.nodes.ros_time import ros_now_s, s_to_time, uuid_hex
from timebill_ros.nodes.validation import InvalidGoal, model_prompt, validate_goal

R = TimedInference.Result
NEVER = ('dispatch_at_s', 'prefill_start_s', 'prefill_end_s', 'estimate_received_s',
         'decode_start_s')


def serve(node, goal_handle, ctx) -> TimedInference.Result:
    """Serve one goal on ``node`` (the server); ``ctx`` is its ``orphans.ServedGoal``."""
    rel = lambda: ros_now_s(node) - ctx.accepted_s  # noqa: E731
    # stages that never happen stay -1; a refusal evicts nothing and plans no quality
    result = R(**{name: -1.0 for name in NEVER}, expected_quality=-1.0, alpha_limit=-1.0)
    goal = goal_handle.request
    result.structured = bool(goal.json_schema or goal.grammar)

    def end(status: int, reason: str) -> TimedInference.Result:
        return node._end(goal_handle, result, rel, status, reason)

    cfg = node.cfg
    if cfg is None:
        return end(R.STATUS_ABORTED, 'the server is not configured')
    if len(node._goals) > cfg.max_goals:  # each held goal holds an executor thread
        return end(R.STATUS_REJECTED, f'queue full: {len(node._goals) - 1} goals are held '
                   f'(max_goals {cfg.max_goals}); retry later')
    try:
        deadline, ids, overrun, max_new = validate_goal(goal, ctx.accepted_s, cfg, node.tokenizer)
    except InvalidGoal as exc:
        return end(R.STATUS_REJECTED, str(exc))
    result.prompt_tokens = n_prompt = len(ids)
    ctx.client_node = goal.client_node
    request = Request(
        request_id=ctx.request_id,
        accepted_at=s_to_time(ctx.accepted_s),
        deadline=s_to_time(deadline),
        # the text the ids encode: the predictor predicts from what the model reads
        prompt=model_prompt(goal.prompt, goal.json_schema, cfg),
        system_prompt=goal.system_prompt,
        input_ids=ids,
        max_new_tokens=max_new,
        overrun_policy=overrun,
        min_quality=float(goal.min_quality),
        max_alpha=float(goal.max_alpha),
        json_schema=goal.json_schema,
        grammar=goal.grammar,
    )
    fleet = node.fleet
    present = fleet.fresh(cfg.peer_timeout_s)
    refusals = [hopeless(p.beat, cfg, ros_now_s(node), n_prompt, deadline) for p in present]
    if present and all(refusals):  # by the generators' own models: saves two round trips
        return end(R.STATUS_REJECTED, refusals[0] if len(present) == 1 else '; '.join(
            f'{p.name}: {why}' for p, why in zip(present, refusals)))

    def relay(feedback_msg) -> None:
        goal_handle.publish_feedback(copy_fields(feedback_msg.feedback, TimedInference.Feedback()))

    def held(inner) -> None:
        ctx.inner = inner
        if goal_handle.is_cancel_requested or ctx.stop.done():
            inner.cancel_goal_async()

    cap = float(goal.max_alpha) if goal.max_alpha >= 0 else cfg.alpha_max
    tried, history = [], []
    result.dispatch_at_s = rel()
    while True:
        inflight = Counter(g.generator for g in list(node._goals.values()) if g.dispatched)
        choices = fleet.choose(cfg, deadline - ros_now_s(node), goal.prompt, goal.system_prompt,
                               n_prompt, max_new, min(cap, cfg.alpha_max), exclude=tried,
                               inflight=inflight)
        if not choices:
            why = fleet.why_none() if not tried else 'no other generator is present'
            return end(R.STATUS_ABORTED, '; '.join(history + [why]))
        peer = fleet.peers[choices[0].name]
        if tried:  # a re-dispatch: only when this generator can still finish it
            late = hopeless(peer.beat, cfg, ros_now_s(node), n_prompt, deadline)
            if late:
                return end(R.STATUS_ABORTED, '; '.join(history + [f'{peer.name}: {late}']))
            history[-1] += f'; re-dispatched to {peer.name} at {rel():.3f} s'
            node.get_logger().warning(f'goal {ctx.request_id[:8]}: {history[-1]}')
        ctx.generator, ctx.generator_pid = peer.name, peer.beat.pid
        result.generator = peer.name  # also on an abort: where it was when it ended
        ctx.stop, ctx.inner, ctx.dispatched = Future(), None, True
        # to predictor and generator at the same moment: the estimate is made during prefill
        node._requests.publish(request)
        # the generator ends every goal by its deadline plus a step or a chunk; past that its
        # request or answer was lost on the way
        grace = grace_s(peer.beat, cfg, n_prompt, max_new, overrun)
        left = lambda: deadline + grace - ros_now_s(node)  # noqa: E731
        sent = dispatch(peer.action, Generate.Goal(request=request), goal_handle.goal_id, relay,
                        ctx.stop, left, held)
        if sent.asked_by_id or sent.sends > 1:
            node.get_logger().warning(
                f"goal {uuid_hex(goal_handle.goal_id)[:8]}: {peer.name}'s goal reply was lost; "
                f'result asked for by id ({sent.sends} request(s) sent)'
            )
        if sent.result is not None:
            break
        if isinstance(sent.stopped, Lost) and not goal_handle.is_cancel_requested:
            tried.append(peer.name)
            history.append(f'{sent.stopped} at {rel():.3f} s')
            continue
        if sent.refused and len(choices) > 1:  # not active after all: the next one may be
            tried.append(peer.name)
            history.append(f'{peer.name} refused it (not active?)')
            continue
        why = (
            sent.stopped if sent.stopped is not None
            else f'{peer.name} refused the request (not active?)' if sent.refused
            else f'no answer from {peer.name} {grace:.2f} s after the deadline: the request or '
            f'its answer was lost on the way ({sent.sends} request(s) sent)'
        )
        return end(R.STATUS_ABORTED, '; '.join(history + [why]))
    dispatched = result.dispatch_at_s
    copy_fields(sent.result, result)
    result.dispatch_at_s = dispatched
    result.generator = peer.name
    if history:  # the planner reads where its goal went
        result.reason = f'{result.reason} ({"; ".join(history)})'
    result.structured = bool(goal.json_schema or goal.grammar)
    result.total_s = rel()
    if result.status == R.STATUS_CANCELED and goal_handle.is_cancel_requested:
        goal_handle.canceled()
    elif result.status in (R.STATUS_SUCCEEDED, R.STATUS_TRUNCATED):
        goal_handle.succeed()
    else:
        goal_handle.abort()
    return result
