"""Saved-gradient autograd: losses whose gradient is computed in the forward pass.

NVIDIA apex's pattern. The forward pass computes the loss and its analytic gradient
together and keeps only the gradient; backward is at most one multiply by the upstream
gradient. At most one logits-sized tensor stays alive between forward and backward.

A loss plugs in as ``fn(*inputs, needs) -> (loss, grads)``:

- ``inputs``: the logits first, then any other tensor (or None) the loss may
  differentiate, such as soft targets or an alpha tensor;
- ``needs``: one bool per input, whether its gradient is wanted;
- ``grads``: one tensor (or None) per input, d loss / d input, either of the input's
  shape or broadcast to the loss's shape (it is summed back). The logits' gradient must be
  a tensor ``fn`` made: it is scaled in place.

Normalisers live in the forward pass. A "mean" loss, or a "sum" divided by a normaliser
(the head's positive count), divides its gradient there, inside the same fused kernel
under ``torch.compile`` (:func:`reduce_loss_and_grad`). A plain ``loss.backward()`` then
sends an upstream gradient of exactly 1, and backward hands the saved gradient on with
no pass over it at all: the memory floor of a loss is one read of the logits and one
write of the gradient.

Precision of fp16/bf16 inputs: the gradient is computed and kept in fp32. Backward
multiplies it by the upstream gradient (GradScaler's loss scale) in fp32 and rounds the
product once to the input's dtype. Storing the gradient in fp16 before that multiply
flushes small gradients to 0 before GradScaler can lift them, and the scale 65536 itself
is inf in fp16. The cost is 2 bytes per element more between forward and backward (fp16
[2, 200000, 80]: 122 MiB instead of 61 MiB); backward writes the product in 1M-element
chunks, so it adds only the fp16 result. fp32 and fp64 inputs keep their gradient in
their own dtype and, for a scalar loss, scale it in place: no second logits-sized
allocation. On the last backward through the graph (no ``retain_graph``) the saved
gradient is released as it is handed on, so autograd stores it as the leaf's ``.grad``
instead of copying it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from detfocal.utils._compat import assert_async, graph_is_kept

__all__ = ["LossAndGrads", "LossFn", "RowwiseSavedGradFunction", "SavedGradFunction", "combine_divisors",
           "divide_loss_and_grads", "reduce_loss_and_grad", "saved_grad_loss"]

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
        divisor = torch.tensor(max(loss.numel(), 1), dtype=loss.dtype, device=loss.device)
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


class SavedGradFunction(torch.autograd.Function):
    """Runs ``fn`` in forward, keeps only its gradients, and scales them in backward.

    For a scalar loss and fp32/fp64 logits, the first backward scales the saved gradient
    in place (not at all when the upstream gradient is 1) and hands it on: no new
    logits-sized allocation, which on CPU costs as much as the multiply itself. It records
    the scale it applied, so a later backward through the same graph (``retain_graph``,
    ``gradcheck``) rescales by the ratio, out of place. fp16/bf16 logits get a new tensor
    each time: the fp32 product, rounded once.
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
        ctx.input_meta = [(x.dtype, x.shape) if isinstance(x, Tensor) else None for x in inputs]
        ctx.applied_scale = None
        return loss

    @staticmethod
    def upstream(grad_output: Tensor) -> Tensor:
        """The upstream gradient, broadcastable to the saved gradients."""
        return grad_output

    @classmethod
    def input_grads(cls, ctx, grad_output: Tensor) -> list[Tensor | None]:
        upstream = cls.upstream(grad_output)
        grads = ctx.grads
        if grads is None:
            # The gradients are plain attributes, so autograd's own check for this cannot see them.
            raise RuntimeError("Trying to backward through the graph a second time (or directly access saved "
                               "tensors after they have already been freed): a detfocal loss hands its saved "
                               "gradient on in the first backward. Specify retain_graph=True if you need to "
                               "backward a second time.")
        if not graph_is_kept():
            ctx.grads = None  # the last backward: hand the buffers on, keep no reference
        result: list[Tensor | None] = []
        for index, (grad, meta) in enumerate(zip(grads, ctx.input_meta)):
            if grad is None:
                result.append(None)
            elif index == 0:
                result.append(_scale_logits_grad(ctx, grad, upstream, meta[0]))
            else:
                dtype, shape = meta
                result.append((grad * upstream.to(grad.dtype)).sum_to_size(shape).to(dtype))
        del grads
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *SavedGradFunction.input_grads(ctx, grad_output))


class RowwiseSavedGradFunction(SavedGradFunction):
    """:class:`SavedGradFunction` for a loss of shape ``logits.shape[:-1]`` (one value per row)."""

    @staticmethod
    def upstream(grad_output: Tensor) -> Tensor:
        return grad_output.unsqueeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *RowwiseSavedGradFunction.input_grads(ctx, grad_output))


def _scale_logits_grad(ctx, grad: Tensor, upstream: Tensor, dtype: torch.dtype) -> Tensor:
    """The saved logits gradient times the upstream gradient, in the logits' dtype."""
    upstream = upstream.to(grad.dtype)
    if grad.dtype != dtype:
        # fp16/bf16 logits: multiply in fp32, round once when the product is stored.
        if _is_one(upstream):
            return grad.to(dtype)
        out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
        _mul_in_chunks(grad, upstream.expand_as(grad) if upstream.dim() else upstream, out)
        return out
    if upstream.numel() != 1:
        return grad * upstream
    scale = upstream.reshape(())
    previous = ctx.applied_scale
    if previous is None:
        ctx.applied_scale = scale
        return grad if _is_one(scale) else grad.mul_(scale)
    # A second backward (retain_graph, gradcheck): out of place, so the gradient handed out
    # the first time is not changed under the caller. A zero first scale wiped the buffer,
    # which cannot be undone.
    if previous.device.type == "cpu":
        if previous.item() == 0.0:
            raise RuntimeError("detfocal focal loss: cannot backpropagate again through a graph whose "
                               "first backward scaled the loss by 0")
    else:
        assert_async(previous != 0, "detfocal focal loss: second backward after a zero scale")
    return grad * (scale / previous)


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
