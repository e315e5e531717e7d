import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from nanovision.data import shapes
from nanovision.processing_nanovision import NanoVisionImageProcessor
from nanovision.training import trainer as trainer_module
from nanovision.training.data import load_stage_dataset, tokenize_for_stage
from nanovision.training.muon import MuonWithAdamW
from nanovision.training.arguments import argument_parser, validate_arguments
from nanovision.training.stages import build_model, build_processor, run_stage
from nanovision.training.trainer import NonFiniteLossError

TINY = dict(builtin_train_size=120, pack_max_length=256, per_device_train_batch_size=2, depth=2, head_dim=32,
            vocab_size=400, image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_heads=2,
            logging_steps=1, save_steps=1000)


def stage(tmp_path, name, **overrides):
    """(StageArguments, NanoVisionTrainingArguments) of a tiny run."""
    return argument_parser().parse_dict({"stage": name, "output_dir": str(tmp_path / name), **TINY, **overrides})


def check(tmp_path, name, **overrides):
    validate_arguments(*stage(tmp_path, name, **overrides))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """base -> vision -> sft, a few steps each."""
    root = tmp_path_factory.mktemp("pipeline")
    base = run_stage(*stage(root, "base", max_steps=3))
    vision = run_stage(*stage(root, "vision", model=str(base), max_steps=2))
    # the quickstart's sft settings: multi-turn built-in conversations, bf16 autocast (on the CPU too)
    sft = run_stage(*stage(root, "sft", model=str(vision), max_steps=2, train_modules="connector,language_model",
                          builtin_turns=3, bf16=True))
    return base, vision, sft


def test_stage_folders_are_complete_checkpoints(pipeline):
    base, vision, sft = pipeline
    common = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "modeling_nanovision.py", "configuration_nanovision.py", "README.md", "training_settings.json"}
    assert common <= {p.name for p in base.iterdir()}
    assert common | {"processor_config.json", "processing_nanovision.py"} <= {p.name for p in sft.iterdir()}
    card = (sft / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["base_model"] == str(vision) and metadata["datasets"] == ["builtin"]
    assert "| train_modules | connector,language_model |" in card
    settings = json.loads((sft / "training_settings.json").read_text())
    assert settings["bf16"] is True and json.loads((base / "training_settings.json").read_text())["bf16"] is False
    generation = json.loads((sft / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 1 and generation["pad_token_id"] == 2


def test_stages_train_only_their_modules(pipeline):
    base, vision, sft = pipeline
    base_weights, vision_weights, sft_weights = (load_file(path / "model.safetensors") for path in pipeline)
    # vision stage: language model frozen, connector trained
    assert torch.equal(vision_weights["model.language_model.layers.0.mlp.up_proj.weight"],
                       base_weights["model.layers.0.mlp.up_proj.weight"])
    # sft with connector,language_model: the vision tower stays as it was, the rest moves
    tower = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(sft_weights[tower], vision_weights[tower])
    projector = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(sft_weights[projector], vision_weights[projector])


def test_vision_stage_honours_use_fused_kernels_with_either_tower(pipeline, tmp_path):
    from conftest import TINY_VISION
    from transformers import AutoTokenizer, SiglipVisionConfig, SiglipVisionModel

    base = pipeline[0]
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "siglip")
    tokenizer = AutoTokenizer.from_pretrained(base)
    for vision_model in (None, str(tmp_path / "siglip")):
        model = build_model(stage(tmp_path, "vision", model=str(base), vision_model=vision_model,
                                  use_fused_kernels=True)[0], tokenizer)
        assert model.fused_kernel_ops == ("rms_norm", "swiglu", "rope", "linear_cross_entropy", "layer_norm"), \
            vision_model
        assert model.config.text_config.use_fused_kernels is True


def test_quickstart_evaluation_runs_on_the_pipeline(pipeline, capsys):
    from nanovision.training.evaluate import evaluate_checkpoint

    scores = evaluate_checkpoint(pipeline[2], num_test=8, batch_size=4)
    assert scores["n"] == 8 and 0.0 <= scores["overall"] <= 1.0
    assert "accuracy: " in capsys.readouterr().out


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash after step {self.step}")


def losses(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "muon"])
def test_resume_after_a_crash_continues_the_same_run(tmp_path, optim):
    settings = dict(max_steps=6, save_steps=3, builtin_train_size=200, optim=optim)
    run_stage(*stage(tmp_path / "straight", "base", **settings))
    with pytest.raises(KeyboardInterrupt):
        run_stage(*stage(tmp_path / "crashed", "base", **settings), callbacks=[CrashAt(4)])
    checkpoint = tmp_path / "crashed" / "base" / "checkpoint-3"
    assert checkpoint.exists() and not (tmp_path / "crashed" / "base" / "checkpoint-6").exists()
    run_stage(*stage(tmp_path / "crashed", "base", resume_from_checkpoint=str(checkpoint), **settings))
    straight = losses(tmp_path / "straight" / "base" / "checkpoint-6")
    resumed = losses(tmp_path / "crashed" / "base" / "checkpoint-6")
    assert sorted(straight) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step


class KeepOptimizer(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.model, self.optimizer, self.last_lr = model, optimizer.optimizer, lr_scheduler.get_last_lr()


def test_muon_takes_the_decoder_matrices_and_the_schedule_reaches_both_optimizers(pipeline, tmp_path):
    keep = KeepOptimizer()
    run_stage(*stage(tmp_path, "sft", model=str(pipeline[1]), optim="muon", muon_lr=0.02, learning_rate=1e-3,
                    max_steps=3, train_modules="connector,language_model", lr_scheduler_type="linear"),
              callbacks=[keep])
    optimizer = keep.optimizer
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): name for name, p in keep.model.named_parameters()}
    muon = sorted(names[id(p)] for group in optimizer.muon.param_groups for p in group["params"])
    adamw = sorted(names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"])
    assert muon == sorted(name for name, p in keep.model.named_parameters()
                          if name.startswith("model.language_model.layers.") and p.ndim == 2)
    assert len(muon) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    trained = sorted(name for name, p in keep.model.named_parameters() if p.requires_grad)
    assert sorted(muon + adamw) == trained and not any("vision_tower" in name for name in trained)
    assert "model.language_model.embed_tokens.weight" in adamw
    # the linear schedule ends at 0 on every group of both inner optimizers (Accelerate reloads the optimizer's
    # state when it prepares it, which makes new group dicts: the wrapper must follow them)
    groups = optimizer.muon.param_groups + optimizer.adamw.param_groups
    assert [group["initial_lr"] for group in optimizer.muon.param_groups] == [0.02]
    assert all(group["lr"] == 0.0 for group in groups) and keep.last_lr == [0.0] * len(groups)
    assert all(a is b for a, b in zip(optimizer.param_groups, groups, strict=True))


class PoisonWeightsAfterSave(TrainerCallback):
    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3.*checkpoint-2"):
        run_stage(*stage(tmp_path, "base", max_steps=6, save_steps=2), callbacks=[PoisonWeightsAfterSave()])
    folders = sorted(p.name for p in (tmp_path / "base").glob("checkpoint-*"))
    assert folders == ["checkpoint-2"]
    weights = load_file(tmp_path / "base" / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_push_to_hub_uploads_exactly_the_exported_folder(tmp_path, monkeypatch):
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["files"] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*"))
            calls["folder"] = folder_path

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    final = run_stage(*stage(tmp_path, "base", max_steps=1, push_to_hub=True, hub_model_id="someone/tiny"))
    assert calls["repo"] == "someone/tiny" and calls["folder"] == str(final)
    assert calls["files"] == sorted(p.name for p in final.iterdir())
    assert "model.safetensors" in calls["files"] and not any("checkpoint" in f for f in calls["files"])
    with pytest.raises(ValueError, match="hub_model_id"):
        check(tmp_path, "base", push_to_hub=True)


def test_missing_columns_name_the_expected_ones(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"content": "hello"}\n')
    with pytest.raises(ValueError, match=r"expects columns \['text'\].*lacks \['text'\]"):
        load_stage_dataset(str(path), "base")
    sft = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(ValueError, match=r"sft stage expects columns \['messages', 'images'\]"):
        tokenize_for_stage(sft, "sft", tokenizer=None)
    with pytest.raises(ValueError, match="train_modules"):
        check(tmp_path, "sft", train_modules="vision,lm")


def test_load_stage_dataset_opens_files_and_saved_folders(tmp_path):
    data = datasets.Dataset.from_dict({"text": ["a red circle.", "two shapes."]})
    data.to_parquet(str(tmp_path / "d.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("d.parquet", "saved", "saved_dict"):
        assert load_stage_dataset(str(tmp_path / source), "base")["text"] == data["text"]


def test_throughput_and_mfu_are_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "default_peak_flops", lambda: 1e12)
    final = run_stage(*stage(tmp_path, "base", max_steps=3, save_steps=3))
    logs = [entry for entry in json.loads((tmp_path / "base" / "checkpoint-3" / "trainer_state.json").read_text())[
        "log_history"] if "loss" in entry]
    assert all(entry["tokens_per_second"] > 0 and 0 < entry["mfu"] < 1 for entry in logs[1:])
    assert final.exists()


REPO = Path(__file__).resolve().parents[1]
# SGD: Adam's first steps turn float-rounding-sized gradients into full-size updates, which would hide whether two
# runs really train on the same global batch with the same loss scaling.
SGD = {"optim": "sgd", "learning_rate": 0.5, "warmup_steps": 0, "max_steps": 3, "save_steps": 3}


def train_stage(output_dir, stage_name, settings, accelerate_config=None, *launch_flags):
    """tests/distributed_stage.py with python, or under `accelerate launch` with a config from examples/accelerate
    (2 processes). On a machine without GPUs a MULTI_GPU or FSDP config starts gloo processes (`--cpu` would run
    one); --mixed_precision no because the configs' bf16 would autocast on CPU where the 1-process run does not."""
    command = [sys.executable]
    if accelerate_config:
        command += ["-m", "accelerate.commands.launch", "--mixed_precision", "no", *launch_flags,
                    "--config_file", str(REPO / "examples" / "accelerate" / accelerate_config)]
    script = Path(__file__).with_name("distributed_stage.py")
    out = subprocess.run([*command, str(script), str(output_dir), stage_name, json.dumps(settings)], check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # a gloo group left alive at interpreter shutdown aborts the process now and then, after a successful run
    ranks = 2 if accelerate_config else 1
    assert [json.loads((output_dir / f"exit-rank{rank}.json").read_text()) for rank in range(ranks)] == \
        [{"process_group_alive": False}] * ranks
    return output_dir


def assert_same_training(single, double):
    one, two = losses(single / "checkpoint-3"), losses(double / "checkpoint-3")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert one[3] < one[1] - 0.01  # the steps really trained


def assert_final_is_the_trained_model(run, auto_class, folders=("final",)):
    trained = torch.load(run / "trained_logits.pt")
    for folder in folders:
        model = auto_class.from_pretrained(run / folder)
        with torch.no_grad():
            logits = model(**trained["inputs"]).logits
        torch.testing.assert_close(logits, trained["logits"], rtol=1e-5, atol=1e-5, msg=lambda m, f=folder: f"{f}: {m}")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_process_ddp_matches_one_process_at_same_global_batch(tmp_path):
    from transformers import AutoModelForCausalLM

    single = train_stage(tmp_path / "p1", "base", {**TINY, **SGD, "per_device_train_batch_size": 4})
    double = train_stage(tmp_path / "p2", "base", {**TINY, **SGD, "per_device_train_batch_size": 2}, "ddp.yaml")
    assert_same_training(single, double)
    assert_final_is_the_trained_model(double, AutoModelForCausalLM)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_process_fsdp2_matches_one_process_and_exports_plain_checkpoints(tmp_path):
    """examples/accelerate/fsdp2.yaml on 2 gloo processes (tests/distributed_stage.py lets Accelerate run FSDP on
    CPU): the base stage, then SFT with images, packing, a frozen vision tower, its own connector learning rate and
    sharded checkpoints. Each trains as one process at the same global batch does, and <output_dir>/final is the
    trained model for plain from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    base = {**TINY, **SGD}
    single = train_stage(tmp_path / "base1", "base", {**base, "per_device_train_batch_size": 4})
    double = train_stage(tmp_path / "base2", "base", {**base, "per_device_train_batch_size": 2}, "fsdp2.yaml")
    assert_same_training(single, double)
    assert_final_is_the_trained_model(double, AutoModelForCausalLM, folders=("final", "checkpoint-3"))
    # the export is the model's own class and remote code, not torch's generated FSDP class and source files
    assert sorted(p.name for p in (double / "final").iterdir()) == sorted(p.name for p in (single / "final").iterdir())

    vlm = run_stage(*stage(tmp_path, "vision", model=str(single / "final"), max_steps=1))
    sft = {**TINY, **SGD, "model": str(vlm), "train_modules": "connector,language_model", "connector_lr": 0.05,
           "builtin_train_size": 200}  # >= 3 global batches of packed rows: no wrapped-around last batch
    single = train_stage(tmp_path / "sft1", "sft", {**sft, "per_device_train_batch_size": 4})
    double = train_stage(tmp_path / "sft2", "sft", {**sft, "per_device_train_batch_size": 2}, "fsdp2.yaml",
                         "--fsdp_state_dict_type", "SHARDED_STATE_DICT")
    assert_same_training(single, double)
    assert_final_is_the_trained_model(double, AutoModelForImageTextToText)
    assert json.loads((double / "final" / "config.json").read_text())["auto_map"] == json.loads(
        (single / "final" / "config.json").read_text())["auto_map"]


def test_tower_pretraining_trains_tower_and_connector_only(tmp_path):
    from nanovision.training.tower_pretraining import CaptionWordsCollator, CaptionWordsObjective, PreparedCaptions

    base = run_stage(*stage(tmp_path, "base", max_steps=2))
    args, _ = stage(tmp_path, "vision", model=str(base))
    model = build_model(args, AutoTokenizer.from_pretrained(base))
    processor = build_processor(model, AutoTokenizer.from_pretrained(base))
    rows = shapes.caption_dataset(num_train=16, num_test=1, image_size=32)["train"]
    prepared = PreparedCaptions(rows, processor.image_processor, processor.tokenizer, chunk_size=5)
    batch = CaptionWordsCollator(processor.tokenizer)([prepared[i] for i in range(len(prepared))])
    assert batch["pixel_values"].shape == (16, 3, 32, 32)
    # prepared once, in chunks: the same pixels as processing the batch's images together
    together = processor.image_processor(list(rows["image"]), return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], together)
    words = processor.tokenizer(rows[0]["caption"], add_special_tokens=False)["input_ids"]
    assert set(batch["word_targets"][0].nonzero()[:, 0].tolist()) == set(words)

    torch.manual_seed(0)
    objective = CaptionWordsObjective(model)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=3e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = []
    for _ in range(15):
        loss = objective(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("model.vision_tower") for name in moved)
    assert any(name.startswith("model.multi_modal_projector") for name in moved)
    assert not any(name.startswith(("model.language_model", "lm_head")) for name in moved)


def test_tower_pretraining_errors_and_stage_flag(tmp_path):
    from nanovision.training.tower_pretraining import CaptionWordsCollator, PreparedCaptions

    with pytest.raises(ValueError, match="tower_pretrain_steps applies to the vision stage"):
        check(tmp_path, "sft", tower_pretrain_steps=5)
    base = run_stage(*stage(tmp_path, "base", max_steps=2))
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = shapes.caption_dataset(num_train=2, num_test=1, image_size=32)["train"]
    with pytest.raises(ValueError, match="have no words"):
        empty = datasets.Dataset.from_dict({"image": [rows[0]["image"]], "caption": [""]})
        prepared = PreparedCaptions(empty, NanoVisionImageProcessor(size={"height": 32, "width": 32}), tokenizer, True)
        CaptionWordsCollator(tokenizer, phrases=True)([prepared[0]])
    # in the stage: the tower moves before alignment; the language model stays frozen
    plain = run_stage(*stage(tmp_path / "plain", "vision", model=str(base), max_steps=1))
    pretrained = run_stage(*stage(tmp_path / "pre", "vision", model=str(base), max_steps=1, tower_pretrain_steps=3,
                                 tower_pretrain_batch_size=8))
    plain_weights, pretrained_weights, base_weights = (load_file(p / "model.safetensors")
                                                       for p in (plain, pretrained, base))
    name = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(plain_weights[name], pretrained_weights[name])
    assert torch.equal(pretrained_weights["model.language_model.layers.0.mlp.up_proj.weight"],
                       base_weights["model.layers.0.mlp.up_proj.weight"])


def test_tower_pretraining_phrases_bind_words_within_one_token(tmp_path):
    from nanovision.training.tower_pretraining import CaptionWordsCollator, CaptionWordsObjective, PreparedCaptions

    base = run_stage(*stage(tmp_path, "base", max_steps=2))
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = build_model(stage(tmp_path, "vision", model=str(base))[0], tokenizer)
    processor = build_processor(model, tokenizer)
    image = shapes.render_scene([{"shape": "circle", "color": "red", "position": "left"}], 32)
    rows = [{"image": image, "caption": "a red circle on the left and a blue square on the right."},
            {"image": image, "caption": "a blue square on the right."},
            {"image": image, "caption": "a green triangle in the middle."}]
    rows = datasets.Dataset.from_list(rows)
    batch = CaptionWordsCollator(tokenizer, phrases=True)(list(PreparedCaptions(rows, processor.image_processor,
                                                                                tokenizer, phrases=True)))
    assert "phrase_words" not in CaptionWordsCollator(tokenizer)(list(PreparedCaptions(rows, processor.image_processor,
                                                                                       tokenizer)))
    phrases = ["a blue square on the right", "a green triangle in the middle", "a red circle on the left"]  # sorted
    assert batch["phrase_images"].tolist() == [[1, 1, 0], [0, 0, 1], [1, 0, 0]]  # a shared phrase: both images
    for row, phrase in zip(batch["phrase_words"], phrases):
        ids = set(tokenizer(phrase, add_special_tokens=False)["input_ids"])
        assert set(row.nonzero()[:, 0].tolist()) == ids and torch.isclose(row.sum(), torch.tensor(1.0))

    # A phrase's score is its best token's mean over the phrase's words: two tokens that each show half of
    # "red circle" do not match it, one token that shows both does.
    objective = CaptionWordsObjective(model)
    directions = objective.word_directions
    pair = tokenizer("red circle", add_special_tokens=False)["input_ids"]
    other = tokenizer("blue", add_special_tokens=False)["input_ids"][0]
    phrase = torch.zeros(1, directions.shape[0])
    phrase[0, pair] = 1 / len(pair)
    split = directions[pair]  # image 0: each of the phrase's words on a token of its own
    bound = torch.stack([directions[pair].sum(0)] + [directions[other]] * (len(pair) - 1))  # image 1: one token
    tokens = SimpleNamespace(pooler_output=torch.stack([split, bound]))
    objective.vision.get_image_features = lambda pixel_values: tokens
    targets = torch.zeros(2, directions.shape[0])
    targets[:, pair] = 1
    bound_loss = objective(None, targets, phrase, torch.tensor([[0.0, 1.0]]))["loss"]
    split_loss = objective(None, targets, phrase, torch.tensor([[1.0, 0.0]]))["loss"]
    assert bound_loss < split_loss  # the objective prefers the image whose token binds the phrase's words

    with pytest.raises(ValueError, match="also set --tower_pretrain_steps"):
        check(tmp_path, "vision", tower_pretrain_phrases=True)
    pretrained = run_stage(*stage(tmp_path / "pre", "vision", model=str(base), max_steps=1, tower_pretrain_steps=2,
                                 tower_pretrain_batch_size=8, tower_pretrain_phrases=True,
                                 connector_position_embedding=True))
    assert json.loads((pretrained / "config.json").read_text())["connector_position_embedding"] is True
    assert load_file(pretrained / "model.safetensors")["model.multi_modal_projector.position_embedding"].any()


def test_connector_position_embedding_and_caption_turn_flags(tmp_path):
    with pytest.raises(ValueError, match="connector_position_embedding shapes a new VLM"):
        check(tmp_path, "sft", connector_position_embedding=True)
    with pytest.raises(ValueError, match="builtin_caption_turn applies to the sft stage"):
        check(tmp_path, "vision", builtin_caption_turn=True)
    with pytest.raises(ValueError, match="builtin_caption_turn applies to the sft stage"):
        check(tmp_path, "sft", dataset="some/hub-dataset", builtin_caption_turn=True)
    base = run_stage(*stage(tmp_path, "base", max_steps=2))
    vision = run_stage(*stage(tmp_path, "vision", model=str(base), max_steps=1))
    with pytest.raises(ValueError, match="is a VLM built without it"):
        check(tmp_path, "vision", model=str(vision), connector_position_embedding=True)


def test_builtin_turns_and_bf16_flags(tmp_path):
    with pytest.raises(ValueError, match="builtin_turns applies to the sft stage"):
        check(tmp_path, "vision", builtin_turns=3)
    with pytest.raises(ValueError, match="builtin_turns applies to the sft stage"):
        check(tmp_path, "sft", dataset="some/hub-dataset", builtin_turns=3)
    with pytest.raises(ValueError, match="builtin_turns must be at least 1"):
        check(tmp_path, "sft", builtin_turns=0)
    def bf16(requested):
        return stage(tmp_path, "base", bf16=requested)[1].bf16

    assert bf16(True) and not bf16(False)
    assert bf16(None) == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@pytest.mark.parametrize("flag, value, message", [
    ("learning_rate", 0.0, "--learning_rate must be a positive number, got 0.0"),
    ("learning_rate", -3e-3, "--learning_rate must be a positive number"),
    ("lm_lr", -1.0, "--lm_lr must be a positive number"),
    ("connector_lr", 0.0, "--connector_lr must be a positive number"),
    ("vision_lr", float("nan"), "--vision_lr must be a positive number"),
    ("muon_lr", -0.02, "--muon_lr must be a positive number"),
    ("tower_pretrain_lr", float("inf"), "--tower_pretrain_lr must be a positive number"),
    ("max_steps", 0, "--max_steps 0 trains nothing"),
    ("max_steps", -5, "--max_steps -5 trains nothing"),
    ("num_train_epochs", 0.0, "--num_train_epochs must be positive, got 0.0"),
    ("gradient_accumulation_steps", 0, "--gradient_accumulation_steps must be at least 1, got 0"),
    ("per_device_train_batch_size", 0, "--device_batch_size / --per_device_train_batch_size must be at least 1, got 0"),
    ("pack_max_length", -8, "--pack_max_length must be at least 1, got -8"),
    ("builtin_train_size", 0, "--builtin_train_size must be at least 1"),
    ("depth", 0, "--depth must be at least 1"),
    ("save_total_limit", 0, "--save_total_limit must be at least 1"),
    ("save_steps", -1, "--save_steps must be positive"),
    ("weight_decay", -0.1, "--weight_decay must be 0 or more"),
    ("tower_pretrain_steps", -1, "--tower_pretrain_steps must be 0 or more"),
])
def test_out_of_range_flags_are_refused_naming_the_flag(tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check(tmp_path, "base", **{flag: value})


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", "0"], "--max_steps 0 trains nothing"),
    (["--device_batch_size", "0"], "--device_batch_size / --per_device_train_batch_size must be at least 1"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be positive"),
    (["--learning_rate", "-1"], "--learning_rate must be a positive number"),
])
def test_the_cli_refuses_bad_flags_before_any_work(tmp_path, flags, message):
    from nanovision.cli import main

    with pytest.raises(ValueError, match=re.escape(message)):
        main(["train", "--stage", "base", "--output_dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_cli_flags_keep_nanovisions_names_and_defaults(tmp_path):
    args, training_args = argument_parser().parse_args_into_dataclasses(
        ["--stage", "sft", "--output_dir", str(tmp_path), "--device_batch_size", "3", "--warmup", "0", "--compile",
         "--optim", "muon", "--bf16"])
    assert (training_args.per_device_train_batch_size, training_args.warmup_steps) == (3, 0)
    assert training_args.torch_compile and training_args.bf16 and training_args.use_muon
    assert args.train_modules == "vision_tower,connector,language_model"
    _, defaults = argument_parser().parse_args_into_dataclasses(["--stage", "base", "--output_dir", str(tmp_path)])
    assert (defaults.learning_rate, defaults.lr_scheduler_type, defaults.warmup_steps, defaults.num_train_epochs,
            defaults.seed, defaults.save_total_limit) == (3e-3, "cosine", 0.05, 1.0, 0, 2)
    assert defaults.optim == "adamw_torch_fused" and not defaults.use_muon and not defaults.remove_unused_columns


@pytest.mark.parametrize("name", ["vision", "sft"])
def test_vision_and_sft_stages_need_a_model(tmp_path, name):
    with pytest.raises(ValueError, match=f"--stage {name} needs --model"):
        check(tmp_path, name)


@pytest.fixture
def text_model(tmp_path):
    from conftest import tiny_text_config

    from nanovision.modeling_nanovision import NanoVisionForCausalLM

    NanoVisionForCausalLM(tiny_text_config()).save_pretrained(tmp_path / "text")
    return str(tmp_path / "text")


@pytest.mark.parametrize("flag, message", [
    ("model", "--model {path}: no such folder"),
    ("tokenizer", "--tokenizer {path}: no such folder"),
    ("vision_model", "--vision_model {path}: no such folder"),
    ("resume_from_checkpoint", "--resume_from_checkpoint {path}: not a Trainer checkpoint"),
    ("dataset", "--dataset {path}: no such file or folder"),
])
def test_paths_that_do_not_exist_are_named(tmp_path, text_model, flag, message):
    path = str(tmp_path / "nowhere" / "final")
    with pytest.raises(ValueError, match=re.escape(message.format(path=path))):
        check(tmp_path, "vision", **{"model": text_model, flag: path})
    with pytest.raises(ValueError, match=re.escape(f"--model {tmp_path}: the folder has no config.json")):
        check(tmp_path, "base", model=str(tmp_path))


def test_vision_model_must_be_a_complete_siglip_tower(pipeline, tmp_path):
    from conftest import TINY_VISION
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    base, vision, _ = pipeline
    with pytest.raises(ValueError, match=r"holds a 'nanovision' model, not a SigLIP vision tower"):
        check(tmp_path, "vision", model=str(base), vision_model=str(vision))
    with pytest.raises(ValueError, match=r"--model .* is a 'siglip_vision_model' model; the vision stage starts"):
        SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "siglip")
        check(tmp_path, "vision", model=str(tmp_path / "siglip"))
    with pytest.raises(ValueError, match="the sft stage starts from a nanovision VLM"):
        check(tmp_path, "sft", model=str(base))
    # a SigLIP folder whose weights lack the encoder: refused, not a randomly initialised tower
    weights = load_file(tmp_path / "siglip" / "model.safetensors")
    save_file({name: tensor for name, tensor in weights.items() if "encoder" not in name},
              str(tmp_path / "siglip" / "model.safetensors"))
    args, _ = stage(tmp_path, "vision", model=str(base), vision_model=str(tmp_path / "siglip"))
    with pytest.raises(ValueError, match=r"lacks \d+ weights the model needs"):
        build_model(args, AutoTokenizer.from_pretrained(base))


def test_resume_with_another_dataset_keeps_the_checkpoints_tokenizer(tmp_path, caplog):
    settings = dict(max_steps=2, save_steps=2, builtin_train_size=60)
    with caplog.at_level("INFO", logger="nanovision"):
        run_stage(*stage(tmp_path, "base", **settings))
    assert "base stage data: 60 examples from builtin, none dropped; packed 60 examples" in caplog.text
    checkpoint = tmp_path / "base" / "checkpoint-2"
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"zebra {i} quokka xylophone {i * 7} jumps"}) + "\n"
                             for i in range(40)))
    resumed = run_stage(*stage(tmp_path, "base", **{**settings, "max_steps": 3}, dataset=str(other),
                               resume_from_checkpoint=str(checkpoint)))
    assert json.loads((resumed / "training_settings.json").read_text())["steps"] == 3
    kept = AutoTokenizer.from_pretrained(checkpoint).get_vocab()
    assert AutoTokenizer.from_pretrained(resumed).get_vocab() == kept
    # a model of other sizes than the checkpoint's would resume partly random
    with pytest.raises(ValueError, match="holds another model than these flags build"):
        run_stage(*stage(tmp_path, "base", **settings, depth=3, resume_from_checkpoint=str(checkpoint)))


def test_the_stage_log_names_truncation_and_its_flag(tmp_path, caplog):
    from nanovision.training.dataset_packing import PackingStats
    from nanovision.training.stages import log_data_use

    args, _ = stage(tmp_path, "base", pack_max_length=64)
    with caplog.at_level("INFO", logger="nanovision"):
        log_data_use(args, 10, PackingStats(max_length=64, examples_in=10, rows_out=4, tokens=600,
                                            truncated_examples=3, truncated_tokens=90))
    record = caplog.records[-1]
    assert record.levelname == "WARNING" and "10 examples from builtin, none dropped" in record.message
    assert "truncated 3 examples" in record.message and "raise --pack_max_length" in record.message
