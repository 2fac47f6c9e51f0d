"""MoCoQueue (ages, wrap-around, temporal decay, resume) and momentum_update."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cmgen.losses.queue import MoCoQueue, momentum_update


def _batch(b, d, start):
    """Keys whose first coordinate records their global index, so slots can be traced."""
    x = torch.zeros(b, d)
    x[:, 0] = torch.arange(start, start + b, dtype=torch.float32)
    return x


def test_initial_state_is_random_unit_keys():
    q = MoCoQueue(dim=8, size=10)
    torch.testing.assert_close(q.keys.norm(dim=1), torch.ones(10))
    assert q.ages.tolist() == [0] * 10 and int(q.ptr) == 0 and int(q.num_filled) == 0
    assert not q.valid_mask().any()
    torch.testing.assert_close(q.weights(), torch.ones(10))


def test_ages_and_wrap_around_with_batch_not_dividing_size():
    size, d = 7, 3
    q = MoCoQueue(d, size, temporal_decay=0.9)
    # expected state tracked by hand: slot -> (global index, age)
    slot_index, slot_age = [None] * size, [0] * size
    ptr, total = 0, 0
    for step, b in enumerate([3, 3, 3, 2, 5, 7]):
        q.enqueue(_batch(b, d, total))
        slot_age = [a + 1 for a in slot_age]
        for j in range(b):
            slot_index[(ptr + j) % size] = total + j
            slot_age[(ptr + j) % size] = 1  # VideoMoCo: written slots get count 1
        ptr, total = (ptr + b) % size, total + b
        assert int(q.ptr) == ptr, step
        assert q.ages.tolist() == slot_age, step
        filled = [s is not None for s in slot_index]
        assert q.valid_mask().tolist() == filled, step
        assert int(q.num_filled) == sum(filled)
        written = [i for i, s in enumerate(slot_index) if s is not None]
        assert q.keys[written, 0].tolist() == [float(slot_index[i]) for i in written], step
    torch.testing.assert_close(q.weights(), torch.tensor([0.9 ** a for a in slot_age]))


def test_ages_after_several_enqueues_explicit():
    q = MoCoQueue(2, 6, temporal_decay=0.5)
    q.enqueue(torch.randn(2, 2))  # slots 0,1
    q.enqueue(torch.randn(2, 2))  # slots 2,3
    q.enqueue(torch.randn(3, 2))  # slots 4,5,0
    # age counts the write itself: slot 0 rewritten now (1); slot 1 written 3 enqueues ago; 2,3 two ago; 4,5 now
    assert q.ages.tolist() == [1, 3, 2, 2, 1, 1]
    assert int(q.ptr) == 1 and int(q.num_filled) == 6
    torch.testing.assert_close(q.weights(), torch.tensor([0.5, 0.125, 0.25, 0.25, 0.5, 0.5]))
    # never-written random keys also age (VideoMoCo ages every slot per enqueue)
    r = MoCoQueue(2, 6, temporal_decay=0.5)
    r.enqueue(torch.randn(1, 2))
    r.enqueue(torch.randn(1, 2))
    assert r.ages.tolist() == [2, 1, 2, 2, 2, 2]
    assert r.valid_mask().tolist() == [True, True, False, False, False, False]
    keys, weights = r.snapshot(valid_only=True)
    assert keys.shape == (2, 2) and weights.tolist() == [0.25, 0.5]


def test_videomoco_default_decay_weights_in_float64():
    q = MoCoQueue(2, 4, temporal_decay=0.99999)
    q.ages.fill_(65535)
    torch.testing.assert_close(q.weights(), torch.full((4,), 0.99999 ** 65535), rtol=1e-7, atol=0)


def test_enqueue_stores_detached_copies_and_validates():
    q = MoCoQueue(3, 4)
    k = torch.randn(2, 3, requires_grad=True)
    q.enqueue(k)
    assert not q.keys.requires_grad
    with torch.no_grad():
        k.mul_(0)
    assert q.keys[:2].abs().sum() > 0
    with pytest.raises(ValueError, match="cannot enqueue 5 keys into a queue of size 4"):
        q.enqueue(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        q.enqueue(torch.randn(2, 4))
    with pytest.raises(ValueError, match="temporal_decay"):
        MoCoQueue(3, 4, temporal_decay=1.5)
    with pytest.raises(ValueError, match="size"):
        MoCoQueue(3, 0)


def test_snapshot_survives_later_enqueue_in_backward():
    q = MoCoQueue(4, 8)
    query = torch.randn(2, 4, requires_grad=True)
    keys, _ = q.snapshot()
    loss = (query @ keys.t()).logsumexp(dim=1).mean()
    q.enqueue(torch.randn(3, 4))
    loss.backward()  # would raise "modified by an inplace operation" if keys were the buffer itself
    assert query.grad is not None


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    a = MoCoQueue(3, 5, temporal_decay=0.8)
    for b in (2, 4, 3):
        a.enqueue(torch.randn(b, 3))
    state = copy.deepcopy(a.state_dict())
    assert set(state) == {"keys", "ages", "ptr", "num_filled"}
    b_ = MoCoQueue(3, 5, temporal_decay=0.8)
    b_.load_state_dict(state)
    for n in (4, 1, 5):
        new = torch.randn(n, 3)
        a.enqueue(new)
        b_.enqueue(new)
        for name in ("keys", "ages", "ptr", "num_filled"):
            assert torch.equal(getattr(a, name), getattr(b_, name)), name
        assert torch.equal(a.weights(), b_.weights())


# ---------------------------------------------------------------- momentum_update

def _pair():
    torch.manual_seed(1)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    online(torch.randn(5, 3))  # give online BN running stats different from the target's
    online.train()
    online(torch.randn(5, 3))
    return online, target


def test_momentum_update_exact_formula_params_only():
    online, target = _pair()
    before_t = {k: v.clone() for k, v in target.state_dict().items()}
    m = 0.9
    momentum_update(online, target, m)
    on = online.state_dict()
    for name, p in target.named_parameters():
        expected = before_t[name] * m + on[name] * (1 - m)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    for name, buf in target.named_buffers():
        assert torch.equal(buf, before_t[name]), name  # MoCo default: buffers untouched
    assert all(p.grad is None for p in target.parameters())


def test_momentum_update_buffers_copy_and_ema_and_extremes():
    online, target = _pair()
    before_t = {k: v.clone() for k, v in target.state_dict().items()}
    on = online.state_dict()
    momentum_update(online, target, 0.75, buffers="ema")
    for name, buf in target.named_buffers():
        if buf.is_floating_point():
            torch.testing.assert_close(buf, 0.75 * before_t[name] + 0.25 * on[name])
        else:
            assert torch.equal(buf, on[name]), name
    online, target = _pair()
    momentum_update(online, target, 0.5, buffers="copy")
    for name, buf in target.named_buffers():
        assert torch.equal(buf, online.state_dict()[name]), name
    online, target = _pair()
    momentum_update(online, target, 0.0)
    for (_, p), (_, q) in zip(online.named_parameters(), target.named_parameters()):
        assert torch.equal(p, q)
    before = [p.clone() for p in target.parameters()]
    momentum_update(online, target, 1.0)
    for p, q in zip(before, target.parameters()):
        torch.testing.assert_close(p, q)


def test_momentum_update_bad_arguments():
    online, target = _pair()
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(online, target, 1.5)
    with pytest.raises(ValueError, match="buffers"):
        momentum_update(online, target, 0.9, buffers="all")
    with pytest.raises(ValueError, match="numbers of parameters"):
        momentum_update(online, nn.Linear(3, 4), 0.9)
    with pytest.raises(ValueError, match="shape"):
        momentum_update(nn.Linear(3, 4), nn.Linear(4, 3), 0.9)
