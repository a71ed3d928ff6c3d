"""Input data: ImageCoDe, captions, generated sets, preprocessing and the grain pipeline."""
