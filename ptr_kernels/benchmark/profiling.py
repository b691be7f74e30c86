"""Launch and host-sync counts of one call, from a `torch.profiler` session (CUDA)."""

from __future__ import annotations

import bisect

from .workloads import MODES

MARK = "ptr_kernels.benchmark.counted:"
_SYNC_CALLS = ("cudaStreamSynchronize", "cuStreamSynchronize")
_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                 "cudaMemcpyAsync", "cudaMemsetAsync")


def count_marked(events) -> dict:
    """{label: (GPU activities, host syncs)} for each `record_function(label)` range whose label starts
    with MARK, from a torch.profiler event list.

    GPU activities are the kernel, memcpy and memset events on the device timeline that start inside the range
    (a marked call ends with a device synchronize, so all its GPU work lies inside); if the profiler recorded
    none, the launch API calls on the host. Host syncs are the `cudaStreamSynchronize` calls in the range.
    """
    from torch.autograd import DeviceType

    ranges = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.name.startswith(MARK) and e.device_type == DeviceType.CPU)
    starts = [r[0] for r in ranges]
    device, api, syncs = ({r[2]: 0 for r in ranges} for _ in range(3))
    for e in events:
        if e.name.startswith(MARK):
            continue
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if i < 0 or e.time_range.start > ranges[i][1]:
            continue
        label = ranges[i][2]
        # GPU "user annotation" events mirror record_function ranges (Inductor's, autograd's): not launches
        device[label] += e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        api[label] += e.name in _LAUNCH_CALLS
        syncs[label] += e.name in _SYNC_CALLS
    return {label: (device[label] or api[label], syncs[label]) for label in device}


def mark_calls(runner, timer, marks: dict) -> None:
    """Inside a running profiler session: one marked call per mode of a warmed-up `sweep.Runner`, recorded in
    `marks` ({label: (row key, mode)}). An unmarked call precedes each, since a session can drop the first GPU
    events it sees (a known torch.profiler behaviour on CUDA)."""
    from torch.profiler import record_function

    for mode in MODES:
        runner.run(0, mode)
        timer.sync()
        label = f"{MARK}{len(marks)}"
        with record_function(label):
            runner.run(0, mode)
            timer.sync()
        marks[label] = (runner.key, mode)
