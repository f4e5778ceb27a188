"""Measurement: bytes autograd holds for backward, the appendix 7.2 memory and 7.3 FLOP estimates,
and the environment training processes run with."""
