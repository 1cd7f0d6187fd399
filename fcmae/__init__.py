"""fcmae: FCMAE pretraining for ConvNeXt V2 with exact, MinkowskiEngine-free sparse encoders."""
from fcmae import optim, weights
from fcmae.models import BACKEND_CHOICES, FCMAE, create_model, list_models

__version__ = "0.1.0"


def list_backends():
    """Backend names `create_model` accepts ("auto" picks the fastest exact one installed)."""
    return list(BACKEND_CHOICES)


__all__ = ["FCMAE", "create_model", "list_models", "list_backends", "optim", "weights", "__version__"]
