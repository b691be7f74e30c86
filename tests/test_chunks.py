"""Long sequences over many programs (ops/chunks.py): exactness at chunk boundaries against the float64
reference (through the fuzz's near-tie rule), the carried state across chunks, bad offsets, the launch counts
and grids, and the same bits from two runs."""

import pytest
import torch

from ptr_kernels import PolicyLossConfig, policy_loss
from ptr_kernels.benchmark.host import stubbed_triton_launches
from ptr_kernels.ops import ids, token
from ptr_kernels.testing.cases import Case

from test_triton_kernel import check_case

CHUNK = ids.CHUNK.value
# sequences of one token to several chunks, and an empty one, each boundary on both sides
LENGTHS = (1, CHUNK - 1, CHUNK, CHUNK + 1, 0, 2 * CHUNK + 5)
CONFIGS = {
    "cppo": dict(method="cppo", delta=0.2, delta_b=0.01),
    "cppo-quantile": dict(method="cppo", delta=0.2, delta_b=0.005, delta_b_quantile=0.6, delta_b_max_mult=3.0),
    "cppo-soft-sequence": dict(method="cppo", delta=0.2, delta_b=0.01, gate="soft", length_mode="sequence",
                               loss_agg_mode="seq-mean-token-mean"),
    "cppo-padded-logp": dict(method="cppo", delta=0.2, delta_b=0.01, length_mode="padded", surrogate="logp"),
    "dppo": dict(method="dppo", loss_agg_mode="seq-mean-token-mean"),
    "ppo": dict(method="ppo", clip_ratio_c=3.0),
}

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _case(lengths, packed: bool, config: dict, seed: int = 0) -> Case:
    """float64 inputs with holes in the mask: packed `[N]` with `cu_seqlens`, or padded rows as wide as the
    longest sequence, each row's mask ending at its length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    width = int(lengths.max())
    count = int(lengths.sum()) if packed else len(lengths) * width
    old = -torch.rand(count, generator=g, dtype=torch.float64) * 3
    lp = (old + torch.randn(count, generator=g, dtype=torch.float64) * 0.05).clamp(max=0)
    mask = torch.rand(count, generator=g) > 0.1
    adv = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    cu = None
    if packed:
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    else:
        lp, old, mask = lp.view(-1, width), old.view(-1, width), mask.view(-1, width)
        mask &= torch.arange(width)[None, :] < lengths[:, None]
    return Case(seed=-1, log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask, cu_seqlens=cu,
                rollout_is_weights=None, config=PolicyLossConfig(**config),
                kwargs=dict(dp_size=1, batch_num_tokens=None, global_batch_size=None))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_chunk_boundaries_match_the_reference(name, packed, device, run_policy_loss):
    """Lengths 1, CHUNK - 1, CHUNK, CHUNK + 1, 0 and 2 CHUNK + 5: the budget, n_i, T_w, delta_b_i and every sum
    cross chunk boundaries, and agree with the float64 reference up to near-ties."""
    check_case(_case(LENGTHS, packed, CONFIGS[name]), torch.float32, device, run_policy_loss)


def test_small_blocks_share_a_tile_with_a_long_sequence(device, run_policy_loss):
    """Blocks of 64 put 16 sequences in a tile; one of them spans two chunks, so the tile's second chunk runs
    with 15 empty rows."""
    lengths = [5] * 20 + [CHUNK + 7] + [3] * 10
    case = _case(lengths, True, CONFIGS["cppo-soft-sequence"], seed=3)
    check_case(case, torch.float32, device, run_policy_loss, block=64)


@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_a_shard_spanning_chunks_hands_on_its_state(gate, device):
    """A shard of three chunks starting mid-sequence (initial state, position offset, T_w and delta_b_i given):
    the loss, the gradient and the state after it agree with the reference's."""
    case = _case([2 * CHUNK + 100, 300], True, dict(CONFIGS["cppo"], gate=gate), seed=5)
    inputs = case.inputs(torch.float64)
    shard = dict(initial_state=torch.tensor([[0.3, 2.0, 40.0], [0.0, 0.0, 0.0]], dtype=torch.float64),
                 position_offset=torch.tensor([1000, 0]), sequence_length=torch.tensor([12000, 300]),
                 sequence_delta_b=torch.tensor([0.01, 0.02], dtype=torch.float64), output_final_state=True)
    results = []
    for backend, dtype, where in (("reference", torch.float64, "cpu"), ("triton", torch.float32, device)):
        args = {k: v.to(where, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
                v.to(where) if isinstance(v, torch.Tensor) else v for k, v in {**inputs, **shard}.items()}
        lp = args.pop("log_prob").requires_grad_(True)
        loss, metrics, final = policy_loss(lp, **args, backend=backend)
        (grad,) = torch.autograd.grad(loss, lp)
        results.append((loss.double().cpu(), metrics["mask_frac"].double().cpu(), grad.double().cpu(),
                        final.double().cpu()))
    (loss_r, frac_r, grad_r, final_r), (loss_t, frac_t, grad_t, final_t) = results
    assert frac_r > 0.05  # the budget binds
    torch.testing.assert_close(loss_t, loss_r, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(frac_t, frac_r, rtol=0, atol=2e-4)  # a near-tie may flip one token
    torch.testing.assert_close(grad_t, grad_r, rtol=2e-5, atol=1e-6 * grad_r.abs().max().item())
    torch.testing.assert_close(final_t, final_r, rtol=2e-5, atol=1e-4)


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    bits = values.float().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _gathers(d: torch.Tensor, q: float, lo: float, hi: float) -> bool:
    """Whether the kernel selects among gathered keys (ops/quantile.py, with k = 1): no key inside (lo, hi) past
    the histogram's window, and at most SELECT_CANDIDATES keys in the bins of the two ranks."""
    keys = _order_keys(d)
    base = int(_order_keys(torch.tensor([lo]))[0]) - ids.SELECT_MARGIN.value
    inside = (d > lo) & (d < hi)
    in_window = inside & (keys - base >= 0) & (keys - base < ids.SELECT_BINS.value << ids.SELECT_SHIFT.value)
    if (inside & ~in_window).any():
        return False
    rank = torch.tensor(q, dtype=torch.float32) * (len(d) - 1)
    kb = int(torch.floor(rank))
    ka = kb + int(rank > kb)
    n_lo = int((d <= lo).sum())
    bins = ((keys[in_window] - base) >> ids.SELECT_SHIFT.value).sort().values
    wanted = [bins[r] for r in (kb - n_lo, ka - n_lo) if 0 <= r < len(bins)]
    return not wanted or int(((bins >= min(wanted)) & (bins <= max(wanted))).sum()) <= ids.SELECT_CANDIDATES.value


def _select_case(kind: str, packed: bool = True) -> tuple:
    """One sequence of 2 CHUNK + 5 tokens (and a short one) whose D = |pi - mu| is placed on purpose: 0 (below
    lo = delta_b), inside (lo, hi), or far above hi = 2 delta_b; q puts torch.quantile's two ranks where `kind`
    says. Returns the case and whether its tile selects among gathered keys (else: bisection over memory)."""
    n, short, lo = 2 * CHUNK + 5, 300, 0.01
    g = torch.Generator().manual_seed(11)
    where = torch.rand(n, generator=g)
    inside = torch.rand(n, generator=g, dtype=torch.float64) * 0.6 * lo + 1.2 * lo
    d = torch.where(where < 0.5, 0.0, torch.where(where < 0.8, inside, 3 * 2 * lo))  # 50 % 0, 30 % inside
    config = dict(method="cppo", delta=0.2, delta_b=lo, delta_b_max_mult=2.0)
    if kind == "few inside":  # about 40 keys inside, evenly spaced: a rank off by one changes delta_b_i by 0.4 %
        few = (where >= 0.5) & (where < 0.5 + 40 / n)
        spaced = 1.2 * lo + 0.6 * lo * few.cumsum(0).double() / 40
        d = torch.where(where < 0.5, 0.0, torch.where(few, spaced, 6 * lo))
    elif kind == "none inside":
        d = torch.where(where < 0.5, 0.0, torch.full_like(inside, 6 * lo))
    elif kind == "one crowded bin":  # 30 % share one value: more keys in its bin than gathered at most
        d = torch.where(where < 0.5, 0.0, torch.where(where < 0.8, torch.full_like(inside, 1.5 * lo), inside))
    elif kind == "past the window":  # hi = 20 lo: keys inside (lo, hi) beyond the window's 2^24 keys
        d = torch.where(where < 0.5, 0.0, inside * torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * 2.5))
        config["delta_b_max_mult"] = 20.0
    old = torch.full((n,), -0.6931471805599453, dtype=torch.float64)
    lp = torch.log(torch.exp(old) + d)
    mask = torch.ones(n, dtype=torch.bool)
    mask[1000:1010] = False
    # the kernel's view: float32 D, its counts and ranks (q chosen for the kind)
    d32 = (torch.exp(lp.float()) - torch.exp(old.float())).abs()[mask]
    count, n_lo, n_hi = len(d32), int((d32 <= lo).sum()), int((d32 < 2 * lo).sum())
    q = {"below": (n_lo - 0.5) / (count - 1), "above": (n_hi - 0.5) / (count - 1),
         "none inside": (n_lo - 0.5) / (count - 1), "few inside": (n_lo + 10.5) / (count - 1)}.get(kind, 0.65)
    config["delta_b_quantile"] = q
    if kind in ("below", "above"):
        assert n_hi - n_lo > 100
    gathered = _gathers(d32, q, lo, config["delta_b_max_mult"] * lo)
    lp = torch.cat([lp, old[:short] + 0.01])
    old = torch.cat([old, old[:short]])
    mask = torch.cat([mask, torch.ones(short, dtype=torch.bool)])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    cu = torch.tensor([0, n, n + short], dtype=torch.int32) if packed else None
    if not packed:  # padded rows of n
        lp = torch.cat([lp, torch.zeros(n - short, dtype=torch.float64)]).view(2, n)
        old = torch.cat([old, torch.zeros(n - short, dtype=torch.float64)]).view(2, n)
        mask = torch.cat([mask, torch.zeros(n - short, dtype=torch.bool)]).view(2, n)
    case = Case(seed=-1, log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask, cu_seqlens=cu,
                rollout_is_weights=None, config=PolicyLossConfig(**config),
                kwargs=dict(dp_size=1, batch_num_tokens=None, global_batch_size=None))
    return case, gathered


@pytest.mark.parametrize("kind", ["random", "below", "above", "few inside", "none inside", "one crowded bin",
                                  "past the window"])
def test_a_long_sequence_selects_its_quantile_across_chunks(kind, device, run_policy_loss):
    """A one-row tile of three chunks: the pre-pass items build a histogram of the keys inside (lo, hi), the
    gathering items collect the keys of the bins holding the two ranks, chunk 0 selects among them. The ranks
    inside the region, d_(kb) the largest key <= lo, d_(ka) the smallest >= hi, no key inside, and the two
    fallbacks to bisection over memory (a crowded bin, keys past the window) agree with the reference."""
    case, gathered = _select_case(kind)
    assert gathered == (kind not in ("one crowded bin", "past the window"))
    check_case(case, torch.float32, device, run_policy_loss)


def test_padded_rows_select_their_quantile_across_chunks(device, run_policy_loss):
    """The same with padded rows (the histogram rows are indexed by the tile's first overflow item)."""
    check_case(_select_case("random", packed=False)[0], torch.float32, device, run_policy_loss)


def test_bad_offsets_poison_every_output_in_the_kernel(device):
    """Offsets out of order make the items' map of tiles meaningless: no hang, no read outside the tensors, and
    the loss and every metric are NaN (the kernel directly: on CPU tensors the API raises before the launch)."""
    from ptr_kernels.ops.plan import kernel_plan
    from ptr_kernels.ops.runtime import fused_forward
    n = 3 * CHUNK
    lp = -torch.rand(n, device=device)
    # the second: the overflow item of sequence 0's second chunk is handed to sequence 2 (which starts in
    # the first chunk), so sequence 0 must not wait for what that item does for its chunk 0 in the pre-pass
    for offsets in ([0, 2 * CHUNK, CHUNK, n], [0, 2 * CHUNK, 1, n]):
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        for method in ("cppo", "dppo", "ppo"):
            loss, aux, _ = fused_forward(lp, lp - 0.1, torch.ones(3, device=device), None, cu, None, None,
                                         plan=kernel_plan(PolicyLossConfig(method=method)), adv_per_seq=True,
                                         loss_scale_factor=0.0, normalizers=(1, None, None))
            assert torch.isnan(loss) and torch.isnan(aux).all(), (offsets, method)


def test_a_bad_first_offset_in_a_tile_of_long_sequences_gives_nan(device):
    """Tiles of two sequences (blocks of 512): the second tile's first offset is out of range while its other
    sequence spans three chunks. That tile runs as one chunk of nothing (its offsets cannot place later chunks),
    so no item waits for a flag outside the launch, and every output is NaN. Also no sequences but tokens."""
    from ptr_kernels.ops.runtime import forced_block_size, fused_forward
    from ptr_kernels.ops.plan import kernel_plan
    n = 3 * CHUNK
    lp = -torch.rand(n, device=device)
    plan = kernel_plan(PolicyLossConfig(delta_b_quantile=0.9))  # the pre-pass: the deciding items wait
    for offsets, advantages in (([0, 10, n + 100 * CHUNK, 0, n], 4), ([0], 0)):
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        with forced_block_size(512):
            loss, aux, _ = fused_forward(lp, lp - 0.1, torch.ones(advantages, device=device), None, cu, None, None,
                                         plan=plan, adv_per_seq=True, loss_scale_factor=0.0,
                                         normalizers=(1, None, None))
        assert torch.isnan(loss) and torch.isnan(aux).all(), offsets


def test_two_runs_give_the_same_bits(device):
    """The chunks of a sequence add their sums in chunk order, whatever order the programs finish in."""
    case = _case(LENGTHS, True, CONFIGS["cppo-quantile"], seed=9)
    outs = []
    for _ in range(2):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in case.inputs(torch.float32).items()}
        lp = inputs.pop("log_prob").requires_grad_(True)
        loss, metrics = policy_loss(lp, **inputs, backend="triton")
        (grad,) = torch.autograd.grad(loss, lp)
        outs.append((loss, torch.stack(list(metrics.values())), grad))
    for first, second in zip(*outs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("method", ["cppo", "dppo", "ppo"])
@pytest.mark.parametrize("quantile", [None, 0.9])
def test_long_packed_sequences_spread_over_many_programs(method, quantile, device):
    """8 x 131,072 packed tokens: two launches per forward + backward, and every launch of more than one
    program has at least 128 (launches stubbed: only the grids are recorded)."""
    config = PolicyLossConfig(method=method, delta_b_quantile=quantile if method == "cppo" else None)
    grids, launches = _packed_grids(131_072, 8, config, device, backward=True)
    assert launches == 2
    assert grids and all(g >= 128 for g in grids if g > 1), grids


def _packed_grids(length: int, num_seqs: int, config, device, backward: bool = False) -> tuple:
    """The token kernel's grids and the number of launches of one call (and its backward) on `num_seqs` packed
    sequences of `length` tokens, launches stubbed."""
    lp = torch.zeros(num_seqs * length, device=device)
    cu = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * length
    grids = []
    original = token.token_kernel.__class__.__getitem__

    def recording(kernel, grid):
        grids.append(grid[0])
        return original(kernel, grid)

    with stubbed_triton_launches() as launches, pytest.MonkeyPatch.context() as patch:
        patch.setattr(token.token_kernel.__class__, "__getitem__", recording)
        loss = policy_loss(lp.clone().requires_grad_(True), lp, torch.ones(num_seqs, device=device),
                           torch.ones(num_seqs * length, dtype=torch.bool, device=device), cu_seqlens=cu,
                           config=config, backend="triton")[0]
        if backward:
            loss.backward()
        return grids, launches["launches"]


@pytest.mark.parametrize("method, quantile, programs", [
    ("cppo", 0.9, 1024 + 3 * 256),  # the pre-pass, gathering and deciding stages
    ("cppo", None, 1024 + 2 * 256),  # cppo's T_w under a mask: the pre-pass and deciding stages
    ("dppo", None, 1024 + 256),  # one stage
])
def test_earlier_stages_run_on_the_overflow_items_only(method, quantile, programs, device):
    """1024 packed sequences of 1024 tokens: 1024 tiles of one chunk and room for N // 4096 = 256 overflow
    items per stage. The stages before the deciding one run on the overflow items only (a tile of one chunk
    makes its pre-pass in its deciding item), so the grid is 1024 + stages x 256, not stages x 1280."""
    grids, _ = _packed_grids(1024, 1024, PolicyLossConfig(method=method, delta_b_quantile=quantile), device)
    assert grids == [programs]
