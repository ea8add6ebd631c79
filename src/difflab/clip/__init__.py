"""CLIP tools: the course's personalisation scores (grade_hw2_3.py semantics, done once per
model load) and zero-shot classification with optional prompt ensembling.

Submodules: ``model`` (offline loading, batched features), ``score`` (CLIP image/text
scores, top-5 ranking, PASS verdicts), ``zeroshot`` (top-1/top-5, ensembling, cases),
``templates`` (prompt templates, data only), ``testing`` (random CLIP folders).
"""
