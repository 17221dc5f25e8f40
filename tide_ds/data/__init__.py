"""Data: the offline Qwen3 tokenizer (``tokenizers``), the pre-tokenized demo corpus (``corpus``) and
training/evaluation batches with exact resume (``loader``). Training never tokenizes (DESIGN decision 7).
"""
