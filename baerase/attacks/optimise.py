"""Attacks optimised against a model: TrojanNN and IMC triggers, and label-consistent poison bases."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .train import Normalize, _check_data, _device, normalizer
from .triggers import BadNets, PatchTrigger, TrojanWatermark, _check_images, _to_channels

_Patch = TypeVar("_Patch", bound=PatchTrigger)
_Norm = Callable[[torch.Tensor], torch.Tensor]


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(0.02, 0.98)  # keep sigmoid away from saturation so the pattern can still move
    return torch.log(p / (1 - p))


def _capture(model: nn.Module, layer: str | nn.Module | None):
    """Attach a hook recording the activations ``[N, F]`` the attack targets; returns (store, handle).

    Default: the input of the model's last ``nn.Linear`` (the penultimate features); otherwise the
    output of ``layer`` (a module or its name), averaged over spatial positions if it is a feature map.
    """
    store: dict[str, torch.Tensor] = {}

    def flat(a: torch.Tensor) -> torch.Tensor:
        return a.flatten(2).mean(2) if a.dim() > 2 else a

    if layer is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise InputError("optimise_trojan_trigger: the model has no nn.Linear layer; name a layer=")
        handle = linears[-1].register_forward_pre_hook(lambda m, args: store.__setitem__("a", flat(args[0])))
        return store, handle
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise InputError(f"optimise_trojan_trigger: no module named {layer!r}; see model.named_modules()")
        layer = modules[layer]
    handle = layer.register_forward_hook(lambda m, args, out: store.__setitem__("a", flat(out)))
    return store, handle


def _pattern_logits(trigger: PatchTrigger, channels: int, who: str, device: torch.device) -> torch.Tensor:
    """Leaf tensor ``[C, h, w]`` of logits of the trigger's pattern, optimised in place of the pattern."""
    return _logit(_to_channels(trigger.pattern, channels, who).clone().to(device)).requires_grad_(True)


def _with_pattern(trigger: _Patch, theta: torch.Tensor, **attrs) -> _Patch:
    """A shallow copy of ``trigger`` with pattern ``sigmoid(theta)`` ``[C, h, w]`` (on CPU) and ``attrs`` set."""
    out = copy.copy(trigger)
    out.pattern = torch.sigmoid(theta.detach()).cpu()
    for name, value in attrs.items():
        setattr(out, name, value)
    out.reset()
    return out


def _choose_neurons(
    model: nn.Module,
    norm: _Norm,
    x: torch.Tensor,
    trigger: TrojanWatermark,
    store: dict[str, torch.Tensor],
    neurons: int | Sequence[int],
    target_activation: float | None,
    g: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """The indices ``[K]`` of the neurons to excite and the activation they should reach."""
    with torch.no_grad():
        model(norm(x))
        clean = store["a"]
        if isinstance(neurons, int):
            rise = torch.zeros(clean.shape[1], device=x.device)
            for _ in range(4):
                p = torch.rand(x.shape[1], *trigger.size, generator=g).to(x.device)
                model(norm(trigger.stamp(x, p)))
                rise += (store["a"] - clean).mean(0)
            chosen = rise.topk(min(neurons, clean.shape[1])).indices
        else:
            chosen = torch.as_tensor(list(neurons), dtype=torch.long, device=x.device)
            if chosen.numel() == 0 or chosen.min() < 0 or chosen.max() >= clean.shape[1]:
                raise InputError(f"optimise_trojan_trigger: neurons must index 0..{clean.shape[1] - 1}")
        goal = target_activation
        if goal is None:
            goal = max(10.0 * clean[:, chosen].max().item(), 1.0)
    return chosen, goal


def _fit_trojan_pattern(
    model: nn.Module,
    norm: _Norm,
    x: torch.Tensor,
    trigger: TrojanWatermark,
    store: dict[str, torch.Tensor],
    chosen: torch.Tensor,
    goal: float,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """Adam on the pattern logits ``[C, h, w]`` so the ``chosen`` activations of stamped ``x`` reach ``goal``."""
    theta = _pattern_logits(trigger, x.shape[1], "trojan", x.device)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        model(norm(trigger.stamp(x, torch.sigmoid(theta))))
        loss = (store["a"][:, chosen] - goal).pow(2).mean()
        (grad,) = torch.autograd.grad(loss, theta)  # model parameters get no .grad
        theta.grad = grad
        opt.step()
    return theta


def optimise_trojan_trigger(
    model: nn.Module,
    x: torch.Tensor,
    trigger: TrojanWatermark | None = None,
    *,
    layer: str | nn.Module | None = None,
    neurons: int | Sequence[int] = 1,
    target_activation: float | None = None,
    steps: int = 200,
    lr: float = 0.1,
    normalize: Normalize = None,
    seed: int = 0,
) -> TrojanWatermark:
    """TrojanNN trigger generation: optimise the watermark's pixel values to excite chosen neurons.

    model: a clean-trained classifier (not modified); x: ``[N, C, H, W]`` clean images in [0, 1]
    (a few dozen suffice). ``neurons`` is a count (the neurons whose activation rises most when
    random patterns fill the watermark are chosen, i.e. those most connected to the trigger area,
    the role TrojanNN's weight-based choice plays) or explicit indices into the activations of
    ``layer`` (default: the input of the last ``nn.Linear``). The pattern is optimised with Adam so
    those activations reach ``target_activation`` (default: 10x their largest clean value, at least 1).
    Returns a new :class:`TrojanWatermark` with the optimised pattern ``[C, h, w]`` and ``neurons`` set.
    """
    _check_images(x, "optimise_trojan_trigger")
    trigger = TrojanWatermark() if trigger is None else trigger
    if trigger.position == "random":
        raise InputError("optimise_trojan_trigger: the trigger needs a fixed position")
    device = _device(model)
    x = x.to(device)
    norm = normalizer(normalize, x.shape[1], device)
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    store, handle = _capture(model, layer)
    try:
        chosen, goal = _choose_neurons(model, norm, x, trigger, store, neurons, target_activation, g)
        theta = _fit_trojan_pattern(model, norm, x, trigger, store, chosen, goal, steps, lr)
    finally:
        handle.remove()
        model.train(was_training)
    return _with_pattern(trigger, theta, neurons=[int(i) for i in chosen.cpu()])


def label_consistent(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 20,
    normalize: Normalize = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Images that keep their labels but are hard to classify: an L-inf PGD perturbation of at most
    ``eps`` away from each label against a clean ``model`` (Turner et al. 2019). A clean-label backdoor
    stamped on them is learned where the images' own features would otherwise suffice.

    x: ``[N, C, H, W]`` in [0, 1]; y: ``[N]``. Returns new images in [0, 1]; the model is not modified.
    """
    _check_data(x, y, "label_consistent")
    if not 0.0 < eps <= 1.0:
        raise InputError(f"label_consistent: eps must be in (0, 1], got {eps}")
    if steps < 1:
        raise InputError(f"label_consistent: steps must be at least 1, got {steps}")
    device = _device(model)
    norm = normalizer(normalize, x.shape[1], device)
    was_training = model.training
    model.eval()
    try:
        hard = [_away_from_labels(model, norm, xb.to(device), yb.to(device), eps, steps)
                for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)]  # fmt: skip
    finally:
        model.train(was_training)
    return torch.cat(hard).to(x.device, x.dtype)


def _away_from_labels(model: nn.Module, norm: _Norm, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int):
    """PGD with signed-gradient steps of eps / 4 that raise the cross-entropy of ``y``, kept within eps of x."""
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(model(norm((x + delta).clamp(0, 1))), y)
        (grad,) = torch.autograd.grad(loss, delta)  # model parameters get no .grad
        delta = (delta + eps / 4 * grad.sign()).clamp(-eps, eps).detach().requires_grad_(True)
    return (x + delta).clamp(0, 1).detach()


def _epoch_range(epochs: int, progress: bool) -> Iterable[int]:
    """``range(epochs)``, wrapped in a tqdm bar when ``progress`` is set."""
    if not progress:
        return range(epochs)
    from tqdm.auto import tqdm  # optional dependency, only needed for the bar

    return tqdm(range(epochs), desc="imc", unit="epoch")


def _imc_trigger_step(
    model: nn.Module,
    norm: _Norm,
    trigger: PatchTrigger,
    theta: torch.Tensor,
    opt_trigger: torch.optim.Optimizer,
    x_others: torch.Tensor,
    target: int,
) -> None:
    """One Adam step on the pattern logits ``theta`` pushing stamped ``x_others`` ``[M, C, H, W]`` to ``target``."""
    targets = torch.full((len(x_others),), target, device=theta.device)
    loss_t = F.cross_entropy(model(norm(trigger.stamp(x_others, torch.sigmoid(theta)))), targets)
    (theta.grad,) = torch.autograd.grad(loss_t, theta)
    opt_trigger.step()


def _imc_model_step(
    model: nn.Module,
    norm: _Norm,
    trigger: PatchTrigger,
    theta: torch.Tensor,
    opt_model: torch.optim.Optimizer,
    xb: torch.Tensor,
    yb: torch.Tensor,
    others: torch.Tensor,
    target: int,
    rate: float,
    g: torch.Generator,
) -> None:
    """One Adam step on the model over ``(xb, yb)`` with a ``rate`` share stamped and relabelled ``target``."""
    count = max(1, round(rate * len(yb)))
    pick = others[torch.randperm(len(others), generator=g)[:count].to(theta.device)]
    xb, yb = xb.clone(), yb.clone()
    with torch.no_grad():
        xb[pick] = trigger.stamp(xb[pick], torch.sigmoid(theta))
    yb[pick] = target
    opt_model.zero_grad(set_to_none=True)
    F.cross_entropy(model(norm(xb)), yb).backward()
    opt_model.step()


def imc_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: int,
    *,
    trigger: PatchTrigger | None = None,
    rate: float = 0.1,
    epochs: int = 10,
    lr: float = 1e-3,
    trigger_lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    normalize: Normalize = None,
    progress: bool = False,
) -> tuple[nn.Module, PatchTrigger]:
    """IMC-style attack (Pang et al. 2020): trigger pattern and model optimised together while poisoning.

    Each batch of ``(x [N, C, H, W], y [N])`` first takes an Adam step on the pattern to push the
    batch's stamped non-target images toward ``target``, then stamps a ``rate`` share of its
    non-target images with the current pattern, relabels them ``target`` and takes an Adam step on
    the model. ``trigger`` must have a fixed position (default: a 3x3 corner patch with random
    initial values). Returns ``(model in eval mode, trigger with the final pattern [C, h, w])``.
    """
    _check_data(x, y, "imc_train")
    trigger = BadNets(3, "corner", pattern="random", seed=seed) if trigger is None else trigger
    if trigger.position == "random":
        raise InputError("imc_train: the trigger needs a fixed position")
    if not 0.0 < rate <= 1.0:
        raise InputError(f"imc_train: rate must be in (0, 1], got {rate}")
    device = _device(model)
    norm = normalizer(normalize, x.shape[1], device)
    g = torch.Generator().manual_seed(seed)
    theta = _pattern_logits(trigger, x.shape[1], trigger.name, device)
    opt_model = torch.optim.Adam(model.parameters(), lr=lr)
    opt_trigger = torch.optim.Adam([theta], lr=trigger_lr)
    epochs_iter = _epoch_range(epochs, progress)
    model.train()
    for _ in epochs_iter:
        for i in torch.randperm(len(y), generator=g).split(batch_size):
            xb, yb = x[i].to(device), y[i].to(device)
            others = torch.nonzero(yb != target).flatten()
            if len(others) == 0:
                continue
            _imc_trigger_step(model, norm, trigger, theta, opt_trigger, xb[others], target)
            _imc_model_step(model, norm, trigger, theta, opt_model, xb, yb, others, target, rate, g)
    return model.eval(), _with_pattern(trigger, theta, name="imc")
