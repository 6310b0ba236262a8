"""
timebill_ros: time-budgeted LLM inference for robots (TimeBill, arXiv 2512.21859).

Kept light on purpose: the colcon build installs this file over the rosidl-generated
package __init__, and the core must import without ROS or torch.
"""

__version__ = '0.1.0'
