"""Small generic utilities with no tide-ds knowledge (files, locks)."""
