"""trove: PEER layers whose expert tables live as int4/int8 records in a `.trove` store.

The C++ core is the extension module `trove._core` (python/core.cc, built by the project's
CMake); `trove.torch` holds the PyTorch module and optimizer. `import trove` does not import
torch.

In a development checkout the extension is built into <build>/python/trove, not beside this
file: ./dev setup puts both folders on the virtual environment's path, and extend_path below
joins them into one package. A wheel (`pip install .`) has both in one folder.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

from . import _core  # noqa: E402  (after the path is complete)

__version__ = "0.1.0"


def store_layers(path):
    """The names of the layers in the store at `path` (training state layers included)."""
    return _core.store_layers(str(path))
