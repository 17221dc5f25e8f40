"""The student's ``tide_bd3lm`` attention backend (our masked diffusion attention) against SDPA."""

import pytest
import torch

from tide_ds.models import qwen3
from tide_ds.models.qwen3 import BD3LMStudent, build_student, tiny_student_config


@pytest.mark.parametrize("implementation", [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CPU tensors through Triton's interpreter; GPUs run tests/kernels' *_cuda tests")),
])
def test_tide_bd3lm_backend_matches_sdpa_forward_and_gradients(monkeypatch, implementation):
    monkeypatch.setattr(qwen3, "kernel_implementation", lambda device: implementation)
    ref = BD3LMStudent(build_student(tiny_student_config(), seed=0), block_size=4)
    ours = BD3LMStudent(build_student(tiny_student_config(), seed=0, attn_implementation="tide_bd3lm"), block_size=4)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randint(0, 1000, (2, 16), generator=g)
    x_t = torch.where(torch.rand(2, 16, generator=g) < 0.5, 1010, x_0)
    outs = []
    for model in (ref, ours):
        hidden = model(x_t, x_0)
        (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum().backward()
        outs.append([hidden.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # fp32, different summation order


def test_tide_bd3lm_backend_needs_the_student_forward():
    model = build_student(tiny_student_config(), seed=0, attn_implementation="tide_bd3lm")
    with pytest.raises(TypeError, match="runs only inside BD3LMStudent.forward"):
        model(torch.randint(0, 1000, (1, 8)))
