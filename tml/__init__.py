"""tml: decoder-only transformers with Multi-head Latent Attention, trained from scratch on Lightning Fabric.

`tml.load(path)` gives a trained model (tml/pretrained.py); everything else is reached through its module.
"""

__all__ = ["load"]


def __getattr__(name: str):
    # Imported on first use: loading pulls in torch and Lightning (seconds), which `import tml.config` never needs.
    if name == "load":
        from tml.pretrained import load

        return load
    raise AttributeError(f"module 'tml' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])  # `load` for tab completion, though it is imported on first use
