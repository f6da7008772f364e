"""Image-side modules that turn a reference image into the extra K/V tokens of the UNet's
cross-attention: RealCustom's adaptive scoring module (``scoring``), RealCustom++'s cross-layer
cross-scale projector (``ccp``) and the SigLIP + DINOv2 features it reads (``features``), and the
public RealCustom++ checkpoint's key map (``public_checkpoint``)."""
