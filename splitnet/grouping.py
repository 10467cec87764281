"""The grouping stage on a budget: how the SplitNet objective is scheduled so that the weights
between groups actually reach zero, and the number that says whether the cut will be cheap.

The objective is the paper's (:mod:`splitnet.regularizers`): ``CE + g1 disjoint + g2 weight +
g3 balance``. With plain (sub)gradient SGD (``method: reference``, what the authors' code runs)
the group-lasso term removes only ~1e-3 x g2 of an off-block weight's norm per step, so the blocks
empty only over the reference's ~200k steps; a short schedule cuts away weights the model still
uses. ``method: staged`` (the default) spends the steps in phases:

1. **warm-up** (``warmup`` of the steps): cross-entropy only, assignments frozen at their init.
   The features first learn something worth grouping; assignments that start moving on random
   weights harden on init noise.
2. **the groups.** ``assign: derived`` (the default) computes them at the first step after the
   warm-up (:mod:`splitnet.partition`): the class groups from the classifier (classes whose weight
   vectors agree), every split layer's channel groups, balanced, from the class groups and the
   layers' ``W**2``, written into the assignments; no learning rate, nothing to collapse.
   ``assign: learned`` runs an **assign** phase instead: the full objective, the assignments
   learning from the weights (the group-weight term carries the weights' structure into them, the
   disjoint term hardens them, the balance term keeps the groups apart), at
   ``assignment_lr_mult`` x the learning rate: a rate that depends on the channel count, the
   groups and the steps (docs/method.md).
3. **sparsify** (everything after the warm-up when derived; the last ``sparsify`` of the steps
   when learned): the hard assignment (argmax with the cut's minimum-size rule,
   :func:`splitnet.tree.hard_assignment`) is fixed; the group-weight term on it is applied as its
   proximal step after every SGD step: block soft-thresholding of every off-block row segment
   ``W[out in b, i]`` and column segment ``W[j, in in a]``. Its size: derived from the weights by
   default (``sparsify_strength`` 0: the thresholds over the phase add up to :data:`PROX_MARGIN`
   x each layer's largest off-block segment at the phase's start, on a linear ramp), or the
   reference coefficients times a strength that ramps geometrically from 1 to
   ``sparsify_strength``. Segments reach exactly zero; cross-entropy trains the diagonal blocks
   meanwhile. The very last step projects what is left (report: ``off_block_energy`` before it),
   so the cut drops only zeros and the tree computes the grouped model's function.

:func:`off_block_energy` is the fraction of each split layer's weight energy (sum of W^2) that
lies off the diagonal blocks of a hard assignment: what the cut would throw away.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .models.base import CLASSES, SplitModel
from .partition import classifier_class_groups, derive_groups, random_groups, set_assignment_
from .regularizers import RegularizerPlan, RegularizerWeights, _size_classes, init_std, regularizer_terms
from .tree import hard_assignment, smallest_group_share

METHODS = ("reference", "staged")
MIN_GROUP_SHARE = 0.25  # a group under a quarter of its balanced size is collapsing (the report's balance check)


ASSIGN_MODES = ("derived", "learned", "random")
PROX_MARGIN = 6.0    # derived strength: the proximal thresholds over the sparsify phase add up to 6x each
                     # layer's largest off-block segment norm: were cross-entropy silent, the largest would be
                     # empty at 41% of the phase (sqrt(1/6)), the rest retrains the blocks. Measured on 20
                     # CIFAR-100 classes, WRN-16-1 2-2-2, 100 / 400 grouping steps: grouped top-1 after the phase
                     # x1 0.392 / 0.512, x3 0.431 / 0.552, x6 0.438 / 0.562, x12 0.444 / 0.555 (docs/method.md)


@dataclass
class GroupingSchedule:
    """How the grouping stage's steps are used (see the module docstring).

    ``assign``: ``derived`` (the default) computes the groups from the weights at the end of the
    warm-up (:mod:`splitnet.partition`) and sparsifies from there: phases warm-up and sparsify,
    no learning rate. ``learned``: the paper's assignments, learned in an assign phase between the
    two (``method: reference`` always learns them). ``random``: as ``derived``, but every set's groups
    are random and balanced (seeded by ``random_seed``): the derived groups' control, what a tree of the
    same shape is worth without them.
    ``warmup`` / ``sparsify``: fractions of the stage's steps (``staged`` only; ``reference``
    ignores them; ``derived`` ignores ``sparsify``: everything after the warm-up sparsifies).
    ``sparsify_strength``: 0 (the default) derives the proximal step from the weights (the
    thresholds over the phase add up to :data:`PROX_MARGIN` x each layer's largest off-block segment
    at its start, on a linear ramp); a number >= 1 is the multiplier of the reference coefficient
    at the end of a geometric ramp from 1.
    """

    method: str = "staged"
    warmup: float = 0.25
    sparsify: float = 0.35
    sparsify_strength: float = 0.0
    disjoint_hold: float = 0.5
    assign: str = "derived"
    random_seed: int = 0

    def __post_init__(self):
        # each message starts with the field's name (the pipeline's config prefixes its section: group.)
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r}; use {' or '.join(METHODS)}")
        if self.assign not in ASSIGN_MODES:
            raise ValueError(f"assign: {self.assign!r}; use {', '.join(ASSIGN_MODES[:-1])} or {ASSIGN_MODES[-1]}")
        if not (0 <= self.warmup < 1 and 0 <= self.sparsify < 1 and self.warmup + self.sparsify < 1):
            raise ValueError(f"warmup ({self.warmup}) and sparsify ({self.sparsify}): each in [0, 1) and together "
                             "below 1 (the assign phase between them needs steps)")
        if self.sparsify_strength != 0 and self.sparsify_strength < 1:
            raise ValueError(f"sparsify_strength: 0 (derived from the weights) or >= 1, got {self.sparsify_strength}")
        if not 0 <= self.disjoint_hold < 1:
            raise ValueError(f"disjoint_hold: must be in [0, 1), got {self.disjoint_hold}")

    @property
    def derived(self) -> bool:
        """Groups fixed at the warm-up's end, not learned (``staged`` with ``assign: derived`` or its
        control ``random``)."""
        return self.method == "staged" and self.assign in ("derived", "random")

    def disjoint_factor(self, step: int, total: int) -> float:
        """Multiplier of the disjoint coefficient: 0 for the first ``disjoint_hold`` of the assign
        phase, then a linear ramp to 1 at its end (``reference``: always 1)."""
        if self.method == "reference":
            return 1.0
        start, end = self.warmup * total, (1 - self.sparsify) * total
        hold_end = start + self.disjoint_hold * (end - start)
        if step < hold_end:
            return 0.0
        return min(1.0, (step - hold_end) / max(end - hold_end, 1))

    def assign_start(self, total: int) -> int:
        """The first step after the warm-up (0 for ``reference``): where ``derived`` computes the groups."""
        step = min(int(math.ceil(self.warmup * total)), total) if self.method == "staged" else 0
        while step > 0 and self.phase(step - 1, total) != "warmup":
            step -= 1
        while step < total and self.phase(step, total) == "warmup":
            step += 1
        return step

    def phase(self, step: int, total: int) -> str:
        """``warmup``, ``assign`` or ``sparsify`` for global step ``step`` of ``total``."""
        if self.method == "reference":
            return "assign"
        t = step / max(total, 1)
        if t < self.warmup:
            return "warmup"
        if self.derived or t >= 1 - self.sparsify:
            return "sparsify"
        return "assign"

    def sparsify_start(self, total: int) -> int:
        """The first sparsify step (``total`` when there is none)."""
        return next((s for s in range(self.assign_start(total), total) if self.phase(s, total) == "sparsify"), total)

    def strength(self, step: int, total: int) -> float:
        """Multiplier of the proximal threshold at ``step`` (sparsify phase): 1 -> sparsify_strength."""
        start = (self.warmup if self.derived else 1 - self.sparsify) * total
        span = max(total - start, 1)
        t = min(max((step - start) / span, 0.0), 1.0)
        return self.sparsify_strength ** t


# ---- off-block energy -----------------------------------------------------------------------

def _energy(weight: torch.Tensor) -> torch.Tensor:
    """Sum of W^2 over the k x k taps: [Dout, Din]."""
    w2 = weight.detach().float().pow(2)
    return w2.flatten(2).sum(2) if w2.dim() > 2 else w2


@torch.no_grad()
def off_block_energy(model: SplitModel, hard) -> dict[str, float]:
    """Fraction of each split layer's sum of W^2 that lies off the diagonal blocks of ``hard``.

    hard: a :class:`splitnet.tree.HardAssignment` (e.g. ``hard_assignment(model)``). Returns
    ``{layer name: fraction in [0, 1]}`` for every split layer; 0 means the cut drops nothing.
    """
    out = {}
    for layer in model.split_layers():
        w = layer.module.weight
        gin = hard.group_of(layer.in_set, layer.groups).to(w.device)
        gout = hard.group_of(layer.out_set, layer.groups).to(w.device)
        e = _energy(w)
        off = (gout[:, None] != gin[None, :])
        total = float(e.sum())
        out[layer.name] = float(e[off].sum()) / total if total > 0 else 0.0
    return out


# ---- the proximal step ----------------------------------------------------------------------

class BlockProx:
    """The proximal step of the group-weight term for a fixed hard assignment.

    For every split layer it keeps the group ids of inputs and outputs; :meth:`step` applies block
    soft-thresholding to every off-block row segment (one input, the outputs of one other group)
    and then to every off-block column segment (one output, the inputs of one other group), with
    the thresholds the reference normalization gives each segment (``lr * g2 * w_l * c``, with the
    layers' self-weights ``w_l = S_l / sum S``) times ``strength``.

    Layers are batched as the regularizers are (:class:`splitnet.regularizers.RegularizerPlan`):
    per size class a padded [L, Dout, Din] energy, the segment norms of every layer and group from
    two ``bmm`` s with the one-hot assignments, and one ``_foreach_mul_`` that scales every weight.
    No host sync.
    """

    def __init__(self, model: SplitModel, hard):
        entries = []
        for pos, layer in enumerate(model.split_layers()):
            w = layer.module.weight
            g = layer.groups
            din, dout = w.shape[1], w.shape[0]
            taps = math.sqrt(w[0, 0].numel())  # sqrt(mean over taps) = ||.|| / k
            norm = 2 * (g - 1) * init_std(w) / g
            entries.append({"pos": pos, "layer": layer, "groups": g, "din": din, "dout": dout,
                            "row_c": 1.0 / (taps * din * math.sqrt(dout) * norm),
                            "col_c": 1.0 / (taps * math.sqrt(din) * dout * norm)})
        self.names = [e["layer"].name for e in entries]
        self._peaks_from, self._peak_tensors = None, []   # step_budget's peaks, on the device
        self.classes, order = [], []
        for members in _size_classes(entries):
            g = members[0]["groups"]
            din, dout = max(m["din"] for m in members), max(m["dout"] for m in members)
            device = members[0]["layer"].module.weight.device
            gin = torch.full((len(members), din), -1, dtype=torch.long)
            gout = torch.full((len(members), dout), -1, dtype=torch.long)
            for k, m in enumerate(members):
                lay = m["layer"]
                gin[k, :m["din"]] = hard.group_of(lay.in_set, g)
                gout[k, :m["dout"]] = hard.group_of(lay.out_set, g)
            groups = torch.arange(g)
            p_hard = (gin[:, None, :] == groups[None, :, None]).float()     # [L, g, Din] one-hot (0 on padding)
            q_hard = (gout[:, None, :] == groups[None, :, None]).float()    # [L, g, Dout]
            off = (gout[:, :, None] != gin[:, None, :]) & (gout[:, :, None] >= 0) & (gin[:, None, :] >= 0)
            self.classes.append({
                "weights": [m["layer"].module.weight for m in members], "din": din, "dout": dout,
                "p": p_hard.to(device), "q": q_hard.to(device), "off": off.to(device),
                "row_c": torch.tensor([m["row_c"] for m in members], device=device),
                "col_c": torch.tensor([m["col_c"] for m in members], device=device)})
            order += [m["pos"] for m in members]
        self.inverse = torch.argsort(torch.tensor(order, dtype=torch.long)) if order else torch.zeros(0, dtype=torch.long)
        if self.classes:
            self.inverse = self.inverse.to(self.classes[0]["p"].device)

    def _energy(self, c) -> torch.Tensor:
        return RegularizerPlan.padded_energy([w.detach() for w in c["weights"]], c["dout"], c["din"], mean=False)

    @staticmethod
    def _segments(c, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared norms of the off-block row segments [L, g, Din] and column segments [L, Dout, g]."""
        off_energy = energy * c["off"]
        return torch.bmm(c["q"], off_energy), torch.bmm(off_energy, c["p"].transpose(1, 2))

    @torch.no_grad()
    @torch.no_grad()
    def step(self, lr: float, coefficient: float, strength: float = 1.0) -> None:
        """Shrink every off-block segment by ``lr * coefficient * strength * w_l * c_segment``.

        Tensor ops only: nothing here waits for the device (no ``.item()``, no Python branch on a
        tensor's value), so a GPU step is not held up by the proximal step.
        """
        if not self.classes:
            return
        energies = [self._energy(c) for c in self.classes]
        terms = torch.cat(list(self._class_terms(energies)))
        self_weights = terms / terms.sum().clamp_min(1e-30)     # w_l = S_l / sum S (in class order)
        scale = lr * coefficient * strength * self_weights
        start, rows, cols = 0, [], []
        for c in self.classes:
            n = len(c["weights"])
            rows.append(scale[start:start + n] * c["row_c"])
            cols.append(scale[start:start + n] * c["col_c"])
            start += n
        self._shrink(energies, rows, cols)

    @torch.no_grad()
    def peaks(self) -> list[list[float]]:
        """The largest off-block row and column segment norm of every layer now, per size class:
        ``[[row peak of each layer..., col peak of each layer...] per class]`` (what
        :meth:`step_budget` is sized by; plain floats, so a checkpoint can keep them)."""
        out = []
        for c in self.classes:
            rows, cols = self._segments(c, self._energy(c))
            out.append(torch.cat([rows.flatten(1).max(1).values.sqrt(), cols.flatten(1).max(1).values.sqrt()]).tolist())
        return out

    @torch.no_grad()
    def step_budget(self, peaks: list[list[float]], k: int, n: int, margin: float) -> None:
        """Step ``k`` (0-based) of an ``n``-step sparsify phase with derived thresholds: each layer's
        row and column thresholds are ``margin x its peak`` (:meth:`peaks`, at the phase's start)
        spread over the phase on a linear ramp (step ``k`` gets ``2 (k + 1) / (n (n + 1))`` of it): gentle
        while the diagonal blocks take over the off-block weights' work, enough at the end to empty
        even the largest segment (the last step projects what cross-entropy held on to)."""
        if not self.classes:
            return
        share = margin * 2.0 * (min(k, n - 1) + 1) / (n * (n + 1))
        if self._peaks_from is not peaks:  # on the device once, not every step
            self._peaks_from = peaks
            self._peak_tensors = [torch.tensor(p, dtype=torch.float32, device=c["p"].device)
                                  for c, p in zip(self.classes, peaks)]
        rows, cols = [], []
        for c, p in zip(self.classes, self._peak_tensors):
            count = len(c["weights"])
            rows.append(p[:count] * share)
            cols.append(p[count:] * share)
        self._shrink([self._energy(c) for c in self.classes], rows, cols)

    def _shrink(self, energies, row_thresholds, col_thresholds) -> None:
        """Block soft-thresholding of every off-block row segment, then every column segment, with
        one threshold per layer for each kind ([L] tensors per size class)."""
        for c, e, row_t, col_t in zip(self.classes, energies, row_thresholds, col_thresholds):
            rows, _ = self._segments(c, e)
            keep_rows = (1 - row_t[:, None, None] / rows.sqrt().clamp_min(1e-30)).clamp_min(0)   # [L, g, Din]
            row_factor = torch.bmm(c["q"].transpose(1, 2), keep_rows)             # [L, Dout, Din]: keep of (gout[j], i)
            _, cols = self._segments(c, e * row_factor.pow(2))                     # column norms after the row step
            keep_cols = (1 - col_t[:, None, None] / cols.sqrt().clamp_min(1e-30)).clamp_min(0)   # [L, Dout, g]
            col_factor = torch.bmm(keep_cols, c["p"])                              # [L, Dout, Din]: keep of (j, gin[i])
            factor = torch.where(c["off"], row_factor * col_factor, torch.ones_like(row_factor))
            self._scale(c, factor)

    def _class_terms(self, energies):
        for c, e in zip(self.classes, energies):
            rows, cols = self._segments(c, e)
            yield rows.sqrt().sum((1, 2)) * c["row_c"] + cols.sqrt().sum((1, 2)) * c["col_c"]

    @staticmethod
    def _scale(c, factor: torch.Tensor) -> None:
        """Every weight of the class times its [Dout, Din] slice of ``factor`` (broadcast over taps)."""
        views = []
        for k, w in enumerate(c["weights"]):
            f = factor[k, :w.shape[0], :w.shape[1]].to(w.dtype)
            views.append(f.reshape(*f.shape, *([1] * (w.dim() - 2))).expand_as(w))
        torch._foreach_mul_([w.data for w in c["weights"]], views)

    @torch.no_grad()
    def project(self) -> None:
        """Set every off-block weight to exactly zero."""
        for c in self.classes:
            self._scale(c, (~c["off"]).float())


# ---- the stage's driver ---------------------------------------------------------------------

class Grouping:
    """Per-step driver of the grouping stage (used by :func:`splitnet.train.train_one_epoch`).

        grouping = Grouping(model, RegularizerWeights(1, 1, 10), GroupingSchedule(), total_steps)
        reg, terms = grouping.loss(step)      # add to the cross-entropy (None in warm-up/sparsify)
        ...; optimizer.step()
        grouping.after_step(step, lr)         # the proximal step while sparsifying

    ``total_steps``: the stage's steps over all epochs. ``min_classes_per_group`` /
    ``min_channels_per_group``: the cut's minimum-size rule, applied to the hard assignment the
    sparsify phase fixes (so the cut later finds the same one). The state is the model's
    parameters and :meth:`state` (a checkpoint keeps it; :meth:`load_state` on resume): the hard
    assignment is recomputed from the (frozen) assignments, the derived thresholds are kept.

    ``assign: derived`` (the schedule's default): at the first step after the warm-up the class
    groups come from the classifier (:func:`classifier_class_groups`) and every channel set's from
    the weights (:func:`splitnet.partition.derive_groups`), written into the assignment logits
    (:func:`splitnet.partition.set_assignment_`), and the sparsify phase starts; ``class_start``
    then holds the class groups, every worker's from rank 0.

    ``classifier_init_margin`` (``assign: learned``): at the first step of the assign phase, start
    the class groups from the classifier as the warm-up left it (:func:`init_class_assignment_`
    with this margin): ``assign_init: classifier`` for a grouping from scratch. ``class_start``
    then holds those groups. A resume past that step finds them in the checkpointed assignments
    and does not apply them again.
    """

    def __init__(self, model: SplitModel, weights: RegularizerWeights, schedule: GroupingSchedule, total_steps: int,
                 min_classes_per_group: int = 1, min_channels_per_group: int = 1,
                 classifier_init_margin: float | None = None):
        self.model, self.weights, self.schedule, self.total = model, weights, schedule, total_steps
        self.minimum = (min_classes_per_group, min_channels_per_group)
        self.prox: BlockProx | None = None
        self.hard = None
        self.classifier_init_margin = classifier_init_margin
        start = schedule.assign_start(total_steps)
        self._class_init_step = start if classifier_init_margin is not None or schedule.derived else None
        self._sparsify_start = schedule.sparsify_start(total_steps)
        self.class_start: list[int] | None = None
        self.derived_at: int | None = None            # the step the groups were derived at (derived)
        self.peaks: list[list[float]] | None = None   # derived strength: the layers' peaks at the phase's start
        self.fixed_off_block: dict[str, float] | None = None  # off-block energy when the groups were fixed

    def state(self) -> dict:
        """What a resume needs besides the model's parameters (JSON-friendly)."""
        return {"class_start": self.class_start, "derived_at": self.derived_at, "peaks": self.peaks,
                "fixed_off_block": self.fixed_off_block}

    def load_state(self, state: dict | None) -> None:
        state = state or {}
        self.class_start = state.get("class_start", self.class_start)
        self.derived_at = state.get("derived_at", self.derived_at)
        self.peaks = state.get("peaks", self.peaks)
        self.fixed_off_block = state.get("fixed_off_block", self.fixed_off_block)

    def phase(self, step: int) -> str:
        return self.schedule.phase(step, self.total)

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _classifier_groups(self) -> torch.Tensor:
        """The classifier's class groups, computed on rank 0 and sent to every worker."""
        groups = self.model.assignments.groups(CLASSES)
        if not self._distributed():
            return classifier_class_groups(self.model.fc.weight, groups)
        device = self.model.fc.weight.device
        labels = (classifier_class_groups(self.model.fc.weight, groups).to(device) if dist.get_rank() == 0 else
                  torch.zeros(self.model.fc.weight.shape[0], dtype=torch.long, device=device))
        dist.broadcast(labels, src=0)
        return labels.cpu()

    def loss(self, step: int):
        """(regularizer loss, terms as 0-d tensors) for ``step``, or (None, {}) when the phase has none."""
        phase = self.phase(step)
        if phase != "assign":
            if phase == "sparsify":
                self._fix_hard(step)
            return None, {}
        if step == self._class_init_step and self.class_start is None:
            labels = self._classifier_groups()
            init_class_assignment_(self.model, labels, self.classifier_init_margin)
            self.class_start = labels.tolist()
        terms = regularizer_terms(self.model)
        w = self.weights
        disjoint = w.disjoint * self.schedule.disjoint_factor(step, self.total)
        loss = disjoint * terms["disjoint"] + w.weight * terms["weight"] + w.balance * terms["balance"]
        return loss, {k: terms[k].detach() for k in ("weight", "disjoint", "balance")}

    def _fix_hard(self, step: int) -> None:
        if self.prox is not None:
            return

        if self.schedule.derived and self.derived_at is None:
            if not self._distributed() or dist.get_rank() == 0:  # rank 0 derives; the broadcast below sends it
                if self.schedule.assign == "random":
                    set_assignment_(self.model, random_groups(self.model, self.schedule.random_seed))
                else:
                    labels = classifier_class_groups(self.model.fc.weight, self.model.assignments.groups(CLASSES))
                    set_assignment_(self.model, derive_groups(self.model, labels))
            self.class_start, self.derived_at = [], step        # set from the fixed labels below
        if self._distributed():
            # every worker must fix the same groups: rank 0's assignments decide (argmax ties)
            with torch.no_grad():
                for p in self.model.assignments.parameters():
                    dist.broadcast(p.data, src=0)
        self.hard = hard_assignment(self.model, *self.minimum)
        if self.schedule.derived and self.derived_at == step:
            self.class_start = self.hard.labels[CLASSES].tolist()
        for p in self.model.assignments.parameters():
            p.requires_grad_(False)
        self.prox = BlockProx(self.model, self.hard)
        if self.fixed_off_block is None:  # what the assignment leaves off the blocks before any proximal step
            self.fixed_off_block = off_block_energy(self.model, self.hard)
        if not self.schedule.sparsify_strength and self.peaks is None:
            self.peaks = self.prox.peaks()

    def after_step(self, step: int, lr: float) -> None:
        """The proximal step (sparsify phase); the last step of the stage projects what is left."""
        if self.phase(step) != "sparsify" or self.prox is None:
            return
        if self.schedule.sparsify_strength:
            self.prox.step(lr, self.weights.weight or 1.0, self.schedule.strength(step, self.total))
        else:
            start = self._sparsify_start
            self.prox.step_budget(self.peaks, step - start, self.total - start, PROX_MARGIN)
        if step + 1 >= self.total:
            self.prox.project()

    @torch.no_grad()
    def group_shares(self) -> dict[str, float]:
        """Every learned set's smallest group as a share of its balanced size (1.0: balanced, 0: an
        empty group), from the argmax of the soft assignments as they are: no minimum-size move
        hides a collapse. Fixed at what the sparsify phase fixed once it has."""
        if self.hard is not None:
            sizes = self.hard.group_sizes()
        else:
            sizes = {name: torch.bincount(q.argmax(0).cpu(), minlength=q.shape[0]).tolist()
                     for name, q in self.model.assignments.learned()}
        return {name: smallest_group_share({name: counts})[0] for name, counts in sizes.items()}

    def off_block_energy(self) -> dict[str, float]:
        """Off-block energy per split layer under the current hard assignment (fixed while sparsifying).
        Before the sparsify phase fixes it, the argmax is taken quietly: this is a measurement, and
        the minimum-size moves it would need are not made (the sparsify phase and the cut log theirs)."""
        hard = self.hard if self.hard is not None else hard_assignment(self.model, *self.minimum, quiet=True)
        return off_block_energy(self.model, hard)


def collapsing(shares: dict[str, float], floor: float = MIN_GROUP_SHARE, phase: str | None = None) -> dict[str, float]:
    """The sets of ``shares`` (:meth:`Grouping.group_shares`) whose smallest group is under ``floor``.
    None in the warm-up (``phase``): the assignments are still their init noise, no group has formed."""
    if phase == "warmup":
        return {}
    return {name: share for name, share in shares.items() if share < floor}


def collapse_warning(stage: str, epoch: int, collapsed: dict[str, float], phase: str) -> str:
    """One line when groups collapse during grouping, before any cut: which sets, how small, what to do."""
    worst = sorted(collapsed.items(), key=lambda kv: kv[1])
    listed = ", ".join(f"{name} {share:.0%}" for name, share in worst[:3]) + (
        f" and {len(worst) - 3} more" if len(worst) > 3 else "")
    when = "the sparsify phase fixed them so: the cut will move members to fill" if phase == "sparsify" else \
        "still learning: they may recover before the sparsify phase fixes them"
    return (f"[{stage}] warning: epoch {epoch}: groups collapsing, the smallest group of {listed} of its balanced "
            f"size (floor {MIN_GROUP_SHARE:.0%}); {when} (group.assign: derived keeps groups balanced; learned: lower "
            f"group.assignment_lr_mult or raise group.balance)")


# -- where the class groups start ----------------------------------------------------------------
ASSIGN_INITS = ("random", "classifier")


@torch.no_grad()
def init_class_assignment_(model: SplitModel, labels: torch.Tensor, margin: float = 2.0) -> None:
    """Start the class assignment at ``labels`` (group id per class): ``margin`` added to the
    logit of the class's group (the init noise stays). ``margin = 2`` with 2 groups is q ~ 0.88: a
    lean, not a decision; the objective still moves the classes. How far it moves them depends on
    the class matrix's learning rate (``class_assignment_lr_mult``): from the demo's baseline, x60
    let the W**2 co-clustering pull NMI from 0.67 back to 0.38 in 3 epochs, x6 kept 0.67."""
    logits = model.assignments.logit(CLASSES)
    if labels.numel() != logits.shape[1] or int(labels.max()) >= logits.shape[0]:
        raise ValueError(f"class labels for {labels.numel()} classes in {int(labels.max()) + 1} groups do not fit "
                         f"the class assignment [{logits.shape[0]}, {logits.shape[1]}]")
    logits.scatter_add_(0, labels.to(logits.device)[None, :], torch.full_like(logits[:1], margin))
