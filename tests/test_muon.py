import pytest
import torch

from nanovision.training import trainer as trainer_module
from nanovision.training.muon import Muon, MuonWithAdamW, orthogonalize


def matrices(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 32, generator=generator), torch.randn(32, 96, generator=generator),
            torch.randn(40, 40, generator=generator)]


def run(optimizer_cls, steps=3, **kwargs):
    params = [torch.nn.Parameter(m) for m in matrices()]
    optimizer = optimizer_cls([{"params": params[:2], "lr": 0.02, "weight_decay": 0.0},
                               {"params": params[2:], "lr": 0.005, "weight_decay": 0.1}], **kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return params


def test_muon_matches_torch_muon_bit_for_bit_in_bf16():
    """The quickstart's recipe was measured with torch.optim.Muon: the bf16 path must be the same optimizer."""
    ours, torchs = run(Muon), run(torch.optim.Muon)
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs, strict=True))
    assert not torch.equal(ours[0], matrices()[0])


def test_muon_fp32_newton_schulz_is_the_float64_iteration_rounded():
    for m in matrices():
        fp32, fp64 = orthogonalize(m, dtype=torch.float32), orthogonalize(m.double(), dtype=torch.float64)
        assert fp32.dtype == torch.float32 and fp32.shape == m.shape
        torch.testing.assert_close(fp32.double(), fp64, rtol=0, atol=1e-5)
    # tall and wide random matrices come out near-orthogonal (square ones keep tiny singular values near 0)
    for m in matrices()[:2]:
        singular = torch.linalg.svdvals(orthogonalize(m, dtype=torch.float32))
        assert 0.6 < singular.min() and singular.max() < 1.1, singular
        assert torch.linalg.svdvals(m).max() > 8  # what the iteration started from
    fp32_run, bf16_run = run(Muon, newton_schulz_dtype=torch.float32), run(Muon)
    assert all((a - b).abs().max() < 0.02 * 3 for a, b in zip(fp32_run, bf16_run, strict=True))  # 3 steps of lr 0.02


def test_muon_takes_matrices_only():
    with pytest.raises(ValueError, match="2D weight matrices only; give vectors"):
        Muon([torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4))])


def tiny_trainer(tmp_path, **training_arguments):
    from conftest import tiny_text_config
    from transformers import TrainingArguments

    from nanovision.modeling_nanovision import NanoVisionForCausalLM

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **training_arguments)
    return trainer_module.NanoVisionTrainer(model=NanoVisionForCausalLM(tiny_text_config()), args=args, muon_lr=0.02)


@pytest.mark.parametrize("fast_bf16, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_trainer_runs_newton_schulz_in_fp32_on_cpus_without_bf16(tmp_path, monkeypatch, fast_bf16, dtype):
    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert tiny_trainer(tmp_path).create_optimizer().muon.newton_schulz_dtype == dtype


def test_muon_errors_name_the_fix(tmp_path):
    trainer = tiny_trainer(tmp_path, optim="adamw_torch")
    optimizer = trainer.create_optimizer()
    adamw_state = torch.optim.AdamW(trainer.model.parameters()).state_dict()
    with pytest.raises(ValueError, match=r"no \['adamw', 'muon'\] part.*--optim the checkpoint was trained with"):
        optimizer.load_state_dict(adamw_state)
    trainer.optimizer, trainer.is_fsdp_enabled = None, True
    with pytest.raises(ValueError, match="--optim muon orthogonalises whole weight matrices, which FSDP shards"):
        trainer.create_optimizer()


def test_muon_with_adamw_steps_both_and_evaluates_the_closure_once():
    matrix, vector = torch.nn.Parameter(torch.ones(8, 4)), torch.nn.Parameter(torch.ones(4))
    optimizer = MuonWithAdamW(Muon([matrix], lr=0.1), torch.optim.AdamW([vector], lr=0.1))
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = (matrix @ vector * torch.arange(8.0)).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert len(calls) == 1 and loss.item() == pytest.approx(4 * sum(range(8)))
    assert not torch.equal(matrix, torch.ones(8, 4)) and not torch.equal(vector, torch.ones(4))
