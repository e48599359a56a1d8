"""Training data: collation of `avar_ops.data` records into Qwen2.5-VL batches with token groups, and VARD
data synthesis (describe, reason with reflection, anchor) with its recipe and prompt templates."""
