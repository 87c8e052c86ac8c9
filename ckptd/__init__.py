"""ckptd: publish training checkpoints to W&B Artifacts from outside the training process."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ckptd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
