"""`ptr-kernels doctor`: what this installation can run, one line per part.

torch and triton (absent where it does not exist), the device the kernels would run on (a CUDA device, or the
Triton interpreter on the CPU) and whether they compute the reference's loss there, whether verl imports and
has our four losses in its `POLICY_LOSS_REGISTRY` (verl logs a failing plugin only at debug level, so the
registration is run here again and its error shown), and TRL's version and whether our trainer imports.
Exit code 0 when the core works (the reference backend computes a loss), 1 otherwise: the kernels, verl and
TRL are optional.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

VERL_LOSSES = ("ptr_cppo", "ptr_dppo_tv", "ptr_dppo_kl", "ptr_vanilla")


def _report(part: str, text: str) -> None:
    print(f"{part:<12}{text}", flush=True)


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _small_batch(device: str):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 9, generator=g)
    new = old + 0.1 * torch.randn(3, 9, generator=g)
    mask = torch.arange(9) < torch.tensor([[9], [5], [1]])
    return [t.to(device) for t in (new, old, torch.randn(3, generator=g), mask)]


def _core() -> bool:
    from . import __version__, policy_loss

    _report("ptr_kernels", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})")
    _report("torch", torch.__version__)
    try:
        loss, _ = policy_loss(*_small_batch("cpu"), backend="reference")
        ok = bool(torch.isfinite(loss))
        _report("reference", "computes the loss" if ok else f"gave a non-finite loss {loss.item()}")
        return ok
    except Exception as error:  # noqa: BLE001 - report whatever broke
        _report("reference", f"FAILED: {_error(error)}")
        return False


def _kernels() -> None:
    """The triton version, the device, and one small batch through backend="triton" against the reference."""
    cuda = torch.cuda.is_available()
    if not cuda and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # as fuzz and bench do: before triton is imported
    try:
        import triton
    except ImportError:
        _report("triton", "not installed (it exists for Linux only): the reference backend only")
        return
    _report("triton", triton.__version__)
    device = "cuda" if cuda else "cpu"
    where = f"CUDA device {torch.cuda.get_device_name()}" if cuda else "Triton interpreter on CPU"
    from . import policy_loss

    try:
        batch = _small_batch(device)
        fused, _ = policy_loss(*batch, backend="triton")
        reference, _ = policy_loss(*batch, backend="reference")
        if torch.allclose(fused, reference, rtol=1e-4, atol=1e-6):
            _report("kernels", f"{where}: backend='triton' matches the reference")
        else:
            _report("kernels", f"{where}: backend='triton' gave {fused.item()}, the reference {reference.item()}")
    except Exception as error:  # noqa: BLE001
        _report("kernels", f"neither a CUDA device nor the Triton interpreter works here: {_error(error)}")


def _verl() -> None:
    try:
        import verl
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
    except Exception as error:  # noqa: BLE001 - absent, or broken
        _report("verl", f"does not import ({_error(error)}): pip install -c .ci/constraints.txt -e '.[verl]'")
        return
    missing = [name for name in VERL_LOSSES if name not in POLICY_LOSS_REGISTRY]
    if not missing:
        _report("verl", f"{verl.__version__}: {', '.join(VERL_LOSSES)} registered")
        return
    # `import verl` ran our plugin and logged its failure at debug level only: run it again, loudly
    from .integrations import verl as ptr_verl

    try:
        ptr_verl.register()
        note = ("ptr_kernels.integrations.verl.register() adds them: is the verl.plugins entry point installed "
                "(pip install -e .), or VERL_USE_EXTERNAL_MODULES=ptr_kernels.integrations.verl_plugin set?")
    except Exception as error:  # noqa: BLE001
        note = f"ptr_kernels.integrations.verl.register() fails: {_error(error)}"
    _report("verl", f"{verl.__version__}: {', '.join(missing)} not in POLICY_LOSS_REGISTRY after `import verl`; "
                    f"{note}")


def _trl() -> None:
    try:
        import trl
    except Exception as error:  # noqa: BLE001
        _report("trl", f"does not import ({_error(error)}): pip install -c .ci/constraints.txt -e '.[trl]'")
        return
    try:
        from .integrations import trl as ptr_trl  # noqa: F401 - the import is the check
        _report("trl", f"{trl.__version__}: ptr_kernels.integrations.trl imports")
    except Exception as error:  # noqa: BLE001
        _report("trl", f"{trl.__version__}: ptr_kernels.integrations.trl does not import: {_error(error)}")


def run(args: argparse.Namespace) -> int:
    """`ptr-kernels doctor`: 0 when the core works, 1 otherwise."""
    core = _core()
    _kernels()  # before verl and TRL, which may import triton: the interpreter must be chosen first
    _verl()
    _trl()
    print("core: OK" if core else "core: BROKEN (the reference backend fails)")
    return 0 if core else 1
