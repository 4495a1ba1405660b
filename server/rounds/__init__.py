"""A training round as an explicit state machine: one module per state.

    SELECTING ──quota or deadline──▶ REPORTING ──target, deadline or nobody left──▶ AGGREGATING
        │                               │                                            │
        └──target reached early─────────┴──────────────▶ AGGREGATING ──commit──▶ COMMITTED
                                        └──below minimum at deadline──▶ FAILED
    any open state ──coordinator restart──▶ ABANDONED

`selecting.py`, `reporting.py` say when a round leaves their state; `aggregating.py` turns
the accumulated updates into the next global model; `closed.py` records terminal rounds.
"""
