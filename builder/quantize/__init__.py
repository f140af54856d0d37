"""The quantize stage, between export and compile: FP32 ONNX -> INT8 (Q/DQ, or weight-only for the
LLM) gated against FP32 on held-out inputs with :mod:`builder.compare`, walking a fallback ladder
(:mod:`.ladder`) per component, then the pipeline gate over all of them (:mod:`.pipeline`,
:mod:`.stage`). Calibration data goes through the server's own preprocessing.
"""
