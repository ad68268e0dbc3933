"""Training: convlens's own compact CNN, the training loop, and classifier evaluation.

Class folders in, a trained classifier and its evaluation out::

    from convlens.train import TrainConfig, train
    result = train("data/", "model_dir", TrainConfig(epochs=20, size=64))
    model = convlens.load_model(result.model_path)
"""

from ..models.nets import ShapesNet
from .loop import ProgressEvent, TrainConfig, TrainResult, learning_rate_at, read_checkpoint, train

__all__ = ["ProgressEvent", "ShapesNet", "TrainConfig", "TrainResult", "learning_rate_at", "read_checkpoint", "train"]
