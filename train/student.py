"""LEADER(S): the compact ID-based student that ships to the bedside.

Read top to bottom: config, attention block, the model (one file on purpose, ~590 lines: the
whole model and the counting prior it corrects, readable in one go as nanoGPT's is). Inputs come from
`leader_edge.bedside.encoding.Encoder.encode` (see its docstring for the id conventions).

Tensor path for export (`Student.logits` / `Student.predict_proba`), all int64, names as in
`leader_edge.bedside.encoding.INPUT_NAMES`; B (batch), K (visit slots), L* (codes) are dynamic:
    diagnoses    int64 [B, K, Ld]  shared code ids, -1 padded
    procedures   int64 [B, K, Lp]
    medications  int64 [B, K, Lm]  medications of the PREVIOUS visit in each slot
    profile      int64 [B, F]      profile ids, -1 = none
    visit_mask   int64 [B, K]      1 = real visit; visits right-aligned, slot K-1 = current visit
Output: float32 [B, n_meds] logits or probabilities, columns in `Encoder.codes["medication"]` order.

Architecture (LEADER-NOTES, with two additions):
    code ids -> shared embedding [*, D] (+ an embedding of the code's ICD/ATC parent group, so a
    rare code borrows from its frequent siblings) -> one transformer block per code type over a visit's codes
    -> masked mean (kernels.embedding_bag) = one vector per kind per visit (`set_encoder="mean"`:
    masked mean of the embeddings, then a residual MLP per kind - DeepSets, no per-code matmul);
    medication stream shifted by one visit, the oldest visit's slot holding the profile vector
    (mean of profile field embeddings); visit vector = [diag, proc, med] (3D);
    + learned position-from-current-visit embedding (the release had none: visit order was invisible);
    one transformer block over visits; the current visit's output -> MLP -> head logits;
    + a wide path (Wide & Deep, `wide_logits`): a logit vector per code, masked max over the current
    visit's codes and previous medications, added to the head's logits (synth, no-distill: val PRAUC
    0.6075 -> 0.6358, test Jaccard 0.417 -> 0.445). Where kernels run, deep + wide + prior is one
    `kernels.wide_max_head` pass (`fused_head`).
Eager, training and export run this code as written (export/onnx.py patches nothing): the bags
call `kernels.embedding_bag` only where a kernel runs (CUDA, or backend="triton"); on CPU, and so
under export, they are the padded gather (`Student.bag`), the reference's values with no
data-dependent check. The visit block computes only the current slot's query and FFN (`Block`,
`last`). Only gathers, matmuls, masks and fixed-shape reductions: no nn.EmbeddingBag, no Python
branches on data, so torch.onnx traces it with a dynamic batch. Masked attention uses a finite
-1e9 bias, so an all-padding row (a visit with no procedures) softmaxes to a harmless uniform row
instead of NaN. `logit_parts` splits the logit into what a reader can be shown (explain.onnx).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from leader_edge import kernels
from leader_edge.errors import ConfigError

NEG = -1e9  # attention bias for padding: finite, so fully padded rows stay NaN-free
PRIOR_RULES = ("mean", "max", "noisy_or", "specificity")  # leader_edge.evaluation.baselines.RULES, the order of `prior_mix`
P_CLAMP = 1e-4  # the prior's probabilities are clamped to [P_CLAMP, 1 - P_CLAMP] before the logit


def current_codes(diagnoses: torch.Tensor, procedures: torch.Tensor, medications: torch.Tensor) -> torch.Tensor:
    """The current visit's codes [B, Ld + Lp + Lm]: its diagnoses, procedures and the previous
    visit's medications (slot K-1), in that order: the wide path's and prior's inputs, and the
    slots of `Student.logit_parts`."""
    return torch.cat([diagnoses[:, -1], procedures[:, -1], medications[:, -1]], dim=1)


def padded_rows(table: torch.Tensor, codes: torch.Tensor, fill: float) -> torch.Tensor:
    """table [V, D] rows named by codes int64 [N, L] -> [N, L, D], the padding -1 reading a row of
    `fill` (0 for a sum, NEG for a max): torch indexing and ONNX Gather both read -1 as the last row
    of the [V + 1, D] table, so no mask pass over [N, L, D] is needed."""
    padded = torch.cat([table, table.new_full((1, table.shape[1]), fill)])  # [V + 1, D], row V = row -1
    return padded[codes.clamp(min=-1)]


def packed_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes int64 [B, L] (-1 padded anywhere) -> [B, L']: each row's codes in the same order, its
    padding after them, L' = the most codes any row holds (at least 1, a padding column when every
    row is empty). What the wide path and the prior compute is the same over these slots - a max, or
    sums to which padding adds exact zeros - and their [B, L, n_meds] gathers shrink with L: the
    current visit's diagnoses, procedures and previous medications, each padded to the batch's
    widest visit of any slot, were ~half padding on sorted synth batches. An index sort and a gather
    on [B, L]; the width is data (exported as a Slice whose end the graph computes)."""
    length = codes.shape[1]
    mask = codes >= 0
    pos = torch.arange(length, device=codes.device)
    order = torch.sort(torch.where(mask, pos, pos + length), dim=1).indices  # real slots first, in order
    width = mask.sum(dim=1).max().clamp(min=1).item()
    torch._check(width >= 1)
    torch._check(width <= length)
    return torch.gather(codes, 1, order).narrow(1, 0, width)


def sum_terms(terms: dict) -> torch.Tensor:
    """deep + wide + prior of `Student.logit_terms` (the terms present) -> [B, n_meds] logits."""
    out = terms["deep"]
    for name in ("wide", "prior"):
        if terms[name] is not None:
            out = out + terms[name]
    return out


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(P_CLAMP, 1 - P_CLAMP)
    return torch.log(p) - torch.log1p(-p)


# ONNX has no Log1p/Expm1: torch.onnx writes log(1 + x) and exp(x) - 1, which lose the relative
# digits of a small x (onnxruntime's prior shares of the demo student were 1.8e-3 off torch's). Where
# relative digits count, Kahan's corrections (Log, Exp and arithmetic only) make torch and
# onnxruntime agree to float32 rounding; elsewhere torch.log1p's absolute error (6e-8) is enough.
def log1p(x: torch.Tensor) -> torch.Tensor:
    """log(1 + x), accurate for small |x| in torch and in ONNX."""
    u = 1 + x
    return torch.where(u == 1, x, torch.log(u) * (x / torch.where(u == 1, 1.0, u - 1)))


def expm1(x: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 for x <= 0, accurate for small |x| in torch and in ONNX."""
    u = torch.exp(x)
    return torch.where(u == 1, x, (u - 1) * (x / torch.where(u == 1, -1.0, torch.log(u))))


# Fields added after students were first saved, with the behaviour such a student was trained with.
LEGACY = {"set_encoder": "transformer", "prior": "none", "prior_rule": "max"}


@dataclass
class StudentConfig:
    """The student's settings: the one definition of each and of its default (the shipped recipe's;
    `DistillConfig` reads them from here). Built by `distill.train_student`, saved with the weights."""

    n_codes: int  # rows of the shared code table (Encoder.n_codes)
    n_meds: int  # label space (Encoder.n_meds)
    n_profile_ids: int  # rows of the profile table (Encoder.n_profile_ids)
    med_offset: int  # shared id of medication 0 (Encoder.med_offset)
    n_groups: int = 0  # code groups (Encoder.code_groups); 0 = no group embeddings
    dim: int = 64  # LEADER(S) code embedding size; the visit vector is 3 * dim
    heads: int = 4  # 16-dim heads at dim 64
    hidden: int = 128  # MLP head 192 -> 128 -> n_meds, as the release; also the distilled state
    max_visits: int = 8  # position table size; must be >= Encoder.max_visits
    dropout: float = 0.4  # 2.5k training samples on synth: 0.2 peaked at epoch 11 with val PRAUC 0.650, 0.4 reached 0.666
    ffn_mult: int = 2  # 2x FFN keeps the visit block at ~0.3M params (4x: ~0.44M)
    teacher_dim: int = 0  # teacher hidden size; 0 = no distillation projection
    # Feature MSE weight. LEADER uses 0.4 (MIMIC-III); on default synth with the smollm2-12-layer teacher
    # (test PRAUC 0.54, below the label-only student) 0.4 and 1.0 peak at epoch 1 (val PRAUC 0.640/0.641),
    # 0.1 trains normally and reaches val PRAUC 0.644 (no-distill 0.636).
    alpha: float = 0.1
    info_nce: float = 0.005  # profile/medication alignment weight (LEADER MIMIC-III)
    temperature: float = 0.1  # InfoNCE temperature on cosine similarities
    ddi_weight: float = 0.0  # expected interacting pairs penalty; 0 = off (LEADER has none)
    wide: str = "max"  # wide path over the current visit's codes: "max", "mean" or "none" (see `wide_logits`)
    wide_rank: int = 0  # 0: a full [n_codes, n_meds] table; r > 0: [n_codes, r] x [r, n_meds] (MIMIC size needs it)
    # Per-kind set encoder over a visit's codes. "transformer": one block over the codes, then the
    # masked mean; "mean" (DeepSets): masked mean of the code embeddings, then a residual MLP on the
    # pooled vector - no per-code matmul, the cost that was ~72% of `leader-edge predict`. Default
    # synth, no-distill, seeds 42/1/2: val PRAUC transformer 0.6358/0.6458/0.6320, "mean"
    # 0.6435/0.6392/0.6347 (equal within noise); model-only ORT fp32 batch 1024 3.7x faster.
    set_encoder: str = "mean"
    # Counting as a prior the model corrects: "frequency" adds the frequency baseline's logit (its
    # co-occurrence tables are buffers, set with `set_prior`) to every logit, so a student whose
    # learned terms are 0 IS the baseline. `prior_rule` is the baseline's combination rule, or
    # "stack": a learned weighted sum of all four rules' logits (`prior_mix`, fitted on out-of-fold
    # scores before training; default synth validation PRAUC 0.6494 vs 0.6403 for "max" alone).
    prior: str = "frequency"
    prior_rule: str = "stack"
    backend: str = "auto"  # kernels backend on CUDA ("triton" forces the kernels); CPU runs the torch forms

    def __post_init__(self) -> None:
        for name in ("n_codes", "n_meds", "dim", "heads", "hidden", "max_visits", "ffn_mult"):
            if getattr(self, name) < 1:
                raise ConfigError(f"StudentConfig.{name}={getattr(self, name)} must be >= 1")
        if self.dim % self.heads:
            raise ConfigError(f"StudentConfig.dim={self.dim} must be divisible by heads={self.heads}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"StudentConfig.dropout={self.dropout} must be in [0, 1)")
        if self.backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"StudentConfig.backend={self.backend!r}; use 'auto', 'torch' or 'triton'")
        if self.wide not in ("max", "mean", "none"):
            raise ConfigError(f"StudentConfig.wide={self.wide!r}; use 'max', 'mean' or 'none'")
        if self.set_encoder not in ("transformer", "mean"):
            raise ConfigError(f"StudentConfig.set_encoder={self.set_encoder!r}; use 'transformer' or 'mean'")
        if self.prior not in ("none", "frequency"):
            raise ConfigError(f"StudentConfig.prior={self.prior!r}; use 'none' or 'frequency'")
        if self.prior_rule not in (*PRIOR_RULES, "stack"):
            raise ConfigError(f"StudentConfig.prior_rule={self.prior_rule!r}; use one of {', '.join(PRIOR_RULES)} or 'stack'")
        if self.wide_rank < 0:
            raise ConfigError(f"StudentConfig.wide_rank={self.wide_rank} must be >= 0 (0 = full table)")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, **override) -> "StudentConfig":
        """The config of a saved student. Fields added after a student was saved take the value they
        had before they existed (`LEGACY`), not today's default, so the student loads as trained."""
        return cls(**{**LEGACY, **data, **override})


class Block(nn.Module):
    """Pre-norm transformer block over a padded set/sequence with a key mask."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *, last: bool = False) -> torch.Tensor:
        """x [N, T, dim], mask [N, T] bool (True = real) -> [N, T, dim]; with `last`, [N, 1, dim]: the
        last position's output alone. Keys and values still cover every position, but only the last
        one asks (its query, projection and FFN): the visit block's caller reads nothing else, and
        sorted synth batches hold 1.62 visit slots per patient, so those matmuls shrink by 38%."""
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        if last:
            q, x = q[:, -1:], x[:, -1:]  # [N, T, dim] -> [N, 1, dim]
        # [N, T or 1, dim] -> [N, heads, T or 1, dim / heads]
        q, k, v = (z.reshape(n, z.shape[1], self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        bias = torch.where(mask, 0.0, NEG)[:, None, None, :]  # [N, 1, 1, T]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(n, x.shape[1], d)
        x = x + self.drop(self.out(y))
        return x + self.drop(self.ffn(self.norm2(x)))


class SetMLP(nn.Module):
    """DeepSets rho: a pre-norm residual MLP on a pooled set vector, [N, dim] -> [N, dim]."""

    def __init__(self, dim: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.ffn(self.norm(x)))


class Student(nn.Module):
    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        c = self.config = config
        self.code_emb = nn.Parameter(torch.randn(c.n_codes, c.dim) * 0.02)
        # Group embedding added to each code's: set with `set_code_groups`, saved with the weights.
        self.group_emb = nn.Parameter(torch.randn(max(c.n_groups, 1), c.dim) * 0.02)
        self.register_buffer("code_group", torch.zeros(c.n_codes, dtype=torch.int64))
        self.profile_emb = nn.Parameter(torch.randn(max(c.n_profile_ids, 1), c.dim) * 0.02)
        set_block = (lambda: Block(c.dim, c.heads, c.ffn_mult, c.dropout)) if c.set_encoder == "transformer" \
            else (lambda: SetMLP(c.dim, c.ffn_mult, c.dropout))
        self.set_blocks = nn.ModuleDict({k: set_block() for k in ("diag", "proc", "med")})
        self.visit_pos = nn.Parameter(torch.randn(c.max_visits, 3 * c.dim) * 0.02)  # index 0 = current visit
        self.visit_block = Block(3 * c.dim, c.heads, c.ffn_mult, c.dropout)
        self.norm = nn.LayerNorm(3 * c.dim)
        self.mlp = nn.Linear(3 * c.dim, c.hidden)
        self.drop = nn.Dropout(c.dropout)
        self.head_weight = nn.Parameter(torch.randn(c.n_meds, c.hidden) * (1 / math.sqrt(c.hidden)))
        self.head_bias = nn.Parameter(torch.zeros(c.n_meds))
        # Wide path: one logit vector per code, zero at start (the caller may set co-occurrence log-odds).
        self.wide_codes = self.wide_meds = None
        if c.wide != "none":
            self.wide_codes = nn.Parameter(torch.zeros(c.n_codes, c.wide_rank or c.n_meds))
            if c.wide_rank:
                self.wide_meds = nn.Parameter(torch.randn(c.wide_rank, c.n_meds) / math.sqrt(c.wide_rank))
        if c.prior != "none":  # the frequency baseline's tables over the shared code ids (`set_prior`)
            self.register_buffer("prior_table", torch.zeros(c.n_codes, c.n_meds))  # P(med | code), smoothed
            # The "specificity" rule's weight log(1 + visits / count) of each code; 0 = never seen by the baseline.
            self.register_buffer("prior_weight", torch.zeros(c.n_codes))
            self.register_buffer("prior_global", torch.full((c.n_meds,), 0.5))  # P(med), the always-present feature
            self.register_buffer("prior_global_weight", torch.ones(1))  # its specificity weight (log 2)
            if c.prior_rule == "stack":  # logit weight of each rule in PRIOR_RULES order
                self.prior_mix = nn.Parameter(torch.zeros(len(PRIOR_RULES)))
        # Training only: maps the student hidden state onto the teacher's feature space.
        self.proj = nn.Linear(c.hidden, c.teacher_dim) if c.teacher_dim > 0 else None

    def set_code_groups(self, groups) -> None:
        """groups: int64 [n_codes] group of each shared code id (`Encoder.code_groups()`)."""
        groups = torch.as_tensor(groups, dtype=torch.int64)
        if groups.shape != self.code_group.shape or (self.config.n_groups and int(groups.max()) >= self.config.n_groups):
            raise ValueError(f"code groups of shape {tuple(groups.shape)} (max {int(groups.max())}) do not fit "
                             f"n_codes={self.config.n_codes}, n_groups={self.config.n_groups}; use Encoder.code_groups()")
        self.code_group.copy_(groups)

    def set_prior(self, table, weight, global_row, global_weight: float) -> None:
        """The frequency baseline as buffers: table [n_codes, n_meds] P(med | code), weight [n_codes]
        the specificity weight (> 0; 0 for codes the baseline never saw), global_row [n_meds] P(med),
        global_weight (its specificity weight)."""
        if self.config.prior == "none":
            raise ValueError("set_prior on a student with prior='none'; build it with StudentConfig(prior='frequency')")
        t = torch.as_tensor(table, dtype=torch.float32)
        if t.shape != self.prior_table.shape:
            raise ValueError(f"prior table of shape {tuple(t.shape)}; this student needs {tuple(self.prior_table.shape)}")
        self.prior_table.copy_(t)
        self.prior_weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        self.prior_global.copy_(torch.as_tensor(global_row, dtype=torch.float32))
        self.prior_global_weight.fill_(float(global_weight))

    def for_export(self) -> "Student":
        """The same function in fewer ops, to trace (`export.onnx.export_onnx`): a copy whose code
        rows hold code + group, with the group path off. Every set encoder reads a code as the sum of
        its row and its group's row (the mean encoder as mean(code) + mean(group), which equals
        mean(code + group)), so the graph gathers and sums one table per kind instead of two:
        model.onnx ~6% faster on the demo student (32.3k -> 34.3k patients per CPU second, one run).
        Equal within float32 rounding; self when the student has no groups."""
        if not self.config.n_groups:
            return self
        out = Student(replace(self.config, n_groups=0))
        state = {k: v.clone() for k, v in self.state_dict().items() if k not in ("group_emb", "code_group")}
        state["code_emb"] = (self.code_emb.detach() + self.group_emb.detach()[self.code_group]).to(self.code_emb.dtype)
        # assign: each tensor keeps its dtype and device (bf16 tables stay bf16), as in the student traced
        missing, unexpected = out.load_state_dict(state, strict=False, assign=True)
        if unexpected or set(missing) != {"group_emb", "code_group"}:
            raise RuntimeError(f"for_export: unexpected state {unexpected}, missing {missing}")
        return out.train(self.training)

    def n_params(self, *, inference: bool = True) -> int:
        """Parameters; `inference` leaves out the distillation projection (not exported)."""
        skip = {id(p) for p in self.proj.parameters()} if (inference and self.proj is not None) else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    # -- encoders ---------------------------------------------------------------------------------

    def bag(self, table: torch.Tensor, codes: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Masked sum or mean of `table` [V, D] rows named by codes int64 [N, L] (-1 padded) -> [N, D];
        a bag with no code gives 0.

        Where a kernel runs (CUDA tensors with backend "auto", or backend "triton") this is
        `kernels.embedding_bag`. Elsewhere - CPU training, eager, and so every export - it is the
        padded gather (`padded_rows`): no mask pass over the gathered [N, L, D] (the reference's
        `Where` over it was 40% of the mean student's ORT fp32 time at batch 1024) and no
        data-dependent branch, so torch.export traces it as written. The values are the
        reference's: the sum gains exact zeros in the same order.
        """
        backend = self.config.backend
        if backend == "triton" or (backend == "auto" and codes.is_cuda):
            return kernels.embedding_bag(table, codes, mode=mode, backend=backend)
        out = padded_rows(table, codes, 0.0).float().sum(dim=1)  # [N, L] -> [N, L, D] -> [N, D]
        if mode == "mean":
            out = out / (codes >= 0).sum(dim=1, keepdim=True).clamp(min=1).to(out.dtype)
        return out.to(table.dtype)

    def encode_sets(self, codes: torch.Tensor, kind: str) -> torch.Tensor:
        """codes int64 [N, L] (-1 padded) -> [N, dim]: set block, then masked mean of its outputs
        ("transformer"), or masked mean of the embeddings, then the set MLP ("mean")."""
        n, length = codes.shape
        mask = codes >= 0
        ids = codes.clamp(min=0)
        if self.config.set_encoder == "mean":
            # mean(code + group) = mean(code) + mean(group): two bags gathering straight from the tables,
            # so the exporter's int8 embedding pass still finds them as Gather inputs.
            x = self.bag(self.code_emb, codes)
            if self.config.n_groups:
                x = x + self.bag(self.group_emb, torch.where(mask, self.code_group[ids], -1))
            return self.set_blocks[kind](x)
        x = self.code_emb[ids]  # [N, L] -> [N, L, dim]
        if self.config.n_groups:
            x = x + self.group_emb[self.code_group[ids]]
        x = self.set_blocks[kind](x, mask)
        # Masked mean as an embedding bag over the block's output rows: row n*L+l, -1 where padded.
        rows = torch.arange(n * length, device=codes.device).reshape(n, length)
        return self.bag(x.reshape(n * length, -1), torch.where(mask, rows, -1))

    def profile_vector(self, profile: torch.Tensor) -> torch.Tensor:
        """profile int64 [B, F] -> [B, dim], mean of the field embeddings."""
        return self.bag(self.profile_emb, profile)

    def hidden_state(
        self, diagnoses: torch.Tensor, procedures: torch.Tensor, medications: torch.Tensor,
        profile: torch.Tensor, visit_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs as in the module docstring -> (hidden [B, hidden], profile vector [B, dim])."""
        b, k = visit_mask.shape
        sets = []
        for kind, codes in (("diag", diagnoses), ("proc", procedures), ("med", medications)):
            pooled = self.encode_sets(codes.reshape(b * k, -1), kind)  # [B*K, L] -> [B*K, dim]
            sets.append(pooled.reshape(b, k, -1))
        mask = visit_mask > 0
        prof = self.profile_vector(profile)
        # The oldest real visit has no previous medications: the profile vector stands in for them.
        prev = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
        first = (mask & ~prev)[..., None]  # [B, K, 1]
        sets[2] = torch.where(first, prof[:, None, :], sets[2])
        x = torch.cat(sets, dim=-1) + self.visit_pos[:k].flip(0)  # [B, K, 3*dim], slot K-1 gets position 0
        x = self.visit_block(x, mask, last=True)  # [B, 1, 3*dim]: the current visit, attending to its history
        h = self.norm(x[:, -1])
        return self.drop(F.gelu(self.mlp(h))), prof

    # -- the logit: deep head + wide path + counting prior -------------------------------------------

    def logits(self, diagnoses, procedures, medications, profile, visit_mask) -> torch.Tensor:
        """Inputs as in the module docstring -> float32 [B, n_meds] logits (the sum of `logit_terms`)."""
        h, _ = self.hidden_state(diagnoses, procedures, medications, profile, visit_mask)
        codes = current_codes(diagnoses, procedures, medications)
        if self.kernel_head(h):
            return self.fused_head(h, codes)
        return sum_terms(self.logit_terms(h, codes))

    def predict_proba(self, diagnoses, procedures, medications, profile, visit_mask) -> torch.Tensor:
        """Inputs as in the module docstring -> float32 [B, n_meds] probabilities."""
        h, _ = self.hidden_state(diagnoses, procedures, medications, profile, visit_mask)
        codes = current_codes(diagnoses, procedures, medications)
        if self.kernel_head(h):
            return self.fused_head(h, codes, sigmoid=True)
        return torch.sigmoid(sum_terms(self.logit_terms(h, codes)))

    def kernel_head(self, h: torch.Tensor) -> bool:
        """Whether the head runs as `kernels.wide_max_head` - where the bags run their kernel: CUDA
        with backend "auto", or backend "triton". Elsewhere (CPU, export) `logit_terms` in torch."""
        return self.config.backend == "triton" or (self.config.backend == "auto" and h.is_cuda)

    def fused_head(self, h: torch.Tensor, codes: torch.Tensor, *, rule_logits: torch.Tensor | None = None,
                   target: torch.Tensor | None = None, sigmoid: bool = False):
        """`sum_terms(logit_terms(h, codes, rule_logits=...))` as one `kernels.wide_max_head` pass:
        logits, probabilities (`sigmoid`) or, with `target`, (BCE loss, probabilities).

        Fused: h W^T + b, the full wide table's masked max (its [B, L, n_meds] gather never built)
        and the per-row extra logits in the fp32 epilogue. Computed in torch as that extra term, the
        same code `logit_terms` runs: the counting prior (a mix of rule logits, from `rule_logits` or
        the tables) and the wide fallbacks - wide="mean" (a bag of rows) and wide_rank > 0 (the max
        needs each code's [n_meds] row of the low-rank product first).
        """
        fused_wide = self.config.wide == "max" and self.wide_meds is None
        extra = None
        if self.wide_codes is not None and not fused_wide:
            extra = self._wide(codes, False)["wide"]
        if self.config.prior != "none":
            if rule_logits is None:
                rule_logits = self.rule_logits(codes)
            prior = self.mix_prior(rule_logits)
            extra = prior if extra is None else extra + prior
        args = (h, self.head_weight, self.head_bias, self.wide_codes if fused_wide else None,
                codes if fused_wide else None, extra)
        if target is not None:
            return kernels.wide_max_head_loss(*args, target, backend=self.config.backend)
        return kernels.wide_max_head(*args, sigmoid=sigmoid, backend=self.config.backend)

    def logit_parts(self, diagnoses, procedures, medications, profile, visit_mask) -> dict[str, torch.Tensor]:
        """The logit split into what a reader can be shown (export's explain.onnx).

        Slots L = Ld + Lp + Lm are `current_codes`: the current visit's diagnoses, procedures and
        previous medications, in input column order. B rows, M medications.

        Returns:
            deep       float32 [B, M]     the head's h W^T + b.
            wide       float32 [B, M]     wide="max": the max (owed to the code at wide_slot); 0 for
                                          wide="mean" (its shares are in `codes`) and without a wide path.
            wide_slot  int64 [B, M]       wide="max": the slot whose row won (padding never wins); -1 for
                                          a visit with no code, wide="mean" or no wide path.
            codes      float32 [B, L, M]  each slot's share of the counting prior's move away from the
                                          global row's logit, plus for wide="mean" its row / n; 0 on padding.
            rest       float32 [B, M]     what no code owns: the global row's logit, the clamp, rounding.
        deep + wide + codes.sum(1) + rest equals `logits` within 1e-5 (float32 sums of terms up to
        ~20; tests/train/test_student.py). Prior shares (`_rule`): mean/specificity the exact share
        w_l (row_l - g) / (sum w + gw) of the probability's move, max the winning code, noisy_or
        each code's term of log(1 - p); the logit's move is split in those proportions; stack mixes
        the rules' shares by prior_mix. `logits` sums the same terms without the per-code split
        (the [B, L, M] shares would cost model.onnx time for nothing it outputs).
        """
        h, _ = self.hidden_state(diagnoses, procedures, medications, profile, visit_mask)
        codes = current_codes(diagnoses, procedures, medications)
        t = self.logit_terms(h, codes, explain=True)
        deep = t["deep"]
        none = torch.full_like(deep, -1, dtype=torch.int64)
        shares = deep.new_zeros(deep.shape[0], codes.shape[1], deep.shape[1])  # [B, L, M]
        owed = torch.zeros_like(deep)  # the terms the shares split
        if self.config.wide == "mean":
            shares, owed = shares + t["wide_codes"], owed + t["wide"]
        if self.config.prior != "none":
            shares, owed = shares + t["prior_codes"], owed + t["prior"]
        wide = t["wide"] if self.config.wide == "max" else torch.zeros_like(deep)
        return {"deep": deep, "wide": wide, "wide_slot": t.get("wide_slot", none), "codes": shares,
                "rest": owed - shares.sum(dim=1)}

    def logit_terms(self, h: torch.Tensor, codes: torch.Tensor, *, explain: bool = False,
                    rule_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """The logit's terms from hidden states h [B, hidden] and the current visit's codes [B, L]
        (`current_codes`): "deep", "wide", "prior" [B, n_meds] (None: the student has no such term).

        `explain` adds "wide_slot" int64 [B, n_meds] (wide="max") and the per-slot shares
        "wide_codes" (wide="mean") and "prior_codes" [B, L, n_meds] that `logit_parts` reports.
        `rule_logits` [B, n_meds, R]: prior rule logits to mix instead of the tables' (training
        samples' out-of-fold ones).
        """
        terms = {"deep": F.linear(h, self.head_weight, self.head_bias), "wide": None, "prior": None}
        if not explain and not codes.is_cuda and codes.shape[1] > 0:  # explain's shares are per input slot
            codes = packed_codes(codes)
        if self.wide_codes is not None:
            terms.update(self._wide(codes, explain))
        if self.config.prior != "none":
            if rule_logits is not None:
                terms["prior"] = self.mix_prior(rule_logits)
            elif explain:
                parts = [self._rule(codes, r, explain) for r in self.prior_rules()]
                terms["prior"] = self.mix_prior(torch.stack([z for z, _ in parts], dim=-1))  # [B, M, R] -> [B, M]
                terms["prior_codes"] = self.mix_prior(torch.stack([s for _, s in parts], dim=-1))  # [B, L, M, R]
            else:
                terms["prior"] = self.mix_prior(self.rule_logits(codes))
        return terms

    def wide_logits(self, diagnoses: torch.Tensor, procedures: torch.Tensor, medications: torch.Tensor) -> torch.Tensor:
        """The wide path's [B, n_meds] logits from the current visit's codes (see `_wide`)."""
        return self._wide(current_codes(diagnoses, procedures, medications), False)["wide"]

    def _wide(self, codes: torch.Tensor, explain: bool) -> dict[str, torch.Tensor]:
        """The wide (Wide & Deep) path over codes [B, L]: {"wide": [B, n_meds]} (+ "wide_slot" or
        "wide_codes" with `explain`, see `logit_terms`).

        Each code of the current visit (slot K-1: its diagnoses, procedures and the previous visit's
        medications) owns a logit vector; the visit takes their masked max ("max", the frequency
        baseline's best rule) or mean. A code seen 5 times gets its own direct route to the labels
        instead of having to move the shared embedding and transformer. A visit with no codes scores 0.
        """
        mask = codes >= 0
        if self.config.wide == "mean":
            # mean(x) @ W = mean(x @ W): the low-rank mean bags r-wide rows, then one matmul.
            out = {"wide": self.bag(self.wide_codes, codes)}
            rows = padded_rows(self.wide_codes, codes, 0.0) if explain else None  # [B, L, n_meds or r]
            if self.wide_meds is not None:
                out["wide"] = out["wide"] @ self.wide_meds
                rows = rows @ self.wide_meds if explain else None
            if explain:
                out["wide_codes"] = rows / mask.sum(dim=1).clamp(min=1).to(rows.dtype)[:, None, None]
            return out
        if self.wide_meds is None:
            x = padded_rows(self.wide_codes, codes, NEG)  # [B, L] -> [B, L, n_meds], padding -1e9: never wins
        else:
            x = torch.where(mask[..., None], self.wide_codes[codes.clamp(min=0)] @ self.wide_meds, NEG)
        any_code = mask.any(dim=1, keepdim=True)  # [B, 1]
        out = {"wide": torch.where(any_code, x.amax(dim=1), 0.0)}
        if explain:
            out["wide_slot"] = torch.where(any_code, x.argmax(dim=1), -1)  # the first slot of a tie
        return out

    def mix_prior(self, z: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """[..., R] rule logits or shares, or R tensors [...] (`rule_logits`; R = 4 for "stack", else
        1) -> [...]. The tuple form mixes without stacking: a sum over a last axis of 4 was ~4% of
        model.onnx's time, four scaled adds of [B, n_meds] are negligible."""
        if self.config.prior_rule != "stack":
            return z[0] if isinstance(z, tuple) else z[..., 0]
        if not isinstance(z, tuple):
            return (z * self.prior_mix).sum(-1)
        out = z[0] * self.prior_mix[0]
        for i in range(1, len(z)):
            out = out + z[i] * self.prior_mix[i]
        return out

    def prior_rules(self) -> tuple[str, ...]:
        """The counting rules the prior mixes: `PRIOR_RULES` for "stack", else the one rule."""
        return PRIOR_RULES if self.config.prior_rule == "stack" else (self.config.prior_rule,)

    def rule_logits(self, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The prior's rule logits, R tensors [B, n_meds] (`prior_rules` order), from the current
        visit's codes [B, L]: `_rule`'s values, every rule from one pass over the visit's codes.

        `_rule` builds its [B, L, n_meds] rows once per rule: a gather of the table, the weight mask
        and, for noisy_or, a log over them - four of each for "stack", which cost the shipped
        student ~40% of predict's end-to-end speed (BENCHMARKS.md, bisected to the prior). Here a code the baseline never saw
        reads the padding's zero row (the index is masked on [B, L], not the rows): P = 0 never wins
        the max and adds 0 to a sum, log(1 - 0) = 0. The log moves onto the [n_codes + 1, n_meds]
        table, a constant of the exported graph that onnxruntime folds once at load. So the visit
        costs two gathers, the sums over its slots and one max. The same sums in the same order as
        `_rule`'s, but for specificity's weighted sum (a matmul here): equal to it within float32
        rounding (tests/train/test_student.py). The table reaches the graph as one initializer read
        by a Gather and elementwise ops only, which int8-weights still quantises per row.
        """
        rules = self.prior_rules()
        table = torch.cat([self.prior_table, self.prior_table.new_zeros(1, self.prior_table.shape[1])])  # row -1: zeros
        g = self.prior_global
        out = {}
        w = padded_rows(self.prior_weight[:, None], codes, 0.0)[..., 0]  # [B, L] specificity weights, 0 unseen or padding
        seen = torch.where(w > 0, codes, -1)  # [B, L]: unseen codes read the zero row, as padding does
        if any(r in ("mean", "max", "specificity") for r in rules):
            rows = table[seen]  # [B, L, n_meds]
            if "mean" in rules:
                n = (w > 0).to(w.dtype).sum(1, keepdim=True)  # [B, 1] codes the baseline saw
                out["mean"] = _logit((rows.sum(1) + g) / (n + 1))
            if "specificity" in rules:
                gw = self.prior_global_weight
                dt = torch.promote_types(w.dtype, rows.dtype)  # bf16 tables beside fp32 weights: as `_rule`'s w * rows
                out["specificity"] = _logit(((w[:, None, :].to(dt) @ rows.to(dt))[:, 0] + gw * g) / (w.sum(1, keepdim=True) + gw))
            if "max" in rules:
                out["max"] = _logit(torch.maximum(rows.amax(1), g))
        if "noisy_or" in rules:
            keep = torch.log1p(-table.clamp(max=1 - 1e-6))[seen].sum(1)  # [B, n_meds], <= 0
            s = (keep + torch.log1p(-g.clamp(max=1 - 1e-6))).clamp(math.log(P_CLAMP), math.log1p(-P_CLAMP))
            out["noisy_or"] = torch.log(-expm1(s)) - s
        return tuple(out[r] for r in rules)

    def _rule(self, codes: torch.Tensor, rule: str, explain: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frequency baseline's logits [B, n_meds] under one combination rule from the current
        visit's codes [B, L] (-1 padded), and with `explain` each slot's share [B, L, n_meds] of
        their move away from the global row's logit (else None).

        Rules as `leader_edge.evaluation.baselines.FrequencyBaseline.predict_proba`: "mean"/"specificity" a
        weighted mean of the codes' P(med | code) rows and the global row, "max" their max,
        "noisy_or" 1 - prod(1 - P). Codes the baseline never saw carry weight 0.
        """
        spec = self.prior_weight[codes.clamp(min=0)] * (codes >= 0).to(self.prior_weight.dtype)  # [B, L]
        w = (spec if rule == "specificity" else (spec > 0).to(spec.dtype))[..., None]  # [B, L, 1]
        rows = self.prior_table[codes.clamp(min=0)]  # [B, L] -> [B, L, n_meds]
        g = self.prior_global
        gw = self.prior_global_weight if rule == "specificity" else torch.ones_like(self.prior_global_weight)
        if rule in ("mean", "specificity"):
            total = w.sum(1) + gw  # [B, 1]
            p = ((w * rows).sum(1) + gw * g) / total
        elif rule == "max":
            scored = rows * w  # P >= 0: unseen (w = 0) rows and padding never win
            p = torch.maximum(scored.amax(1), g)
        else:  # noisy_or
            keep = w * torch.log1p(-rows.clamp(max=1 - 1e-6))  # [B, L, n_meds], <= 0
            # log(1 - p), clamped as p is; logit(p) = log(-expm1(s)) - s has no 1 - exp(s) near p = 1,
            # whose float32 step (6e-8 in p) was up to 3e-4 in the logit.
            s = (keep.sum(1) + torch.log1p(-g.clamp(max=1 - 1e-6))).clamp(math.log(P_CLAMP), math.log1p(-P_CLAMP))
            p = -expm1(s)
        z = torch.log(p) - s if rule == "noisy_or" else _logit(p)
        if not explain:
            return z, None
        move = z - _logit(g)  # [B, n_meds]; the global row's own logit stays in `rest`
        if rule == "max":  # the winning code owns the whole move; none when the global row is the max
            slot = torch.arange(codes.shape[1], device=codes.device)[None, :, None]  # [1, L, 1]
            won = (slot == scored.argmax(dim=1, keepdim=True)).to(z.dtype)  # [B, L, n_meds]
            return z, won * torch.where(scored.amax(1) > g, move, 0.0)[:, None]
        if rule == "noisy_or":  # log(1 - p) is a sum over codes: the move is shared as those terms
            total = keep.sum(1, keepdim=True)  # [B, 1, n_meds]
            return z, torch.where(total < 0, keep / torch.where(total < 0, total, -1.0), 0.0) * move[:, None]
        # mean/specificity: p - g = sum_l d_l exactly. The secant slope (logit(p) - logit(g)) / (p - g)
        # turns those probability shares into logit shares (a code below P(med) pulls down). It is
        # log1p(delta / g) / delta + log1p(delta / (1 - p)) / delta: no difference of two logits, whose
        # float32 rounding (~1e-6) over a small delta gave shares 4.5e-5 off float64 on the demo
        # student; 1 / g + 1 / (1 - p) at delta = 0; the clamped logits' secant where p or g is clamped.
        d = w * (rows - g) / total[..., None]  # [B, L, n_meds]
        delta = d.sum(1)  # p - g
        safe = torch.where(delta == 0, 1.0, delta)
        exact = torch.where(delta == 0, 1 / g + 1 / (1 - p),
                            (log1p(delta / g) + log1p(delta / (1 - p))) / safe)
        inside = (torch.minimum(p, g) > P_CLAMP) & (torch.maximum(p, g) < 1 - P_CLAMP)
        return z, d * torch.where(inside, exact, move / safe)[:, None]

    # -- training (PyHealth style) -----------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], *, keep_logits: bool = False) -> dict[str, torch.Tensor]:
        """Loss and probabilities for one batch.

        Args:
            batch: the five inputs, "labels" float [B, n_meds], and optionally "target_medications"
                int64 [B, Lt] (InfoNCE), "teacher" float [B, teacher_dim] (distillation),
                "ddi" float [n_meds, n_meds] (DDI penalty), "prior" float [B, n_meds, R] (the counting
                prior's rule logits to use instead of the tables': out-of-fold ones for training samples).

        Returns:
            {"loss", "logits" [B, n_meds] (None where the fused loss kernel ran - `kernel_head` - unless
            `keep_logits` (output-level distillation) or the DDI penalty needs them), "y_prob"
            [B, n_meds], "y_true" [B, n_meds], "bce", "mse", "nce", "ddi"} (scalars for the terms, 0
            when a term is off).
        """
        c = self.config
        inputs = [batch[n] for n in ("diagnoses", "procedures", "medications", "profile", "visit_mask")]
        h, prof = self.hidden_state(*inputs)
        y_true, codes, ddi_on = batch["labels"], current_codes(*inputs[:3]), c.ddi_weight > 0 and "ddi" in batch
        prior, prob = batch.get("prior"), None
        if not self.kernel_head(h):
            logits = sum_terms(self.logit_terms(h, codes, rule_logits=prior))
        elif keep_logits or ddi_on:  # differentiable logits: the kernel's logits form
            logits = self.fused_head(h, codes, rule_logits=prior)
        else:  # the loss form: no logits kept, the probabilities come with the loss
            logits = None
            bce, prob = self.fused_head(h, codes, rule_logits=prior, target=y_true)
        if logits is not None:
            bce = F.binary_cross_entropy_with_logits(logits, y_true)
        zero = bce.new_zeros(())
        mse = nce = ddi = zero
        if c.alpha > 0 and self.proj is not None and "teacher" in batch:
            mse = F.mse_loss(self.proj(h), batch["teacher"])
        if c.info_nce > 0 and "target_medications" in batch:
            nce = self.info_nce(prof, batch["target_medications"])
        if ddi_on:
            p = torch.sigmoid(logits)
            ddi = ((p @ batch["ddi"]) * p).sum(-1).mean() / 2  # expected interacting pairs, p^T A p / 2
            y_prob = p.detach()
        else:
            y_prob = prob if logits is None else torch.sigmoid(logits.detach())
        loss = bce + c.alpha * mse + c.info_nce * nce + c.ddi_weight * ddi
        return {"loss": loss, "logits": logits, "y_prob": y_prob.detach(), "y_true": y_true, "bce": bce.detach(),
                "mse": mse.detach(), "nce": nce.detach(), "ddi": ddi.detach()}

    def info_nce(self, prof: torch.Tensor, target_meds: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between profile vectors [B, dim] and the current visit's medication
        set encodings (target_meds [B, Lt]); visits without medications are left out."""
        keep = (target_meds >= 0).any(dim=1)
        if int(keep.sum()) < 2:
            return prof.new_zeros(())
        p = F.normalize(prof[keep], dim=-1)
        m = F.normalize(self.encode_sets(target_meds[keep], "med"), dim=-1)
        sim = p @ m.T / self.config.temperature  # [n, n], matching pairs on the diagonal
        labels = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
