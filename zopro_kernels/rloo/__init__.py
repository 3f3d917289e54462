"""The RLOO loop wrapper: iterative ZOPrO with a LoRA policy and a LoRA reward model on one base.

Python API::

    from zopro_kernels.rloo import TrainConfig, train
    history = train(TrainConfig.from_yaml("examples/sentiment.yaml"))

Needs the ``loop`` extra (transformers, peft, safetensors, tqdm); imports stay lazy so that
``import zopro_kernels`` works without them.
"""

from .config import TrainConfig


def __getattr__(name):
    if name == "train":
        from .cli import train

        return train
    if name in ("RLOOTrainer",):
        from .loop import RLOOTrainer

        return RLOOTrainer
    if name in ("PolicyAndReward", "LoraSettings"):
        from . import models

        return getattr(models, name)
    raise AttributeError(name)


__all__ = ["TrainConfig", "train", "RLOOTrainer", "PolicyAndReward", "LoraSettings"]
