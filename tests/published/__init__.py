"""Faithful re-implementations of the published VSE-infinity modules (woodfrog/vse_infty),
written for this project: the parity oracles of the tests and the baselines of bench/."""
