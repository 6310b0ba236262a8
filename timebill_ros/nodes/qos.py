"""
The channel names and QoS every TimeBill node, the typed client and the bag recorder share.

Written once so they cannot drift apart. Names are relative: they follow the nodes' namespace.
"""

from __future__ import annotations

from lifecycle_msgs.msg import Transition
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

ACTION_TIMED_INFERENCE = 'timed_inference'  # planner-facing, on timebill_server
TOPIC_REQUESTS = 'timebill/requests'  # server -> predictor, published with the generate goal
TOPIC_ESTIMATES = 'timebill/estimates'  # predictor -> generator (and anyone recording)
TOPIC_PREFILL_PLANS = 'timebill/prefill_plans'  # generator -> predictor: cached length per goal
# planner-facing, on timebill_server, which asks its generators (generator_endpoint)
SERVICE_ESTIMATE_BUDGET = 'timebill/estimate_budget'
SERVICE_PRIME = 'timebill/prime'  # prefix cache priming, on every generator
SERVICE_RELEASE_PRIME = 'timebill/release_prime'
SERVICE_PREDICT_LENGTH = 'timebill/predict_length'  # generator -> predictor (EstimateBudget)


def generator_endpoint(generator: str, what: str) -> str:
    """
    Name one generator's internal action or service: ``timebill/<generator>/<what>``.

    ``what``: generate (action), estimate_budget, prime, release_prime. One prefix per
    generator node, so several serve side by side in one namespace.
    """
    return f'timebill/{generator}/{what}'


# Requests and estimates must not be lost (a lost estimate costs a pessimistic N_max plan), but a
# restarted node must not act on stale ones: reliable, volatile.
CHANNEL_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=50,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
HEARTBEAT_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)

# Action goal/result/cancel services: ROS's default keeps only the last 10 requests, so a burst
# of more than 10 goals (several planners at once) silently loses the rest.
SERVICE_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=256,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
ACTION_QOS = {
    'goal_service_qos_profile': SERVICE_QOS,
    'result_service_qos_profile': SERVICE_QOS,
    'cancel_service_qos_profile': SERVICE_QOS,
}

TRANSITIONS = {
    'configure': Transition.TRANSITION_CONFIGURE,
    'activate': Transition.TRANSITION_ACTIVATE,
    'deactivate': Transition.TRANSITION_DEACTIVATE,
    'cleanup': Transition.TRANSITION_CLEANUP,
    'shutdown': Transition.TRANSITION_UNCONFIGURED_SHUTDOWN,
}
