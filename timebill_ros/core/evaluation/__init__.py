"""
Offline evaluation: tasks, scoring, policies, the budget × policy sweep, reports and bag IO.

Kept import-light: each submodule pulls in torch / rosbags / matplotlib only when used.
"""
