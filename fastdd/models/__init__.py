"""Model zoo: the ConvNet family, a CIFAR-style ResNet-18 and an MLP, with generator-seeded init.

Every model maps ``[N, channel, H, W]`` images to ``[N, num_classes]`` logits, and exposes
``embed(x) -> [N, feature_dim]`` (the penultimate representation that DM matches) and the int
attribute ``feature_dim``.

- :class:`ConvNet` (``fastdd.models.convnet``), :class:`ResNet18`, :class:`MLP`
- :func:`get_model` / :func:`model_names`: the reference's names (``"ConvNet"``, ``"ConvNetD4"``,
  ``"ConvNetBN"``, ``"ResNet18BN"``, ...)
- :func:`init_parameters`: in-place PyTorch-default re-initialisation drawing only from a
  ``torch.Generator``

Vectorised training (several models at once with ``torch.func``)::

    params, buffers = torch.func.stack_module_state(models)   # each leaf [M, ...]
    base = copy.deepcopy(models[0]).to("meta")
    def f(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))
    logits = torch.vmap(f)(params, buffers, x)                 # x: [M, N, C, H, W] -> [M, N, classes]

This works for every norm of the ConvNet family. For BatchNorm in train mode the stacked running
statistics must be passed (as above, ``buffers`` batched with ``in_dims=0``); they are then updated
per model in the stacked tensors. Passing BatchNorm buffers unbatched (``in_dims=None``) fails,
because the in-place running-stat update would write a per-model value into a shared tensor
(``torch.func.replace_all_batch_norm_modules_`` is not needed). ``torch.vmap(torch.func.grad(loss))``
over the same call, and plain autograd through the vmapped forward into the stacked parameters, give
the per-model gradients. ``functional_call`` runs ``forward``; to vmap :meth:`embed` wrap it in a
module whose ``forward`` calls ``embed`` (parameter names then gain the wrapper's prefix). See
``tests/test_models.py`` for the checked equivalences.
"""
from .convnet import ConvNet
from .init import init_parameters
from .mlp import MLP
from .registry import get_model, has_batchnorm, model_names
from .resnet import ResNet18
from .taps import embed_with_taps

__all__ = ["ConvNet", "ResNet18", "MLP", "get_model", "has_batchnorm", "model_names", "init_parameters",
           "embed_with_taps"]
