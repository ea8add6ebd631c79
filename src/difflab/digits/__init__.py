"""Problem 1: class-conditional digit diffusion on MNIST-M and SVHN."""
