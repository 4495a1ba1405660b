"""Secure aggregation (Bonawitz et al. 2017 over SecAgg+'s sparse graph, Bell et al. 2020).

The math both sides need lives here, once: Shamir sharing, key agreement, share encryption,
mask expansion, modular masking, the neighbour graph, its parameters and the quantization of
floats into the modular field. The device's half of the protocol is `client.SecAggClient`, with
one module per round (`client_r0_advertise_keys` ... `client_r3_unmasking`). The server's half
is `server.secagg`, which imports this package and never re-implements it.
"""
