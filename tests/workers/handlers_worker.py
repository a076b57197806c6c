"""Worker of tests/test_accelerate_config_objects.py on 2 CPU processes: kwargs handlers that reach DDP and the group.

Run by torchrun. ``ddp`` checks that DistributedDataParallelKwargs reach the DDP wrapper and that
``distributed_type`` is MULTI_CPU; ``timeout`` has process 1 stay away from a collective (until
process 0 touches a file) and checks that process 0 gives up after InitProcessGroupKwargs' timeout
instead of torch's default.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from checks import RANK, expect, leave, say  # noqa: E402

from trainer import Accelerator  # noqa: E402
from trainer.utils import (  # noqa: E402
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
)


def ddp() -> None:
    # Not find_unused_parameters=True here: with it, DDP's used-parameter all-reduce and PowerSGD's chained
    # all-reduces are issued from two threads on one gloo group and can pair up wrongly (a torch/gloo race).
    handler = DistributedDataParallelKwargs(bucket_cap_mb=1, broadcast_buffers=False,
                                            comm_hook=DDPCommunicationHookType.POWER_SGD, comm_wrapper="fp16",
                                            comm_state_option={"matrix_approximation_rank": 1, "start_powerSGD_iter": 2})
    accelerator = Accelerator(kwargs_handlers=[handler])
    expect(accelerator.distributed_type, DistributedType.MULTI_CPU, "distributed_type")
    expect(accelerator.distributed_type == "MULTI_CPU", True, "a str enum equals its value")
    torch.manual_seed(0)
    model = accelerator.prepare(torch.nn.Linear(8, 4))
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + RANK))
        accelerator.backward(F.mse_loss(model(x), torch.zeros(4, 4)))
        optimizer.step()
        optimizer.zero_grad()
    logged = model._get_ddp_logging_data()
    expect((logged["bucket_cap_bytes"], bool(logged["broadcast_buffers"])), (2**20, False), "DDP's settings")
    expect(logged["comm_hook"], "fp16_compress_wrapper.<locals>.fp16_compress_wrapper_hook", "PowerSGD in the fp16 wrapper")
    weights = accelerator.gather(model.module.weight.detach().reshape(1, -1))
    expect(torch.equal(weights[0], weights[1]), True, "replicas stay equal")
    say(f"DDP OK rank {RANK}")


def timeout(signal_file: Path, handler: bool = True) -> None:
    Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=3))] if handler else None)
    if RANK == 1:  # away from the collective rank 0 waits in, until rank 0 is done with it (60 s at most)
        deadline = time.monotonic() + 60
        while not signal_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        say("AWAY done rank 1")
        return
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as error:  # gloo's timeout surfaces as a RuntimeError (DistBackendError)
        say(f"TIMEOUT after {time.monotonic() - start:.1f} s: {type(error).__name__}")
        return
    finally:
        signal_file.touch()
    say("NO TIMEOUT")


if __name__ == "__main__":  # the group's timeout is set when it starts: a timeout case needs a launch of its own
    if sys.argv[1] == "ddp":
        ddp()
    else:  # timeout: from InitProcessGroupKwargs; launch_timeout: from trainer launch's flag, nothing in the script
        timeout(Path(sys.argv[2]), handler=sys.argv[1] == "timeout")
    leave()
