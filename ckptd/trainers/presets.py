"""Trainer presets: frozen data, one small table per trainer. No logic lives here (see ``plan.py``).

A preset says which files a trainer writes and what each one is: a *candidate* feeding one or more weight
streams (``model``, ``ema``), a *derived copy* to ignore (the trainer's own ``best``/``last``/``avg`` copies: ranking
them would count one checkpoint twice or rank a copy by a metric that is not its own), or a *resume state* (kept for
resuming training; its ``best_metric`` is the best so far, not this checkpoint's metric).

Metric and step sources are templates: ``{name}`` is the user's ``metric.name``, ``{eval_name}`` the Hugging Face
spelling (``eval_`` added unless present, as HF's ``metric_for_best_model`` does), ``{name_re}`` the name escaped for
a regex. A template that needs a name is left out when none is given. Facts behind each table: DESIGN.md §4.
"""

from __future__ import annotations

from dataclasses import dataclass

# a number as Python's format() writes it: optional sign, digits, optional fraction and exponent
NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"


@dataclass(frozen=True)
class WeightsSource:
    """Where a stream's weights are inside a loaded checkpoint object.

    ``key``: a dotted key path (``""`` = the object itself), ``auto`` = the model weights as
    :func:`ckptd.layouts.find_model_weights` detects them, ``auto-ema`` = EMA weights as detected there (never a
    fallback to the model's weights). ``requires``: a top-level key that must be present for this source to apply
    (Lightning's ``WeightAveraging`` moves the raw weights to ``current_model_state``).
    """

    key: str
    requires: str = ""

    def describe(self) -> str:
        return self.key + (f" (when {self.requires} is present)" if self.requires else "")


@dataclass(frozen=True)
class StreamSpec:
    """One weight stream of a trainer: which file names feed it and where its weights are in each file."""

    name: str
    files: tuple[str, ...]  # name globs (files or folders); "*" = every candidate
    weights: tuple[WeightsSource, ...]  # tried in order: the first that applies wins
    optional: bool = False  # a file without these weights simply does not feed this stream
    about: str = ""


@dataclass(frozen=True)
class Preset:
    name: str
    about: str  # one line: what the trainer writes
    include: tuple[str, ...]  # candidate name globs (files; folders are recognised by the stream globs)
    ignore: tuple[tuple[str, str], ...]  # (name glob, reason): derived copies and temp names
    resume: tuple[tuple[str, str], ...]  # (name glob, reason): resume states, recorded but never ranked
    streams: tuple[StreamSpec, ...]
    metric: tuple[str, ...]  # source templates, tried in order
    step: tuple[str, ...]
    metric_where: str  # for humans: where this trainer keeps *this* checkpoint's metric
    needs_name: str = ""  # why a metric name is required ("" = not required)
    evidence: tuple[tuple[str, ...], ...] = ()  # auto-detection: any group whose globs all match a relative path
    allow_globals: tuple[str, ...] = ()  # data-only pickle globals this trainer's files carry


AUTO = WeightsSource("auto")
AUTO_EMA = WeightsSource("auto-ema")

PLAIN_INCLUDE = ("*.pt", "*.pth", "*.ckpt", "*.bin", "*.safetensors")
PLAIN_METRIC = ("checkpoint:metric", rf"filename:score_(?P<metric>{NUMBER})")
PLAIN_STEP = ("checkpoint:iterations", "checkpoint:global_step", "checkpoint:step", "trainer_state:global_step",
              r"filename:(?:step|checkpoint)[=_-]?(?P<step>[0-9]+)")
# with a metric name: look for it by that name instead of the generic places
NAMED_METRIC = ("checkpoint:{name}", "checkpoint:metrics.{name}", "sidecar:{stem}.json#{name}")

_SCORE = rf"filename:_score_(?P<metric>{NUMBER})(?:_it[0-9]+)?\.pt$"

CVNETS = Preset(
    name="cvnets",
    about="ml-cvnets / SeedLayoutSaver: model-only top-k files named by their score, plus copies and resume states",
    include=("*.pt",),
    ignore=(
        ("checkpoint_best.pt", "derived copy: ml-cvnets' copy of the best model (its score file is ranked)"),
        ("checkpoint_last.pt", "derived copy: ml-cvnets' latest model, rewritten in place every epoch, no metric"),
        ("checkpoint_avg.pt", "derived copy: ml-cvnets' own top-k average (ckptd computes its own)"),
        ("checkpoint_ema_best.pt", "derived copy: ml-cvnets' copy of the best EMA model (its score file is ranked)"),
        ("checkpoint_ema_last.pt", "derived copy: ml-cvnets' latest EMA model, rewritten in place, no metric"),
        ("checkpoint_ema.pt", "derived copy: older ml-cvnets' latest EMA model, rewritten in place, no metric"),
        ("checkpoint_ema_avg.pt", "derived copy: ml-cvnets' own EMA top-k average (ckptd computes its own)"),
        ("checkpoint_ema_epoch*.pt", "derived copy: per-epoch EMA model (save_all_checkpoints), no metric"),
        ("checkpoint_epoch*.pt", "derived copy: per-epoch model (save_all_checkpoints), no metric"),
    ),
    resume=(
        ("training_checkpoint*.pt", "resume state: its best_metric is the best so far, not this checkpoint's"),
        ("checkpoint.pt", "resume state (older ml-cvnets): its best_metric is the best so far"),
    ),
    streams=(
        StreamSpec("model", ("checkpoint_score_*.pt",), (AUTO,), about="checkpoint_score_{metric:.4f}.pt"),
        StreamSpec("ema", ("checkpoint_ema_score_*.pt",), (AUTO,), about="checkpoint_ema_score_{ema metric:.4f}.pt"),
    ),
    metric=(_SCORE,),
    step=(r"filename:_it(?P<step>[0-9]+)\.pt$",),
    metric_where="the score in each top-k file's name (the EMA files carry the EMA model's own score)",
    evidence=(("checkpoint_score_*.pt",), ("checkpoint_ema_score_*.pt",),
              ("training_checkpoint_last.pt", "checkpoint_last.pt")),
)

TIMM = Preset(
    name="timm",
    about="timm CheckpointSaver: checkpoint-<epoch>.pth.tar (top max_history), last/model_best copies, recovery",
    include=("*.pth.tar",),
    ignore=(
        ("model_best.pth.tar", "derived copy: timm's hard link of the best checkpoint-<epoch>.pth.tar"),
        ("last.pth.tar", "derived copy: timm's latest epoch, replaced every epoch"),
        ("milestone-*.pth.tar", "derived copy: timm's milestone snapshot of last.pth.tar"),
        ("tmp.pth.tar", "temp name: timm writes here, then renames to last.pth.tar"),
        ("recovery_tmp.pth.tar", "temp name: timm writes here, then renames to recovery-*.pth.tar"),
    ),
    resume=(("recovery-*.pth.tar", "resume state: timm's mid-epoch recovery file, no metric"),),
    streams=(
        StreamSpec("model", ("checkpoint-*.pth.tar",), (WeightsSource("state_dict"),)),
        StreamSpec("ema", ("checkpoint-*.pth.tar",), (WeightsSource("state_dict_ema"),), optional=True,
                   about="state_dict_ema when the run trains a model EMA"),
    ),
    metric=("checkpoint:metric",),
    step=("checkpoint:epoch", r"filename:-(?P<step>[0-9]+)\.pth\.tar$"),
    metric_where="'metric' in each checkpoint (the EMA stream ranks by the same per-file metric)",
    evidence=(("checkpoint-*.pth.tar",), ("model_best.pth.tar",), ("last.pth.tar",), ("recovery-*.pth.tar",)),
    allow_globals=("argparse.Namespace",),
)

HF = Preset(
    name="hf",
    about="Hugging Face Trainer: checkpoint-<step>/ folders with trainer_state.json",
    include=("checkpoint-*",),
    ignore=(
        ("tmp-checkpoint-*", "temp name: the Trainer renames it to checkpoint-<step> when complete"),
        ("model.safetensors", "derived copy: Trainer.save_model() output (final or best model, no step of its own)"),
        ("model-*.safetensors", "derived copy: Trainer.save_model() output shard"),
        ("model.safetensors.index.json", "derived copy: Trainer.save_model() output index"),
        ("pytorch_model*.bin", "derived copy: Trainer.save_model() output"),
        ("adapter_model.*", "derived copy: Trainer.save_model() adapter output"),
        ("training_args.bin", "not weights: the Trainer's arguments"),
    ),
    resume=(),
    streams=(StreamSpec("model", ("checkpoint-*",), (AUTO,), about="the checkpoint-<step> folder"),),
    metric=("trainer_state:{eval_name}",),
    step=("trainer_state:global_step", r"filename:^checkpoint-(?P<step>[0-9]+)$"),
    metric_where="checkpoint-<step>/trainer_state.json: the log_history entry of the folder's own step "
                 "(eval_<name>; top-level best_metric is the best so far)",
    needs_name="the Trainer logs several metrics (eval_loss, eval_accuracy, …)",
    evidence=(("checkpoint-*/trainer_state.json",),),
)

LIGHTNING = Preset(
    name="lightning",
    about="PyTorch Lightning ModelCheckpoint: *.ckpt (top-k), last.ckpt",
    include=("*.ckpt",),
    ignore=(),
    resume=(
        ("last.ckpt", "resume state: Lightning's save_last copy; its current_score may belong to an earlier save"),
        ("last-v*.ckpt", "resume state: Lightning's save_last copy; its current_score may belong to an earlier save"),
    ),
    streams=(
        StreamSpec("model", ("*.ckpt",), (WeightsSource("current_model_state"), WeightsSource("state_dict")),
                   about="state_dict (current_model_state when WeightAveraging put the average in state_dict)"),
        StreamSpec("ema", ("*.ckpt",), (WeightsSource("state_dict", requires="current_model_state"), AUTO_EMA),
                   optional=True, about="WeightAveraging's state_dict, or an EMA/SWA callback's averaged weights"),
    ),
    metric=("lightning:{name}", rf"filename:(?:^|[-_/]){{name_re}}=(?P<metric>{NUMBER})"),
    step=("checkpoint:global_step", r"filename:step=(?P<step>[0-9]+)"),
    metric_where="current_score of the ModelCheckpoint callback monitoring <name> (not best_model_score), "
                 "then '<name>=<value>' in the file name",
    needs_name="several ModelCheckpoint callbacks may monitor different metrics",
    evidence=(("*epoch=*.ckpt",), ("*step=*.ckpt",), ("*lightning_logs/version_*/checkpoints/*.ckpt",)),
)

FAIRSEQ = Preset(
    name="fairseq",
    about="fairseq: checkpoint<epoch>.pt / checkpoint_<epoch>_<updates>.pt, best/last copies",
    include=("*.pt",),
    ignore=(
        ("checkpoint_best.pt", "derived copy: fairseq's copy of the best checkpoint"),
        ("checkpoint_last.pt", "derived copy: fairseq's copy of the latest checkpoint"),
        ("checkpoint.best_*.pt", "derived copy: fairseq's keep_best_checkpoints copy"),
    ),
    resume=(),
    streams=(
        StreamSpec("model", ("checkpoint[0-9]*.pt", "checkpoint_[0-9]*_[0-9]*.pt"), (WeightsSource("model"),)),
        StreamSpec("ema", ("checkpoint[0-9]*.pt", "checkpoint_[0-9]*_[0-9]*.pt"),
                   (WeightsSource("extra_state.ema"),), optional=True, about="extra_state.ema (store_ema)"),
    ),
    metric=("checkpoint:extra_state.val_loss",),
    step=(r"filename:^checkpoint_[0-9]+_(?P<step>[0-9]+)\.pt$", "checkpoint:extra_state.train_iterator.epoch"),
    metric_where="extra_state.val_loss: this checkpoint's value of best_checkpoint_metric (extra_state.best is the "
                 "best so far)",
    evidence=(("checkpoint[0-9]*.pt",), ("checkpoint_[0-9]*_[0-9]*.pt",), ("checkpoint.best_*.pt",)),
    allow_globals=("argparse.Namespace",),
)

DEEPSPEED = Preset(
    name="deepspeed",
    about="DeepSpeed: global_step<N>/mp_rank_00_model_states.pt (ZeRO stages 0-2) next to optimizer shards",
    include=("*.pt",),
    ignore=(("*optim_states.pt", "not weights: ZeRO optimizer shard"),),
    resume=(),
    streams=(StreamSpec("model", ("mp_rank_00_model_states.pt",), (WeightsSource("module"),)),),
    metric=("checkpoint:{name}", "checkpoint:metric"),
    step=("checkpoint:global_steps", "checkpoint:global_step"),
    metric_where="a client_state value saved with the checkpoint (checkpoint:<name>)",
    evidence=(("global_step*/mp_rank_*_model_states.pt",),),
)

DCP = Preset(
    name="dcp",
    about="torch.distributed.checkpoint folders (.metadata written last), and plain files beside them",
    include=PLAIN_INCLUDE,  # a DCP folder in a run must not hide the run's other checkpoints
    ignore=(),
    resume=(),
    streams=(StreamSpec("model", ("*",), (AUTO,)),),
    metric=(*NAMED_METRIC, *PLAIN_METRIC),
    step=PLAIN_STEP,
    metric_where="a value saved in the state (checkpoint:<name>, metrics.<name>) or a sidecar JSON",
    evidence=(("*/.metadata",),),
)

PLAIN = Preset(
    name="plain",
    about="any torch.save / safetensors checkpoints: every included file is a candidate of one stream",
    include=PLAIN_INCLUDE,
    ignore=(),
    resume=(),
    streams=(StreamSpec("model", ("*",), (AUTO,)),),
    metric=PLAIN_METRIC,
    step=PLAIN_STEP,
    metric_where="'metric' in the checkpoint or 'score_<value>' in the file name (with a name: checkpoint:<name>, "
                 "metrics.<name>, {stem}.json#<name>)",
)

# auto-detection tries them in this order (most specific evidence first); plain is the fallback
PRESETS: dict[str, Preset] = {p.name: p for p in (HF, DEEPSPEED, DCP, CVNETS, TIMM, LIGHTNING, FAIRSEQ, PLAIN)}
TRAINERS = ("auto", "cvnets", "lightning", "hf", "timm", "fairseq", "deepspeed", "dcp", "plain")
STREAM_NAMES = ("model", "ema")
