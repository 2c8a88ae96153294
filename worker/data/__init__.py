"""TinyStories text → ``train.bin`` / ``val.bin`` of GPT-2 tokens, plus ``manifest.json``.

One module per step, in the order the data flows:

- ``sources``: where stories come from (the Hugging Face hub, an http(s) URL, a folder, a file);
- ``encoding``: the text format, chunks cut at separator lines, the train/val rule for a single
  file, and encoding in worker processes;
- ``preparation``: ``prepare``, which writes the token files and then the manifest;
- ``manifest``: the data folder's format, ``DataError``, and the reader API (``read_manifest``,
  ``load_split``).
"""

from worker.data.encoding import DEFAULT_CHUNK_BYTES, read_chunks
from worker.data.manifest import MANIFEST, DataError, load_split, read_manifest
from worker.data.preparation import DEFAULT_VAL_FRACTION, prepare

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_VAL_FRACTION",
    "MANIFEST",
    "DataError",
    "load_split",
    "prepare",
    "read_chunks",
    "read_manifest",
]
