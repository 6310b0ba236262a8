#!/usr/bin/env bash
# Build the ROS 2 side of timebill_ros from PyPI wheels (no ROS distribution needed).
# Idempotent: installs the Kilted wheels into the venv if missing, repoints the wheels'
# hard-coded Python include paths (see docs: they name the wheel builder's /opt/python),
# then runs `colcon build --symlink-install` so Python edits need no rebuild. The build also
# compiles the C++ decode kernels against this venv's torch (one library per ISA, installed to
# site-packages/timebill_ros/_kernels/) or copies them from `make kernels`' identical build.
# BUILD_TESTING=ON (as `make colcon-test` sets it) also configures the tests for `colcon test`;
# the default OFF keeps the build free of test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
PIP="$PY -m pip --disable-pip-version-check -q"

ROS_WHEELS=(ros-kilted-rclpy ros-kilted-rmw-fastrtps-cpp ros-kilted-std-msgs
  ros-kilted-rosidl-default-generators ros-kilted-ament-cmake ros-kilted-ament-cmake-python
  ros-kilted-ament-package ros-kilted-ament-cmake-include-directories
  ros-kilted-rosidl-core-generators ros-kilted-ament-cmake-ros-core
  ros-kilted-diagnostic-msgs ros-kilted-lifecycle-msgs ros-kilted-action-msgs
  ros-kilted-builtin-interfaces catkin-pkg colcon-common-extensions)

# one `pip show` for all of them: it prints a "Name:" line for each installed one
installed=$($PY -m pip --disable-pip-version-check show "${ROS_WHEELS[@]}" 2>/dev/null \
  | sed -n 's/^Name: //p' | tr 'A-Z_' 'a-z-' || true)  # pip show exits 1 when any is missing
missing=()
for w in "${ROS_WHEELS[@]}"; do
  grep -qx "$w" <<<"$installed" || missing+=("$w")
done
if ((${#missing[@]})); then
  echo "[setup_ros] installing ${missing[*]}"
  $PIP install "${missing[@]}"
fi

# Repoint /opt/python/... include dirs in the exported CMake targets (idempotent: after the
# first run no file names /opt/python any more).
inc=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
npinc=$($PY -c 'import numpy; print(numpy.get_include())')
mapfile -t files < <(grep -rl '/opt/python/cp311-cp311' "$VENV"/share/*/cmake 2>/dev/null || true)
for f in "${files[@]}"; do
  sed -i -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#${npinc}#g" \
         -e "s#/opt/python/cp311-cp311/include/python3.11#${inc}#g" "$f"
done
((${#files[@]})) && echo "[setup_ros] repointed Python include paths in ${#files[@]} CMake files"

# CMake refuses an exported include dir inside the source tree (the venv is inside the
# repo) unless it is under the install prefix: reach numpy's headers through a link there.
NP_LINK=$ROOT/install/timebill_ros/include/_numpy_include
mkdir -p "$(dirname "$NP_LINK")"
ln -sfn "$npinc" "$NP_LINK"

export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV
export PATH=$VENV/bin:$PATH
# colcon must see only this package (not the venv or .cache trees).
"$VENV/bin/colcon" --log-base log build --symlink-install --base-paths "$ROOT" \
  --packages-select timebill_ros --event-handlers console_direct- \
  --cmake-args -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING="${BUILD_TESTING:-OFF}" \
  -DPython3_NumPy_INCLUDE_DIR="$NP_LINK"
echo "[setup_ros] built; use: export AMENT_PREFIX_PATH=$VENV; source install/setup.bash"
