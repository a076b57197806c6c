"""trainer.local_sgd.LocalSGD on two processes, step by step (not an upstream script; run by test_compat_features.py).

Each process trains the same small model on its own data, so the replicas drift apart. Checked
after every step: inside the block gradients are not averaged; ``local_sgd.step()`` leaves the
parameters alone except on every ``local_sgd_steps``-th call, which makes them equal on both
processes and equal to the mean of what they were; leaving the block averages once more; after
it, backward averages gradients again.
"""

import sys

import torch

from trainer import Accelerator
from trainer.local_sgd import LocalSGD

LOCAL_SGD_STEPS = 3
STEPS = 8  # not a multiple of 3: the block's exit does the last average


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def main():
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, "run this on two processes"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data on each process

    def train_step():
        inputs = torch.randn(16, 4, generator=generator)
        loss = ((model(inputs) - inputs.sum(dim=1, keepdim=True)) ** 2).mean()
        accelerator.backward(loss)
        grads = accelerator.gather(flat(p.grad for p in model.parameters())[None])
        optimizer.step()
        optimizer.zero_grad()
        return grads

    averages = 0
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=LOCAL_SGD_STEPS) as local_sgd:
        assert local_sgd.enabled
        for step in range(1, STEPS + 1):
            grads = train_step()
            assert not torch.equal(grads[0], grads[1]), f"step {step}: gradients were averaged inside the block"
            before = accelerator.gather(flat(model.parameters())[None])
            assert not torch.equal(before[0], before[1]), f"step {step}: the replicas did not drift apart"
            local_sgd.step()
            after = accelerator.gather(flat(model.parameters())[None])
            if step % LOCAL_SGD_STEPS == 0:
                averages += 1
                assert torch.equal(after[0], after[1]), f"step {step}: the parameters differ right after an average"
                torch.testing.assert_close(after[0], before.mean(dim=0), rtol=0, atol=1e-6)
            else:
                assert torch.equal(after, before), f"step {step}: step() changed the parameters between averages"
        assert local_sgd.num_steps == STEPS
        before = accelerator.gather(flat(model.parameters())[None])
    after = accelerator.gather(flat(model.parameters())[None])
    assert torch.equal(after[0], after[1]), "the parameters differ after the block"
    torch.testing.assert_close(after[0], before.mean(dim=0), rtol=0, atol=1e-6)
    assert averages == STEPS // LOCAL_SGD_STEPS

    grads = train_step()  # outside the block the model averages gradients again
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
    accelerator.end_training()
    sys.stdout.write(f"LOCAL_SGD_SYNC OK rank {accelerator.process_index}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
