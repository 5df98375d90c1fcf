"""lmstack: a small causal-LM pretraining stack with per-layer token mixers."""

from lmstack.errors import ConfigError, LMStackError

__version__ = "0.1.0"
__all__ = ["ConfigError", "LMStackError", "__version__"]


def _register_auto_classes() -> None:
    # `import lmstack` makes exported models loadable by the Auto factories without trust_remote_code.
    try:
        from lmstack.export.hf import register_auto_classes
    except ImportError:  # transformers missing: the core library still works
        return
    register_auto_classes()


_register_auto_classes()
