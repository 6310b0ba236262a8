#!/usr/bin/env bash
# Run test/test_launch_bringup.py against the real launch / launch_ros / launch_testing, built from
# their public sources into a scratch folder outside the repo (none of them is on PyPI).
#
#   tools/real_launch_test.sh [SCRATCH]      (default SCRATCH=/tmp/timebill-launch)
#
# Clones ros2/launch, ros2/launch_ros and ros2/rcl_interfaces (composition_interfaces: launch_ros
# imports it; no wheel carries it) unless SCRATCH/src already holds them, installs the Python
# packages with pip --target, builds composition_interfaces with colcon, then runs the test with
# `launch_test` (launch_testing's pytest plugin of this snapshot does not load under pytest 9.2,
# upstream ros2/launch#979). Needs `make setup` first (the venv, the model, the built package).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SCRATCH="${1:-/tmp/timebill-launch}"
VENV="$REPO/.venv"
SITE="$SCRATCH/site"
mkdir -p "$SCRATCH/src"
for name in launch launch_ros rcl_interfaces; do
  if [ ! -d "$SCRATCH/src/$name" ]; then
    git clone -q --depth 1 "${ROS2_GIT:-https://github.com/ros2}/$name" "$SCRATCH/src/$name"
  fi
done
if [ ! -x "$SITE/bin/launch_test" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps --target "$SITE" \
    "$SCRATCH/src/launch/launch" "$SCRATCH/src/launch/launch_xml" \
    "$SCRATCH/src/launch/launch_yaml" "$SCRATCH/src/launch/launch_testing" \
    "$SCRATCH/src/launch_ros/launch_ros" "$SCRATCH/src/launch_ros/launch_testing_ros"
  "$VENV/bin/python" -m pip install -q --target "$SITE" osrf-pycommon lark
fi
export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
if [ ! -f "$SCRATCH/ws/install/setup.bash" ]; then
  (cd "$SCRATCH" && mkdir -p ws && cd ws && "$VENV/bin/colcon" build \
    --base-paths "$SCRATCH/src/rcl_interfaces/composition_interfaces" \
    --cmake-args -DBUILD_TESTING=OFF --event-handlers console_direct-)
fi
set +u
source "$SCRATCH/ws/install/setup.bash"
source "$REPO/install/setup.bash"
set -u
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TIMEBILL_CACHE="${TIMEBILL_CACHE:-$REPO/.cache}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
cd "$REPO"
exec "$VENV/bin/python" "$SITE/bin/launch_test" test/test_launch_bringup.py
