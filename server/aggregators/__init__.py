"""Server halves of Overnight's aggregators, composed like TFF's aggregation factories.

`parse_aggregator` turns a task's aggregator expression (a preset with TFF's name, or a
composition) into an `AggregatorConfig`; `AggregationProcess` holds the state between rounds
and creates each round's `UpdateAggregator`.
"""
