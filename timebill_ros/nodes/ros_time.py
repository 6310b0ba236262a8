"""
Conversions between ROS time messages and float seconds (the core's unit), and goal ids.

ROS time (system time by default) is comparable across processes on one machine; the pipeline
runs on ``time.monotonic()``, so absolute deadlines cross over with ``to_monotonic``.
"""

from __future__ import annotations

import math
import time

from rclpy.duration import Duration
from rclpy.time import Time


def duration_to_s(d) -> float:
    return Duration.from_msg(d).nanoseconds * 1e-9


def s_to_duration(seconds: float):
    if not math.isfinite(seconds):
        raise ValueError(f'a duration must be finite, got {seconds}')
    return Duration(nanoseconds=int(round(seconds * 1e9))).to_msg()


def time_to_s(t) -> float:
    return Time.from_msg(t).nanoseconds * 1e-9


def s_to_time(seconds: float):
    return Time(nanoseconds=int(round(seconds * 1e9))).to_msg()


def ros_now_s(node) -> float:
    """ROS clock (system time by default): comparable across processes on one machine."""
    return node.get_clock().now().nanoseconds * 1e-9


def to_monotonic(ros_time_s: float, node) -> float:
    """Map an absolute ROS time to time.monotonic(), the clock the pipeline runs on."""
    return time.monotonic() + (ros_time_s - ros_now_s(node))


def uuid_hex(uuid_msg) -> str:
    return bytes(uuid_msg.uuid).hex()
