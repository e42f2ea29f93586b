"""method=lqf: solve for δ of the linearized network ``f_lin(x) = f(x; w0) + J(x; w0)·δ`` (the paper's LQF).

The objective is ``mean_n ℓ(f_lin(x_n), y_n) + (λ/2)‖δ‖²`` with λ = ``weight_decay`` (a number, or ``auto``:
:mod:`lqf_exp.solvers.weight_decay`). A solver from ``conf/solver`` minimizes it pass by pass under Lightning's
loop (manual optimization); the stopping rule ends the run at convergence, not after a number of epochs
(:class:`~lqf_exp.solvers.SolveController`), and the test uses the final δ. The ``precond`` callback hands its
inverse to the solver (``CurvatureTargets.attach``). Checkpoints hold δ, the base head (fitted by ``head_init``),
the solver's whole state and what rebuilds the rest of w0 (the model config), not a second copy of w0.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lqf_exp.curvature import CurvatureTargets, Preconditioner
from lqf_exp.data.distributed import EvalShard, rank_and_world
from lqf_exp.head_init import check_head_init_kind, fit_validated_head, init_head
from lqf_exp.jacobian_cache import JacobianCache
from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.losses import ClassificationLoss
from lqf_exp.methods.base import ClassifierModule
from lqf_exp.methods.lqf_setup import (
    TrainingSet,
    WeightDecayChoice,
    build_jacobian_cache,
    choose_weight_decay,
    leave_one_out_refusal,
    parse_weight_decay,
)
from lqf_exp.models.heads import head_name
from lqf_exp.prefix_cache import PrefixFeatures
from lqf_exp.solvers import Evaluation, LQFObjective, SolveController, Solver, StoppingRule, WeightDecaySelection
from lqf_exp.solvers.objective import unflatten

# The run factors that rebuild w0; a checkpoint linearized around another w0 is refused.
W0_SOURCE_KEYS = ("model", "weights", "pooling", "activation")


log = logging.getLogger(__name__)

class _SolverSteps(torch.optim.Optimizer):
    """Lets Lightning count and hook the solver's steps (``global_step``, checkpoint cadence); the solver's state
    lives in the LQF checkpoint entry, not here."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return closure() if closure is not None else None


class LQF(ClassifierModule):
    """Linear Quadratic Fine-Tuning: δ = w − w0 is the only trainable tensor; w0 and BN statistics stay frozen."""

    method_name = "lqf"
    test_checkpoint = "final"
    _fixed_pass: Iterator[tuple[Tensor, Tensor]] | None = None  # a limited pass's batches (_pass_batches)

    def __init__(
        self,
        net: nn.Module,
        loss_fn: ClassificationLoss,
        num_classes: int,
        solver: Solver,
        stop: StoppingRule,
        weight_decay: float | str = "auto",
        weight_decay_selection: WeightDecaySelection | None = None,
        hparams: dict[str, Any] | None = None,
        linearize: str = "all",
        bn_affine: str = "freeze",
        head_init: str = "probe",
        head_init_l2: float | str = "auto",
        head_init_batches: int | None = None,
        tangent: str = "auto",
        prefix_cache_gb: float | None = None,
        jacobian_cache_gb: float | None = None,
        compile: bool = False,
        take_closed_form: bool = True,
    ) -> None:
        check_head_init_kind(head_init)  # fail at construction, not after the data are loaded for the fit
        self.requested_weight_decay = parse_weight_decay(weight_decay, "method.weight_decay")
        self.head_init = head_init
        self.head_init_l2 = parse_weight_decay(head_init_l2, "method.head_init_l2")
        self.head_init_batches = head_init_batches
        self.selection = weight_decay_selection or WeightDecaySelection()
        linearized = LinearizedNetwork(net, linearize=linearize, bn_affine=bn_affine, tangent=tangent,
                                       head_name=head_name(net))
        super().__init__(linearized, loss_fn, num_classes, hparams)
        if prefix_cache_gb is not None and not prefix_cache_gb > 0:
            raise ValueError(f"invalid method.prefix_cache_gb={prefix_cache_gb!r}: expected a size > 0 in GB, or null "
                             "to run the frozen prefix on every pass")
        self.prefix_cache_gb = prefix_cache_gb
        # the training and validation sets' prefix features, once computed (lqf_exp.prefix_cache)
        self.prefix_features: dict[str, PrefixFeatures] = {}
        self.compile = bool(compile)
        self._solve_network: LinearizedNetwork | None = None
        self.automatic_optimization = False
        self.controller = SolveController(solver, stop)
        self.weight_decay: float | None = self.requested_weight_decay  # None until `auto` has chosen
        self.selection_record: dict[str, Any] = {}
        self.head_record: dict[str, Any] = {}
        self.preconditioner: Preconditioner | None = None
        self.objective: LQFObjective | None = None
        self._pending: dict[str, Any] | None = None
        self.head_smoother: Any = None
        if jacobian_cache_gb is not None and not jacobian_cache_gb > 0:
            raise ValueError(f"invalid method.jacobian_cache_gb={jacobian_cache_gb!r}: expected a size > 0 in GB, "
                             "or null to always run the solve through network passes")
        self.jacobian_cache_gb = jacobian_cache_gb
        self.jacobian_cache: JacobianCache | None = None
        self.cache_record: dict[str, Any] = {}
        self.dual_solution: Tensor | None = None  # δ* (flat) when the λ selection solved the dual system
        # False: the solver iterates even where the λ selection solved the dual system (a study of the solver
        # itself, e.g. solver=sgd's learning rate); the closed form still gives L*, so the gap stays measured.
        self.take_closed_form = bool(take_closed_form)
        # Persisted, so a resumed run keeps its fitted head instead of fitting a new one.
        self.register_buffer("head_ready", torch.tensor(False))

    @property
    def linearized(self) -> LinearizedNetwork:
        return self.net  # type: ignore[return-value]

    @property
    def solver(self) -> Solver:
        return self.controller.solver

    def configure_trainable(self) -> None:
        """Only δ is trainable; LinearizedNetwork froze w0 already."""

    def objective_value(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``loss(f_lin(x), y) + (λ/2)‖δ‖²`` on a batch (λ = 0 until chosen)."""
        penalty = sum(d.pow(2).sum() for d in self.linearized.deltas.values())
        return self.loss_fn(logits, labels) + 0.5 * (self.weight_decay or 0.0) * penalty

    def curvature_targets(self) -> CurvatureTargets:
        return CurvatureTargets(
            network=self.linearized.base_network,
            layers=self.linearized.curvature_layers(),
            loss=self.loss_fn,
            constant=self.loss_fn.constant_curvature,
            damping_offset=self.weight_decay or 0.0,
            outputs_fn=self.linearized,
            attach=self.attach_preconditioner,
        )

    def attach_preconditioner(self, preconditioner: Preconditioner) -> None:
        self.preconditioner = preconditioner
        if self.objective is not None:
            self.objective.attach(preconditioner)

    # -- data the solver reads beyond the training loop ---------------------------------------------------------
    def _rank_share(self, dataset: Any) -> Any:
        """This rank's block of ``dataset``, by the rule its evaluation loaders shard with (each sample once)."""
        rank, world = rank_and_world(self._trainer)
        return dataset if world == 1 else Subset(dataset, list(EvalShard(dataset, rank, world)))

    def _batches(self, dataset: Any) -> Any:
        return ((x.to(self.device), y.to(self.device)) for x, y in self.eval_loader(self._rank_share(dataset)))

    @property
    def solve_network(self) -> LinearizedNetwork:
        """The network the solver's passes run through: on stored prefix features where there are some, compiled
        with ``method.compile``."""
        net = self._solve_network
        if net is None:
            net = self.linearized.on_prefix_features() if "train" in self.prefix_features else self.linearized
            if self.compile:
                with torch.no_grad():  # the first call checks the tangent path, eagerly (its check cannot compile)
                    net(next(iter(self.train_batches()))[0])
                net.compile(fullgraph=True)
            self.__dict__["_solve_network"] = net  # not a submodule: its tensors are self.linearized's
        return net

    def _split_batches(self, split: str, dataset: Any) -> Any:
        stored = self.prefix_features.get(split)
        if stored is not None:
            return stored.batches(self.trainer.datamodule.eval_batch_size)
        return self._batches(dataset)

    def train_batches(self) -> Any:
        return self._split_batches("train", self.train_data())

    def _store_prefix_features(self) -> None:
        """The frozen prefix's output for every training and validation sample, once (``method.prefix_cache_gb``)."""
        if self.prefix_cache_gb is None or not len(self.linearized.prefix) or self.prefix_features:
            return
        budget = self.prefix_cache_gb
        for split, dataset in (("train", self.train_data()), ("val", self.trainer.datamodule.val_dataset)):
            share = self._rank_share(dataset)
            stored = PrefixFeatures.compute(self.linearized.prefix, self._batches(dataset), len(share), budget, split)
            if stored is None:
                return
            self.prefix_features[split] = stored
            budget -= stored.gigabytes

    def evaluate(self, gradient: bool) -> Evaluation:
        assert self.objective is not None
        return self.objective.evaluate(self.train_batches(), gradient)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss of f_lin on the validation split (all ranks)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        # stored validation features imply stored training features, so the solve network then takes features too
        net = self.solve_network if "val" in self.prefix_features else self.linearized
        for x, y in self._split_batches("val", self.trainer.datamodule.val_dataset):
            total += self.loss_fn.per_sample(net(x), y).sum().double()
            count += len(y)
        reduce = self.trainer.strategy.reduce
        return float(reduce(total, reduce_op="sum")) / float(reduce(count, reduce_op="sum"))

    # -- head initialization, before any callback's on_fit_start ------------------------------------------------
    def setup(self, stage: str) -> None:
        self._check_precision()
        if stage == "fit" and not bool(self.head_ready):
            self.initialize_head()

    def _check_precision(self) -> None:
        """Refuse autocast (``trainer.precision=bf16-mixed``/``16-mixed``) before any solve when ``J·δ`` runs through
        forward-mode AD, which does not run under autocast (e.g. ``method.tangent=autodiff``, or ``auto`` on a network
        with a module the fused rules do not know): otherwise the whole solve runs in float32 and the first
        validation batch fails."""
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        if not precision.endswith("-mixed") or self.linearized.dual is not None:
            return
        why = ("method.tangent=autodiff was requested" if self.linearized.tangent == "autodiff" else
               f"method.tangent={self.linearized.tangent} found no fused rule for a module of the linearized blocks "
               "(the log says which)")
        raise ValueError(
            f"trainer.precision={precision} needs the fused tangent path (mixed-precision rules), but J·δ runs "
            f"through forward-mode AD here, which does not run under autocast: {why}. Valid: trainer.precision=32-true "
            "or 64-true with any tangent, or a mixed precision with method.tangent=fused/auto on networks whose "
            "linearized modules all have fused rules")

    def initialize_head(self, loader: Iterable | None = None, *, train_data: Any = None,
                        val_loader: Iterable | None = None) -> None:
        """Fit (``probe``) or draw (``random``) the base head at w0; δ is zero, so f_lin stays f(x; w0).

        ``train_data`` (default: the trainer's training samples; none without a trainer) decides whether leave-one-out
        can choose the head's l2; where it cannot, the validation loss on ``val_loader`` (default: the trainer's
        validation set) does. ``lqf_exp.forget`` passes the samples a run keeps and the run's validation set.
        """
        if train_data is None and self._trainer is not None:
            train_data = self.train_data()
        if loader is None and self.head_init == "probe":
            loader = self.eval_loader(train_data)
            if self.head_init_batches is not None:
                loader = [batch for _, batch in zip(range(self.head_init_batches), loader, strict=False)]
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        base = self.linearized.base_network
        original_device = next(base.parameters()).device
        base = base.to(device or original_device)
        refusal = None
        if self.head_init == "probe" and self.head_init_l2 is None and train_data is not None:
            refusal = leave_one_out_refusal(train_data, self.num_classes)
        if refusal is not None:  # the head's l2 on the validation loss instead, as method=probe chooses it
            log.info("head_init_l2=auto: validation loss instead of leave-one-out (%s)", refusal)
            val = val_loader if val_loader is not None else self.eval_loader(self.trainer.datamodule.val_dataset)
            fit = fit_validated_head(base, loader, val, self.loss_fn, device=device,
                                     head_name=self.linearized.head_name).fit
        else:
            fit = init_head(base, loader, kind=self.head_init, loss=self.loss_fn, l2=self.head_init_l2,
                            head_name=self.linearized.head_name)
        base.to(original_device)
        # The head's smoother joins the leave-one-out of λ only if it saw exactly the training set.
        self.head_smoother = fit.smoother if fit is not None and self.head_init_batches is None else None
        self.head_record = {"head_init": self.head_init, "head_l2": None if fit is None else fit.l2}
        self.head_ready.fill_(True)

    # -- the solve ----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _SolverSteps(list(self.linearized.delta_list()))

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def set_weight_decay(self, value: float) -> None:
        self.weight_decay = float(value)
        if self.objective is not None:
            self.objective.weight_decay = self.weight_decay
        if self.preconditioner is not None:
            self.preconditioner.set_damping_offset(self.weight_decay)

    def _training_set(self) -> TrainingSet:
        return TrainingSet(self.solve_network, self.loss_fn, self.train_data(), self.train_batches, self.num_classes,
                           self.trainer.world_size)

    def _apply_weight_decay_choice(self, choice: WeightDecayChoice) -> None:
        self.set_weight_decay(choice.weight_decay)
        self.selection_record = choice.record
        self.controller.path = choice.path
        if choice.system is not None:
            self.controller.objective_star = choice.objective_star
            if self.take_closed_form:
                self.dual_solution = choice.solution  # δ* = Jᵀu: the run takes it instead of iterating toward it
            self.solver.use_dual_system(choice.system)

    def on_fit_start(self) -> None:
        solved = self._pending is not None and self._pending["status"] != "running"
        if not solved:
            self._store_prefix_features()
        if self.jacobian_cache is None and not solved:
            self.jacobian_cache, self.cache_record = build_jacobian_cache(self._training_set(),
                                                                          self.jacobian_cache_gb, self.solver)
        if self.weight_decay is None:
            self._apply_weight_decay_choice(choose_weight_decay(self._training_set(), self.selection,
                                                                self.jacobian_cache, self.head_smoother))
        assert self.weight_decay is not None
        self.objective = LQFObjective(self.solve_network, self.loss_fn, self.weight_decay, self._reduce_sum)
        self.objective.attach(self.preconditioner)
        if self.preconditioner is not None:
            self.preconditioner.set_damping_offset(self.weight_decay)
        if self._pending is not None:
            self.controller.load_state_dict(self._pending)
            self._pending = None
        self.objective.attach_cache(self.jacobian_cache)
        train_size = len(self.train_data())
        self.controller.start(self.objective, train_size, self.trainer.world_size, self.evaluate,
                              scale=self.loss_fn.zero_predictor_loss(self.num_classes))
        if self.dual_solution is not None and self.controller.status == "running":
            self.controller.accept_optimum(unflatten(self.dual_solution, self.objective.deltas), self.evaluate)
            self.dual_solution = None

    def _solved_without_passes(self) -> bool:
        """The solve needs no training batches: it is finished, or it runs on the Jacobian cache."""
        return self.controller.status != "running" or (self.objective is not None and self.objective.in_memory)

    def on_train_epoch_start(self) -> None:
        if self.controller.status != "running":
            return
        if self.objective is not None and self.objective.in_memory:
            self.controller.run_in_memory(self.evaluate, self.validation_loss, self.set_weight_decay)
            self._log_pass(done=True)
            return
        self.controller.begin_pass()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # A finished or in-memory solve lets the epoch's batches pass untouched (skipping them with Lightning's
        # -1 would also skip the epoch's validation, and val/* would be missing from metrics.json).
        if self._solved_without_passes():
            if batch_idx == 0:  # one (empty) solver step, so that Lightning counts the epoch and checkpoints it
                self.optimizers().step()
            return
        stored = self.prefix_features.get("train")
        if stored is not None:
            # The pass runs on the stored prefix features (the objective's network takes them, not images), all of it
            # at the epoch's first batch, in a permutation drawn per epoch; the image batches then pass untouched.
            if batch_idx == 0:
                seed = int(self.trainer.datamodule.shuffle_seed) + self.current_epoch
                generator = torch.Generator().manual_seed(seed)
                order = torch.randperm(len(stored), generator=generator).to(stored.labels.device)
                for chunk in order.split(len(batch[1])):  # this rank's batch size
                    self._solver_step(stored.features[chunk], stored.labels[chunk])
            return
        for images, labels in self._pass_batches(batch, batch_idx):
            self._solver_step(images, labels)

    def _pass_batches(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> list[tuple[Tensor, Tensor]]:
        """What the solver steps on at the loader's ``batch_idx``-th batch: that batch, or under
        ``trainer.limit_train_batches`` the next batch of ``train_data()`` in a fixed order (the rest of it at the
        loader's last batch).

        The limited loader gives the first k batches of a new shuffle every epoch: other samples than the objective
        is scored on (``train_data()``: the first k batches' worth, in order) and others from pass to pass, so two
        passes' objectives measured different problems (a smoke run whose start interpolated its samples was
        declared diverged). In a fixed order every pass steps on, and is scored on, the same samples.
        """
        data = self.train_data()
        if data is self.trainer.datamodule.train_dataset:
            return [batch]
        if batch_idx == 0 or self._fixed_pass is None:
            self._fixed_pass = iter(DataLoader(self._rank_share(data), batch_size=len(batch[1]), shuffle=False))
        last = batch_idx + 1 >= self.trainer.num_training_batches
        chosen = list(self._fixed_pass) if last else list(itertools.islice(self._fixed_pass, 1))
        return [(x.to(self.device), y.to(self.device)) for x, y in chosen]

    def _solver_step(self, images: Tensor, labels: Tensor) -> None:
        report: dict[str, Any] = {}
        # The solve runs in float32 under any trainer precision: the solvers step by an exact quadratic model of the
        # objective, and bf16 logits and curvature products break it (a bf16-mixed solve of the default task reported
        # a negative objective, stopped as "converged" with the gradient norm only halved, and tested 1.7 points
        # below float32). Evaluation (val/test/predict) runs under the trainer's autocast.
        with torch.autocast(images.device.type, enabled=False):
            self.optimizers().step(closure=lambda: report.update(self.controller.step(images, labels)))
        if "loss" in report:
            # The step's mini-batch objective at δ before the step: mean_n ℓ_n over its batches + (λ/2)‖δ‖², the
            # normalization of solver/objective (the whole training set after the pass); named so, not train/loss,
            # which for the other methods is the loss without a penalty.
            self.log("solver/batch_objective", report.pop("loss"), on_step=True, on_epoch=False, prog_bar=True,
                     batch_size=len(labels))
        for key, value in report.items():
            self.log(f"solver/{key}", value, on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The pass ends here, before the epoch's validation and checkpoint, so both see the state after it.
        if batch_idx + 1 == self.trainer.num_training_batches:
            if self._solved_without_passes():
                self.trainer.should_stop = True
            else:
                self.end_pass()

    def end_pass(self) -> None:
        self._log_pass(self.controller.end_pass(self.evaluate, self.validation_loss, self.set_weight_decay))

    def _log_pass(self, done: bool) -> None:
        final = self.controller.final
        if final is not None:
            self.log("solver/objective", final.objective, on_step=False, on_epoch=True, prog_bar=True)
            if final.grad_norm is not None:
                self.log("solver/grad_norm", final.grad_norm, on_step=False, on_epoch=True)
        self.log("solver/weight_decay", float(self.weight_decay or 0.0), on_step=False, on_epoch=True)
        if done:
            self.trainer.should_stop = True
            # W&B shows how the solve ended, not only metrics.json: a capped solve is not a converged one.
            summary = self.controller.summary()
            self.log("solver/converged", float(summary["status"] == "converged"), on_step=False, on_epoch=True)
            for key in ("grad_ratio", "estimated_gap"):
                if summary.get(key) is not None:
                    self.log(f"solver/{key}", float(summary[key]), on_step=False, on_epoch=True)

    def on_train_end(self) -> None:
        self.controller.certify(self.evaluate)
        # The solve is over: the test runs through the JVP path, and the cache (GBs) would outlive its use.
        self.jacobian_cache = None
        if self.objective is not None:
            self.objective.attach_cache(None)

    def run_summary(self) -> dict[str, Any]:
        return {"solver": self.solve_summary()}

    def solve_summary(self) -> dict[str, Any]:
        """What metrics.json records about the solve (``solver`` entry)."""
        if self.objective is None:
            return {}
        return {**self.controller.summary(), **self.head_record, "weight_decay_selection": self.selection_record,
                "jacobian_cache": self.cache_record}

    # -- checkpoints: δ + head + solver state, not a copy of w0 ----------------------------------------------
    def _rebuildable_keys(self, state_dict: dict[str, Tensor]) -> list[str]:
        head = f"net.net.{self.linearized.head_name}."
        return [k for k in state_dict if k.startswith("net.net.") and not k.startswith(head)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in self._rebuildable_keys(state):
            del state[key]
        checkpoint["lqf_w0_source"] = {k: v for k, v in self.hparams.items() if k in W0_SOURCE_KEYS}
        checkpoint["lqf_solve"] = {"controller": self.controller.state_dict(), "weight_decay": self.weight_decay,
                                   "selection": self.selection_record, "head": self.head_record,
                                   "jacobian_cache": self.cache_record}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        source = checkpoint.get("lqf_w0_source", {})
        mine = {k: v for k, v in self.hparams.items() if k in source}
        if source != mine:
            raise ValueError(f"checkpoint was linearized around {source}, but this run builds w0 from {mine}")
        own = self.state_dict()
        for key in self._rebuildable_keys(own):
            checkpoint["state_dict"].setdefault(key, own[key])
        solve = checkpoint.get("lqf_solve")
        if solve is not None:
            self._pending = solve["controller"]
            self.weight_decay = solve["weight_decay"]
            self.selection_record, self.head_record = dict(solve["selection"]), dict(solve["head"])
            self.cache_record = dict(solve.get("jacobian_cache", {}))

