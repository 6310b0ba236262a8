"""
rosbag2 (MCAP) recording and reading of TimeBill requests, estimates and results, no ROS needed.

Split by what a caller does with a bag: ``interfaces`` registers the package's message and
action types the way rosidl names them, ``convert`` turns dicts into messages and back,
``writer`` records (crash-safe, message by message), ``recovery`` makes a bag whose writer died
readable, and ``reader`` turns any bag (ours or ``ros2 bag record``'s) back into requests and
results. ``timebill_ros.core.evaluation.bags`` re-exports the public names. Kept import-light:
``rosbags`` loads only when a bag is opened or a typestore built.
"""
