"""Sparse formats: bit packing and the dense / bitmap / COO / CSR / CSC storage of appendix 7.1."""
