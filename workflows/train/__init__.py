"""One training loop under Ray Train + DeepSpeed for the four EVATok models (see loop.py)."""
from workflows.train.loop import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
