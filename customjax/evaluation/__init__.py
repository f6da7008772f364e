"""One evaluation for every method (``python -m customjax.evaluate``).

  * :mod:`.stats`: means with bootstrap 95% intervals over groups (subjects, pairs), paired differences;
  * :mod:`.store`: the resumable sample store (one PNG per finished image, written atomically);
  * :mod:`.methods`: the evaluated methods (adapter exports, fine-tuned concept exports, text-only rows)
    behind one sampling interface;
  * :mod:`.encoders`: CLIP and DINO image encoders from Hugging Face folders with their image
    processors' preprocessing (DINO ViT-S/16 for DINO-I, any ``CLIPModel`` for CLIP-T / CLIP-I);
  * :mod:`.dreambench`: the DreamBench protocol (subjects folder, prompt list, CLIP-T, CLIP-I, DINO-I,
    and with masks the segmented R-/E- variants of CustomContrast);
  * :mod:`.run`: the sampling loop (progress bar, resumable, SIGTERM-safe);
  * :mod:`.report`: results table, similarity-controllability frontier plot, sample grid.

The ShapeWorld protocol (exact scores) lives with the lab: :mod:`customjax.shapeworld.benchmark.comparison`.
"""
