"""``--teacher.attn_implementation=tide_bd3lm``: our attention kernels inside every teacher, against SDPA.

Bidirectional teachers (LLaDA, Dream, LLaDA2) run the kernel's key-lengths mode, WeDLM its BD3LM mode (a
padded WeDLM batch falls back to SDPA with the dense mask). Both the PyTorch reference (what a CPU trains
with) and the Triton kernel (here in Triton's interpreter) must give SDPA's hidden states on real rows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tide_ds.models import tide_attention
from tide_ds.models.teachers import FAMILIES, get_family, load_teacher
from tide_ds.models.tide_attention import key_lengths

B, L, K = 2, 16, 4


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tide_attention_teachers")
    return {name: family.write_tiny_checkpoint(root / name, seed=0) for name, family in FAMILIES.items()}


def _forward(name: str, model, ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    family = get_family(name)
    if name == "wedlm":
        return family.forward_hidden(model, ids, x_0_BL=ids.flip(1), block_size=K, attention_mask_BL=valid)
    return family.forward_hidden(model, ids, attention_mask_BL=valid)


@pytest.mark.parametrize("implementation", [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CPU tensors through Triton's interpreter; GPUs run tests/kernels' *_cuda tests")),
])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tide_backend_matches_sdpa(tiny_dirs, name, implementation, monkeypatch, generator, caplog) -> None:
    monkeypatch.setattr(tide_attention, "kernel_implementation", lambda device: implementation)
    sdpa = load_teacher(tiny_dirs[name])
    ours = load_teacher(tiny_dirs[name], attn_implementation="tide_bd3lm")
    assert ours.config._attn_implementation == "tide_bd3lm"
    ids = torch.randint(0, 1000, (B, L), generator=generator)
    valid = torch.ones(B, L, dtype=torch.long)
    valid[1, L - 5:] = 0  # right padding in the second sequence
    caplog.set_level(logging.INFO, logger=tide_attention.__name__)
    tide_attention._log_once.cache_clear()
    with torch.no_grad():
        full = _forward(name, ours, ids, None)
        torch.testing.assert_close(full, _forward(name, sdpa, ids, None), atol=2e-5, rtol=1e-4)
        padded, expected = _forward(name, ours, ids, valid), _forward(name, sdpa, ids, valid)
    real = valid.bool()
    torch.testing.assert_close(padded[real], expected[real], atol=2e-5, rtol=1e-4)
    # The padding reached the kernel: the shortened sequence differs from the unpadded run.
    assert not torch.allclose(padded[1, : L - 5], full[1, : L - 5], atol=1e-4)
    if name == "wedlm":
        assert "runs through SDPA" in caplog.text  # BD3LM + key padding: the dense-mask fallback, said once


@pytest.mark.parametrize("name", ["llada", "wedlm"])
def test_tide_backend_kernel_sees_the_mask(tiny_dirs, name, monkeypatch, generator) -> None:
    """The backend really runs bd3lm_attention with the kernel arguments of the family."""
    calls = []
    import tide_kernels.bd3lm_attention as op

    real = op.bd3lm_attention

    def spy(q, k, v, **kwargs):
        calls.append({key: (val.tolist() if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()})
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(op, "bd3lm_attention", spy)
    monkeypatch.setattr(tide_attention, "kernel_implementation", lambda device: "triton")  # the GPU's choice
    model = load_teacher(tiny_dirs[name], attn_implementation="tide_bd3lm")
    ids = torch.randint(0, 1000, (B, L), generator=generator)
    valid = torch.ones(B, L, dtype=torch.long)
    valid[0, L - 3:] = 0
    with torch.no_grad():
        _forward(name, model, ids, None if name == "wedlm" else valid)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers
    if name == "wedlm":
        assert calls[0] == {"seq_len": L, "block_size": K, "clean_first": True, "scale": calls[0]["scale"],
                            "implementation": "triton"}
    else:
        assert calls[0]["key_lens"] == [L - 3, L]


def test_left_padding_is_a_clear_error(tiny_dirs, generator) -> None:
    model = load_teacher(tiny_dirs["llada"], attn_implementation="tide_bd3lm")
    ids = torch.randint(0, 1000, (B, L), generator=generator)
    valid = torch.ones(B, L, dtype=torch.long)
    valid[1, :3] = 0
    with pytest.raises(ValueError, match=r"row 1 has padding before real tokens.*pad on the right"):
        _forward("llada", model, ids, valid)


def test_key_lengths() -> None:
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert key_lengths(valid).tolist() == [2, 4, 0]
    assert key_lengths(valid).dtype == torch.int32
    with pytest.raises(ValueError, match="row 0 has padding before real tokens"):
        key_lengths(torch.tensor([[1, 0, 1, 0]]))
    with pytest.raises(ValueError, match=r"\[B, L\] 0/1 padding mask"):
        key_lengths(torch.ones(2, 1, 4))


def test_teacher_config_accepts_the_backend() -> None:
    from tide_ds.config import TeacherArgs

    assert TeacherArgs(attn_implementation="tide_bd3lm").attn_implementation == "tide_bd3lm"
    with pytest.raises(ValueError, match="teacher.attn_implementation"):
        TeacherArgs(attn_implementation="flash_attention_2")


def test_unsupported_head_dim_is_refused_when_the_model_is_built(tmp_path) -> None:
    from tide_ds.models.qwen3 import build_student, tiny_student_config

    path = FAMILIES["llada"].write_tiny_checkpoint(tmp_path / "llada", seed=0, d_model=48, n_heads=2)  # head dim 24
    load_teacher(path)  # sdpa takes any head dim
    with pytest.raises(ValueError, match=r"teacher.attn_implementation=tide_bd3lm needs a head dim in \[16, 32, 64, 128\].*head_dim=24"):
        load_teacher(path, attn_implementation="tide_bd3lm")
    with pytest.raises(ValueError, match=r"model.attn_implementation=tide_bd3lm needs a head dim .*head_dim=24"):
        config = tiny_student_config()
        config.head_dim = 24
        build_student(config, attn_implementation="tide_bd3lm")
