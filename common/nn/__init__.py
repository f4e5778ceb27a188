"""Network layers and models: masked layers, NSConv (eq. 7), SAP (§3.4) with its C kernels, the
CIFAR-sized ResNets, MobileNetV2, LeNet-5 and AlexNet, and the training step."""
