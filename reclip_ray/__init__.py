"""reclip-ray: RECLIP (train CLIP mostly on small images, finetune briefly at full size) on Ray and MLflow.

Importing the package is cheap and has no side effects; the heavy pieces (torch, Ray) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["export_model", "load_model", "load_config", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from reclip_ray.config import load_config
    from reclip_ray.export import export_model, load_model


def __getattr__(name: str) -> Any:
    if name in ("export_model", "load_model"):
        from reclip_ray import export

        return getattr(export, name)
    if name == "load_config":
        from reclip_ray.config import load_config

        return load_config
    raise AttributeError(f"module 'reclip_ray' has no attribute {name!r}")
