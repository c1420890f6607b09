"""adntn: compress pretrained CNN layers into automatically differentiable nonlinear tensor networks."""

__version__ = "0.1.0"
