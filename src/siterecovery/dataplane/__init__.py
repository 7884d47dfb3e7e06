"""Data plane: moves disk writes from agents through process servers to master targets."""
