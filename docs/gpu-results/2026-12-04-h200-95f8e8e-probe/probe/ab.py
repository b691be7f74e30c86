"""A/B probe of the token kernel's stages on a GPU (not part of the package)."""
import os, sys, time, statistics
import torch
import ptr_kernels
from ptr_kernels import policy_loss, PolicyLossConfig
from ptr_kernels.benchmark import workloads as w
from ptr_kernels.benchmark.timing import Timer
from ptr_kernels.reference import policy_loss_reference

variant = sys.argv[1]
full = variant == "v0"
dev = torch.device("cuda")
shapes = [w.packed(8, 1048576)] + ([w.padded(256, 4096), w.packed(1024, 1048576)] if full else [])
configs = {"cppo": PolicyLossConfig(method="cppo"), "cppo_fixed": PolicyLossConfig(method="cppo", delta_b_quantile=None),
           "dppo": PolicyLossConfig(method="dppo")}
if not full:
    configs = {"cppo": configs["cppo"]}
jobs = []
for shape in shapes:
    for data in ("bench", "need"):
        inp = w.make_inputs(shape, dev, torch.float32, 0, 0)
        if data == "need":  # a drift for which k * P90(D) falls inside (delta_b, max_mult * delta_b)
            old = inp.old_log_prob
            lp = (old + 0.25 * (inp.log_prob.detach() - old)).clamp(max=0).requires_grad_()
            inp = w.Inputs(log_prob=lp, old_log_prob=old, advantages=inp.advantages, mask=inp.mask,
                           mask_float=inp.mask_float, cu_seqlens=inp.cu_seqlens)
        for name, cfg in configs.items():
            if data == "need" and name != "cppo":
                continue
            jobs.append((shape.name if hasattr(shape, "name") else str(shape), data, name, cfg, inp))

def call(inp, cfg, bwd):
    loss = policy_loss(inp.log_prob, inp.old_log_prob, inp.advantages, inp.mask, cu_seqlens=inp.cu_seqlens,
                       config=cfg, backend="triton")[0]
    if bwd:
        loss.backward()
    return loss

lines = []
for sname, data, name, cfg, inp in jobs:  # compile and check
    loss = call(inp, cfg, False)
    ref = policy_loss_reference(inp.log_prob.detach().double(), inp.old_log_prob.double(), inp.advantages.double(),
                                inp.mask, cu_seqlens=inp.cu_seqlens, config=cfg)[0]
    call(inp, cfg, True)
    torch.cuda.synchronize()
    lines.append(f"check {variant} {sname} {data} {name} loss={loss.item():.8g} ref={ref.item():.8g} "
                 f"rel={abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-30):.2e}")
print("\n".join(lines), flush=True)
ready, turn = sys.argv[2], sys.argv[3]
open(ready, "w").close()
while not os.path.exists(turn):
    time.sleep(0.2)
timer = Timer(dev)
for sname, data, name, cfg, inp in jobs:
    for bwd in (False, True):
        t = timer.graph_times(lambda: call(inp, cfg, bwd), 25)
        print(f"time {variant} {sname} {data} {name} {'fwd_bwd' if bwd else 'fwd'} median_us={statistics.median(t):.1f} "
              f"min_us={min(t):.1f}", flush=True)
open(turn + ".done", "w").close()
