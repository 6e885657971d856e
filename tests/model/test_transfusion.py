"""The Transfusion setting's model: mask, causality, all-text equivalence, gradient routing,
bf16 autocast and the FLOP count, each against a reference written here."""

import dataclasses

import pytest
import torch
from helpers import TINY, TINY_TRANSFUSION, transfusion_batch
from torchtitan.models.attention import get_document_mask_mod

from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.diffusion import transfusion_dense_mask, transfusion_mask_mod

SEQ = 16
EOS = 3  # a text id used as the document separator in the block_causal cases


def _model(**kw) -> MoTTransformer:
    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(**{**TINY_TRANSFUSION, **kw}))
    with torch.no_grad():
        model.init_weights()
    return model


def _naive_mask(image_ids: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """allowed[b, q, k] = (k <= q or q, k in the same image) and (same document), by loops."""
    bs, seq = image_ids.shape
    out = torch.zeros(bs, seq, seq, dtype=torch.bool)
    for b in range(bs):
        ids = image_ids[b].tolist()
        doc = [0] * seq
        if tokens is not None:  # a document ends with its EOS: position i is in doc #EOS before i
            for i in range(1, seq):
                doc[i] = doc[i - 1] + int(tokens[b, i - 1].item() == EOS)
        for q in range(seq):
            for k in range(seq):
                visible = k <= q or (ids[q] >= 0 and ids[q] == ids[k])
                out[b, q, k] = visible and doc[q] == doc[k]
    return out


def _eval_mask_mod(mask_mod, bs: int, seq: int) -> torch.Tensor:
    b = torch.arange(bs).view(bs, 1, 1)
    q = torch.arange(seq).view(1, seq, 1)
    k = torch.arange(seq).view(1, 1, seq)
    return mask_mod(b, torch.zeros(()), q, k).expand(bs, seq, seq)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("documents", [False, True])
def test_mask_equals_naive_reference(seed: int, documents: bool) -> None:
    """Random layouts, each with an image cut by the window edge; row 0 opens with the tail
    of an image split across windows."""
    batch, _ = transfusion_batch(3, 24, 6, seed=seed)
    image_ids, tokens = batch["image_ids"], batch["input"]
    assert (image_ids[:, -1] >= 0).all() and image_ids[0, 0] == 0
    document = get_document_mask_mod(tokens, EOS) if documents else None
    if documents:
        assert (tokens == EOS).any(), "the layout must hold a document boundary"
    expected = _naive_mask(image_ids, tokens if documents else None)
    got = _eval_mask_mod(transfusion_mask_mod(image_ids, document), *image_ids.shape)
    # TorchTitan's document mask treats the last position as an EOS; nothing follows it.
    assert torch.equal(got, expected)
    if not documents:
        assert torch.equal(transfusion_dense_mask(image_ids)[:, 0], expected)


def test_flex_block_mask_matches_sdpa_mask() -> None:
    """The flex path (BlockMask from get_attention_masks) computes what the sdpa path does."""
    batch, _ = transfusion_batch(2, SEQ, 6, seed=1)
    sdpa = _model()
    flex = _model(attn_type="flex")
    flex.load_state_dict(sdpa.state_dict())
    extra = {k: batch[k] for k in ("patches", "timesteps", "image_ids")}
    masks = flex.get_attention_masks(batch["input"], tokenizer=None, extra_inputs=extra)
    with torch.no_grad():
        a = sdpa(batch["input"], batch["modality_ids"], **extra)
        b = flex(batch["input"], batch["modality_ids"], attention_masks=masks, **extra)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_image_noise_never_reaches_earlier_text_and_images_see_themselves() -> None:
    model = _model()
    batch, _ = transfusion_batch(2, SEQ, 6, seed=2)
    ids = batch["image_ids"][1]
    image = int(ids.max())  # the row's last image (cut by the window edge)
    where = (ids == image).nonzero().flatten()
    first, last = int(where[0]), int(where[-1])
    args = {k: batch[k] for k in ("patches", "timesteps", "image_ids")}
    with torch.no_grad():
        logits, eps = model(batch["input"], batch["modality_ids"], **args)
        changed = dict(args, patches=args["patches"].clone())
        changed["patches"][1, last] += 1.0
        logits2, eps2 = model(batch["input"], batch["modality_ids"], **changed)
    assert torch.equal(logits[:, :first], logits2[:, :first])
    assert torch.equal(logits[0], logits2[0])  # other rows untouched
    assert torch.equal(eps[1, :first], eps2[1, :first])
    # the image's FIRST position sees its last one (bidirectional within the image)
    assert not torch.allclose(eps[1, first], eps2[1, first])
    # with a causal-only mask it would not: the same check fails when the mask breaks
    t2 = dict(changed, timesteps=args["timesteps"].clone())
    t2["timesteps"][1, last] = (t2["timesteps"][1, last] + 1) % 1000
    with torch.no_grad():
        _, eps3 = model(batch["input"], batch["modality_ids"], **t2)
    assert not torch.allclose(eps3[1, first], eps2[1, first])


def test_all_text_batch_gives_todays_output_exactly() -> None:
    plain_args = MoTModelArgs(**TINY)
    torch.manual_seed(0)
    plain = MoTTransformer(plain_args)
    model = _model()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("diffusion.")}
    plain.load_state_dict(state)
    tokens = torch.randint(0, 40, (2, SEQ))
    mods = torch.zeros_like(tokens)
    mods[:, 5:9] = 1  # discrete image tokens, as in the Chameleon setting
    with torch.no_grad():
        assert torch.equal(model(tokens, mods), plain(tokens, mods))
        none = torch.full_like(tokens, -1)
        logits, _ = model(
            tokens, mods, patches=torch.zeros(2, SEQ, 6), timesteps=torch.zeros_like(tokens),
            image_ids=none,
        )
    # no latent position: only the explicit causal mask differs from sdpa's is_causal
    torch.testing.assert_close(logits, plain(tokens, mods), atol=1e-6, rtol=1e-6)


def _image_loss_grads(batch: dict) -> dict[str, torch.Tensor | None]:
    model = _model()
    args = {k: batch[k] for k in ("patches", "timesteps", "image_ids")}
    _, eps = model(batch["input"], batch["modality_ids"], **args)
    latent = (batch["image_ids"] >= 0).unsqueeze(-1)
    ((eps - batch["noise"]) ** 2 * latent).sum().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_image_loss_reaches_only_image_weights_and_patch_layers() -> None:
    """An image that opens the window (no caption before it): text-only weights get zero."""
    batch, _ = transfusion_batch(1, SEQ, 6, seed=0)
    batch = {k: v[:1] for k, v in batch.items()}  # row 0 opens with an image's tail
    image = batch["image_ids"][0]
    keep = int((image == 0).nonzero()[-1]) + 2  # that image and its EOI
    for k, v in batch.items():
        reps = (1, SEQ // keep + 1) + (1,) * (v.dim() - 2)
        batch[k] = v[:, :keep].repeat(*reps)[:, :SEQ].clone()
    batch["image_ids"] = torch.where(batch["modality_ids"] == 1, batch["image_ids"], -1)
    batch["modality_ids"][:, keep:] = 0  # everything after the image is text
    batch["image_ids"][:, keep:] = -1
    grads = _image_loss_grads(batch)
    # Every modality copy gets a gradient (zero, not None); only the text head, which the
    # image loss does not read, has none.
    assert [n for n, g in grads.items() if g is None] == ["output.weight"]
    for name, g in grads.items():
        if name.startswith("layers.") and name.endswith(".0.weight"):  # a text-modality copy
            assert torch.count_nonzero(g) == 0, name
        if name.startswith("layers.") and name.endswith(".1.weight"):  # the image copy
            assert torch.count_nonzero(g) > 0, name
    for name in ("diffusion.patch_in.weight", "diffusion.patch_out.weight",
                 "diffusion.time_embed.in_layer.weight", "norm.weight"):
        assert torch.count_nonzero(grads[name]) > 0, name


def test_caption_reaches_image_loss_only_through_its_keys_and_values() -> None:
    """A caption before an image: the image loss reaches the caption's text weights only
    through attention keys/values; the last block's text query/output/FFN stay zero."""
    batch, _ = transfusion_batch(1, SEQ, 6, seed=5)
    batch = {k: v[:1] for k, v in batch.items()}
    grads = _image_loss_grads(batch)
    last = TINY["n_layers"] - 1
    for name in ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2"):
        assert torch.count_nonzero(grads[f"layers.{last}.{name}.0.weight"]) == 0, name
    for name in ("attention.wk", "attention.wv"):
        assert torch.count_nonzero(grads[f"layers.{last}.{name}.0.weight"]) > 0, name


def test_bf16_autocast_matches_fp32() -> None:
    model = _model()
    batch, _ = transfusion_batch(2, SEQ, 6, seed=4)
    args = {k: batch[k] for k in ("patches", "timesteps", "image_ids")}
    ref_logits, ref_eps = model(batch["input"], batch["modality_ids"], **args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, eps = model(batch["input"], batch["modality_ids"], **args)
    (logits.float().sum() + eps.float().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(eps.float(), ref_eps, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(logits.float(), ref_logits, atol=3e-2, rtol=3e-2)


def test_active_flops_count_the_patch_layers() -> None:
    with_layers = _model()
    plain_args = MoTModelArgs(**TINY)
    plain = MoTTransformer(plain_args)
    n1, f1 = with_layers.model_args.get_nparams_and_flops(with_layers, SEQ)
    n0, f0 = plain_args.get_nparams_and_flops(plain, SEQ)
    extra = sum(p.numel() for p in with_layers.diffusion.parameters())
    assert n1 - n0 == extra and f1 - f0 == 6 * extra


def test_patches_need_a_transfusion_flavor() -> None:
    plain = MoTTransformer(MoTModelArgs(**TINY))
    batch, _ = transfusion_batch(1, SEQ, 6)
    with pytest.raises(ValueError, match="without diffusion layers"):
        plain(batch["input"], batch["modality_ids"], patches=batch["patches"],
              timesteps=batch["timesteps"], image_ids=batch["image_ids"])
    assert dataclasses.replace(MoTModelArgs(**TINY_TRANSFUSION)).diffusion


def test_transfusion_forward_and_loss_read_nothing_back_from_the_device() -> None:
    """On the meta device (any device->host read raises), with host ids: forward, the
    per-image diffusion loss and backward."""
    from torchtitan_mot.model.inputs import HostTensor
    from torchtitan_mot.trainer.loss import per_image_mse

    batch, _ = transfusion_batch(2, SEQ, 6, seed=6)
    with torch.device("meta"):
        model = MoTTransformer(MoTModelArgs(**TINY_TRANSFUSION))
    meta = {k: v.to("meta") for k, v in batch.items() if k != "modality_ids"}
    logits, eps = model(meta["input"], HostTensor(batch["modality_ids"]), patches=meta["patches"],
                        timesteps=meta["timesteps"], image_ids=meta["image_ids"])
    mse, n_images = per_image_mse(eps, meta["noise"], meta["image_ids"])
    (logits.sum() + mse).backward()
    assert eps.shape == (2, SEQ, 6) and n_images.device.type == "meta"


def test_whole_transfusion_forward_compiles_once_for_any_image_layout() -> None:
    from torch._dynamo.utils import counters

    from torchtitan_mot.benchmark.perf import CompileCounts

    torch._dynamo.reset()
    counters.clear()
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    try:
        for seed in range(3):
            batch, _ = transfusion_batch(2, SEQ, 6, seed=seed)
            args = {k: batch[k] for k in ("patches", "timesteps", "image_ids")}
            got = compiled(batch["input"], modality_ids=batch["modality_ids"], **args)
            want = model(batch["input"], modality_ids=batch["modality_ids"], **args)
            for x, y in zip(got, want):
                torch.testing.assert_close(x, y)
        assert CompileCounts.now() == CompileCounts(graphs=1, graph_breaks=0), dict(counters)
    finally:
        torch._dynamo.reset()


def test_timestep_features_equal_fluxs() -> None:
    from torchtitan.models.flux.model.layers import timestep_embedding

    from torchtitan_mot.model.diffusion import timestep_features

    t = torch.tensor([0, 1, 17, 500, 999])
    torch.testing.assert_close(timestep_features(t), timestep_embedding(t, 256, time_factor=1.0))


def test_block_causal_flex_mask_keeps_documents_apart() -> None:
    """The flex flavor with documents: a document's logits do not depend on the one before."""
    from types import SimpleNamespace

    batch, _ = transfusion_batch(1, SEQ, 6, seed=0)
    tokens = batch["input"].clone()
    cut = int((batch["image_ids"][0] == 0).nonzero()[-1]) + 2  # after the first image's EOI
    tokens[0, cut - 1] = EOS
    model = _model(attn_type="flex", attn_mask_type="block_causal")
    extra = {k: batch[k] for k in ("patches", "timesteps", "image_ids")}
    tok = SimpleNamespace(eos_id=EOS)
    masks = model.get_attention_masks(tokens, tok, extra)
    changed = dict(extra, patches=extra["patches"].clone())
    changed["patches"][0, :cut - 1] += 1.0  # the first document's image
    with torch.no_grad():
        a = model(tokens, batch["modality_ids"], attention_masks=masks, **extra)
        b = model(tokens, batch["modality_ids"], attention_masks=masks, **changed)
    torch.testing.assert_close(a[0][:, cut:], b[0][:, cut:], atol=0, rtol=0)
    assert not torch.equal(a[1][:, : cut - 1], b[1][:, : cut - 1])


def test_flavors_that_cannot_express_the_mask_are_refused() -> None:
    with pytest.raises(ValueError, match="varlen"):
        MoTModelArgs(**{**TINY_TRANSFUSION, "attn_type": "varlen"})
    with pytest.raises(ValueError, match="no document mask"):
        MoTModelArgs(**{**TINY_TRANSFUSION, "attn_mask_type": "block_causal"})
