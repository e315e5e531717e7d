"""Run with `torchrun --nproc_per_node 2 tensor_parallel_run.py CHECKPOINT...`: each checkpoint (a nanovision text
model or VLM) loaded with transformers' tensor parallelism (tp_size=2: the config's base_model_tp_plan and the
lm_head plan) must give the logits and the gradients of the same checkpoint loaded unsharded."""

import sys

import torch
from conftest import probe_inputs
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.distributed import DistributedConfig

import nanovision  # noqa: F401  (registers the Auto classes)


def logits_and_grads(model, inputs):
    outputs = model(**inputs)
    outputs.loss.backward()
    # full_tensor gathers a sharded gradient: collective, in the same parameter order on every rank
    grads = {name: getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for name, p in model.named_parameters()}
    return outputs.logits.detach(), grads


def check(path):
    config = AutoConfig.from_pretrained(path)
    auto_class = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    inputs = probe_inputs(config)
    inputs["labels"] = inputs["input_ids"]
    expected_logits, expected_grads = logits_and_grads(auto_class.from_pretrained(path), inputs)
    model = auto_class.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2))
    q_proj = model.get_decoder().layers[0].self_attn.q_proj.weight
    assert q_proj.to_local().shape[0] * 2 == q_proj.shape[0], f"{path}: q_proj is not sharded"
    logits, grads = logits_and_grads(model, inputs)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4, msg=lambda m: f"{path} logits: {m}")
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{path} {n}: {m}")


for path in sys.argv[1:]:
    check(path)
