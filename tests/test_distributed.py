"""cmgen.distributed: no-op without a process group, correct values and gradients with two."""
import pytest
import torch

from cmgen import distributed as cd
from tests.dist_utils import run_distributed


def test_single_process_is_identity():
    x = torch.randn(4, 3, requires_grad=True)
    assert cd.rank() == 0 and cd.world_size() == 1 and not cd.is_distributed()
    assert cd.gather_with_grad(x) is x
    assert cd.gather_no_grad(x) is x
    assert cd.all_reduce_with_grad(x) is x
    shuffled, idx = cd.batch_shuffle(x)
    assert shuffled is x and idx is None
    assert cd.batch_unshuffle(x, idx) is x


def _gather_worker(rank, world_size):
    torch.manual_seed(0)
    full = torch.randn(2 * world_size, 3, dtype=torch.float64)
    weights = torch.randn(2 * world_size, 3, dtype=torch.float64)
    local = full[rank * 2:(rank + 1) * 2].clone().requires_grad_(True)
    gathered = cd.gather_with_grad(local)
    # each rank's loss uses every row; the global objective is the mean over ranks
    loss = (gathered * weights).sum() * (rank + 1)
    loss.backward()
    summed = cd.all_reduce_with_grad(local)
    y = local.detach().clone().requires_grad_(True)
    (cd.all_reduce_with_grad(y) * weights[:2]).sum().backward()
    x_sh, idx = cd.batch_shuffle(full[rank * 2:(rank + 1) * 2])
    back = cd.batch_unshuffle(x_sh, idx)
    return {"gathered": gathered.detach(), "grad": local.grad, "summed": summed.detach(),
            "reduce_grad": y.grad, "unshuffled": back, "full": full, "weights": weights}


@pytest.mark.slow
def test_two_processes_gather_and_reduce():
    out = run_distributed(_gather_worker, world_size=2)
    full, weights = out[0]["full"], out[0]["weights"]
    for r, o in enumerate(out):
        torch.testing.assert_close(o["gathered"], full)
        # d/dx_r of sum_s loss_s = weights_r * (1 + 2): gradients of every rank's loss are summed
        torch.testing.assert_close(o["grad"], weights[r * 2:(r + 1) * 2] * 3)
        torch.testing.assert_close(o["summed"], full[0:2] + full[2:4])
        torch.testing.assert_close(o["reduce_grad"], weights[:2] * 2)
        torch.testing.assert_close(o["unshuffled"], full[r * 2:(r + 1) * 2])
