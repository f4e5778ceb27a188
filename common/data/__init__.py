"""Data sets (Fashion-MNIST, CIFAR-10, CINIC-10, Tiny ImageNet) and their federated partitions."""
