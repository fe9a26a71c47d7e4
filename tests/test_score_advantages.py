import os
from unittest import mock

import pytest
import torch
from conftest import assert_within_rule
from hypothesis import given, settings
from hypothesis import strategies as st

from score_fast.kernels.score_advantages import score_advantages, score_advantages_ref

BASELINES = ("rloo", "mean", "none")


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SCORE_FAST_BACKEND", request.param)
    return request.param


def _inputs(E, n_groups, seed=0, binary=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if binary:
        r1 = torch.randint(0, 2, (E,), generator=g).float()
        r2 = torch.randint(0, 2, (E,), generator=g).float()
    else:
        r1, r2 = torch.rand(E, generator=g), torch.rand(E, generator=g)
    # sparse, negative, unsorted prompt ids
    group = torch.randint(-n_groups, n_groups, (E,), generator=g) * 7 - 3
    return r1.to(device), r2.to(device), group.to(device)


def _check_against_ref(r1, r2, group, **kw):
    out = score_advantages(r1, r2, group, **kw)
    assert out.dtype == torch.float32 and out.shape == (r1.numel(), 2)
    ref64 = score_advantages_ref(r1.double().cpu(), r2.double().cpu(), group.cpu(), **kw)
    base = score_advantages_ref(r1.cpu(), r2.cpu(), group.cpu(), **kw)
    assert_within_rule(out, ref64, base, atol=1e-6, name=str(kw))


def test_hand_table_stage2_no_baseline(backend):
    # (r1, r2) = (0,1), (1,1), (0,0), (1,0): turn-2 reward r2 + 10 (r2 - r1)
    r1 = torch.tensor([0.0, 1.0, 0.0, 1.0])
    r2 = torch.tensor([1.0, 1.0, 0.0, 0.0])
    out = score_advantages(r1, r2, torch.arange(4), stage=2, alpha=10.0, baseline="none")
    assert out.tolist() == [[0.0, 11.0], [1.0, 1.0], [0.0, 0.0], [1.0, -10.0]]


def test_rloo_group_sizes_1_2_3_by_hand(backend):
    # groups: 7 -> episodes {0, 2}, -2 -> {1}, 30 -> {3, 4, 5}
    group = torch.tensor([7, -2, 7, 30, 30, 30])
    r1 = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    r2 = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    # stage 1: column 0 zero; column 1 = r2 minus the mean of the others in the group
    s1 = score_advantages(r1, r2, group, stage=1, baseline="rloo")
    assert s1[:, 0].tolist() == [0.0] * 6
    assert s1[:, 1].tolist() == [1.0, 0.0, -1.0, 0.5, 0.5, -1.0]
    # stage 2, alpha 10: shaped turn-2 rewards 1, -10, 0, 11, 1, -10
    s2 = score_advantages(r1, r2, group, stage=2, alpha=10.0, baseline="rloo")
    assert s2[:, 0].tolist() == [1.0, 0.0, -1.0, -1.0, 0.5, 0.5]
    # group 7: 1 - 0, 0 - 1; group 30: 11 - (1-10)/2, 1 - (11-10)/2, -10 - (11+1)/2
    assert s2[:, 1].tolist() == [1.0, 0.0, -1.0, 15.5, 0.5, -16.0]


def test_mean_and_normalize_by_hand(backend):
    group = torch.tensor([4, 4, 9])
    r = torch.tensor([0.0, 1.0, 1.0])
    mean = score_advantages(r, r, group, stage=1, baseline="mean")
    assert mean[:, 1].tolist() == [-0.5, 0.5, 0.0]
    # population std of {0, 1} is 0.5: mean -> +-0.5 / 0.5, rloo -> +-1 / 0.5;
    # the group of one has std 0 and stays 0 (the 1e-6 guard keeps it finite)
    norm = score_advantages(r, r, group, stage=1, baseline="mean", normalize=True)
    torch.testing.assert_close(norm[:, 1], torch.tensor([-1.0, 1.0, 0.0]), rtol=1e-5, atol=0)
    rloo = score_advantages(r, r, group, stage=1, baseline="rloo", normalize=True)
    torch.testing.assert_close(rloo[:, 1], torch.tensor([-2.0, 2.0, 0.0]), rtol=1e-5, atol=0)
    assert norm[:, 0].tolist() == [0.0] * 3


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("E,n_groups", [(1, 1), (7, 3), (37, 5)])
def test_matches_reference(backend, E, n_groups, stage, baseline, normalize):
    r1, r2, group = _inputs(E, n_groups, seed=E, binary=E != 37)
    _check_against_ref(r1, r2, group, stage=stage, alpha=10.0, baseline=baseline,
                       normalize=normalize)
    if stage == 1:
        assert score_advantages(r1, r2, group, stage=1, baseline=baseline,
                                normalize=normalize)[:, 0].eq(0).all()


@pytest.mark.parametrize("n_groups", [4, 300])
def test_large_batch(backend, n_groups):
    # 4 groups: ~125-250 episodes each, more than one 128-wide block per pass;
    # 300 groups: mostly sizes 1..3
    r1, r2, group = _inputs(1000, n_groups, seed=n_groups)
    _check_against_ref(r1, r2, group, stage=2, alpha=10.0, baseline="rloo", normalize=True)


@settings(max_examples=25, deadline=None)
@given(E=st.integers(1, 12), n_groups=st.integers(1, 4), seed=st.integers(0, 2**16),
       stage=st.sampled_from([1, 2]), baseline=st.sampled_from(BASELINES),
       normalize=st.booleans())
def test_permutation_equivariant_property(E, n_groups, seed, stage, baseline, normalize):
    # shuffling the episodes shuffles the advantages, both paths (env patched by hand:
    # hypothesis reruns the body, a function-scoped monkeypatch would not reset between)
    r1, r2, group = _inputs(E, n_groups, seed=seed, binary=seed % 2 == 0)
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(seed))
    kw = dict(stage=stage, alpha=2.5, baseline=baseline, normalize=normalize)
    ref = score_advantages_ref(r1.double(), r2.double(), group, **kw)
    for be in ("triton", "torch"):
        with mock.patch.dict(os.environ, {"SCORE_FAST_BACKEND": be}):
            out = score_advantages(r1[perm], r2[perm], group[perm], **kw)
        torch.testing.assert_close(out.double(), ref[perm], rtol=1e-5, atol=1e-5)


def test_no_grad_and_int_rewards(backend):
    r1 = torch.tensor([0.0, 1.0], requires_grad=True)
    out = score_advantages(r1, torch.tensor([True, False]), torch.tensor([1, 1], dtype=torch.int32),
                           stage=2)
    assert not out.requires_grad
    # shaped: 1 + 10 * 1 = 11 and 0 - 10 = -10; rloo: 11 - (-10), -10 - 11
    assert out.tolist() == [[-1.0, 21.0], [1.0, -21.0]]


def test_empty(backend):
    e = torch.empty(0)
    assert score_advantages(e, e, torch.empty(0, dtype=torch.long), stage=2).shape == (0, 2)


def test_errors():
    r = torch.zeros(4)
    g = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="stage"):
        score_advantages(r, r, g, stage=3)
    with pytest.raises(ValueError, match="baseline"):
        score_advantages(r, r, g, stage=2, baseline="grpo")
    with pytest.raises(ValueError, match=r"r2 shape \(3,\).*r1 shape \(4,\)"):
        score_advantages(r, torch.zeros(3), g, stage=2)
    with pytest.raises(ValueError, match=r"group shape \(5,\).*r1 shape \(4,\)"):
        score_advantages(r, r, torch.zeros(5, dtype=torch.long), stage=2)
    with pytest.raises(ValueError, match=r"r1 must be 1-D.*\(2, 2\)"):
        score_advantages(r.view(2, 2), r.view(2, 2), g.view(2, 2), stage=2)
    with pytest.raises(ValueError, match="group must hold integer"):
        score_advantages(r, r, r, stage=2)


@pytest.mark.gpu
@pytest.mark.parametrize("baseline", BASELINES)
def test_gpu_matches_reference(monkeypatch, baseline):
    monkeypatch.setenv("SCORE_FAST_BACKEND", "triton")
    r1, r2, group = _inputs(4096, 200, device="cuda")
    _check_against_ref(r1, r2, group, stage=2, alpha=10.0, baseline=baseline, normalize=True)
