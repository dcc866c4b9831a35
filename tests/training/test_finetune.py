"""glm4v finetune on the tiny checkpoint: labels, batches, bad records, overfitting, exact resume,
Ctrl-C, and the command end to end (the one docs/training.md shows)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURES, ROOT
from safetensors.torch import load_file

from glm4v_core import cli, load_model
from glm4v_core.config import GLM4VConfig
from glm4v_core.model.loss import IGNORE_INDEX
from glm4v_core.processing import chat as processing_chat
from glm4v_core.processing import tokenizer as processing_tokenizer
from glm4v_core.training import cli as training_cli
from glm4v_core.training.data import DataError, collate, read_samples, tokenize_sample
from glm4v_core.training.state import read_log
from glm4v_core.transforms import adapter_files

TINY = FIXTURES / "tiny"
DATA = FIXTURES / "finetune"
IMAGE = FIXTURES / "images" / "gradient_rgb_97x61.png"


@pytest.fixture(scope="module")
def tokenizer():
    config = GLM4VConfig.from_json(TINY / "config.json")
    return processing_tokenizer.resolve_tokenizer(None, TINY, config)


@pytest.fixture(scope="module")
def config():
    return GLM4VConfig.from_json(TINY / "config.json")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def image_sample(text="A red to blue gradient."):
    return {"messages": [{"role": "user", "content": "What colours?", "image": str(IMAGE)},
                         {"role": "assistant", "content": text}]}


def run(tmp_path: Path, *args: str, data: Path | None = None, out: str = "out") -> int:
    data = data or DATA / "train.jsonl"
    return training_cli.main(["--data", str(data), "--out", str(tmp_path / out), "--no-progress", *args])


def losses(out: Path) -> list[float]:
    train, _ = read_log(out / "loss.jsonl")
    return [r["loss"] for r in train]


# -- data -----------------------------------------------------------------------------------------

def test_labels_only_on_assistant_turns_and_ids_are_the_chat_templates(tokenizer):
    sp = tokenizer.special_ids
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Colour?", "image": str(IMAGE)},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "More?"},
                {"role": "assistant", "content": "Blue."}]
    ids, labels = tokenize_sample(messages, tokenizer)
    # the sample is exactly what chat.build_batch makes of the conversation, plus <|endoftext|>
    template = processing_chat.build_batch(tokenizer, [messages], 56, add_generation_prompt=False).input_ids[0].tolist()
    assert ids == [*template, sp["<|endoftext|>"]]
    assert len(labels) == len(ids)
    counted = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[t] == ids[t] for t in counted)
    # counted = the tokens after each <|assistant|> up to and including the token that ends the turn
    expected = []
    for start in [t for t, i in enumerate(ids) if i == sp["<|assistant|>"]]:
        end = next(t for t in range(start + 1, len(ids)) if ids[t] in (sp["<|user|>"], sp["<|endoftext|>"]))
        expected += range(start + 1, end + 1)
    assert counted == expected
    assert tokenizer.decode([ids[t] for t in counted]).count("Red.") == 1
    assert "Colour?" not in tokenizer.decode([ids[t] for t in counted])

    ids_all, labels_all = tokenize_sample(messages, tokenizer, train_on="all")
    boi = ids.index(sp["<|begin_of_image|>"])
    assert labels_all[0] == IGNORE_INDEX and labels_all[boi + 1] == IGNORE_INDEX  # first token, image pad
    assert sum(label != IGNORE_INDEX for label in labels_all) == len(ids) - 2


def test_batches_are_left_padded_with_labels_lined_up(tokenizer, config, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [image_sample(), {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]}])
    samples = read_samples(path, tokenizer, config)
    batch = collate(samples, tokenizer, config.vision.image_size)
    ids, mask, labels = batch.inputs.input_ids, batch.inputs.attention_mask, batch.labels
    assert ids.shape == labels.shape == mask.shape
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        assert ids[row, -n:].tolist() == list(s.input_ids) and labels[row, -n:].tolist() == list(s.labels)
        assert (labels[row, :-n] == IGNORE_INDEX).all() and (mask[row, :-n] == 0).all()
    assert batch.inputs.pixel_values.shape == (1, 3, 56, 56)  # one image, the first row's
    assert batch.counted == int((labels != IGNORE_INDEX).sum())
    assert samples[0].length == len(samples[0].input_ids) - 3 + 2 + (56 // 14 // 2) ** 2


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_counted_labels_are_what_the_loss_averages_over(tokenizer, config, train_on):
    """The loss of a two-row batch equals the token-weighted mean of its rows' losses: the label
    counts the trainer weights micro-batches with are the model's own."""
    model = load_model(TINY)
    samples = read_samples(DATA / "train.jsonl", tokenizer, config, train_on=train_on)[:2]
    def loss(batch):
        i = batch.inputs
        return float(model(i.input_ids, i.pixel_values, i.attention_mask, i.position_ids, labels=batch.labels).loss)
    both = collate(samples, tokenizer, 56)
    rows = [collate([s], tokenizer, 56) for s in samples]
    weighted = sum(loss(b) * b.counted for b in rows) / sum(b.counted for b in rows)
    assert both.counted == sum(b.counted for b in rows)
    assert abs(loss(both) - weighted) < 1e-5


def test_bad_records_are_reported_with_line_numbers_or_refused(tokenizer, config, tmp_path):
    long_text = "word " * 3000
    records = [image_sample(),                                                       # 1 good
               "{not json",                                                          # 2
               {"messages": [{"role": "robot", "content": "x"}]},                    # 3 unknown role
               {"messages": [{"role": "user", "content": "x", "image": "nope.png"},  # 4 missing image
                             {"role": "assistant", "content": "y"}]},
               {"messages": [{"role": "user", "content": "only a question"}]},       # 5 nothing to learn
               {"messages": [{"role": "user", "content": "q"},                       # 6 too long
                             {"role": "assistant", "content": long_text}]},
               {"text": "no messages"},                                              # 7
               {"messages": [{"role": "user", "content": "x", "image": "fake.png"},  # 8 not an image
                             {"role": "assistant", "content": "y"}]}]
    (tmp_path / "fake.png").write_text("not an image")
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    path.write_text(path.read_text().replace("\n", "\n\n", 1))  # a blank line: allowed, lines shift by one
    reports = []
    samples = read_samples(path, tokenizer, config, report=reports.append)
    assert [s.line for s in samples] == [1]
    got = {int(r.split(":")[1]): r for r in reports[:-1]}
    assert sorted(got) == [3, 4, 5, 6, 7, 8, 9]
    assert "not valid JSON" in got[3] and "unknown role 'robot'" in got[4]
    assert "'nope.png' does not exist" in got[5] and "no token to learn" in got[6]
    assert "exceed max_length 2048" in got[7] and "nothing is truncated" in got[7] and '"messages"' in got[8]
    assert "'fake.png' is not a readable image" in got[9]
    assert "1 record(s) used, 7 skipped" in reports[-1]
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        read_samples(path, tokenizer, config, on_bad="error")
    code = run(tmp_path, "--max-steps", "1", "--on-bad-record", "error", data=path)
    assert code == 1


# -- training -------------------------------------------------------------------------------------

def test_lora_overfits_one_image_and_text_sample(tmp_path):
    """Rank-8 LoRA on the decoder and projector, lr 1e-2 constant: the loss on one image+text
    sample falls from ~7.5 (about ln 1024, chance) below 0.1 within 15 steps."""
    data = write_jsonl(tmp_path / "one.jsonl", [image_sample()])
    assert run(tmp_path, "--max-steps", "15", "--lr", "1e-2", "--schedule", "constant",
               "--train", "decoder,projector", data=data) == 0
    curve = losses(tmp_path / "out")
    assert curve[0] > 6.0 and curve[-1] < 0.1, curve


def test_accumulated_micro_batches_weigh_tokens_like_one_batch(tmp_path):
    """Step 1 over samples a, b: one batch of 2 or 2 accumulated micro-batches of 1 give the same
    loss (each micro-batch weighted by its share of the counted tokens, not 1/2 each)."""
    assert run(tmp_path, "--max-steps", "1", "--batch-size", "2", out="batch") == 0
    assert run(tmp_path, "--max-steps", "1", "--grad-accum", "2", out="accum") == 0
    (one,), (two,) = losses(tmp_path / "batch"), losses(tmp_path / "accum")
    assert abs(one - two) < 1e-5, (one, two)


# LoRA on the decoder and the ViT, dropout, accumulation and warmup: every state a resume must restore
RESUME_ARGS = ["--max-steps", "4", "--save-every", "2", "--lr", "1e-2", "--grad-accum", "2", "--lora-dropout", "0.2",
               "--warmup-steps", "2", "--train", "decoder,vision"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference curve: RESUME_ARGS run start to end (checkpoints at steps 2 and 4)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    assert run(tmp, *RESUME_ARGS, out="full") == 0
    return tmp / "full"


def test_resume_continues_the_same_loss_curve_exactly(tmp_path, uninterrupted):
    assert run(tmp_path, *RESUME_ARGS, "--resume", str(uninterrupted / "checkpoints" / "step-000002"),
               out="resumed") == 0
    assert losses(tmp_path / "resumed") == losses(uninterrupted)  # exact: steps 1-2 copied, 3-4 recomputed
    a, b = (load_file(d / "adapter.safetensors") for d in (uninterrupted, tmp_path / "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming in place after a run that went past its last checkpoint drops the stale log lines
    shutil.copytree(uninterrupted, tmp_path / "full")
    shutil.rmtree(tmp_path / "full" / "checkpoints" / "step-000004")
    assert run(tmp_path, *RESUME_ARGS, "--resume", str(tmp_path / "full"), out="full") == 0
    assert losses(tmp_path / "full") == losses(uninterrupted)


def test_full_fine_tune_resumes_exactly(tmp_path):
    common = ["--lora-rank", "0", "--train", "projector,decoder", "--max-steps", "4", "--save-every", "2",
              "--lr", "1e-3"]
    assert run(tmp_path, *common, out="full") == 0
    assert run(tmp_path, *common, "--resume", str(tmp_path / "full" / "checkpoints" / "step-000002"),
               out="resumed") == 0
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
    trained, base = load_model(tmp_path / "full" / "model"), load_model(TINY)
    assert not torch.equal(trained.projector.glu.up.weight, base.projector.glu.up.weight)
    assert not torch.equal(trained.text.layers[0].attn.qkv.weight, base.text.layers[0].attn.qkv.weight)
    assert torch.equal(trained.vision.layers[0].attn.qkv.weight, base.vision.layers[0].attn.qkv.weight)  # frozen


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, uninterrupted):
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_ctrl_c(*args, **kwargs):  # Ctrl-C in step 2 after its forward/backward (dropout drawn)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_ctrl_c)
    assert run(tmp_path, *RESUME_ARGS, out="cut") == 130
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000001"]
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    assert run(tmp_path, *RESUME_ARGS, "--resume", str(tmp_path / "cut"), out="cut") == 0
    assert losses(tmp_path / "cut") == losses(uninterrupted)


def test_resume_refuses_changed_arguments_and_fresh_runs_refuse_old_checkpoints(tmp_path, capsys):
    assert run(tmp_path, "--max-steps", "1") == 0
    assert run(tmp_path, "--max-steps", "1") == 1
    assert "already holds a previous run's files" in capsys.readouterr().err
    assert run(tmp_path, "--max-steps", "2", "--lr", "1e-3", "--resume", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "--lr 0.0001 -> 0.001" in err and "--max-steps 1 -> 2" in err
    assert run(tmp_path, "--train", "decoder,ears") == 1
    assert "unknown part(s) ['ears']" in capsys.readouterr().err


DOCS_COMMAND = ("glm4v finetune --data tests/fixtures/finetune/train.jsonl "
                "--eval-data tests/fixtures/finetune/eval.jsonl --out runs/tiny --max-steps 10 --lr 1e-2 "
                "--save-every 5 --save-merged")


def test_training_doc_command_runs_end_to_end(tmp_path, monkeypatch, capsys):
    doc = (ROOT / "docs" / "training.md").read_text()
    assert DOCS_COMMAND in doc
    monkeypatch.chdir(ROOT)
    argv = DOCS_COMMAND.split()[1:]
    argv[argv.index("runs/tiny")] = str(tmp_path / "tiny")
    assert cli.main(argv) == 0
    out = tmp_path / "tiny"
    train, evals = read_log(out / "loss.jsonl")
    assert [r["step"] for r in train] == list(range(1, 11)) and train[-1]["loss"] < train[0]["loss"]
    assert all(r["tokens_per_s"] > 0 for r in train)
    assert len(evals) == 1 and evals[0]["step"] == 10 and evals[0]["eval_loss"] > 0
    err = capsys.readouterr().err
    assert "held-out loss" in err and "10/10" in err and "loss=" in err and "tok_s=" in err  # the progress bar
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005", "step-000010"]
    # the merged checkpoint computes what the base model plus the saved adapters computes
    adapted = load_model(TINY)
    adapter_files.load_adapters(adapted, out / "adapter.safetensors")
    merged = load_model(out / "merged")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_finetune_on_cuda_resumes_exactly(tmp_path, dtype):
    """On CUDA (Triton kernels where no gradient is needed): LoRA over the decoder and the ViT,
    checkpointing on; the resumed curve follows the uninterrupted one and the loss falls. Within
    1e-3, not bit for bit: CUDA's attention backward may sum with atomics (nondeterministic); a
    dropout mask not restored would move the loss by percents."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    common = ["--device", "cuda", "--dtype", dtype, "--max-steps", "6", "--save-every", "3", "--lr", "1e-2",
              "--train", "decoder,vision", "--gradient-checkpointing", "--lora-dropout", "0.1"]
    assert run(tmp_path, *common, out="full") == 0
    assert run(tmp_path, *common, "--resume", str(tmp_path / "full" / "checkpoints" / "step-000003"),
               out="resumed") == 0
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "full"), rel=1e-3)
    assert losses(tmp_path / "full")[-1] < losses(tmp_path / "full")[0]


def test_without_matplotlib_the_png_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    import sys

    from glm4v_core.training.state import plot_loss
    log = write_jsonl(tmp_path / "loss.jsonl", [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 2.5}])
    assert plot_loss(log, tmp_path / "loss.png") == tmp_path / "loss.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot_loss(log, tmp_path / "again.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().err and not (tmp_path / "again.png").exists()
