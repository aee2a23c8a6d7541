"""The model registry (kept apart from ``__init__`` so model files can import it without cycles)."""

from gradtail.models.base import LongTailClassifier
from gradtail.registry import Registry

MODELS: Registry[LongTailClassifier] = Registry("model")
register_model = MODELS.register
