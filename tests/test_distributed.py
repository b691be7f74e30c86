"""Scale-out with real process groups (gloo, 2 and 4 processes on the CPU): data-parallel normalizers
(`global_counts`) and context-parallel CPPO (`cp_policy_loss`, the carried state, the distributed quantile)
against one process over the whole batch.

One world per size is started for the module (process start-up dominates): every rank runs all scenarios on
its shard and saves what it got; the tests rebuild the same seeded batches here and compare.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch.multiprocessing as mp

if mp.current_process().name != "MainProcess":  # a spawned rank: the kernel runs in Triton's interpreter, which
    os.environ["TRITON_INTERPRET"] = "1"  # must be on before anything imports triton (this module's imports do)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels: triton exists for Linux only")

from ptr_kernels import PolicyLossConfig, policy_loss  # noqa: E402
from ptr_kernels.carried_state import NO_CARRIED_STATE  # noqa: E402
from ptr_kernels.validation import packed_to_rows  # noqa: E402
from ptr_kernels.reference import token_terms  # noqa: E402

WORLD_SIZES = (2, 4)
WORLD_TIMEOUT_S = 300  # start-up of 4 interpreters on 2 cores is most of it
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# cppo with fixed and calibrated delta_b, both length modes, hard and soft gate; the aggregation cycles through
# every mode (loss_scale_factor for packed input: there is no padded width)
CP_CONFIGS = [dict(delta_b_quantile=q, length_mode=length, gate=gate, loss_agg_mode=AGG_MODES[i % len(AGG_MODES)],
                   delta_b=0.01)
              for i, (q, length, gate) in enumerate((q, length, gate) for q in (None, 0.9)
                                                    for length in ("sequence", "padded") for gate in ("hard", "soft"))]
KERNEL_CONFIG = dict(delta_b_quantile=0.9, delta_b_quantile_scale=1.25, length_mode="sequence", gate="hard",
                     loss_agg_mode="seq-mean-token-mean", delta_b=0.01)
LAYOUTS = ("padded", "packed")
T = 48
HOLE = (20, 30)  # masked positions of every padded row: some cut falls inside


# ---------------------------------------------------------------- batches, shared by the ranks and the tests

def _cp_batch(seed: int):
    """A padded batch `[4, T]` with a hole in the mask, and advantages; D near delta_b so that the budget
    binds and the calibrated quantile falls between its clamps."""
    g = torch.Generator().manual_seed(seed)
    old = torch.empty(4, T).uniform_(0.05, 0.95, generator=g).log()
    # per row a scale of the drift: the budget binds in the first row, the quantile is inside its clamps in the second
    lp = old + torch.tensor([[0.08], [0.015], [0.03], [0.03]]) * torch.randn(4, T, generator=g)
    mask = torch.rand(4, T, generator=g) > 0.15
    mask[:, HOLE[0]:HOLE[1]] = False
    mask[3] = False  # a sequence without a valid token
    adv = torch.randn(4, generator=g)
    return lp, old, mask, adv


def _cp_cuts(world: int, layout: str):
    """Per sequence, the cut points `[S, world + 1]`: arbitrary, one inside the hole, one empty shard."""
    inner = {2: [[25], [7], [40], [24]], 4: [[11, 11, 25], [3, 24, 24], [0, 30, 47], [12, 13, 40]]}[world]
    if layout == "padded":  # one width per rank: the cuts of sequence 0 for every sequence
        inner = [inner[0]] * 4
    return [[0] + cuts + [T] for cuts in inner]


def _cp_shard(batch, cuts, rank: int, layout: str):
    """This rank's inputs: padded `[S, T_k]`, or packed `[N_k]` (every position of the shard, with its mask)
    with cu_seqlens; advantages `[S]`."""
    lp, old, mask, adv = batch
    if layout == "padded":
        a, b = cuts[0][rank], cuts[0][rank + 1]
        return dict(log_prob=lp[:, a:b], old_log_prob=old[:, a:b], response_mask=mask[:, a:b], advantages=adv)
    pieces = [(i, cuts[i][rank], cuts[i][rank + 1]) for i in range(lp.shape[0])]
    lengths = torch.tensor([b - a for _, a, b in pieces])
    cat = lambda t: torch.cat([t[i, a:b] for i, a, b in pieces])  # noqa: E731
    return dict(log_prob=cat(lp), old_log_prob=cat(old), response_mask=cat(mask), advantages=adv,
                cu_seqlens=torch.nn.functional.pad(lengths.cumsum(0), (1, 0)))


def _packed_whole(batch):
    """The whole batch packed (every position of each row, with its mask)."""
    lp, old, mask, adv = batch
    S = lp.shape[0]
    return dict(log_prob=lp.reshape(-1), old_log_prob=old.reshape(-1), response_mask=mask.reshape(-1),
                advantages=adv, cu_seqlens=torch.arange(0, S * T + 1, T))


def _full_config(overrides: dict, layout: str) -> PolicyLossConfig:
    config = PolicyLossConfig(**overrides)
    if layout == "packed" and config.loss_agg_mode == "seq-mean-token-sum-norm":
        config = config.replace(loss_scale_factor=64.0)
    return config


def _gate(inputs: dict, config, state=None):
    """M_t of the reference at the shard's valid positions, in token order `[n valid]`."""
    lp, old, mask = inputs["log_prob"], inputs["old_log_prob"], inputs["response_mask"]
    cu = inputs.get("cu_seqlens")
    if cu is not None:
        width = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        rows = lambda t, fill=0.0: packed_to_rows(t, cu, width, fill)  # noqa: E731
        lp, old, mask = rows(lp), rows(old), rows(mask, False)
    terms = token_terms(lp, old, inputs["advantages"], mask, config,
                        carried=NO_CARRIED_STATE if state is None else state.carried)
    return terms.gate[mask], terms.rejected_budget[mask], terms.delta_b


def _dp_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    B = 7
    old = torch.empty(B, T).uniform_(0.05, 0.95, generator=g).log()
    lp = old + 0.2 * torch.randn(B, T, generator=g)
    mask = torch.arange(T) < torch.randint(0, T + 1, (B, 1), generator=g)
    mask[2] = False
    return lp, old, mask, torch.randn(B, generator=g)


def _dp_rows(world: int, rank: int):
    """Unequal row shards of the 7-row DP batch, one of them empty."""
    bounds = {2: [0, 5, 7], 4: [0, 1, 1, 4, 7]}[world]
    return bounds[rank], bounds[rank + 1]


def _quantile_values(seed: int, dtype):
    """Values with ties, negatives and zeros, and a validity mask, for `distributed_quantile`."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(3, 40, generator=g, dtype=torch.float64).to(dtype)
    values[0, :10] = 0.5  # ties
    values[1] = values[1].abs() * 1e-3
    values[0, 10] = -0.0
    valid = torch.rand(3, 40, generator=g) > 0.3
    valid[2, :] = False
    valid[2, 5] = True  # one value
    return values, valid


# ---------------------------------------------------------------- what every rank runs

def _rank_main(rank: int, world: int, port: int, out_dir: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    from ptr_kernels.distributed import cp_policy_loss, cp_shard_state, distributed_quantile, global_counts
    results = {}

    # data parallel: global counts, every aggregation mode, the gradient DDP would all-reduce
    lp, old, mask, adv = _dp_batch(1)
    a, b = _dp_rows(world, rank)
    counts = global_counts(mask[a:b])
    results["dp_counts"] = [int(c) for c in counts]
    cu = torch.nn.functional.pad(mask[a:b].sum(1).cumsum(0), (1, 0))
    results["dp_counts_packed"] = [int(c) for c in global_counts(cu_seqlens=cu)]
    results["dp_counts_packed_mask"] = [int(c) for c in global_counts(mask[a:b].reshape(-1),
                                                                      torch.arange(0, (b - a) * T + 1, T))]
    for mode in AGG_MODES:
        theta = torch.zeros(T, requires_grad=True)  # a parameter shared by every token of a position
        shard_lp = lp[a:b].clone().requires_grad_()
        loss, _ = policy_loss(shard_lp + theta, old[a:b], adv[a:b], mask[a:b], backend="reference",
                              loss_agg_mode=mode, dp_size=counts[2], batch_num_tokens=counts[0],
                              global_batch_size=counts[1])
        loss.backward()
        theta_grad = torch.zeros(T) if theta.grad is None else theta.grad  # an empty shard: no gradient
        dist.all_reduce(theta_grad)  # what DDP does: all-reduce the gradient, divide by the world size
        results[("dp", mode)] = dict(loss=loss.detach(), grad=torch.zeros(0, T) if shard_lp.grad is None
                                     else shard_lp.grad, theta_grad=theta_grad / world)

    # the distributed quantile against torch.quantile over the union of the ranks' values
    for dtype in (torch.float32, torch.float64):
        values, valid = _quantile_values(2, dtype)
        part = slice(rank * 40 // world, (rank + 1) * 40 // world)  # columns of this rank
        v, m = values[:, part], valid[:, part]
        seq = torch.arange(3).repeat_interleave(v.shape[1])
        results[("quantile", dtype)] = distributed_quantile(v.reshape(-1), m.reshape(-1), seq, 3, 0.37)

    # context parallel: cppo configurations on the reference, one on the kernel
    cases = [(layout, i, "reference") for layout in LAYOUTS for i in range(len(CP_CONFIGS))]
    cases.append(("packed", -1, "triton"))
    batch = _cp_batch(3)
    for layout, i, backend in cases:
        config = _full_config(CP_CONFIGS[i] if i >= 0 else KERNEL_CONFIG, layout)
        inputs = _cp_shard(batch, _cp_cuts(world, layout), rank, layout)
        log_prob = inputs.pop("log_prob").clone().requires_grad_()
        loss, metrics = cp_policy_loss(log_prob, **inputs, config=config, backend=backend)
        loss.backward()
        state = cp_shard_state(log_prob, inputs["old_log_prob"], inputs["response_mask"],
                               cu_seqlens=inputs.get("cu_seqlens"), config=config)
        gate, rejected_budget, _ = _gate(dict(inputs, log_prob=log_prob.detach()), config, state)
        n_valid = int(inputs["response_mask"].sum())
        results[("cp", layout, i, backend)] = dict(loss=loss.detach(), grad=log_prob.grad, gate=gate,
                                                   delta_b=state.sequence_delta_b, n_valid=n_valid,
                                                   metrics={k: float(v) for k, v in metrics.items()})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    """Run `_rank_main` on `world` gloo processes (bounded in time); every rank's results, in rank order."""
    size = request.param
    out_dir = str(tmp_path_factory.mktemp(f"world{size}"))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    context = mp.start_processes(_rank_main, args=(size, _free_port(), out_dir), nprocs=size, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {size}-process world did not finish within {WORLD_TIMEOUT_S} s")
    return size, [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(size)]


# ---------------------------------------------------------------- data parallel

def test_global_counts(world):
    size, ranks = world
    _, _, mask, _ = _dp_batch(1)
    expected = [int(mask.sum()), int(mask.any(1).sum()), size]
    for r in ranks:
        assert r["dp_counts"] == expected
        assert r["dp_counts_packed"] == expected
        assert r["dp_counts_packed_mask"] == expected


@pytest.mark.parametrize("mode", AGG_MODES)
def test_dp_gradient_equals_single_process(world, mode):
    size, ranks = world
    lp, old, mask, adv = _dp_batch(1)
    theta = torch.zeros(T, requires_grad=True)
    whole_lp = lp.clone().requires_grad_()
    loss, _ = policy_loss(whole_lp + theta, old, adv, mask, backend="reference", loss_agg_mode=mode)
    loss.backward()
    # DDP averages the ranks' gradients: each rank's loss carries dp_size, so the average is the whole batch's
    grads = torch.cat([r[("dp", mode)]["grad"] for r in ranks]) / size
    torch.testing.assert_close(grads, whole_lp.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ranks[0][("dp", mode)]["theta_grad"], theta.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sum(r[("dp", mode)]["loss"] for r in ranks) / size, loss.detach(),
                               rtol=1e-5, atol=1e-7)
    assert whole_lp.grad.abs().sum() > 0


# ---------------------------------------------------------------- the distributed quantile

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_distributed_quantile_is_torch_quantile(world, dtype):
    _, ranks = world
    values, valid = _quantile_values(2, dtype)
    expected = torch.stack([torch.quantile(values[i][valid[i]], 0.37) for i in range(3)])
    for r in ranks:
        quantile, count = r[("quantile", dtype)]
        assert count.tolist() == valid.sum(1).tolist()
        assert torch.equal(quantile, expected)  # exact: the same order statistics and the same lerp


# ---------------------------------------------------------------- context parallel

def _single_process(layout: str, config: PolicyLossConfig, backend: str, on_backend_device):
    """The whole batch in this process, `policy_loss` on `backend`'s device (conftest.py), results on the CPU."""
    batch = _cp_batch(3)
    inputs = _packed_whole(batch) if layout == "packed" else dict(
        log_prob=batch[0], old_log_prob=batch[1], response_mask=batch[2], advantages=batch[3])
    log_prob = inputs.pop("log_prob").clone().requires_grad_()
    loss, metrics = policy_loss(on_backend_device(backend, log_prob), **on_backend_device(backend, inputs),
                                config=config, backend=backend)
    loss.backward()
    gate, rejected_budget, delta_b = _gate(dict(inputs, log_prob=log_prob.detach()), config)
    return dict(loss=loss.detach().cpu(), grad=log_prob.grad, gate=gate, rejected_budget=rejected_budget,
                delta_b=delta_b, metrics={k: float(v) for k, v in metrics.items()})


def _shard_grads(size, ranks, key, layout):
    """The ranks' shard gradients put back in the whole batch's order (padded `[S, T]` or packed `[S * T]`)."""
    cuts = _cp_cuts(size, layout)
    if layout == "padded":
        return torch.cat([r[key]["grad"] for r in ranks], dim=1)
    rows = torch.zeros(4, T)
    for rank, r in enumerate(ranks):
        grad, start = r[key]["grad"], 0
        for i in range(4):
            a, b = cuts[i][rank], cuts[i][rank + 1]
            rows[i, a:b] = grad[start:start + b - a]
            start += b - a
    return rows.reshape(-1)


def _check_cp(world, layout: str, index: int, backend: str, rtol: float, on_backend_device):
    size, ranks = world
    config = _full_config(CP_CONFIGS[index] if index >= 0 else KERNEL_CONFIG, layout)
    single = _single_process(layout, config, backend, on_backend_device)
    key = ("cp", layout, index, backend)
    torch.testing.assert_close(sum(r[key]["loss"] for r in ranks), single["loss"], rtol=rtol, atol=1e-7)
    torch.testing.assert_close(_shard_grads(size, ranks, key, layout), single["grad"], rtol=rtol, atol=1e-8)
    for r in ranks:  # every rank knows delta_b_i of the whole sequences (the quantile's value, clamped)
        valid_seqs = slice(0, 3)  # the fourth sequence has no valid token: its delta_b is never used
        assert torch.equal(r[key]["delta_b"][valid_seqs], single["delta_b"][valid_seqs])
    if backend == "reference":  # the mask M_t (soft gate g_t) of every valid token, in token order
        gates = _gate_in_token_order(size, ranks, key, layout)
        torch.testing.assert_close(gates, single["gate"], rtol=1e-6, atol=0)
    # the shards' metrics, weighted by their valid tokens, are the whole batch's
    n = sum(r[key]["n_valid"] for r in ranks)
    for name in ("mask_frac", "mask_frac_budget", "divergence_mean", "ppo_kl"):
        combined = sum(r[key]["metrics"][name] * r[key]["n_valid"] for r in ranks) / n
        assert combined == pytest.approx(single["metrics"][name], rel=1e-5, abs=1e-7), name
    return single


def _gate_in_token_order(size, ranks, key, layout):
    """The ranks' gates (valid tokens, shard order) put back in the whole batch's valid-token order."""
    _, _, mask, _ = _cp_batch(3)
    cuts = _cp_cuts(size, layout)
    rows = torch.full((4, T), float("nan"))
    for rank, r in enumerate(ranks):
        gate, start = r[key]["gate"], 0
        for i in range(4):
            a, b = cuts[i][rank], cuts[i][rank + 1]
            n = int(mask[i, a:b].sum())
            rows[i, a:b][mask[i, a:b]] = gate[start:start + n]
            start += n
    return rows[mask]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index", range(len(CP_CONFIGS)),
                         ids=[f"q{c['delta_b_quantile']}-{c['length_mode']}-{c['gate']}-{c['loss_agg_mode']}"
                              for c in CP_CONFIGS])
def test_cp_reference_equals_single_process(world, layout, index, on_backend_device):
    single = _check_cp(world, layout, index, "reference", rtol=2e-6, on_backend_device=on_backend_device)
    if CP_CONFIGS[index]["delta_b_quantile"] is not None:  # the quantile selected a value between the clamps
        assert ((single["delta_b"] > 0.01) & (single["delta_b"] < 0.02)).any()
    if CP_CONFIGS[index]["gate"] == "hard":  # the carried budget decided some tokens
        assert single["rejected_budget"].any()


def test_cp_kernel_equals_single_process(world, on_backend_device):
    """The Triton kernel (interpreter) with the carried state, against the kernel over the whole batch (on CUDA
    when a GPU is present)."""
    _check_cp(world, "packed", -1, "triton", rtol=1e-5, on_backend_device=on_backend_device)
