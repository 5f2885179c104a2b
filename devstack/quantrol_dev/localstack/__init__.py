"""The local stack: real servers on 127.0.0.1 that stand in for a cluster's parts.

A development and test tool (tests/ fixtures and `quantrol demo`); never used against a real cluster.
"""
