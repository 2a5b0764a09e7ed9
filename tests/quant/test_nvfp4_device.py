"""The quantizer's exactness tests with the tensors on each available device (the CPU, and CUDA
when present): known answers, the independent NumPy reference of tests/quant/test_nvfp4.py, the true
division of S_enc, E4M3 rounding on every boundary, SR neighbours and seeding, the RHT.
``nvfp4bench.gpu_check`` runs the CUDA ones on a lent GPU (``-k cuda``)."""
import numpy as np
import pytest
import torch
from tests.quant.test_nvfp4 import (E2M1_RN_TABLE, GOLDEN_CODES, GOLDEN_INPUT, GOLDEN_PACKED, _adversarial,
                        _bytes_hex, _e4m3_boundaries, _reference_fake_quantize)

from nvfp4bench.quant import nvfp4
from nvfp4bench.quant.kernels import fake_quantize
from nvfp4bench.quant.nvfp4 import dequantize, pack, quantize, rht, rht_matrix

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().float().view(torch.int32)


def _ref(x: torch.Tensor, tile_rows: int = 1) -> torch.Tensor:
    return torch.from_numpy(_reference_fake_quantize(x.float().cpu().numpy(), tile_rows))


@pytest.mark.parametrize("device", DEVICES)
def test_golden_vector_on_device(device):
    q = quantize(torch.tensor([GOLDEN_INPUT], device=device))
    assert q.codes.device.type == device
    assert q.amax.item() == 2688.0
    assert q.scales.view(torch.uint8).tolist() == [[0x38, 0x7E]]
    assert q.codes.tolist() == [GOLDEN_CODES]
    assert _bytes_hex(pack(q.codes)) == GOLDEN_PACKED


@pytest.mark.parametrize("device", DEVICES)
def test_e2m1_rn_table_on_device(device):
    values = torch.tensor([v for v, _ in E2M1_RN_TABLE])
    want = torch.tensor([m for _, m in E2M1_RN_TABLE])
    for sign in (1.0, -1.0):
        got = nvfp4.round_e2m1_rn((sign * values).to(device))
        assert torch.equal(_bits(got), _bits(sign * want))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("seed", range(3))
def test_reference_bit_for_bit_on_device(device, tile, seed):
    x = _adversarial(seed)
    ours = fake_quantize(x.to(device), tile=tile)
    assert ours.device.type == device
    assert torch.equal(_bits(ours), _bits(_ref(x, tile[0])))
    q = quantize(x.to(device), tile=tile)
    assert torch.equal(_bits(dequantize(q)), _bits(ours))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_on_device(device, dtype):
    x = _adversarial(7).clamp(-6e4, 6e4).to(dtype)
    assert torch.equal(_bits(fake_quantize(x.to(device))), _bits(_ref(x)))


@pytest.mark.parametrize("device", DEVICES)
def test_global_encode_scale_is_one_true_division_on_device(device):
    g = torch.Generator().manual_seed(0)
    amax = torch.rand(20000, generator=g) * torch.exp2(
        torch.randint(-130, 128, (20000,), generator=g).float())
    amax = torch.cat([amax, torch.zeros(1), torch.tensor([float("inf"), 1e-45])])
    a = amax.numpy()
    with np.errstate(divide="ignore", over="ignore"):
        ref = np.minimum(np.float32(2688.0) / a, np.finfo(np.float32).max).astype(np.float32)
    ref[(a == 0) | (ref == 0)] = 1.0
    got = nvfp4.global_encode_scale(amax.to(device))
    assert torch.equal(_bits(got), _bits(torch.from_numpy(ref)))


@pytest.mark.parametrize("device", DEVICES)
def test_e4m3_boundaries_on_device(device):
    v = _e4m3_boundaries()
    cast = nvfp4.e4m3_cast(v.to(device))
    assert torch.equal(_bits(cast), _bits(nvfp4.e4m3_cast(v)))
    assert torch.equal(_bits(nvfp4.e4m3_round(v.to(device))), _bits(cast))


@pytest.mark.parametrize("device", DEVICES)
def test_subnormal_decode_scale_on_device(device):
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * 1e-36
    s_dec = nvfp4.global_decode_scale(x.abs().max().to(device))
    assert 0 < s_dec.item() < torch.finfo(torch.float32).tiny
    assert torch.equal(_bits(fake_quantize(x.to(device))), _bits(_ref(x)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["hardware", "ideal"])
def test_sr_neighbours_and_seeding_on_device(device, mode):
    x = _adversarial(2).to(device)
    q = quantize(x)
    unit = (q.scales.float() * nvfp4.global_decode_scale(q.amax)).repeat_interleave(16, dim=1)
    step = nvfp4._grid_step((x.abs() / unit).clamp(max=6.0)) * unit
    g = torch.Generator(device).manual_seed(0)
    draws = torch.stack([fake_quantize(x, sr=True, generator=g, sr_mode=mode) for _ in range(4)])
    assert ((draws - x).abs() <= torch.maximum(step, x.abs() - 6 * unit) * (1 + 2 ** -20)).all()
    again = fake_quantize(x, sr=True, sr_mode=mode,
                          generator=torch.Generator(device).manual_seed(0))
    assert torch.equal(draws[0], again) and not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("device", DEVICES)
def test_rht_on_device(device):
    r = rht_matrix(device)
    assert torch.equal(r @ r.T, torch.eye(16, device=device))
    assert torch.equal(rht(torch.eye(16, device=device)), r)
    assert nvfp4.device_rht_matrix(torch.device(device)) is nvfp4.device_rht_matrix(
        torch.device(device))  # made once per device
    x = _adversarial(5)
    assert torch.equal(_bits(rht(x.to(device))), _bits(rht(x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["nvfp4_4over6", "nvfp4_4over6_mse", "mxfp4", "mxfp4_rceil",
                                 "mxfp8", "mxfp8_even"])
def test_formats_on_cuda_equal_the_cpu(fmt):
    """The other block formats on the GPU, RN and SR (the same random bits through
    ``shared_noise``), 1-D blocks and 2-D tiles: the CPU's bits (the CPU's are tested against
    torchao and the write-up in tests/quant/test_formats*.py)."""
    for seed in range(2):
        x = _adversarial(seed)
        for tile in ((1, 16), (16, 16)):
            assert torch.equal(_bits(fake_quantize(x.cuda(), format=fmt, tile=tile)),
                               _bits(fake_quantize(x, format=fmt, tile=tile))), (fmt, tile)
            runs = []
            for dev in ("cuda", "cpu"):
                with nvfp4.shared_noise(torch.Generator().manual_seed(seed)):
                    runs.append(fake_quantize(x.to(dev), format=fmt, tile=tile, sr=True,
                                              generator=torch.Generator(dev).manual_seed(0)))
            assert torch.equal(_bits(runs[0]), _bits(runs[1])), (fmt, tile, "SR")
