"""
Pure-Python install of the core and CLI (``pip install -e .``).

The ROS interfaces and node executables are built by colcon from CMakeLists.txt /
package.xml; this file lets the core be used and tested without a ROS build.
"""

from setuptools import find_packages, setup

setup(
    name='timebill_ros',
    version='0.1.0',
    packages=find_packages(include=['timebill_ros', 'timebill_ros.*']),
    python_requires='>=3.10',
    install_requires=['numpy', 'pyyaml'],  # torch/transformers pinned by requirements.txt
    entry_points={
        'console_scripts': ['timebill = timebill_ros.cli:main']
        + [
            f'{node} = timebill_ros.nodes.{node[len("timebill_"):]}:main'
            for node in (
                'timebill_generator',
                'timebill_predictor',
                'timebill_server',
                'timebill_lifecycle_manager',
            )
        ]
    },
    package_data={'timebill_ros': ['data/*', 'core/kernels/*.cpp']},
    zip_safe=False,
)
