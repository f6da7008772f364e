"""Jitted samplers: plain text-to-image (``t2i``) and the RealCustom dual-branch sampler (``dual_branch``)."""
