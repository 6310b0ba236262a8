"""
Bring up TimeBill: timebill_generator, timebill_predictor and the lifecycle timebill_server.

The server is configured and then activated as soon as it reaches 'inactive'.

    ros2 launch timebill_ros bringup.launch.py [params_file:=/path/to/timebill.yaml]

The node list comes from timebill_ros.bringup.NODES, the same list `timebill bringup`
starts on machines without launch_ros, and both pass the same parameters file.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, RegisterEventHandler
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition
from timebill_ros.bringup import NODES, PACKAGE


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory(PACKAGE), 'config', 'timebill.yaml')
    params = LaunchConfiguration('params_file')
    namespace = LaunchConfiguration('namespace')
    actions = [
        DeclareLaunchArgument(
            'params_file',
            default_value=default_params,
            description='ROS 2 parameters file for all TimeBill nodes',
        ),
        DeclareLaunchArgument(
            'namespace',
            default_value='',
            description='namespace of this TimeBill system (several systems side by side)',
        ),
    ]
    for spec in NODES:
        common = {
            'package': PACKAGE,
            'executable': spec.name,
            'name': spec.name,
            'namespace': namespace,
            'output': 'screen',
            'parameters': [params],
        }
        if not spec.lifecycle:
            actions.append(Node(**common))
            continue
        node = LifecycleNode(**common)
        activate = EmitEvent(
            event=ChangeState(
                lifecycle_node_matcher=matches_action(node),
                transition_id=Transition.TRANSITION_ACTIVATE,
            )
        )
        actions += [
            # configure -> inactive: activate (not after a later deactivate, hence start_state)
            RegisterEventHandler(
                OnStateTransition(
                    target_lifecycle_node=node,
                    start_state='configuring',
                    goal_state='inactive',
                    entities=[activate],
                )
            ),
            node,
            EmitEvent(
                event=ChangeState(
                    lifecycle_node_matcher=matches_action(node),
                    transition_id=Transition.TRANSITION_CONFIGURE,
                )
            ),
        ]
    return LaunchDescription(actions)
