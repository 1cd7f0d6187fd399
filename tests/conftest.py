import pytest
import torch

import fcmae
from fcmae.models.backends import BACKENDS, runnable

# CUDA runs too wherever a GPU is present; CPU always. On CUDA the tolerances are the CPU ones, so
# convolutions and products run in true fp32 (cuDNN's default is TF32, ~1e-3 relative error).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The exact backends under test: MinkowskiEngine's wherever it is installed (CI installs it).
MINKOWSKI = BACKENDS["minkowski"].available("cpu")
BACKEND_NAMES = [backend.name for backend in runnable("cpu")]  # dense, the reference, first


def randomize_(model, seed=0, scale=0.1):
    """Give the parameters that start constant (LayerNorm, GRN gamma/beta, biases, the mask
    token) random values, so that a wrong GRN or a mishandled bias cannot hide behind an
    identity at initialisation. Conv and Linear weights keep their random init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.dim() > 1 and name != "mask_token":
                    continue
                noise = (torch.randn(p.shape, generator=gen) * scale).to(p)
                is_gain = isinstance(module, torch.nn.LayerNorm) and name == "weight"
                p.copy_(1.0 + noise if is_gain else noise)
    return model


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of the reference."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def fixed_probe(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def require_backend(backend, device):
    """Skip where the backend cannot run on `device` (a CPU-only MinkowskiEngine beside a GPU)."""
    reason = BACKENDS[backend].cannot_run(device)
    if reason:
        pytest.skip(reason)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def make_model():
    def make(name="convnextv2_atto", seed=0, **kwargs):
        torch.manual_seed(seed)
        return randomize_(fcmae.create_model(name, **kwargs), seed=seed)
    return make


# The longest file first: pytest-xdist (-n 2 --dist loadfile --no-loadscope-reorder in setup.cfg)
# hands out files in collection order, and the BloodMNIST study alone takes a quarter of the suite.
LONGEST_FIRST = ("test_bloodmnist.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order
