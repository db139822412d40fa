"""Configuration of the teacher stage: one dataclass, validated, saved as RUN/teacher/config.json.

Why the CPU defaults look the way they do (2-core shared VM, fp32, measured 2026-11-25): a forward
pass of SmolLM2-135M runs at ~600 tokens/s at best (bf16 autocast is 2x SLOWER on this CPU: no
AVX-512-BF16), and the default synth data verbalises to ~490k tokens (2,213 training visit prefixes,
200 + 200 validation/test patients, 187 tokens per prompt on average). One full-depth pass over them
would take ~800 s on a quiet machine (and 3-4x that when the shared machine is loaded), more than
the 600 s budget for the whole stage. So on CPU the teacher is the first `backbone_layers` = 9 of
the 30 layers (the lower 8 computed once per sample and cached, exactly), with LoRA on the top
`lora_layers` = 1. On a GPU the same code runs all 30 layers. Depth on default synth, seed 42,
validation PRAUC (benchmarks/bench_teacher_sweep.py, 2026-12-01): 5 layers 0.604, 7 layers 0.592,
9 layers 0.615, 12 layers 0.575 (still rising, but slower per epoch); 8 layers 0.590 in the
2026-11-25 run of the stage itself; noise is ~0.01.
Learning rates are above LEADER's 2e-4 because a CPU run gets ~70 optimizer steps per epoch,
not ~3000: at lr 1e-3 / head 3e-3 validation PRAUC was still rising after 4 epochs (0.504, 0.537,
0.562, 0.570 with the schedule decayed to 0).
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, fields

from leader_edge.errors import ConfigError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU_BACKBONE_LAYERS = 9  # see the module docstring: the depth that fits 10 minutes on 2 cores
ALL_LAYERS = "all"  # lora_layers value: LoRA on every kept layer, whatever the model's depth (LEADER)


@dataclass
class TeacherConfig:
    teacher: str = "smollm2"  # "smollm2", "tiny" or a local Hugging Face directory
    backbone_layers: int | None = None  # keep the first N decoder layers; None: all (CLI: CPU_BACKBONE_LAYERS on CPU)
    lora_layers: int | str = 1  # LoRA on the top N layers, or "all"; the rest is frozen and run once per sample
    lora_r: int = 8  # LEADER
    lora_alpha: int = 32  # LEADER
    lora_dropout: float = 0.1  # LEADER
    lora_targets: tuple[str, ...] = LORA_TARGETS  # LEADER: q,k,v,o,gate,up,down
    max_history: int = 3  # LEADER: at most 3 previous visits
    max_tokens: int = 320  # prompt budget: drops oldest history first; 99th percentile on synth is ~640
    train_all_visits: bool = True  # one training sample per visit prefix (the features need them anyway)
    epochs: int = 8  # upper bound; early stopping on validation PRAUC
    patience: int = 2  # evaluations without a better validation PRAUC before stopping
    batch_size: int = 16  # micro-batch (samples); length-bucketed, so little padding
    grad_accum: int = 2  # effective batch = batch_size * grad_accum * world size (LEADER: 32)
    lr: float = 2e-3  # LEADER: 2e-4 over ~3000 steps; see the module docstring
    head_lr: float = 1e-2  # the head starts from a frequency prior only
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of optimizer steps with linear warm-up, then linear decay
    seed: int = 42  # split seed and the teacher's training seed
    protocol: str = "leader"  # split and test samples: "leader" or "safedrug" (leader_edge.data.dataset.PROTOCOLS)
    cache_batch_tokens: int = 4096  # tokens per batch of the one-off frozen-layer pass
    # Where the frozen-layer states live: "disk" (safetensors shards under RUN/teacher/.cache, read per
    # batch; host memory bounded by a shard: train/state_store.py) or "memory" (a list; fastest on
    # small data). States are stored in bf16 when the run is bf16.
    state_cache: str = "disk"
    # bf16 run: the frozen backbone weights are loaded in bf16 (half of fp32's memory; LoRA and the
    # head stay fp32) and the forward runs under bf16 autocast. Measured 2x slower on this CPU.
    bf16: bool = False
    # Recompute each adapted layer's activations in backward (torch.utils.checkpoint): activation
    # memory per rank drops from ~34 x hidden bytes per token and layer to ~2 x hidden (bf16 layer
    # inputs) at ~1/3 more compute. For 7B-class teachers with all layers adapted (configs/leader-7b.toml).
    gradient_checkpointing: bool = False
    plain: bool = False  # benchmark baseline: no cache, full forward every step (LoRA on lora_layers)
    timing_patients: int = 20  # test patients timed one at a time (50 cost 78 s at load ~5)
    # "frequency": logits = head(feature) + logit(frequency baseline), the baseline fitted on the
    # training split (out-of-fold for training samples), so the LLM learns what co-occurrence misses.
    # "none": LEADER's head alone.
    prior: str = "none"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self, "TeacherConfig")
        # the union-typed fields check_types leaves alone (1.5 layers was a TypeError in peft)
        if not (isinstance(self.lora_layers, numbers.Integral) and not isinstance(self.lora_layers, bool)
                or self.lora_layers == ALL_LAYERS):
            raise ConfigError(f"TeacherConfig.lora_layers={self.lora_layers!r}; use a layer count >= 1 or {ALL_LAYERS!r}")
        if self.backbone_layers is not None and (isinstance(self.backbone_layers, bool)
                                                 or not isinstance(self.backbone_layers, numbers.Integral)):
            raise ConfigError(f"TeacherConfig.backbone_layers={self.backbone_layers!r}; use a layer count >= 1 (or none for all)")
        if isinstance(self.lora_targets, str) or not all(isinstance(t, str) for t in self.lora_targets):
            raise ConfigError(f"TeacherConfig.lora_targets={self.lora_targets!r}; use a list of module names, e.g. "
                              '["q_proj", "v_proj"]')
        self.lora_targets = tuple(self.lora_targets)
        if self.lora_layers != ALL_LAYERS and self.lora_layers < 1:  # its type is checked above
            raise ConfigError(f"TeacherConfig.lora_layers={self.lora_layers} must be >= 1 (or {ALL_LAYERS!r} for every layer)")
        for name in ("lora_r", "lora_alpha", "epochs", "patience", "batch_size", "grad_accum", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TeacherConfig.{name}={getattr(self, name)} must be >= 1")
        if self.backbone_layers is not None and self.backbone_layers < 1:
            raise ConfigError(f"TeacherConfig.backbone_layers={self.backbone_layers} must be >= 1 (or None for all)")
        if self.backbone_layers is not None and self.lora_layers != ALL_LAYERS and self.lora_layers > self.backbone_layers:
            raise ConfigError(
                f"lora_layers={self.lora_layers} > backbone_layers={self.backbone_layers}; adapt at most all kept layers"
            )
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"TeacherConfig.lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ConfigError(f"learning rates must be > 0, got lr={self.lr}, head_lr={self.head_lr}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"TeacherConfig.warmup={self.warmup} must be a fraction in [0, 1)")
        if self.prior not in ("none", "frequency"):
            raise ConfigError(f"TeacherConfig.prior={self.prior!r}; use 'none' or 'frequency'")
        if self.state_cache not in ("disk", "memory"):
            raise ConfigError(f"TeacherConfig.state_cache={self.state_cache!r}; use 'disk' or 'memory'")
        if self.protocol not in ("leader", "safedrug"):
            raise ConfigError(f"TeacherConfig.protocol={self.protocol!r}; use 'leader' or 'safedrug'")
        if self.max_history < 0:
            raise ConfigError(f"TeacherConfig.max_history={self.max_history} must be >= 0")

    def adapted_layers(self, n_layers: int) -> int:
        """How many of a backbone's `n_layers` (kept) layers get LoRA: `lora_layers`, or all of them.

        Raises:
            ConfigError: `lora_layers` is a count above `n_layers`.
        """
        if self.lora_layers == ALL_LAYERS:
            return n_layers
        if self.lora_layers > n_layers:
            raise ConfigError(f"lora_layers={self.lora_layers} but {self.teacher} keeps {n_layers} layers; "
                              f"choose 1..{n_layers}, or {ALL_LAYERS!r} for every layer")
        return self.lora_layers

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherConfig":
        d = dict(d)
        if "train_per_visit" in d:  # the name before 2026-12-02 (RUN/teacher/config.json of older runs)
            d["train_all_visits"] = d.pop("train_per_visit")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown teacher config field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


_SIMPLE = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,), "str": (str,)}  # numpy ints pass


def check_types(config, name: str) -> None:
    """Refuse a field of `config` (a dataclass) whose value is not of its declared simple type
    (int, float, bool, str; other annotations are checked where they are used): a TOML
    `lora_r = "eight"` was a TypeError in a comparison, `lora_r = 8.5` one deep in peft."""
    for f in fields(config):
        value, allowed = getattr(config, f.name), _SIMPLE.get(str(f.type))
        if allowed is not None and (not isinstance(value, allowed) or (f.type != "bool" and isinstance(value, bool))):
            raise ConfigError(f"{name}.{f.name}={value!r} is not {'an' if f.type == 'int' else 'a'} {f.type} "
                              f"(the default is {f.default!r})")


def load_run_config(path) -> tuple[dict, dict]:
    """(teacher fields, student fields) of a TOML run config: a `[teacher]` table of TeacherConfig
    fields and a `[student]` table of `leader_edge.train.distill.DistillConfig` fields. Comments
    carry the reasons; the first comment line is the command that uses the file.

    Raises:
        ValueError: not TOML (with line and column), or a table other than [teacher] / [student].
    """
    import tomllib
    from pathlib import Path

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); see configs/*.toml for the layout") from None
    unknown = sorted(set(data) - {"teacher", "student"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; a run config has [teacher] and [student] tables")
    return dict(data.get("teacher", {})), dict(data.get("student", {}))
