"""The rollout of a ServingPolicy: one state machine (statemachine.py) fed by the SLO analysis (analysis.py)."""
