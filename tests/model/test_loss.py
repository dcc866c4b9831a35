"""The training loss: the reference's label rule, the chunked linear cross entropy equal to the plain
path (loss and gradients), and the cases where the reference itself fails (text-only rows, a
left-padded image batch in train mode)."""
import pytest
import torch
from safetensors.torch import load_file

from glm4v_core import GLM4V, LabelError, load_model
from glm4v_core.model.loss import IGNORE_INDEX, causal_lm_loss, linear_cross_entropy, splice_labels


def test_splice_labels_keeps_boi_eoi_and_drops_patch_rows_and_padding():
    labels = torch.tensor([[4, 5, 6, 7, 8, 9]])  # tokens: pad, a, boi, placeholder, eoi, b
    # an image of 4 rows (boi, 2 patches, eoi) replaces tokens 2..4: T = 6 - 3 + 4 = 7
    source = torch.tensor([[0, 1, 2, 3, 3, 4, 5]])
    is_patch = torch.tensor([[False, False, False, True, True, False, False]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    got = splice_labels(labels, source, is_patch, mask)
    assert got.tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 8, 9]]
    assert splice_labels(labels, None, None, None).tolist() == labels.tolist()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_chunked_loss_equals_plain_loss_and_gradients(dtype, tol):
    torch.manual_seed(0)
    B, T, H, V = 2, 9, 16, 101  # V not a multiple of the chunk: a short last chunk
    hidden = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, dtype=dtype).div(4).requires_grad_()
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = IGNORE_INDEX
    labels[1, -2] = IGNORE_INDEX
    results = []
    for chunk in (None, 32):
        loss = causal_lm_loss(hidden, weight, labels, chunk_size=chunk)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        results.append((loss, gh.float(), gw.float()))
    (l0, h0, w0), (l1, h1, w1) = results
    assert abs(l0.item() - l1.item()) <= 1e-6 * (1 + l0.abs().item())
    for a, b in ((h0, h1), (w0, w1)):
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err <= tol, f"max rel err {err:.3e}"


def test_linear_cross_entropy_matches_cross_entropy_and_skips_frozen_weight():
    torch.manual_seed(1)
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(50, 8)  # frozen (LoRA-style): no gradient is made for it
    targets = torch.tensor([0, 49, 7, 20, 21])
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=7)
    want = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert torch.allclose(got, want, atol=1e-5)
    (gh,) = torch.autograd.grad(got, hidden)
    (wh,) = torch.autograd.grad(want, hidden)
    assert torch.allclose(gh, wh, atol=1e-5)


def test_no_counted_label_gives_zero_not_nan():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    labels = torch.full((1, 4), IGNORE_INDEX)
    for chunk in (None, 16):
        loss = causal_lm_loss(hidden, torch.randn(10, 8), labels, chunk_size=chunk)
        assert loss.item() == 0.0


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    model = load_model(fixtures_dir / "tiny").requires_grad_(True)
    grads = load_file(str(fixtures_dir / "tiny" / "grads.safetensors"))
    ref = load_file(str(fixtures_dir / "tiny" / "reference.safetensors"))
    return model, grads, ref


def case_args(grads, ref, case):
    pixels = ref.get(f"pixel_values_{case}") if case in ("a", "c") else None
    return (grads[f"input_ids_{case}"], pixels, grads[f"attention_mask_{case}"], grads[f"position_ids_{case}"])


def test_model_loss_chunked_equals_plain_on_an_image_batch(tiny):
    model, grads, ref = tiny
    args, labels = case_args(grads, ref, "c"), grads["labels_c"]
    losses, embed_grads = [], []
    for chunk in (None, 100):  # 100 does not divide the 1024-word vocabulary
        model.loss_chunk_size = chunk
        model.zero_grad()
        out = model(*args, labels=labels)
        out.loss.backward()
        assert out.logits is None
        losses.append(out.loss.item())
        embed_grads.append(model.text.lm_head.weight.grad.clone())
    del model.loss_chunk_size
    assert abs(losses[0] - losses[1]) <= 1e-6
    assert ((embed_grads[0] - embed_grads[1]).abs().max() / embed_grads[0].abs().max()).item() <= 1e-5


def test_loss_is_the_same_in_train_and_eval_on_a_left_padded_image_batch(tiny):
    """The reference's train() mode drops the images of a left-padded image batch; ours must not."""
    model, grads, ref = tiny
    args, labels = case_args(grads, ref, "c"), grads["labels_c"]
    with torch.no_grad():
        eval_loss = model.eval()(*args, labels=labels).loss
        train_loss = model.train()(*args, labels=labels).loss
        other_images = model(args[0], args[1].flip(0), *args[2:], labels=labels).loss
    model.eval()
    assert train_loss.item() == eval_loss.item()
    assert abs(train_loss.item() - float(grads["loss_c"])) <= 1e-5
    assert abs(other_images.item() - train_loss.item()) > 1e-3  # the images really are used


def test_text_only_row_in_an_image_batch(tiny):
    """The reference cannot take labels on a text-only row; here a mixed batch works and each row's
    counted tokens are learned exactly as alone (the mean is over the batch's counted tokens)."""
    model, grads, ref = tiny
    pad = model.config.pad_token_id
    ids_a, ids_b = grads["input_ids_a"], grads["input_ids_b"]
    lab_a, lab_b = grads["labels_a"], grads["labels_b"]
    gap = ids_a.shape[1] - ids_b.shape[1]  # left-pad the text row to the image row's length
    ids = torch.cat([ids_a, torch.cat([torch.full((1, gap), pad), ids_b], 1)])
    labels = torch.cat([lab_a, torch.cat([torch.full((1, gap), IGNORE_INDEX), lab_b], 1)])
    mask = torch.ones_like(ids)  # (2, L); the text row starts with its left pads
    mask[1, :gap] = 0
    with torch.no_grad():
        loss = model(ids, ref["pixel_values_a"], mask, labels=labels).loss.item()
    n_a, n_b = (lab_a[:, 1:] != IGNORE_INDEX).sum().item(), (lab_b[:, 1:] != IGNORE_INDEX).sum().item()
    want = (float(grads["loss_a"]) * n_a + float(grads["loss_b"]) * n_b) / (n_a + n_b)
    assert abs(loss - want) <= 1e-5


def test_bad_labels_are_named(tiny):
    model, grads, ref = tiny
    args = case_args(grads, ref, "b")
    with pytest.raises(LabelError, match="labels shape"):
        model(*args, labels=grads["labels_b"][:, 1:])
    bad = grads["labels_b"].clone()
    bad[0, 20] = model.config.vocab_size
    with pytest.raises(LabelError, match=r"labels\[0, 20\]"):
        model(*args, labels=bad)


def test_an_unfilled_model_refuses_to_run(tiny):
    model = GLM4V(tiny[0].config)
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(ValueError, match="never filled.*from_config"):
        model(torch.zeros(1, 3, dtype=torch.long))


def spliced_labels_oracle(input_ids, labels, mask, boi, n_patches):
    """The label rule written as a loop over tokens: each image block's boi and eoi keep their
    labels, its patch rows get -100, pads get -100; rows left-padded with -100 to one length."""
    rows = []
    for ids, lab, m in zip(input_ids.tolist(), labels.tolist(), mask.tolist(), strict=True):
        out, i = [], 0
        while i < len(ids):
            keep = lab[i] if m[i] else -100
            if ids[i] == boi:  # boi, placeholder, eoi -> boi, patches, eoi
                out += [keep] + [-100] * n_patches + [lab[i + 2]]
                i += 3
            else:
                out.append(keep)
                i += 1
        rows.append(out)
    width = max(map(len, rows))
    return torch.tensor([[-100] * (width - len(r)) + r for r in rows])


def test_loss_follows_the_label_rule_with_every_token_labelled(tiny):
    """Labels on every token (boi and eoi included) of an image row and a left-padded text row: the
    loss equals cross entropy of the plain logits against the rule's labels built by a loop."""
    model, grads, ref = tiny
    pad, c = model.config.pad_token_id, model.config
    ids_a, ids_b = grads["input_ids_a"], grads["input_ids_b"]
    gap = ids_a.shape[1] - ids_b.shape[1]
    ids = torch.cat([ids_a, torch.cat([torch.full((1, gap), pad), ids_b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :gap] = 0
    labels = torch.randint(0, c.vocab_size, ids.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(ids, ref["pixel_values_a"], mask, labels=labels).loss
        logits = model(ids, ref["pixel_values_a"], mask).logits
    want = spliced_labels_oracle(ids, labels, mask, c.boi_token_id, c.vision.num_image_tokens)
    assert want.shape == logits.shape[:2]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), want[:, 1:].flatten())
    assert abs(loss.item() - expected.item()) <= 1e-5


def test_loss_label_rule_with_two_images_in_a_row(tiny):
    """Several image blocks per row: each block's patch rows count nothing, its boi/eoi keep theirs."""
    model, grads, ref = tiny
    c = model.config
    a = grads["input_ids_a"][0]
    two = torch.cat([a[:7], a[4:7], a[7:]])  # [gMASK] <sop> <|user|> \n <img> <img> text...
    b = grads["input_ids_b"][0]
    gap = len(two) - len(b)
    ids = torch.stack([two, torch.cat([torch.full((gap,), c.pad_token_id), b])])
    mask = torch.ones_like(ids)
    mask[1, :gap] = 0
    pixels = torch.cat([ref["pixel_values_a"], ref["pixel_values_c"][:1]])
    labels = torch.randint(0, c.vocab_size, ids.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(ids, pixels, mask, labels=labels).loss
        logits = model(ids, pixels, mask).logits
    want = spliced_labels_oracle(ids, labels, mask, c.boi_token_id, c.vision.num_image_tokens)
    assert want.shape == logits.shape[:2]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), want[:, 1:].flatten())
    assert abs(loss.item() - expected.item()) <= 1e-5
