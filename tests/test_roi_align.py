"""detector.layers.roi_align against torchvision.ops.roi_align (the reference semantics), plus dtype,
layout, autograd, determinism, autocast, torch.compile and error handling."""
from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from detector.layers import RoIAlign, roi_align

SCALE = 0.25  # feature map at stride 4 of the image the boxes live in


def make_case(seed: int, n: int = 2, c: int = 3, h: int = 11, w: int = 14, k: int = 24,
              dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A feature map and (K, 5) rois covering the hard cases: boxes inside, partly and wholly outside
    the map, zero-size boxes, boxes smaller than one bin, and boxes larger than the map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    img_h, img_w = h / SCALE, w / SCALE
    x1 = torch.rand(k, generator=g, dtype=torch.float64) * img_w * 1.6 - 0.3 * img_w
    y1 = torch.rand(k, generator=g, dtype=torch.float64) * img_h * 1.6 - 0.3 * img_h
    bw = torch.rand(k, generator=g, dtype=torch.float64) * img_w
    bh = torch.rand(k, generator=g, dtype=torch.float64) * img_h
    bw[::5] = 0.0  # zero-size boxes
    bh[1::6] = 0.0
    bw[2::7] *= 0.02  # much smaller than a bin
    x1[3::8] = img_w + 10.0  # wholly outside
    bw[4::9] = img_w * 3  # larger than the map
    idx = torch.randint(0, n, (k,), generator=g).to(torch.float64)
    rois = torch.stack([idx, x1, y1, x1 + bw, y1 + bh], dim=1)
    return x.to(device=device, dtype=dtype), rois.to(device=device, dtype=dtype)


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    big = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3] + 3, dtype=x.dtype, device=x.device)
    strided = big[:, ::2, :, 1:-2]
    strided.copy_(x)
    return {"contiguous": x.contiguous(), "channels_last": x.contiguous(memory_format=torch.channels_last),
            "strided": strided}


def run_both(x: torch.Tensor, rois: torch.Tensor, size, sr: int, aligned: bool,
             ours_input: torch.Tensor | None = None):
    """Forward and input gradient of ours (on `ours_input`, default x) and torchvision's (on x)."""
    a = (x if ours_input is None else ours_input).detach().clone().requires_grad_()
    b = x.detach().clone().requires_grad_()
    out_a = roi_align(a, rois, size, SCALE, sr, aligned)
    out_b = tv_roi_align(b, rois, size, SCALE, sr, aligned)
    grad = torch.randn(out_b.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # both sides get the same (possibly low-precision) values; ours in its output's layout (channels-last
    # stays channels-last through the backward)
    grad = torch.empty_like(out_a).copy_(grad)
    out_a.backward(grad)
    out_b.backward(grad.to(out_b.dtype))
    return out_a, out_b, a.grad, b.grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_torchvision_fp32(aligned, sampling_ratio, layout):
    for seed in range(3):
        x, rois = make_case(seed)
        ours = layouts(x)[layout]
        out_a, out_b, grad_a, grad_b = run_both(x, rois, (5, 4), sampling_ratio, aligned, ours_input=ours)
        torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-6)
        if layout == "channels_last":  # kept channels-last, not copied to NCHW
            assert out_a.is_contiguous(memory_format=torch.channels_last)


def test_list_of_boxes_equals_tensor_form():
    x, rois = make_case(7, k=9)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(x.shape[0])]
    ordered = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1)
                         for i, b in enumerate(per_image)])
    torch.testing.assert_close(roi_align(x, per_image, 3, SCALE, 2), roi_align(x, ordered, 3, SCALE, 2),
                               rtol=0, atol=0)
    torch.testing.assert_close(roi_align(x, per_image, 3, SCALE, 2), tv_roi_align(x, per_image, 3, SCALE, 2))


def test_module_wrapper():
    x, rois = make_case(3)
    m = RoIAlign((6, 7), SCALE, 0, aligned=True)
    assert m(x, rois).shape == (rois.shape[0], x.shape[1], 6, 7)
    torch.testing.assert_close(m(x, rois), tv_roi_align(x, rois, (6, 7), SCALE, 0, True))
    assert "aligned=True" in repr(m)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_matches_fp32_reference(dtype, tol, layout):
    x, rois = make_case(11, c=5)
    low = layouts(x.to(dtype))[layout]
    ref_in = x.to(dtype).float()  # the same quantised values, pooled in fp32 by torchvision
    for aligned, sr in [(False, 1), (True, 0), (True, 2)]:
        out_a, out_b, grad_a, grad_b = run_both(ref_in, rois.float(), 4, sr, aligned, ours_input=low)
        assert out_a.dtype == dtype and grad_a.dtype == dtype
        torch.testing.assert_close(out_a.float(), out_b, rtol=tol, atol=tol)
        torch.testing.assert_close(grad_a.float(), grad_b, rtol=tol, atol=tol)
    # float32 boxes with a low-precision map are accepted (exact coordinates) and agree with boxes in `dtype`
    # wherever the coordinates are representable in it.
    int_rois = rois.round()
    torch.testing.assert_close(roi_align(low, int_rois.float(), 3, SCALE),
                               roi_align(low, int_rois.to(dtype), 3, SCALE), rtol=0, atol=0)


def test_gradcheck_fp64():
    x, rois = make_case(5, n=2, c=1, h=5, w=6, k=5, dtype=torch.float64)
    x.requires_grad_()  # the op is linear in the feature map, so gradcheck is exact up to rounding
    for aligned, sr in [(False, 2), (True, 0)]:
        fn = lambda t: roi_align(t, rois, (3, 2), SCALE, sr, aligned)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))

    def fn_cl(t):
        return roi_align(t.contiguous(memory_format=torch.channels_last), rois, 3, SCALE, 2, True)

    assert torch.autograd.gradcheck(fn_cl, (x,))


@pytest.mark.slow
def test_gradgradcheck_fp64():
    # double backward: the backward op is differentiable too (its adjoint is the forward)
    x, rois = make_case(5, n=2, c=1, h=5, w=6, k=5, dtype=torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: roi_align(t, rois, (3, 2), SCALE, 0, True), (x,))


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _grads(x, rois, repeats=3, **kw):
    out = []
    for _ in range(repeats):
        a = x.detach().clone().requires_grad_()
        y = roi_align(a, rois, 7, SCALE, **kw)
        y.backward(torch.ones_like(y) + torch.linspace(0, 1, y.numel()).reshape(y.shape).to(y))
        out.append(a.grad)
    return out


def test_deterministic_backward_is_bitwise_repeatable(deterministic):
    x, rois = make_case(13, c=8, k=60)
    for inp in (x, x.contiguous(memory_format=torch.channels_last), x.bfloat16()):
        grads = _grads(inp, rois, sampling_ratio=0, aligned=True)
        for g in grads[1:]:
            assert torch.equal(g, grads[0])


def test_empty_boxes_give_empty_output_and_zero_grad():
    x, _ = make_case(0)
    x.requires_grad_()
    for boxes in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]):
        y = roi_align(x, boxes, 5, SCALE, 2)
        assert y.shape == (0, x.shape[1], 5, 5)
        y.sum().backward()
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None


def test_autocast_bf16_runs_natively_on_cpu():
    x, rois = make_case(17)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = roi_align(xb, rois, 5, SCALE, 1)  # fp32 boxes, bf16 map
        y32 = roi_align(x, rois, 5, SCALE, 1)  # an fp32 map is not downcast either
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    torch.testing.assert_close(y, roi_align(xb, rois, 5, SCALE, 1), rtol=0, atol=0)
    torch.testing.assert_close(y32, roi_align(x, rois, 5, SCALE, 1), rtol=0, atol=0)


def test_opcheck_registrations():
    # schema, fake (meta) kernel, autograd registration and AOT dispatch with dynamic shapes
    x, rois = make_case(19, k=5, dtype=torch.float64)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        args = (inp.requires_grad_(), rois, SCALE, 3, 4, 0, True)
        torch.library.opcheck(torch.ops.detector.roi_align.default, args)


class _Pool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = RoIAlign(4, SCALE, 1)

    def forward(self, x, rois):
        return self.pool(x * 2.0, rois).mean(dim=(2, 3))


def test_torch_compile_runs_and_agrees():
    torch._dynamo.reset()
    x, rois = make_case(23)
    model = _Pool()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ya, yb = compiled(a, rois), model(b, rois)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    x, rois = make_case(29)
    model = _Pool()
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x, rois), model(x, rois))


@pytest.mark.parametrize(
    "make_args,match",
    [
        (lambda x, r: (x, r[:, 1:]), r"\(K, 5\)"),
        (lambda x, r: (x, [r[:, :3]]), r"boxes\[0\] must be a \(K_i, 4\)"),
        (lambda x, r: (x, [r[:, 1:]] * 3), "3 box tensors given for an input batch of 2"),
        (lambda x, r: (x, torch.cat([r, torch.tensor([[2.0, 0, 0, 5, 5]])])), "batch index 2.0"),
        (lambda x, r: (x, torch.cat([r, torch.tensor([[-1.0, 0, 0, 5, 5]])])), "batch index -1.0"),
        (lambda x, r: (x, torch.cat([r, torch.tensor([[0.5, 0, 0, 5, 5]])])), "batch index 0.5"),
        (lambda x, r: (x, torch.cat([r, torch.tensor([[0.0, 0, float("nan"), 5, 5]])])), "non-finite"),
        (lambda x, r: (x, torch.cat([r, torch.tensor([[0.0, 0, 0, float("inf"), 5]])])), "non-finite"),
        (lambda x, r: (x[0], r), "4-D"),
        (lambda x, r: (x, r.double()), "dtype torch.float64 does not match input dtype torch.float32"),
        (lambda x, r: (x.long(), r), "floating point"),
        (lambda x, r: (x, r.to("meta")), "boxes are on meta but input is on cpu"),
    ],
)
def test_bad_input_errors(make_args, match):
    x, rois = make_case(31, k=4)
    inp, boxes = make_args(x, rois)
    with pytest.raises((ValueError, TypeError), match=match):
        roi_align(inp, boxes, 3, SCALE)


@pytest.mark.parametrize("size", [0, (3, 0), (-2, 3), (1, 2, 3)])
def test_bad_output_size(size):
    x, rois = make_case(0)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(x, rois, size, SCALE)
    with pytest.raises(ValueError, match="output_size"):
        RoIAlign(size, SCALE, 0)


def test_native_op_checks_values_itself():
    # Direct calls to the registered op (bypassing the Python checks) still fail cleanly on CPU.
    x, rois = make_case(37, k=3)
    bad = rois.clone()
    bad[1, 0] = 5.0
    with pytest.raises(RuntimeError, match="not a valid batch index"):
        torch.ops.detector.roi_align(x, bad, SCALE, 2, 2, 0, False)
    with pytest.raises(RuntimeError, match="output size must be positive"):
        torch.ops.detector.roi_align(x, rois, SCALE, 0, 2, 0, False)


# ---------------------------------------------------------------------------------------------------
# CUDA (run where a GPU is lent): same comparisons, plus determinism and 64-bit indexing.


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cuda_matches_torchvision_and_cpu(layout):
    for seed, aligned, sr in itertools.product(range(2), [False, True], [0, 1, 2]):
        x, rois = make_case(seed, c=6, device="cuda")
        ours = layouts(x)[layout]
        out_a, out_b, grad_a, grad_b = run_both(x, rois, (5, 4), sr, aligned, ours_input=ours)
        torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_a.cpu(), roi_align(ours.cpu(), rois.cpu(), (5, 4), SCALE, sr, aligned),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float64, 1e-10)])
def test_cuda_dtypes(dtype, tol):
    x, rois = make_case(41, c=8, device="cuda")
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for layout in ("contiguous", "channels_last"):
        low = layouts(x.to(dtype))[layout]
        out_a, out_b, grad_a, grad_b = run_both(x.to(dtype).to(ref_dtype), rois.to(ref_dtype), 4, 0, True,
                                                ours_input=low)
        assert out_a.dtype == dtype and grad_a.dtype == dtype
        torch.testing.assert_close(out_a.to(ref_dtype), out_b, rtol=tol, atol=tol)
        torch.testing.assert_close(grad_a.to(ref_dtype), grad_b, rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_backward(deterministic, dtype):
    x, rois = make_case(43, c=64, h=19, w=23, k=300, device="cuda", dtype=dtype)
    rois = rois.float()
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        grads = _grads(inp, rois, repeats=3, sampling_ratio=0, aligned=True)
        for g in grads[1:]:
            assert torch.equal(g, grads[0])
        # and it agrees with the atomic (fast) kernel
        torch.use_deterministic_algorithms(False)
        fast = _grads(inp, rois, repeats=1, sampling_ratio=0, aligned=True)[0]
        torch.use_deterministic_algorithms(True)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(grads[0].float(), fast.float(), rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic_mode", [False, True])
def test_cuda_gradcheck_fp64(deterministic_mode):
    x, rois = make_case(5, n=2, c=2, h=5, w=6, k=6, dtype=torch.float64, device="cuda")
    x.requires_grad_()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        for aligned, sr, cl in [(False, 2, False), (True, 0, True)]:
            def fn(t, aligned=aligned, sr=sr, cl=cl):
                t = t.contiguous(memory_format=torch.channels_last) if cl else t
                return roi_align(t, rois, (3, 2), SCALE, sr, aligned)

            # the fast backward adds with atomics, in no fixed order: equal only up to rounding
            assert torch.autograd.gradcheck(fn, (x,), nondet_tol=0.0 if deterministic_mode else 1e-12)
        assert torch.autograd.gradgradcheck(lambda t: roi_align(t, rois, (3, 2), SCALE, 0, True), (x,),
                                            nondet_tol=0.0 if deterministic_mode else 1e-12)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.cuda
def test_cuda_autocast_keeps_bf16():
    x, rois = make_case(47, device="cuda")
    xb = x.bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = roi_align(xb, rois, 5, SCALE, 1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, roi_align(xb, rois, 5, SCALE, 1), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_64bit_indexing():
    # An input of more than 2**31 elements: regions at the far end must read the right pixels.
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs about 24 GiB of free GPU memory")
    n, c, h, w = 1, 8, 16384, 16400  # 2.15e9 elements in bfloat16
    x = torch.zeros(n, c, h, w, dtype=torch.bfloat16, device="cuda")
    patch = torch.randn(1, c, 32, 40, device="cuda").bfloat16()
    x[:, :, -32:, -40:] = patch
    rois = torch.tensor([[0, w - 38.0, h - 30.0, w - 5.0, h - 3.0]], device="cuda")
    shifted = rois.clone()
    shifted[:, 1] -= w - 40
    shifted[:, 3] -= w - 40
    shifted[:, 2] -= h - 32
    shifted[:, 4] -= h - 32
    for deterministic_mode in (False, True):
        torch.use_deterministic_algorithms(deterministic_mode)
        try:
            xg = x.requires_grad_()
            y = roi_align(xg, rois, 7, 1.0, 2, True)
            ref_in = patch.clone().requires_grad_()
            ref = roi_align(ref_in, shifted, 7, 1.0, 2, True)
            # coordinates near 16384 carry float32 rounding (ulp 2e-3), hence the bf16-level tolerance
            torch.testing.assert_close(y.float(), ref.float(), rtol=3e-2, atol=3e-2)
            y.float().sum().backward()
            ref.float().sum().backward()
            torch.testing.assert_close(xg.grad[:, :, -32:, -40:].float(), ref_in.grad.float(),
                                       rtol=3e-2, atol=3e-2)
            assert not xg.grad[:, :, :-32].any()
            xg.grad = None
            x = x.detach()
        finally:
            torch.use_deterministic_algorithms(False)
