"""The coordinator's half of secure aggregation: a state machine with one file per state.

advertise keys (r0) -> share keys (r1) -> masked input collection (r2) -> unmasking (r3)
-> completed, or aborted from any of them. `SecAggServer` (server.py) authenticates messages,
dispatches them to the current state and advances the states. The math comes from
`device_runtime.secagg`; nothing here re-implements it.
"""
