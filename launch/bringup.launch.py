"""
Bring up TimeBill: predictor, generator, server, and the lifecycle manager that activates them.

timebill_lifecycle_manager (``autostart: true`` in the parameters file) configures and activates
the predictor, the generator and then the server, and brings a restarted node back.

    ros2 launch timebill_ros bringup.launch.py [params_file:=/path/to/timebill.yaml]

The node list comes from timebill_ros.bringup.NODES, the same list `timebill bringup`
starts on machines without launch_ros, and both pass the same parameters file.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
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
        actions.append(
            Node(
                package=PACKAGE,
                executable=spec.name,
                name=spec.name,
                namespace=namespace,
                output='screen',
                parameters=[params],
            )
        )
    return LaunchDescription(actions)
