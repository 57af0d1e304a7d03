"""The spacetime transformer: ``model`` (blocks, heads, the training and the KV-cached inference entry points),
``attention`` (GQA, QK-norm, KV cache; SDPA / FlexAttention), ``rope`` (the 4-axis RoPE), ``sequence`` (the packed
training sequence and its attention rule).

May import: ``config`` and the pure ``generation.schedules`` (clip layout, the semantic/detail rules). It holds no
schedule rule and no sampling: which head a step uses comes from the plan, and bits are drawn in ``generation``.
"""
