import pytest
import torch

from ldm.devices import choose_device, choose_dtype


def test_cpu_and_auto():
    assert choose_device("cpu").type == "cpu"
    assert choose_device(None).type in ("cpu", "cuda", "mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        choose_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        choose_device("gpu0")


def test_fp16_on_cpu_falls_back_with_a_note():
    assert choose_dtype("autocast", torch.device("cpu"))[0] == torch.float32
    assert "fp32" in choose_dtype("fp16", torch.device("cpu"))[1]
    assert choose_dtype("bf16", torch.device("cpu")) == (torch.bfloat16, None)
    assert choose_dtype("full", torch.device("cpu")) == (torch.float32, None)
    with pytest.raises(ValueError, match="unknown precision"):
        choose_dtype("fp8", torch.device("cpu"))
