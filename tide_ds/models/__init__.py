"""Model files (single-device, Hugging Face style) and checkpoint I/O.

* ``tide_ds.models.hf_weights``: safetensors save/load in the Hugging Face layout (single or sharded).
* ``tide_ds.models.qwen3``: the BD3LM student on transformers' Qwen3 classes (``BD3LMStudent``,
  ``build_student``, ``load_student``, ``save_student``, ``tiny_student_config``).

Model files are imported by their module path, so that checkpoint I/O does not pull in transformers.
"""

from tide_ds.models.hf_weights import list_checkpoint_keys, load_safetensors_checkpoint, save_safetensors_checkpoint

__all__ = ["list_checkpoint_keys", "load_safetensors_checkpoint", "save_safetensors_checkpoint"]
