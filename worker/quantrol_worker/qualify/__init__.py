"""`quantrol-worker qualify`: the ServingPolicy's Qualifying phase, run as a Job on the target before any traffic.

Each arm is measured in three regimes with a field load generator (GuideLLM) through the policy's admission
bounds, and the candidate engine's golden-output figures are compared with calibration's reference. `regimes` and
`golden` hold the pure judgements; `load` drives GuideLLM; `run` puts them together and writes the report.
"""
