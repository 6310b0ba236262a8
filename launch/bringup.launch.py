"""
Bring up TimeBill: predictor, generator, server, and the lifecycle manager that activates them.

timebill_lifecycle_manager (``autostart: true`` in the parameters file) configures and activates
the predictor, the generator and then the server, and brings a restarted node back.

    ros2 launch timebill_ros bringup.launch.py [params_file:=/path/to/timebill.yaml]
    ros2 launch timebill_ros bringup.launch.py generators:=2    # two generators, one server
    ros2 launch timebill_ros bringup.launch.py keystore:=/path/to/keystore  # secured (SROS2)

The node list comes from timebill_ros.bringup.NODES, the same list `timebill bringup`
starts on machines without launch_ros, and both pass the same parameters file.
"""

import os
import tempfile

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from timebill_ros.bringup import (
    enclave_of, fleet_nodes, fleet_parameters, generator_names, NODES, PACKAGE, security_env,
)
import yaml


def _nodes(context):
    """Make the node actions: the default system, or one with several generators."""
    params = LaunchConfiguration('params_file').perform(context)
    namespace = LaunchConfiguration('namespace').perform(context)
    generators = LaunchConfiguration('generators').perform(context).strip()
    keystore = LaunchConfiguration('keystore').perform(context).strip()
    specs, files = NODES, [params]
    if generators:
        names = generator_names(generators)
        specs = fleet_nodes(names)
        fd, path = tempfile.mkstemp(prefix='timebill_fleet_', suffix='.yaml')
        with os.fdopen(fd, 'w') as fh:
            yaml.safe_dump(fleet_parameters(names), fh)
        files.append(path)  # after the main file: its values win
    return [
        Node(
            package=PACKAGE,
            executable=spec.program,
            name=spec.name,
            namespace=namespace,
            output='screen',
            parameters=files,
            # secured: DDS Security enforced, each node in enclave /timebill/<name>
            ros_arguments=['--enclave', enclave_of(spec.name)] if keystore else [],
            additional_env=security_env(keystore) if keystore else None,
        )
        for spec in specs
    ]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory(PACKAGE), 'config', 'timebill.yaml')
    return LaunchDescription([
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
        DeclareLaunchArgument(
            'generators',
            default_value='',
            description='several generators behind the server: a count (2) or node names '
            "(gen_a,gen_b); empty: the params file's generators",
        ),
        DeclareLaunchArgument(
            'keystore',
            default_value='',
            description='SROS2 keystore: run secured (Enforce), node <name> in enclave '
            '/timebill/<name> (tools/make_keystore.sh, docs/SECURITY.md); empty: unsecured',
        ),
        OpaqueFunction(function=_nodes),
    ])
