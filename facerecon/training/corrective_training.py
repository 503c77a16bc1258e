"""Paper 004's multi-level training: R-Net with a corrective level, learned with its corrective space.

The network (:class:`~facerecon.networks.rnet.RNet` with a
:class:`~facerecon.networks.corrective_head.CorrectiveLevel`) regresses the base level's
coefficients and the corrective coefficients delta_g (B, C_g), delta_r (B, C_r); the fields
F = delta Theta are added to the base level's geometry and reflectance (eqs. 1-2). The schedule
is the paper's (sec. 7):

1. **pre-training** (``correctives.base_steps``): the base level's loss only (paper 000's hybrid
   loss, :meth:`Trainer.loss_of`), the network at ``base_learning_rate``; heads and bases idle;
2. **fine-tuning** (``correctives.steps``): the multi-level loss, base-level loss + the final
   level's terms of ``fit --level final`` (:meth:`CorrectiveFitter.terms`: photometric of the final
   render, landmarks of the final geometry, eq. 12-15 regularisers, coefficient prior), with three
   learning rates: the network up to the base level, the geometry head with Theta_g, the
   reflectance head with Theta_r.

Theta is learned (``space = "learn"``, starting from the face model's stored space or smooth random
fields) or the face model's, fixed (``space = "model"``). Checkpoints are R-Net checkpoints (kind
``rnet``) with a ``correctives`` layout; ``fit --checkpoint`` then has both levels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from facerecon.errors import InputError
from facerecon.fitting.correctives import CorrectiveFitter, CorrectiveSettings
from facerecon.fitting.optimize import FaceTargets
from facerecon.networks.rnet import RNet
from facerecon.training.config import TrainConfig
from facerecon.training.distributed import DistContext
from facerecon.training.trainer import TrainSummary, Trainer

#: Caffe's AdaDelta momentum (the paper trains with Caffe's AdaDelta)
ADADELTA_RHO = 0.95


class MultiLevelTrainer(Trainer):
    """R-Net training with paper 004's corrective level (see the module docstring)."""

    find_unused_parameters = True  # heads and bases get no gradient during pre-training
    forward_options = {"fields": True}

    def __init__(self, config: TrainConfig, device: torch.device, ctx: DistContext | None = None):
        if config.correctives is None:
            raise InputError("MultiLevelTrainer needs [correctives] enabled = true")
        self.settings = s = config.correctives
        self._setup_common(config, device, ctx)
        torch.manual_seed(config.seed)
        space = self.face_model.correctives
        if s.space == "model" and space is None:
            raise InputError(f"correctives.space = 'model' but face model {self.face_model.model_id!r} has no "
                             "corrective space (`facerecon model learn-correctives`, or space = 'learn')")
        modes = (space.n_geometry, space.n_reflectance) if space is not None else (s.geometry_modes,
                                                                                   s.reflectance_modes)
        layout = {"geometry_modes": modes[0], "reflectance_modes": modes[1],
                  "support": torch.as_tensor(self.face_model.regions["photometric"], dtype=torch.int64)}
        self.network = RNet(self.tensors, config.architecture, correctives=layout).to(device)
        level = self.network.correctives
        self.space_source = level.initialise(self.tensors.mean_shape, space, seed=config.seed)
        if s.space == "model":
            level.geometry_basis.requires_grad_(False)
            level.reflectance_basis.requires_grad_(False)
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        heads = {"geometry": [level.geometry_head, level.geometry_basis],
                 "reflectance": [level.reflectance_head, level.reflectance_basis]}
        corrective_ids = {id(p) for p in level.parameters()}
        groups = [{"name": "base", "params": [p for p in self.network.parameters() if id(p) not in corrective_ids]}]
        for name, members in heads.items():
            params = [p for m in members for p in (m.parameters() if isinstance(m, torch.nn.Module) else [m])]
            groups.append({"name": name, "params": [p for p in params if p.requires_grad]})
        if s.optimizer == "adadelta":
            self.optimizer = torch.optim.Adadelta(groups, lr=s.base_learning_rate, rho=ADADELTA_RHO)
        else:
            self.optimizer = torch.optim.Adam(groups, lr=s.base_learning_rate)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.model: torch.nn.Module = self.network
        weights = dict(s.weights)
        self.level = CorrectiveFitter(self.loss, self.face_model.regions, CorrectiveSettings(
            photo=config.weights["photo"], landmark=config.weights["landmark"], **weights))

    # -------------------------------------------------------------- schedule
    @property
    def phase(self) -> str:
        """``"base"`` during pre-training, then ``"final"``."""
        return "base" if self.step < self.settings.base_steps else "final"

    def learning_rates(self) -> dict[str, float]:
        """The learning rate of every parameter group at the current step (paper 004 sec. 7)."""
        s = self.settings
        if self.phase == "base":
            return {"base": s.base_learning_rate, "geometry": 0.0, "reflectance": 0.0}
        return {"base": s.learning_rate, "geometry": s.geometry_learning_rate,
                "reflectance": s.reflectance_learning_rate}

    def before_step(self) -> None:
        rates = self.learning_rates()
        for group in self.optimizer.param_groups:
            group["lr"] = rates[group["name"]]

    # -------------------------------------------------------------- loss
    def final_terms(self, params: dict[str, torch.Tensor], targets: FaceTargets) -> dict[str, torch.Tensor]:
        """The final level's terms (B,) (``total`` weighted) of predicted parameters with fields."""
        b = targets.crops.shape[0]
        trust = torch.ones(b, dtype=params["identity"].dtype, device=params["identity"].device)
        batch = self.level.prepare(params, targets, trust, render_size=self.config.render_size, debias=False)
        coefficients = {"geometry": params["corrective_geometry"], "reflectance": params["corrective_reflectance"]}
        return self.level.terms(batch, params["corrective_geometry_field"], params["corrective_reflectance_field"],
                                coefficients)

    def loss_of(self, params: dict[str, torch.Tensor], batch: FaceTargets
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, values = super().loss_of(params, batch)
        if self.phase == "final":
            final = self.final_terms(params, batch)
            loss = loss + final["total"].mean()
            values.update({f"final_{k}": v.detach().mean() for k, v in final.items()})
        return loss, values

    def batch_losses(self, targets: FaceTargets, module: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Validation: the base-level terms, plus the final level's total in the fine-tuning phase."""
        params = self.predict(targets.crops, module)
        with self._float32():
            terms = self.loss.losses(params, targets, self.config.render_size)
            if self.phase == "final":
                terms["total"] = terms["total"] + self.final_terms(params, targets)["total"]
        return terms

    # -------------------------------------------------------------- checkpoints
    def network_state(self) -> dict:
        state = super().network_state()
        state["correctives"] = {**state["correctives"], "space": self.settings.space, "initial": self.space_source}
        return state

    def restore_networks(self, state: dict, path: Path) -> None:
        if state.get("correctives") is None:
            raise InputError(f"checkpoint {path} has no corrective level; --resume needs the output.directory of a "
                             "[correctives] run")
        self.network.load_state_dict(state["network"])

    def _start(self, resume: bool, summary: TrainSummary) -> None:
        latest = self.config.output / "checkpoints" / "latest.pt"
        path = self.settings.base_checkpoint
        if path is not None and self.step == 0 and not (resume and latest.is_file()):
            self._load_base(path)
            summary.notes.append(f"network initialised from {path}")
        summary.notes.append(f"corrective level: {self.network.correctives.layout['geometry_modes']} geometry + "
                             f"{self.network.correctives.layout['reflectance_modes']} reflectance modes, bases from "
                             f"the {self.space_source}, {'learned' if self.settings.space == 'learn' else 'fixed'}")
        super()._start(resume, summary)

    def _load_base(self, path: Path) -> None:
        """The network's weights from an R-Net checkpoint (with or without a corrective level)."""
        if not path.is_file():
            raise InputError(f"correctives.base_checkpoint: {path} does not exist")
        state = self.load_checkpoint(path)
        if "network" not in state:
            raise InputError(f"correctives.base_checkpoint: {path} is not an R-Net checkpoint")
        if state.get("architecture") != self.config.architecture:
            raise InputError(f"correctives.base_checkpoint: {path} is a {state.get('architecture')}, "
                             f"network.architecture is {self.config.architecture}")
        layout = state.get("correctives")
        if layout is not None:
            mine = self.network.correctives.layout
            if any(layout.get(k) != mine[k] for k in mine):
                raise InputError(f"correctives.base_checkpoint: {path} has {layout.get('geometry_modes')} + "
                                 f"{layout.get('reflectance_modes')} corrective modes on {layout.get('support_size')} "
                                 f"vertices, this network {mine['geometry_modes']} + {mine['reflectance_modes']} on "
                                 f"{mine['support_size']} (correctives.geometry_modes, reflectance_modes)")
            self.network.load_state_dict(state["network"])
            return
        missing, unexpected = self.network.load_state_dict(state["network"], strict=False)
        if unexpected or any(not k.startswith("correctives.") for k in missing):
            raise InputError(f"correctives.base_checkpoint: {path} does not fit this network")
