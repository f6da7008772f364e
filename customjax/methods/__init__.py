"""Customization methods: the protocol (:mod:`~customjax.methods.protocol`), one module per method,
the registry (:mod:`~customjax.methods.registry`), and what the trainer and sampler build from a
method config (:mod:`~customjax.methods.build`, :mod:`~customjax.methods.objective`)."""
