"""Run by tests/test_stage1_runs.py under `torchrun --nproc_per_node 2` (gloo, CPU).

First checks that gathered negatives give the single-process loss and gradients (each process
holds half of a batch, one of whose videos failed to decode), then runs `diffret <argv>`.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from diffret.extract.config import ExtractConfig  # noqa: E402
from diffret.extract.distributed import DistInfo, init_distributed  # noqa: E402
from diffret.extract.finetune import batch_loss  # noqa: E402
from diffret.pipeline.cli import main  # noqa: E402
from test_recipe import tiny_batch, tiny_model  # noqa: E402


def check_gathered_gradients(info: DistInfo) -> None:
    tokens, video, mask = tiny_batch(n=4)
    mask[1] = False  # rank 0's second video failed: left out of the loss everywhere
    valid = mask.any(dim=1)
    rows = slice(2 * info.rank, 2 * info.rank + 2)
    for loss_name in ("infonce", "dsl"):
        cfg = ExtractConfig(model="tiny", pretrained="none", loss=loss_name)
        ref = tiny_model()
        expected = batch_loss(ref, ref, tokens, video, mask, valid, cfg, DistInfo(), amp=False)
        expected.backward()
        model = tiny_model()
        net = DistributedDataParallel(model, broadcast_buffers=False)
        loss = batch_loss(net, model, tokens[rows], video[rows], mask[rows], valid, cfg, info, amp=False)
        (loss * info.world).backward()  # as train_step: DDP averages, the sum is wanted
        assert torch.allclose(loss, expected, atol=1e-6), (loss_name, loss.item(), expected.item())
        grads = dict(ref.named_parameters())
        checked = 0
        for name, p in model.named_parameters():
            if grads[name].grad is None:
                assert p.grad is None or not p.grad.any(), name
                continue
            ref_grad = grads[name].grad  # float32 sums in another order: tolerance on the tensor's scale
            assert torch.allclose(p.grad, ref_grad, rtol=1e-4, atol=1e-7 + 1e-5 * float(ref_grad.abs().max())), (
                loss_name, name, float((p.grad - ref_grad).abs().max()))
            checked += 1
        assert checked > 50 and model.clip.logit_scale.grad is not None
        assert torch.allclose(model.clip.logit_scale.grad, ref.clip.logit_scale.grad, rtol=1e-4), loss_name


if __name__ == "__main__":
    info = init_distributed("cpu")
    assert info.world == 2, info
    check_gathered_gradients(info)
    main(sys.argv[1:], standalone_mode=False)
