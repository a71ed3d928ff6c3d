"""Input data: ImageCoDe, captions, MMVP-VLM, generated sets, preprocessing and the grain pipeline.

imagecode.py   the downloaded ImageCoDe folder → examples; direct grain source; `python -m ...imagecode` doctor
doctor.py      checks of a whole folder, every damaged set listed
captions.py    BLIP caption JSONs (COCO, Visual Genome) for stage 1
records.py     TFDS builders writing array_record (no TensorFlow) and sources reading them back
synthetic.py   generated ImageCoDe-layout data for the CPU main job and the tests
mmvp.py        MMVP-VLM statement pairs
preprocess.py  tokenizer, JPEG decoding, resize + CLIP normalisation
augment.py     random resized crop, RandAugment (the project's ops or BLIP's), flips; shared or per image
text_cleaning.py  the authors' `pre_caption` text cleaning (fine-tuning and stage-1 rules)
transforms.py  per-example work done in the pipeline's workers
pipeline.py    grain: shards, shuffle, batches, resumable iterators, global jax.Arrays
grouped.py     batches of whole sets (each set's images once, with all its descriptions); evaluation's plan
set_sampler.py the training plan of grouped batches: seeded set order, packed epoch after epoch, resumable
benchmark.py   input throughput
errors.py      DataError and the raise-or-skip policy

Imports, for every module here: each other only.
"""
