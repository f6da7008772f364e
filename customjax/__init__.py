"""customjax: subject-driven text-to-image customization in JAX/Flax.

The Python API is :mod:`customjax.api` (``api.Customizer``: load a base and a method's adapter, sample;
``api.load_config``, ``api.train``, ``api.export``); its names but ``train`` / ``export`` (the
command modules ``customjax.train`` / ``customjax.export``) are also here, loaded on first use."""

_API = ("Customizer", "Samples", "load_config", "CaseError")


def __getattr__(name):
    if name in _API:
        from customjax import api

        return getattr(api, name)
    raise AttributeError(f"module 'customjax' has no attribute {name!r}")


__all__ = list(_API)
