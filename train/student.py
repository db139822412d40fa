"""LEADER(S): the compact ID-based student that ships to the bedside.

Read top to bottom: config, attention block, the model. Inputs come from
`leader_edge.encoding.Encoder.encode` (see its docstring for the id conventions).

Tensor path for export (`Student.logits` / `Student.predict_proba`), all int64, names as in
`leader_edge.encoding.INPUT_NAMES`; B (batch), K (visit slots), L* (codes) are dynamic:
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
    0.6075 -> 0.6358, test Jaccard 0.417 -> 0.445). Without it the head is kernels.linear_sigmoid.
The export team's exporter swaps `kernels` for `kernels.reference` (the public ops check codes < V
with a Python int, which torch.export cannot trace); set `backend="torch"` for the same in eager.
Only gathers, matmuls, masks and fixed-shape reductions: no nn.EmbeddingBag, no Python branches on
data, so torch.onnx traces it with a dynamic batch. Masked attention uses a finite -1e9 bias, so an
all-padding row (a visit with no procedures) softmaxes to a harmless uniform row instead of NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leader_edge import kernels

NEG = -1e9  # attention bias for padding: finite, so fully padded rows stay NaN-free
PRIOR_RULES = ("mean", "max", "noisy_or", "specificity")  # leader_edge.baselines.RULES, the order of `prior_mix`


@dataclass
class StudentConfig:
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
    alpha: float = 0.4  # feature MSE weight (LEADER MIMIC-III)
    info_nce: float = 0.005  # profile/medication alignment weight (LEADER MIMIC-III)
    temperature: float = 0.1  # InfoNCE temperature on cosine similarities
    ddi_weight: float = 0.0  # expected interacting pairs penalty; 0 = off (LEADER has none)
    wide: str = "max"  # wide path over the current visit's codes: "max", "mean" or "none" (see `wide_logits`)
    wide_rank: int = 0  # 0: a full [n_codes, n_meds] table; r > 0: [n_codes, r] x [r, n_meds] (MIMIC size needs it)
    # Per-kind set encoder over a visit's codes. "transformer": one block over the codes, then the
    # masked mean; "mean" (DeepSets): masked mean of the code embeddings, then a residual MLP on the
    # pooled vector - no per-code matmul, the cost that was ~72% of `leader-edge predict`. The default
    # stays "transformer" so students saved before this field load as trained; training's default is
    # `DistillConfig.set_encoder` ("mean").
    set_encoder: str = "transformer"
    # Counting as a prior the model corrects: "frequency" adds the frequency baseline's logit (its
    # co-occurrence tables are buffers, set with `set_prior`) to every logit, so a student whose
    # learned terms are 0 IS the baseline. `prior_rule` is the baseline's combination rule, or
    # "stack": a learned weighted sum of all four rules' logits (`prior_mix`, fitted on out-of-fold
    # scores before training; default synth validation PRAUC 0.6494 vs 0.6403 for "max" alone).
    prior: str = "none"
    prior_rule: str = "max"
    backend: str = "auto"  # kernels backend; export forces "torch" (the reference ops)

    def __post_init__(self) -> None:
        for name in ("n_codes", "n_meds", "dim", "heads", "hidden", "max_visits", "ffn_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"StudentConfig.{name}={getattr(self, name)} must be >= 1")
        if self.dim % self.heads:
            raise ValueError(f"StudentConfig.dim={self.dim} must be divisible by heads={self.heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"StudentConfig.dropout={self.dropout} must be in [0, 1)")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"StudentConfig.backend={self.backend!r}; use 'auto', 'torch' or 'triton'")
        if self.wide not in ("max", "mean", "none"):
            raise ValueError(f"StudentConfig.wide={self.wide!r}; use 'max', 'mean' or 'none'")
        if self.set_encoder not in ("transformer", "mean"):
            raise ValueError(f"StudentConfig.set_encoder={self.set_encoder!r}; use 'transformer' or 'mean'")
        if self.prior not in ("none", "frequency"):
            raise ValueError(f"StudentConfig.prior={self.prior!r}; use 'none' or 'frequency'")
        if self.prior_rule not in (*PRIOR_RULES, "stack"):
            raise ValueError(f"StudentConfig.prior_rule={self.prior_rule!r}; use one of {', '.join(PRIOR_RULES)} or 'stack'")
        if self.wide_rank < 0:
            raise ValueError(f"StudentConfig.wide_rank={self.wide_rank} must be >= 0 (0 = full table)")

    def to_json(self) -> dict:
        return asdict(self)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [N, T, dim], mask [N, T] bool (True = real) -> [N, T, dim]."""
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        # [N, T, dim] -> [N, heads, T, dim / heads]
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        bias = torch.where(mask, 0.0, NEG)[:, None, None, :]  # [N, 1, 1, T]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(n, t, d)
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

    def n_params(self, *, inference: bool = True) -> int:
        """Parameters; `inference` leaves out the distillation projection (not exported)."""
        skip = {id(p) for p in self.proj.parameters()} if (inference and self.proj is not None) else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    # -- encoders ---------------------------------------------------------------------------------

    def encode_sets(self, codes: torch.Tensor, kind: str) -> torch.Tensor:
        """codes int64 [N, L] (-1 padded) -> [N, dim]: set block, then masked mean of its outputs
        ("transformer"), or masked mean of the embeddings, then the set MLP ("mean")."""
        n, length = codes.shape
        mask = codes >= 0
        ids = codes.clamp(min=0)
        if self.config.set_encoder == "mean":
            # mean(code + group) = mean(code) + mean(group): two bags gathering straight from the tables,
            # so the exporter's int8 embedding pass still finds them as Gather inputs.
            x = kernels.embedding_bag(self.code_emb, codes, mode="mean", backend=self.config.backend)
            if self.config.n_groups:
                groups = torch.where(mask, self.code_group[ids], -1)
                x = x + kernels.embedding_bag(self.group_emb, groups, mode="mean", backend=self.config.backend)
            return self.set_blocks[kind](x)
        x = self.code_emb[ids]  # [N, L] -> [N, L, dim]
        if self.config.n_groups:
            x = x + self.group_emb[self.code_group[ids]]
        x = self.set_blocks[kind](x, mask)
        # Masked mean as an embedding bag over the block's output rows: row n*L+l, -1 where padded.
        rows = torch.arange(n * length, device=codes.device).reshape(n, length)
        rows = torch.where(mask, rows, -1)
        return kernels.embedding_bag(x.reshape(n * length, -1), rows, mode="mean", backend=self.config.backend)

    def profile_vector(self, profile: torch.Tensor) -> torch.Tensor:
        """profile int64 [B, F] -> [B, dim], mean of the field embeddings."""
        return kernels.embedding_bag(self.profile_emb, profile, mode="mean", backend=self.config.backend)

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
        x = self.visit_block(x, mask)
        h = self.norm(x[:, -1])  # the current visit's output, which has attended to its history
        return self.drop(F.gelu(self.mlp(h))), prof

    def wide_logits(self, diagnoses: torch.Tensor, procedures: torch.Tensor, medications: torch.Tensor) -> torch.Tensor:
        """The wide (Wide & Deep) path: [B, n_meds] logits from the current visit's codes alone.

        Each code of the current visit (slot K-1: its diagnoses, procedures and the previous visit's
        medications) owns a logit vector; the visit takes their masked max ("max", the frequency
        baseline's best rule) or mean. A code seen 5 times gets its own direct route to the labels
        instead of having to move the shared embedding and transformer. A visit with no codes scores 0.
        """
        codes = torch.cat([diagnoses[:, -1], procedures[:, -1], medications[:, -1]], dim=1)  # [B, L]
        mask = codes >= 0
        if self.config.wide == "mean" and self.wide_meds is None:
            return kernels.embedding_bag(self.wide_codes, codes, mode="mean", backend=self.config.backend)
        x = self.wide_codes[codes.clamp(min=0)]  # [B, L] -> [B, L, n_meds or r]
        if self.wide_meds is not None:
            x = x @ self.wide_meds  # [B, L, r] -> [B, L, n_meds]
        if self.config.wide == "mean":
            m = mask[..., None].to(x.dtype)
            return (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        best = torch.where(mask[..., None], x, NEG).amax(dim=1)  # [B, n_meds]
        return torch.where(mask.any(dim=1, keepdim=True), best, 0.0)

    def prior_logits(self, diagnoses: torch.Tensor, procedures: torch.Tensor, medications: torch.Tensor) -> torch.Tensor:
        """The frequency baseline's [B, n_meds] logits from the current visit's codes (its features:
        the visit's diagnoses and procedures, the previous visit's medications, and the global prior).

        Rules as `leader_edge.baselines.FrequencyBaseline.predict_proba`: "mean"/"specificity" a
        weighted mean of the codes' P(med | code) rows and the global row, "max" their max,
        "noisy_or" 1 - prod(1 - P); "stack" mixes all four logits with `prior_mix`. Codes the
        baseline never saw carry weight 0.
        """
        codes = torch.cat([diagnoses[:, -1], procedures[:, -1], medications[:, -1]], dim=1)  # [B, L]
        rule = self.config.prior_rule
        rules = PRIOR_RULES if rule == "stack" else (rule,)
        return self.mix_prior(torch.stack([self._rule_logits(codes, r) for r in rules], dim=-1))  # [B, n_meds, R]

    def mix_prior(self, z: torch.Tensor) -> torch.Tensor:
        """[B, n_meds, R] rule logits (R = 4 for "stack", else 1) -> [B, n_meds]."""
        return (z * self.prior_mix).sum(-1) if self.config.prior_rule == "stack" else z[..., 0]

    def _rule_logits(self, codes: torch.Tensor, rule: str) -> torch.Tensor:
        """codes int64 [B, L] (-1 padded) -> [B, n_meds] logits of one combination rule."""
        spec = self.prior_weight[codes.clamp(min=0)] * (codes >= 0).to(self.prior_weight.dtype)  # [B, L]
        w = spec if rule == "specificity" else (spec > 0).to(spec.dtype)
        rows = self.prior_table[codes.clamp(min=0)]  # [B, L] -> [B, L, n_meds]
        g = self.prior_global
        gw = self.prior_global_weight if rule == "specificity" else torch.ones_like(self.prior_global_weight)
        if rule in ("mean", "specificity"):
            p = ((w[..., None] * rows).sum(1) + gw * g) / (w.sum(1, keepdim=True) + gw)
        elif rule == "max":
            p = torch.maximum((rows * w[..., None]).amax(1), g)  # P >= 0: unseen (w = 0) rows never win
        else:  # noisy_or
            keep = torch.log1p(-rows.clamp(max=1 - 1e-6))  # [B, L, n_meds]
            p = 1 - torch.exp((w[..., None] * keep).sum(1) + torch.log1p(-g.clamp(max=1 - 1e-6)))
        p = p.clamp(1e-4, 1 - 1e-4)
        return torch.log(p) - torch.log1p(-p)

    def _extra_logits(self, diagnoses, procedures, medications) -> torch.Tensor | None:
        """Per-row logit terms besides the deep head: the wide path and the counting prior."""
        out = None
        if self.wide_codes is not None:
            out = self.wide_logits(diagnoses, procedures, medications)
        if self.config.prior != "none":
            prior = self.prior_logits(diagnoses, procedures, medications)
            out = prior if out is None else out + prior
        return out

    # -- the tensor path used by export -------------------------------------------------------------

    def logits(self, diagnoses, procedures, medications, profile, visit_mask) -> torch.Tensor:
        """Inputs as in the module docstring -> float32 [B, n_meds] logits."""
        h, _ = self.hidden_state(diagnoses, procedures, medications, profile, visit_mask)
        out = F.linear(h, self.head_weight, self.head_bias)
        extra = self._extra_logits(diagnoses, procedures, medications)
        return out if extra is None else out + extra

    def predict_proba(self, diagnoses, procedures, medications, profile, visit_mask) -> torch.Tensor:
        """Inputs as in the module docstring -> float32 [B, n_meds] probabilities."""
        h, _ = self.hidden_state(diagnoses, procedures, medications, profile, visit_mask)
        extra = self._extra_logits(diagnoses, procedures, medications)
        if extra is None:
            return kernels.linear_sigmoid(h, self.head_weight, self.head_bias, backend=self.config.backend)
        # The wide/prior logits are per row, so the fused kernel (one bias vector) cannot add them.
        return torch.sigmoid(F.linear(h, self.head_weight, self.head_bias) + extra)

    # -- training (PyHealth style) -----------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss and probabilities for one batch.

        Args:
            batch: the five inputs, "labels" float [B, n_meds], and optionally "target_medications"
                int64 [B, Lt] (InfoNCE), "teacher" float [B, teacher_dim] (distillation),
                "ddi" float [n_meds, n_meds] (DDI penalty), "prior" float [B, n_meds, R] (the counting
                prior's rule logits to use instead of the tables': out-of-fold ones for training samples).

        Returns:
            {"loss", "logits" [B, n_meds] (None on the fused path without wide/prior terms), "y_prob"
            [B, n_meds], "y_true" [B, n_meds], "bce", "mse", "nce", "ddi"} (scalars for the terms, 0
            when a term is off).
        """
        c = self.config
        inputs = [batch[n] for n in ("diagnoses", "procedures", "medications", "profile", "visit_mask")]
        h, prof = self.hidden_state(*inputs)
        y_true = batch["labels"]
        if self.wide_codes is None and c.prior == "none":
            bce = kernels.linear_bce_with_logits(h, self.head_weight, self.head_bias, y_true, backend=c.backend)
            logits = None
        else:
            logits = F.linear(h, self.head_weight, self.head_bias)
            if self.wide_codes is not None:
                logits = logits + self.wide_logits(*inputs[:3])
            if c.prior != "none":
                logits = logits + (self.mix_prior(batch["prior"]) if "prior" in batch else self.prior_logits(*inputs[:3]))
            bce = F.binary_cross_entropy_with_logits(logits, y_true)
        zero = bce.new_zeros(())
        mse = nce = ddi = zero
        if c.alpha > 0 and self.proj is not None and "teacher" in batch:
            mse = F.mse_loss(self.proj(h), batch["teacher"])
        if c.info_nce > 0 and "target_medications" in batch:
            nce = self.info_nce(prof, batch["target_medications"])
        if c.ddi_weight > 0 and "ddi" in batch:
            p = self._proba(h, logits)
            ddi = ((p @ batch["ddi"]) * p).sum(-1).mean() / 2  # expected interacting pairs, p^T A p / 2
            y_prob = p.detach()
        else:
            with torch.no_grad():
                y_prob = self._proba(h, logits)
        loss = bce + c.alpha * mse + c.info_nce * nce + c.ddi_weight * ddi
        return {"loss": loss, "logits": logits, "y_prob": y_prob.detach(), "y_true": y_true, "bce": bce.detach(),
                "mse": mse.detach(), "nce": nce.detach(), "ddi": ddi.detach()}

    def _proba(self, h: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        if logits is None:
            return kernels.linear_sigmoid(h, self.head_weight, self.head_bias, backend=self.config.backend)
        return torch.sigmoid(logits)

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
