"""Every teacher family with ``attn_implementation="tide_bd3lm"`` on a GPU: the compiled kernel (key lengths
for the bidirectional teachers, the BD3LM mask for WeDLM) against SDPA, bf16 and fp32. Runs in
``run_gpu_checks.sh``; skipped without CUDA (the interpreter versions are in tests/models)."""

from __future__ import annotations

import pytest
import torch

from tide_ds.models.teachers import FAMILIES, get_family, load_teacher

pytestmark = [pytest.mark.any_device,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
B, L, K = 3, 64, 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tide_backend_on_the_gpu_matches_sdpa(tmp_path, name, dtype) -> None:
    path = FAMILIES[name].write_tiny_checkpoint(tmp_path / name, seed=0)
    models = [load_teacher(path, dtype=dtype, attn_implementation=impl).cuda().eval() for impl in ("sdpa", "tide_bd3lm")]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (B, L), generator=generator).cuda()
    valid = torch.ones(B, L, dtype=torch.long, device="cuda")
    valid[1, L - 7:] = 0
    valid[2, 5:] = 0
    family = get_family(name)
    outs = []
    with torch.no_grad():
        for model in models:
            if name == "wedlm":  # no padding: the kernel's BD3LM mode
                outs.append(family.forward_hidden(model, ids, x_0_BL=ids.flip(1), block_size=K).float())
            else:
                outs.append(family.forward_hidden(model, ids, attention_mask_BL=valid)[valid.bool()].float())
    ref, ours = outs
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # fp32 dots may run in TF32 in both backends
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=tol * ref.abs().max().item(), rtol=tol)
