"""The library under the Flower app: maths, layers, formats and data, knowing nothing of Flower's
server or client. One sub-package per concern; imports run one way, from later to earlier in this list:

- :mod:`common.sparse`: bit packing and the sparse storage formats of appendix 7.1 (exact sizes);
- :mod:`common.nn`: NSConv (eq. 7), SAP (§3.4) and its C kernels, masked layers, the models, the
  training step;
- :mod:`common.pruning`: masks and layer densities, schedules, BaE (eq. 2-4), top-K gradients,
  prune/grow and the servers' structure rules;
- :mod:`common.data`: data sets and federated partitions;
- :mod:`common.measure`: bytes held for backward, appendix 7.2/7.3 estimates, the training
  processes' environment;
- :mod:`common.protocol`: the table of methods, the run config, the per-round instructions and the
  wire format.
"""
