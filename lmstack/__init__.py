"""lmstack: a small causal-LM pretraining stack with per-layer token mixers."""

import importlib.abc
import importlib.util
import sys

from lmstack.errors import ConfigError, LMStackError

__version__ = "0.1.0"
__all__ = ["ConfigError", "LMStackError", "__version__"]


def _register_auto_classes() -> None:
    # Exported models load with the Auto factories without trust_remote_code once lmstack is imported.
    try:
        from lmstack.export.hf import register_auto_classes
    except ImportError:  # transformers missing: the core library still works
        return
    register_auto_classes()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Registers the Auto classes right after `transformers` is first imported, so that `import
    lmstack` (and so every CLI command) does not pay for importing transformers itself."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module) -> None:
                exec_module(module)
                _register_auto_classes()

            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_auto_classes()
else:
    sys.meta_path.insert(0, _RegisterAfterTransformers())
