from torch import nn

from bench.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")
register_model = MODELS.register
