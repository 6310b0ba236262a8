"""
Calibration: measure this machine, fit the ETE, and keep the result as a keyed profile.

Split by concern: the profile and its keyed file (``store``), the least-squares fit scored on
held-out lengths (``fit``), the timing runs on an engine (``timing``) and the report of a run
(``report``). Import the module you need; this package re-exports nothing.
"""
