"""Export forms: the same functions as the student's reference path, cheaper as ONNX graphs.

Masked gathers. The reference ops (`kernels.reference.embedding_bag`, `Student.wide_logits`)
gather rows with the padding clamped to row 0, then overwrite the padded rows with
`Where(mask, rows, fill)` over the whole gathered [N, L, D] tensor. In the mean student's ORT fp32
graph those `Where`s were 40% of the time at batch 1024 (the medication bag 15%, the wide max 15%).
Here the table gets one more row holding the fill (0 for a sum, -1e9 for a max) and the padding
index -1 gathers it - ONNX GatherND and torch indexing both read -1 as the last row. The values are
the same: a sum gains exact zeros in the same order, a max the same -1e9.

The visit block. `Student.hidden_state` keeps only the current visit's output of the visit block,
so its query, attention output, projection and FFN are computed for that slot alone
(`last_query_forward`); keys and values still cover every visit. Sorted synth batches hold 1.62
visit slots per patient, so those matmuls shrink by 38%.

`export_onnx` checks the forms against the student on its example batch before exporting.

    padded_embedding_bag(weight, codes, mode)   # kernels.embedding_bag during export
    padded_wide_logits(model, d, p, m)          # Student.wide_logits during export
    last_query_forward(block, x, mask)          # model.visit_block.forward during export
    fold_constant_concats(path)                 # the [V + 1, D] tables as initializers
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def padded_embedding_bag(weight, codes, mode: str = "sum"):
    """`reference.embedding_bag` (same signature and values) with a zero row for the padding."""
    import torch

    table = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])  # [V + 1, D], row V = row -1 = zeros
    out = table[codes.clamp(min=-1)].float().sum(dim=1)  # [N, L] -> [N, L, D] -> [N, D]
    if mode == "mean":
        out = out / (codes >= 0).sum(dim=1, keepdim=True).clamp(min=1).to(out.dtype)
    return out.to(weight.dtype)


def padded_wide_logits(model, diagnoses, procedures, medications):
    """`Student.wide_logits` for the full-table max path (the default), with a -1e9 row for the
    padding; the mean and low-rank variants go to the student's own method unchanged."""
    import torch

    from leader_edge.train.student import NEG, Student

    if model.config.wide != "max" or model.wide_meds is not None:
        return Student.wide_logits(model, diagnoses, procedures, medications)
    codes = torch.cat([diagnoses[:, -1], procedures[:, -1], medications[:, -1]], dim=1)  # [B, L] the current visit
    table = torch.cat([model.wide_codes, model.wide_codes.new_full((1, model.wide_codes.shape[1]), NEG)])
    best = table[codes.clamp(min=-1)].amax(dim=1)  # [B, L] -> [B, L, n_meds] -> [B, n_meds]
    return torch.where((codes >= 0).any(dim=1, keepdim=True), best, 0.0)


def last_query_forward(block, x, mask):
    """`Block.forward(x, mask)[:, -1:]`: x [N, T, dim], mask [N, T] bool -> [N, 1, dim], the last
    position's output (the only one `Student.hidden_state` reads)."""
    import math

    import torch

    from leader_edge.train.student import NEG

    n, t, d = x.shape
    h = block.heads
    q, k, v = block.qkv(block.norm1(x)).chunk(3, dim=-1)
    q = q[:, -1:]  # [N, 1, dim]: only the current visit asks
    q, k, v = (z.reshape(n, z.shape[1], h, d // h).transpose(1, 2) for z in (q, k, v))  # [N, heads, T or 1, dim / heads]
    bias = torch.where(mask, 0.0, NEG)[:, None, None, :]  # [N, 1, 1, T]
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h) + bias, dim=-1)
    y = (att @ v).transpose(1, 2).reshape(n, 1, d)
    x = x[:, -1:] + block.drop(block.out(y))
    return x + block.drop(block.ffn(block.norm2(x)))


def fold_constant_concats(path: str | Path) -> int:
    """Replace each Concat of constants (an initializer + a ConstantOfShape row) by one initializer,
    in place, so the padded tables reach `quantize_embeddings` as GatherND initializers.

    Returns:
        The number of Concat nodes folded.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    folded, keep = 0, []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in const:
            value = numpy_helper.to_array(node.attribute[0].t) if node.attribute else np.zeros(1, np.float32)
            const[node.output[0]] = np.full(tuple(const[node.input[0]]), value.reshape(-1)[0], dtype=value.dtype)
            keep.append(node)
        elif node.op_type == "Concat" and all(i in const for i in node.input):
            axis = next(a.i for a in node.attribute if a.name == "axis")
            table = np.concatenate([const[i] for i in node.input], axis=axis)
            const[node.output[0]] = table
            graph.initializer.append(numpy_helper.from_array(table, node.output[0]))
            folded += 1
        else:
            keep.append(node)
    used = {i for n in keep for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in keep if n.op_type != "ConstantOfShape" or n.output[0] in used]
    used = {i for n in keep for i in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(keep)
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    onnx.save(model, str(path))
    return folded
