"""Judging live windows: fetch a window's samples, run the policy's gates, decide the next step.

Fetching (`sources`, `samples`) is apart from judging (`judges`, `gates`), and the stage loop
(`progress`) is a pure state machine over judged windows.
"""
