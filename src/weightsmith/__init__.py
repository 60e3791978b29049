"""weightsmith: dataset -> architecture -> train -> evaluate -> ship, on PyTorch."""

__version__ = "0.1.0"

from weightsmith.errors import WeightsmithError  # noqa: E402
from weightsmith.registry import create_model, list_models  # noqa: E402

__all__ = ["WeightsmithError", "create_model", "list_models", "__version__"]
