"""Saved-gradient autograd: losses whose gradient is computed in the forward pass.

NVIDIA apex's pattern. The forward pass computes the loss and its analytic gradient
together and keeps only the gradient; backward is at most one multiply by the upstream
gradient, so at most one logits-sized tensor stays alive between forward and backward.

A loss plugs in as ``fn(*inputs, needs) -> (loss, grads)``:

- ``inputs``: the logits first, then any other tensor (or None) the loss may
  differentiate, such as soft targets or an alpha tensor;
- ``needs``: one bool per input, whether its gradient is wanted;
- ``grads``: one tensor (or None) per input, d loss / d input, either of the input's
  shape or broadcast to the loss's shape (it is summed back). The logits' gradient must be
  a tensor ``fn`` made: it is scaled in place.

``fn`` is written in differentiable torch ops: a backward with ``create_graph=True`` (a
gradient penalty, a Hessian-vector product, MAML) calls it again under autograd on the
inputs and differentiates its analytic gradient. That needs the inputs at backward: the
loss holds them only weakly (they are there whenever the caller or the graph keeps them),
or, inside :func:`double_backward`, strongly.

Normalisers live in the forward pass: a "mean" loss, or a "sum" divided by a normaliser,
divides its gradient there (:func:`reduce_loss_and_grad`), so a plain ``loss.backward()``
hands the saved gradient on without a pass over it.

fp16/bf16 inputs: the gradient is kept in fp32 and multiplied by the upstream gradient
(GradScaler's loss scale) before it is rounded, once, to the input's dtype. Rounding first
would flush small gradients to 0 before the scale lifts them, and the scale 65536 is
itself inf in fp16.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Iterator

import torch
from torch import Tensor

from detfocal.utils._compat import graph_is_kept, tensor_version

__all__ = ["LossAndGrads", "LossFn", "RowwiseSavedGradFunction", "SavedGradFunction", "combine_divisors",
           "divide_loss_and_grads", "double_backward", "reduce_loss_and_grad", "saved_grad_loss"]

LossAndGrads = tuple[Tensor, tuple[Tensor | None, ...]]
LossFn = Callable[..., LossAndGrads]


def reduce_loss_and_grad(loss: Tensor, grads: tuple[Tensor | None, ...], reduction: str,
                         divisor: Tensor | None = None, normalizer: Tensor | None = None) -> LossAndGrads:
    """Reduce an elementwise loss and divide the loss and its gradients alike.

    Args:
        loss: the elementwise loss.
        grads: the elementwise gradients, one per input of the loss function; the first
            (the logits') is divided in place.
        reduction: "none", "sum" or "mean".
        divisor: "mean" only: what to divide by (already clamped by the caller);
            default ``max(loss.numel(), 1)``.
        normalizer: "sum" and "mean": a further positive divisor (a one-element tensor
            without gradient), such as a detector's positive-anchor count.

    Returns:
        ``(loss, grads)``.
    """
    if reduction == "none":
        return loss, grads
    total = loss.sum()
    if reduction == "sum":
        divisor = None
    elif divisor is None:
        divisor = torch.full((), max(loss.numel(), 1), dtype=loss.dtype, device=loss.device)  # no host copy
    return divide_loss_and_grads(total, grads, divisor, normalizer)


def divide_loss_and_grads(total: Tensor, grads: tuple[Tensor | None, ...], divisor: Tensor | None,
                          normalizer: Tensor | None = None) -> LossAndGrads:
    """``total / (divisor * normalizer)``, with the gradients divided alike (the logits' in place).

    The gradients are multiplied by the reciprocal (one multiply per element, fused into
    the gradient's kernel under ``torch.compile``); the loss itself is divided.
    """
    divisor = combine_divisors(divisor, normalizer)
    if divisor is None:
        return total, grads
    inverse = 1.0 / divisor
    first, *rest = grads
    scaled = [None if first is None else first.mul_(inverse.to(first.dtype))]
    scaled += [None if grad is None else grad * inverse.to(grad.dtype) for grad in rest]
    return total / divisor, tuple(scaled)


def combine_divisors(divisor: Tensor | None, normalizer: Tensor | None) -> Tensor | None:
    """``divisor * normalizer``, where either may be None (None: divide by nothing).

    Both are 0-d tensors of the loss's compute dtype (``checks.normalizer_tensor`` makes the
    normaliser so).
    """
    if normalizer is None:
        return divisor
    return normalizer if divisor is None else divisor * normalizer


def saved_grad_loss(fn: LossFn, *inputs: Tensor | None, rowwise: bool = False) -> Tensor:
    """``fn``'s loss, through :class:`SavedGradFunction` when an input needs a gradient.

    Args:
        fn: the loss function, ``fn(*inputs, needs) -> (loss, grads)``.
        *inputs: the logits, then the other tensors ``fn`` may differentiate (or None).
        rowwise: the loss has shape ``logits.shape[:-1]`` (one value per row) and its
            upstream gradient is broadcast over the last dimension.

    Returns:
        The loss.
    """
    grad_enabled = torch.is_grad_enabled()
    needs = tuple(grad_enabled and isinstance(x, Tensor) and x.requires_grad for x in inputs)
    if any(needs):
        function = RowwiseSavedGradFunction if rowwise else SavedGradFunction
        return function.apply(fn, *inputs)
    return fn(*inputs, needs=needs)[0]


def _is_one(scale: Tensor) -> bool:
    """Whether a one-element upstream gradient is exactly 1 (checked on CPU only: elsewhere
    reading it would stall the device, and a multiply there costs less than the wait)."""
    return scale.device.type == "cpu" and scale.numel() == 1 and bool(scale.reshape(()) == 1)


_keep_inputs = threading.local()


@contextlib.contextmanager
def double_backward() -> Iterator[None]:
    """Losses created inside keep their inputs alive until their backward, for ``create_graph=True``.

    A backward with ``create_graph=True`` recomputes the loss from its inputs. Outside this
    context the loss holds the logits (and soft targets) only weakly, so that plain training
    keeps just the saved gradient; then that backward works when something else still holds
    them, and otherwise raises. Inside, the loss holds them, at the cost of their memory
    until the backward: use it where the logits are intermediates, e.g. MAML or a gradient
    penalty through a whole detector.

    Example:
        >>> from detfocal.losses import sigmoid_focal_loss
        >>> weight = torch.randn(4, 3, requires_grad=True)
        >>> with double_backward():
        ...     loss = sigmoid_focal_loss(weight * 2.0, torch.tensor([0, 1, 3, -1]), reduction="sum")
        >>> (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
        >>> grad.pow(2).sum().backward()
    """
    previous = getattr(_keep_inputs, "on", False)
    _keep_inputs.on = True
    try:
        yield
    finally:
        _keep_inputs.on = previous


class SavedGradFunction(torch.autograd.Function):
    """Runs ``fn`` in forward, keeps only its gradients, and scales them in backward.

    The last backward through the graph scales the saved logits gradient in place (not at
    all when the upstream gradient is 1) and hands it on, so autograd stores it as the
    leaf's ``.grad`` without a copy. A backward that keeps the graph (``retain_graph``,
    ``gradcheck``) returns a new tensor instead: what it hands out is the caller's to
    modify, and the saved gradient stays intact for the next backward.

    A backward with ``create_graph=True`` recomputes ``fn`` under autograd from the inputs,
    unchanged since the forward. Logits-sized inputs are held weakly (strongly inside
    :func:`double_backward`); smaller ones, such as alpha, strongly.
    """

    @staticmethod
    def forward(ctx, fn: LossFn, *inputs: Tensor | None) -> Tensor:  # type: ignore[override]
        needs = tuple(ctx.needs_input_grad[1:])
        loss, grads = fn(*inputs, needs=needs)
        saved: list[Tensor | None] = []
        for x, need, grad in zip(inputs, needs, grads):
            if need and grad is None:
                raise RuntimeError("detfocal: a saved-gradient loss returned no gradient for an input that needs one")
            if need and loss.dim() == 0 and grad.shape != x.shape:
                grad = grad.sum_to_size(x.shape)  # a broadcast input (alpha): reduce now, the upstream is a scalar
            saved.append(grad if need else None)
        # Plain attributes, not save_for_backward: backward updates the logits' gradient in
        # place, and these are intermediates (never inputs or outputs), so no version check is needed.
        ctx.grads = saved
        ctx.needs = needs
        ctx.input_meta = [(x.dtype, x.shape) if isinstance(x, Tensor) else None for x in inputs]
        # Logits-sized inputs are held weakly: keeping them alive for a second derivative
        # that is rarely asked for would double the memory the saved gradient is there to save.
        ctx.fn = fn
        ctx.input_refs = [_reference(x, inputs[0].numel()) for x in inputs]
        ctx.input_versions = [tensor_version(x) if isinstance(x, Tensor) else None for x in inputs]
        return loss

    @staticmethod
    def upstream(grad_output: Tensor) -> Tensor:
        """The upstream gradient, broadcastable to the saved gradients."""
        return grad_output

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *_input_grads(ctx, SavedGradFunction.upstream(grad_output)))


class RowwiseSavedGradFunction(SavedGradFunction):
    """:class:`SavedGradFunction` for a loss of shape ``logits.shape[:-1]`` (one value per row)."""

    @staticmethod
    def upstream(grad_output: Tensor) -> Tensor:
        return grad_output.unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *_input_grads(ctx, RowwiseSavedGradFunction.upstream(grad_output)))


def _reference(x: Tensor | None, logits_numel: int) -> Tensor | weakref.ref | None:
    """A weak reference to a logits-sized input; the input itself if it is smaller (alpha) or
    inside :func:`double_backward`."""
    if not isinstance(x, Tensor):
        return None
    keep = x.numel() < logits_numel or getattr(_keep_inputs, "on", False)
    return x if keep else weakref.ref(x)


def _input_grads(ctx, upstream: Tensor) -> list[Tensor | None]:
    """The inputs' gradients: the saved ones times ``upstream``, or, under ``create_graph``
    (grad mode is on in backward only then), ``fn``'s recomputed under autograd."""
    grads = ctx.grads
    if grads is None:
        # The gradients are plain attributes, so autograd's own check for this cannot see them.
        raise RuntimeError("Trying to backward through the graph a second time (or directly access saved "
                           "tensors after they have already been freed): a detfocal loss hands its saved "
                           "gradient on in the first backward. Specify retain_graph=True if you need to "
                           "backward a second time.")
    kept = graph_is_kept()
    fn, refs = ctx.fn, ctx.input_refs
    if not kept:  # the last backward: hand the buffers on, keep no reference
        ctx.grads = ctx.fn = ctx.input_refs = None
    if torch.is_grad_enabled():
        del grads
        return _differentiable_input_grads(ctx, fn, refs, upstream)
    result: list[Tensor | None] = []
    for index, (grad, meta) in enumerate(zip(grads, ctx.input_meta)):
        if grad is None:
            result.append(None)
        elif index == 0:
            result.append(_scale_logits_grad(grad, upstream, meta[0], in_place=not kept))
        else:
            dtype, shape = meta
            result.append((grad * upstream.to(grad.dtype)).sum_to_size(shape).to(dtype))
    del grads
    return result


def _differentiable_input_grads(ctx, fn: LossFn, refs: list, upstream: Tensor) -> list[Tensor | None]:
    """``create_graph=True``: ``fn``'s analytic gradients recomputed under autograd from the
    inputs, so that they carry a graph (a second derivative of the loss)."""
    inputs = []
    for index, (ref, version) in enumerate(zip(refs, ctx.input_versions)):
        name = "logits" if index == 0 else f"the loss's input {index} (its targets or alpha)"
        x = ref() if isinstance(ref, weakref.ref) else ref
        if ref is not None and x is None:
            raise RuntimeError(
                f"detfocal: backward with create_graph=True recomputes the loss from its inputs, but "
                f"{name} was freed after the forward pass (the loss keeps only its gradient). Keep a "
                f"reference to it until this backward, or create the loss inside "
                f"`with detfocal.losses.double_backward():`, which keeps its inputs alive.")
        if x is not None and tensor_version(x) != version:
            raise RuntimeError(
                f"detfocal: {name} of the loss was modified in place after the forward pass, so backward "
                f"with create_graph=True cannot recompute the loss from it; clone it before modifying it.")
        inputs.append(x)
    with torch.enable_grad():
        _, grads = fn(*inputs, needs=ctx.needs)
    result: list[Tensor | None] = []
    for need, grad, meta in zip(ctx.needs, grads, ctx.input_meta):
        if not need or grad is None:
            result.append(None)
            continue
        dtype, shape = meta
        result.append((grad * upstream.to(grad.dtype)).sum_to_size(shape).to(dtype))
    return result


def _scale_logits_grad(grad: Tensor, upstream: Tensor, dtype: torch.dtype, in_place: bool) -> Tensor:
    """The saved logits gradient times the upstream gradient, in the logits' dtype.

    ``in_place``: the last backward, which may scale the saved buffer and hand it on.
    """
    upstream = upstream.to(grad.dtype)
    if grad.dtype != dtype:
        # fp16/bf16 logits: multiply in fp32, round once when the product is stored.
        if _is_one(upstream):
            return grad.to(dtype)
        out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
        _mul_in_chunks(grad, upstream.expand_as(grad) if upstream.dim() else upstream, out)
        return out
    if not in_place:
        return grad * upstream
    if upstream.numel() == 1:
        scale = upstream.reshape(())
        return grad if _is_one(scale) else grad.mul_(scale)
    return grad.mul_(upstream)  # "none": the loss's shape (or its rows') broadcasts to the gradient's


# A product into an output of another dtype goes through a temporary of the inputs' dtype;
# chunks of this many elements keep that temporary at 4 MiB instead of a logits-sized fp32 copy.
CHUNK_NUMEL = 1 << 20


def _mul_in_chunks(grad: Tensor, upstream: Tensor, out: Tensor) -> None:
    """``out[...] = grad * upstream`` (upstream a scalar or ``grad``'s shape), a slab of dim 0 at a time."""
    if grad.numel() <= CHUNK_NUMEL or grad.dim() == 0:
        torch.mul(grad, upstream, out=out)
        return
    row = grad[0].numel()
    step = max(CHUNK_NUMEL // max(row, 1), 1)
    for start in range(0, grad.shape[0], step):
        rows = slice(start, start + step)
        part = upstream if upstream.dim() == 0 else upstream[rows]
        if row > CHUNK_NUMEL and step == 1:
            _mul_in_chunks(grad[start], part[0] if part.dim() else part, out[start])
        else:
            torch.mul(grad[rows], part, out=out[rows])
