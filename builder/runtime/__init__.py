"""Serving-side logic shared by the Python-backend models; imports numpy/Pillow/onnxruntime/tokenizers only, never torch."""
