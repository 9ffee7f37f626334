"""``VisionEfficientTuningTrainer``: ModelScope's EpochBasedTrainer, made to fine-tune U-Tuning models.

What it adds to the base trainer: defaults for everything a configuration.json may leave out, our model,
preprocessor and dataset readers (class names travel to ``CLASSES``), parameter groups (tuner / head learning
rates, no decay on tokens / norms / biases), bf16 autocast, a trainer state that reloads on torch >= 2.6, and a
``work_dir/output`` folder that ``pipeline()`` and ``Model.from_pretrained`` load again.

Configuration keys of ours (all optional): ``train.amp`` ('auto' | 'bf16' | 'fp16' | 'fp32'),
``train.optimizer.head_lr``, ``train.on_bad_image`` ('raise' | 'skip'), ``train.feature_cache`` (bypass mode,
:mod:`.feature_cache`), ``train.drop_path`` ('auto' | a rate: stochastic depth, :mod:`.policy` rule 8); ModelScope's own
``train.optimizer.options.{grad_clip, cumulative_iters}``, ``model.loss.label_smoothing`` and ``train.hooks`` (e.g.
ModelScope's ``TensorboardHook``) work as usual. Below an Adam lr of 4e-3 fresh parallel adapters and prefixes start
their learned scale at ``4e-3 / lr`` unless their entry names a ``scale_init`` (:mod:`.policy` rule 9).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from modelscope.models.base import Model
from modelscope.preprocessors.base import Preprocessor
from modelscope.trainers.hooks import Hook, LoadCheckpointHook
from modelscope.trainers.hooks.priority import Priority
from modelscope.trainers.trainer import EpochBasedTrainer
from modelscope.utils.config import ConfigDict
from modelscope.utils.constant import ModeKeys, ModelFile, TrainerStages
from modelscope.utils.logger import get_logger
from modelscope.utils.torch_utils import is_master

from ..data import load_dataset_any
from ..data.datasets import ON_ERROR_CHOICES
from ..compat import from_pretrained_trust_kwargs, trainer_trust_remote_code, warmup_options
from ..extras import require
from ..location import locate_model_source
from ..model import VisionEfficientTuningModel
from ..preprocessing.preprocessor import VisionEfficientTuningPreprocessor
from ..registration import register_class
from .defaults import DEFAULT_DROP_PATH, DEFAULT_HEAD_LR
from . import checkpointing
from .checkpointing import trainer_state_globals
from . import feature_cache
from .distributed import DataParallelHook, EvalShardSampler
from .export import clean_stale_outputs, export_output, output_configuration, write_card
from .labels import check_conflicting_labels, map_onto, reference_classes
from .memory import use_cpu_allocator
from .metrics import TOPK_METRIC
from .optim import param_groups
from .policy import drop_path_rate, resolve_config
from .precision import autocast, resolve_precision
from .swift_tuners import apply_swift_tuners, exportable, require_swift
from .validate import validate_config
from .schedule import install_probe_first
from .warmup import StepWarmup, warmup_iters
from .workdir import WorkDirLock

logger = get_logger()


OUR_OPTIMIZER_KEYS = ('head_lr',)
TENSORBOARD_HOOK = 'TensorboardHook'  # ModelScope's; writes work_dir/tensorboard_output (extra [tensorboard])


class ExactResumeHook(Hook):
    """Two fixes to ModelScope's resume, so that a resumed run ends with the weights of an uninterrupted one.

    - An epoch-end checkpoint stores the finished epoch's index with ``inner_iter == iters_per_epoch``; the base
      loop then re-enters that epoch, skips all its batches and runs its epoch-end hooks again (a second LR step,
      a second evaluation). After the checkpoint is loaded (``LoadCheckpointHook`` runs before us) we move on to
      the next epoch instead.
    - The saved RNG state is restored at the first ``before_train_iter``, after the epoch's data loader has drawn
      its shuffle order and first random crops; we restore it before the epoch starts.
    """
    PRIORITY = Priority.NORMAL

    def before_run(self, trainer):
        if trainer._inner_iter and trainer._inner_iter >= trainer.iters_per_epoch:
            trainer._epoch += 1
            trainer._inner_iter = 0
            trainer._iter = trainer._epoch * trainer.iters_per_epoch

    def before_train_epoch(self, trainer):
        for hook in trainer.hooks:
            if isinstance(hook, LoadCheckpointHook) and hook.need_load_rng_state and hook.rng_state is not None:
                hook.before_train_iter(trainer)  # applies the state and clears the flag


class VisionEfficientTuningTrainer(EpochBasedTrainer):
    """Same arguments as EpochBasedTrainer (``model``, ``work_dir``, ``train_dataset``, ``eval_dataset``,
    ``cfg_modify_fn`` ...), plus ``amp`` and ``on_bad_image`` overriding ``train.amp`` / ``train.on_bad_image``."""

    default_drop_path = DEFAULT_DROP_PATH  # policy.py, rule 8

    def __init__(self, *args, amp: Optional[str] = None, on_bad_image: Optional[str] = None, **kwargs):
        if kwargs.get('efficient_tuners') is not None:  # before anything is built: say what to install
            require_swift()
        if on_bad_image is not None and on_bad_image not in ON_ERROR_CHOICES:
            raise ValueError(f'on_bad_image={on_bad_image!r}: expected one of {ON_ERROR_CHOICES}')
        self._amp_arg, self._on_bad_image_arg = amp, on_bad_image
        self.skipped_images: Dict[str, List[str]] = {}  # role -> unreadable images left out of that dataset
        self._has_eval_data = kwargs.get('eval_dataset') is not None
        self.label_classes = None  # the class list every dataset is mapped onto (training/labels.py)
        self._label_space_set = False
        launcher = kwargs.pop('launcher', None)
        if launcher is not None:  # our hook instead of ModelScope's CUDA-only DDPHook
            callbacks = kwargs.get('callbacks') or []
            kwargs['callbacks'] = (list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]) \
                + [DataParallelHook(launcher)]
        if kwargs.get('work_dir') is not None:
            # another live run on this work_dir: refused before ModelScope's __init__ writes its log file there
            WorkDirLock(kwargs['work_dir']).check()
        super().__init__(*args, **kwargs)
        device_type = 'cuda' if self.device.type == 'cuda' else 'cpu'
        self.precision = resolve_precision(self._amp_arg or self.cfg.train.get('amp', 'auto'), device_type)
        self._device_type = device_type
        if self.precision == 'fp16':
            self.use_fp16 = True  # ModelScope's TorchAMPOptimizerHook: autocast + GradScaler
        self.register_hook(ExactResumeHook())
        model = self.model_unwrapped
        # policy.py, rule 8; decided on the model as built, ms-swift tuners included (tune_module ran above)
        rate, why = drop_path_rate(self.cfg, model.model.parameter_roles(), model.model.backbone.bypass,
                                   self.default_drop_path)
        model.model.backbone.set_drop_path_rate(rate)  # the backbone keeps it (its drop_path_rate)
        logger.info(f'stochastic depth {rate:g} ({why})')
        checkpointing.install(self, output_configuration(self.cfg.to_dict(), model.head.num_classes,
                                                         model.model.resolved_backbone_config())['model'])
        self.lock = WorkDirLock(self.work_dir)
        self.lock.check()  # another live run on this work_dir: say so now, not halfway

    # -- configuration -----------------------------------------------------------------------------------
    def rebuild_config(self, cfg):
        # compat.py 7., our defaults, then the user's cfg_modify_fn (ModelScope's rebuild_config calls it): the
        # order the command line checks its overrides in too (policy.py, rule 1)
        cfg = resolve_config(cfg, super().rebuild_config)
        # before the model and data are built, so that their memory already follows the setting
        self.cpu_allocator_changed = use_cpu_allocator(cfg.safe_get('train.cpu_allocator') or 'default')
        validate_config(cfg)
        hooks = [h.get('type') for h in (cfg.safe_get('train.hooks') or [])]
        if TENSORBOARD_HOOK in hooks:  # ModelScope's hook imports it only once training starts
            require('tensorboard', 'tensorboard', f'train.hooks {TENSORBOARD_HOOK}')
        if not getattr(self, '_has_eval_data', False):
            # ModelScope's evaluation hook with no data to evaluate fails at the end of training, after the last
            # epoch, losing the run: without an eval set there is nothing for it to do.
            if cfg.safe_get('evaluation.period') is not None:
                cfg.evaluation.pop('period')
            if 'EvaluationHook' in hooks:
                cfg.train.hooks = [h for h in cfg.train.hooks if h.get('type') != 'EvaluationHook']
        elif 'EvaluationHook' not in hooks and cfg.safe_get('evaluation.period') is None:
            cfg.evaluation.period = ConfigDict(interval=1)  # evaluate after every epoch (log + model card)
        head = cfg.safe_get('model.head') or {}
        metrics = list(cfg.safe_get('evaluation.metrics') or [])
        if head.get('num_classes', 0) > 5 and 'accuracy' in metrics and TOPK_METRIC not in metrics:
            metrics.append(TOPK_METRIC)
            cfg.evaluation.metrics = metrics
        return cfg

    @property
    def model_unwrapped(self) -> VisionEfficientTuningModel:
        return self.unwrap_module(self.model)

    def tune_module(self, efficient_tuners):
        """ms-swift tuners (``build_trainer(..., efficient_tuners=...)``, extra ``[swift]``): applied to our model in
        place; we keep training our model (see :mod:`.swift_tuners`), swift's wrapper is ``self.swift_model``."""
        self.swift_model = None
        if efficient_tuners is None:
            return
        self.model, self.swift_model = apply_swift_tuners(self.model, efficient_tuners)

    def get_or_download_model_dir(self, model, model_revision=None, third_party=None):
        """A local folder is used as it is: ModelScope's base trainer would ask the hub whether it is the
        latest version, which stalls for seconds offline. Hub ids still go through ``snapshot_download``; a missing
        local path (a typo) is named at once (:func:`..location.locate_model_source`)."""
        if os.path.exists(model):
            return model if os.path.isdir(model) else os.path.dirname(model)
        locate_model_source(model)
        return super().get_or_download_model_dir(model, model_revision, third_party)

    # -- model, data -------------------------------------------------------------------------------------------
    def build_model(self):
        model = Model.from_pretrained(self.model_dir, cfg_dict=self.cfg,
                                      **from_pretrained_trust_kwargs(trainer_trust_remote_code(self)))
        if not isinstance(model, VisionEfficientTuningModel):
            raise TypeError(f'{self.model_dir}: configuration.json builds {type(model).__name__}, '
                            'expected a vision-efficient-tuning model')
        trainable, total = model.trainable_parameters()
        logger.info(f'trainable parameters: {trainable:,} / {total:,} ({100.0 * trainable / total:.3f}%)')
        return model

    def get_preprocessors(self, preprocessor):
        if preprocessor is not None:
            return super().get_preprocessors(preprocessor)
        train = VisionEfficientTuningPreprocessor.from_model_dir(self.model_dir, cfg=self.cfg, mode=ModeKeys.TRAIN)
        val = VisionEfficientTuningPreprocessor.from_model_dir(self.model_dir, cfg=self.cfg, mode=ModeKeys.EVAL)
        train.mode, val.mode = ModeKeys.TRAIN, ModeKeys.EVAL
        return train, val

    def on_bad_image(self, model_cfg) -> str:
        """'raise' or 'skip': the ``on_bad_image`` argument, else ``train.on_bad_image``, else 'raise'."""
        return self._on_bad_image_arg or model_cfg.safe_get('train.on_bad_image') or 'raise'

    def record_skipped(self, source: Any, role: str, paths: List[str], what: str) -> None:
        """Keep the unreadable files left out of a dataset (``skipped_images``, the card) and name them in the log."""
        self.skipped_images[role] = list(paths)
        if paths:
            logger.warning(f'{source}: {len(paths)} unreadable {role} {what} left out (train.on_bad_image=skip): '
                           f'{paths[:10]}' + (' ...' if len(paths) > 10 else ''))

    def build_dataset(self, datasets, model_cfg, mode, preprocessor: Optional[Preprocessor] = None, **kwargs):
        if datasets is None:
            return super().build_dataset(datasets, model_cfg, mode, preprocessor=preprocessor, **kwargs)
        role = 'training' if mode == ModeKeys.TRAIN else 'evaluation'
        on_error = self.on_bad_image(model_cfg)
        # A copy with our transform and policy: the caller's dataset object is never changed (one object given as
        # both training and evaluation data must not train with the evaluation transform).
        ds = load_dataset_any(datasets).with_options(transform=preprocessor, on_error=on_error)
        if on_error == 'skip':
            # Unreadable rows are found now and left out of the dataset, so that a metric counts neither them nor
            # a stand-in for them: its numerator and denominator are those of pipeline() on the readable rows.
            ds, bad = ds.readable()
            self.record_skipped(ds.source, role, bad, 'image(s)')
            ds = ds.with_options(on_error='raise')  # every row left is readable; a surprise later is an error
        model = self.model_unwrapped
        if not self._label_space_set:  # the training data when there is one (it is built first), else the model
            self.label_classes = reference_classes(model, ds if mode == ModeKeys.TRAIN else None)
            self._label_space_set = True
            if self.label_classes is not None and not model.head_loaded:
                n = model.head.num_classes
                model.CLASSES = list(self.label_classes) + [f'class_{i}' for i in range(len(self.label_classes), n)]
        ds = map_onto(ds, self.label_classes, model.head.num_classes, role)
        check_conflicting_labels(ds, role)  # in the model's classes, so the message names them
        if mode == ModeKeys.TRAIN:
            self.feature_cache_plan = feature_cache.plan_for(self, preprocessor)
            if self.feature_cache_plan.views:
                ds = ds.with_options(views=(self.feature_cache_plan.views, self._seed))
        return ds

    # -- optimisation ------------------------------------------------------------------------------------------
    def build_optimizer(self, cfg: ConfigDict, default_args: dict = None):
        cfg = ConfigDict(dict(cfg))
        lr = cfg.get('lr', 1e-3)
        head_lr = cfg.pop('head_lr', None)
        if head_lr is None:  # a fresh head learns at the linear probe's rate (see defaults.DEFAULT_HEAD_LR)
            head_lr = max(lr, DEFAULT_HEAD_LR)
        groups = param_groups(self.model_unwrapped, lr, cfg.get('weight_decay', 0.0), head_lr)
        for g in groups:
            g.pop('names')
        from modelscope.trainers.optimizer.builder import build_optimizer
        return build_optimizer(groups, cfg=cfg, default_args=default_args)  # parameter groups, not the module

    def create_optimizer_and_scheduler(self):
        optimizer, lr_scheduler, optim_options, lr_options = super().create_optimizer_and_scheduler()
        lr_options = warmup_options(lr_options)  # compat.py, 4.
        total = self.max_epochs * self.iters_per_epoch
        cumulative = max(1, int((optim_options or {}).get('cumulative_iters', 1) or 1))
        n = warmup_iters(self.cfg.safe_get('train.warmup'), math.ceil(total / cumulative),
                         has_own_warmup=bool((lr_options or {}).get('warmup')))
        if n:
            self.warmup = StepWarmup(optimizer, n, lambda: self._iter // cumulative)
        self.probe_first = install_probe_first(self, optimizer)  # schedule.py: train.probe_epochs (off by default)
        return optimizer, lr_scheduler, optim_options, lr_options

    def train_step(self, model, inputs):
        """Forward under the chosen precision; the loss is logged averaged over ranks on any device (the base
        class moves it to CUDA for that, which fails on CPU data parallelism)."""
        model.train()
        self._mode = ModeKeys.TRAIN
        with autocast(self.precision, self._device_type):
            outputs = model(inputs)
        loss = outputs['loss'].detach().clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.log_buffer.update({'loss': loss.item()})
        self.train_outputs = outputs

    def evaluation_step(self, data):
        """The unwrapped model's forward: evaluation needs no data-parallel wrapper, and the wrapper's buffer
        broadcast on the first forward after training would wait forever on a rank whose shard is empty."""
        model = self.model_unwrapped
        model.eval()
        with autocast(self.precision, self._device_type), torch.no_grad():
            return model(data)

    def get_eval_data_loader(self):
        """Under data parallelism, each rank scores a contiguous, unpadded shard of the evaluation rows
        (:class:`.distributed.EvalShardSampler`): every row is counted exactly once. ModelScope's default, a
        ``DistributedSampler``, pads the set with repeats to a multiple of the world size (9 images on 2 ranks
        were scored as 10)."""
        if not getattr(self, '_dist', False) or getattr(self, '_samplers', None) is not None:
            return super().get_eval_data_loader()
        options = {'shuffle': False, **dict(self.cfg.evaluation.get('dataloader', {}))}
        options['shuffle'] = False
        sampler = EvalShardSampler(len(self.eval_dataset), dist.get_rank(), dist.get_world_size())
        return self._build_dataloader_with_dataset(self.eval_dataset, dist=self._dist, seed=self._seed,
                                                   collate_fn=getattr(self, 'eval_data_collator', None),
                                                   sampler=sampler, **options)

    def evaluation_loop(self, data_loader, metric_classes):
        """Data-parallel evaluation that works on CPU too: each rank scores its shard, the metric objects are
        gathered with ``all_gather_object`` and merged (ModelScope's version broadcasts through CUDA)."""
        if not self._dist:
            return super().evaluation_loop(data_loader, metric_classes)
        from modelscope.trainers.utils.inference import evaluate_batch
        from modelscope.utils.data_utils import to_device
        self.invoke_hook(TrainerStages.before_val)
        for data in data_loader:
            evaluate_batch(self, to_device(data, self.device), metric_classes, None)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, metric_classes)
        values = {}
        for i, metric in enumerate(metric_classes):
            for rank, others in enumerate(gathered):
                if rank != dist.get_rank():
                    metric.merge(others[i])
            values.update(metric.evaluate())
        self.invoke_hook(TrainerStages.after_val)
        return values

    # -- running -----------------------------------------------------------------------------------------------
    def train(self, checkpoint_path: Optional[str] = None, *args, **kwargs):
        """ModelScope's training loop; at the end ``work_dir/output`` is written whole (a temporary folder, then a
        rename), so after any failure or kill it is absent or holds a complete trained model.
        ``checkpoint_path`` resumes from an ``epoch_N.pth`` (see :func:`.checkpointing.latest_checkpoint`)."""
        if checkpoint_path is not None:
            checkpointing.check_resume_file(checkpoint_path)
        trainable, total = self.model_unwrapped.trainable_parameters()
        self.logger.info(f'U-Tuning: training {trainable:,} of {total:,} parameters '
                         f'({100.0 * trainable / total:.3f}%), precision {self.precision}')
        with self.lock:
            if is_master():
                clean_stale_outputs(self.output_dir)
            with torch.serialization.safe_globals(trainer_state_globals()), feature_cache.active(self):
                result = super().train(checkpoint_path, *args, **kwargs)
            if is_master():
                self.export_output()
        return result

    def train_loop(self, data_loader):
        """ModelScope's loop, unless this run trains beside other tasks (:mod:`.tasks`): then it hands the loop over."""
        driver = getattr(self, '_loop_driver', None)
        if driver is not None:
            return driver(data_loader)
        return super().train_loop(data_loader)

    def evaluate(self, *args, **kwargs) -> Dict[str, float]:
        with self.lock, torch.serialization.safe_globals(trainer_state_globals()):
            results = super().evaluate(*args, **kwargs)
        self.last_eval = dict(results or {})
        out = self.output_dir
        if is_master() and os.path.isfile(os.path.join(out, 'configuration.json')) and \
                os.path.isfile(os.path.join(out, ModelFile.TORCH_MODEL_FILE)):
            model = exportable(self.model_unwrapped)  # refresh only the model card with these results
            write_card(model, output_configuration(self.cfg.to_dict(), model.head.num_classes,
                                                   model.model.resolved_backbone_config()), out,
                       self.last_eval, self._log_json, self._data_description(),
                       self._train_iters_per_epoch_or_none())
        return results

    @property
    def output_dir(self) -> str:
        return os.path.join(self.work_dir, ModelFile.TRAIN_OUTPUT_DIR)

    def export_output(self) -> str:
        """(Re)write ``work_dir/output`` whole: hub checkpoint, tuner-only weights, configuration, card, curve (ms-swift
        LoRA layers carried over as our LoRA tuners: :func:`.swift_tuners.exportable`)."""
        results = getattr(self, 'last_eval', None) or self._metric_values or {}
        return export_output(exportable(self.model_unwrapped), self.cfg.to_dict(), self.output_dir, results,
                             self._log_json,
                             data=self._data_description(), iters_per_epoch=self._train_iters_per_epoch_or_none())

    def _data_description(self) -> Dict[str, str]:
        out = {}
        for role, ds in (('train', self.train_dataset), ('eval', self.eval_dataset)):
            if ds is not None:
                source = getattr(ds, 'source', None) or type(ds).__name__
                skipped = len(self.skipped_images.get('training' if role == 'train' else 'evaluation', []))
                note = f', {skipped} unreadable left out' if skipped else ''
                out[role] = f'{os.path.basename(str(source).rstrip("/")) or source} ({len(ds)} images{note})'
        return out

    def _train_iters_per_epoch_or_none(self) -> Optional[int]:
        """Training iterations per epoch (places the logged losses at fractional epochs); None before training."""
        if getattr(self, '_train_iters_per_epoch', None):
            return int(self._train_iters_per_epoch)
        loader = getattr(self, 'train_dataloader', None)
        try:
            return len(loader) if loader is not None else None
        except TypeError:
            return None

    @property
    def _log_json(self) -> str:
        return os.path.join(self.work_dir, f'{self.timestamp}.log.json')


register_class(VisionEfficientTuningTrainer)
