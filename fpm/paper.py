"""The paper's published numbers (Shen, "FPM", arXiv 2111.04909), for comparisons only.

Per-model figures of Tables 2 and 4 live in each recipe's ``paper:`` block; this module holds
what is not per recipe: Table 2's order, Table 3 (QQP dev by depth) and the TNEWS figures quoted in
§4.3 (the task recipes' ``paper:`` blocks repeat them; tests/test_recipes.py checks they agree).
"""

from __future__ import annotations

TABLE2_ORDER = [
    "bert-c", "bert-e-s", "bert-e-m", "bert-e-l", "bert-e-x", "bert-e-e", "bert-x-cn-s",
    "bert-x-en-s", "bert-x-en-m", "cpm-x-s", "cpm-x-m", "cpm-x-l", "cpm-x-eva", "epm-x-s",
    "epm-x-m", "epm-x-l", "epm-x-x", "cpm-2-x-s", "cpm-2-x-m", "epm-2-x-s",
]

# Table 3: QQP *dev*, one run per depth, percentages as printed.
TABLE3_QQP_DEV = {
    50: {"model": "BERT-E-S", "precision": 89.84, "recall": 90.42, "f1": 90.11, "accuracy": 90.73},
    60: {"model": "BERT-E-M", "precision": 89.84, "recall": 90.43, "f1": 90.12, "accuracy": 90.73},
    70: {"model": "BERT-E-L", "precision": 90.55, "recall": 91.19, "f1": 90.85, "accuracy": 91.42},
    80: {"model": "BERT-E-X", "precision": 89.99, "recall": 90.39, "f1": 90.18, "accuracy": 90.82},
    90: {"model": "BERT-E-E", "precision": 90.00, "recall": 90.68, "f1": 90.31, "accuracy": 90.91},
}

# §4.3: BERT-C on CLUE TNEWS, dev accuracy after 70k fine-tuning steps; the paper sets it beside
# ALBERT-xxlarge's 59.46, a CLUE leaderboard *test* accuracy.
TNEWS_BERT_C_ACCURACY = 65.86
TNEWS_ALBERT_XXLARGE_TEST_ACCURACY = 59.46

A100_PEAK_TFLOPS = 312.0  # dense bf16/fp16; Table 4's "flops" = GPU-hours x 3600 x this
