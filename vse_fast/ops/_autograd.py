"""What the kernel-backed autograd Functions share."""
import torch


def refuse_create_graph(what: str) -> None:
    """Raise when a kernel backward runs with create_graph=True (a gradient penalty, a Hessian-vector
    product). Such a backward is differentiable once: where the incoming gradient is a constant (the
    loss itself, ``pooled.sum()``), once_differentiable would hand back a gradient cut from the graph,
    and whatever is built on it would silently get no gradient."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what} computes its backward in a kernel, which cannot be differentiated again "
                           "(create_graph=True): use backend='torch' for higher-order gradients")
