"""Data: the offline Qwen3 tokenizer (``tokenizers``), the pre-tokenized demo corpus (``corpus``) and
training/evaluation batches with exact resume (``loader``). Training never tokenizes (docs/design.md decision 7).
"""
