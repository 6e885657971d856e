"""Helpers shared by tests (importable as `helpers`: pytest's `pythonpath`): the tensors of
a DCP checkpoint, gloo process groups in spawned processes, raw inputs for
`torchtitan_mot.data.prepare`, the rows a data loader reads, a tiny model and its
per-modality optimizer config, the HF Llama state dict of a Llama3 built by hand. Running the
trainer is the harness's (`tests/harness/`)."""

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "assets" / "tokenizer")
TINY = dict(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=16, n_modalities=2)
"""A two-modality MoT small enough to build in milliseconds."""


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor entry of a DCP checkpoint (model and optimizer), by its flat key."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state


def optimizer_keys(state: dict[str, Any]) -> list[str]:
    """The optimizer entries of a flattened checkpoint state (TorchTitan's `optimizer.` prefix)."""
    return [k for k in state if k.startswith("optimizer.")]


def run_ranks(fn: Callable[..., Any], world_size: int, folder: Path, *args: Any) -> list[Any]:
    """`fn(rank, world_size, *args)` in `world_size` spawned processes joined in one gloo
    group; returns every rank's result, in rank order (so a test can check each rank, not
    only rank 0). `fn` must be importable (a module-level function)."""
    mp.spawn(_run_rank, args=(world_size, str(folder), fn, args), nprocs=world_size)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _run_rank(rank: int, world_size: int, folder: str, fn: Callable[..., Any], args: tuple) -> None:
    store = dist.FileStore(os.path.join(folder, "store"), world_size)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, store=store)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def make_image_folder(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """`n` PNGs of random sizes (12..80 px a side), alternately grey and RGB, each a
    two-tone picture (left/right halves) so a codebook has structure to find, plus a captions
    jsonl naming them. Returns (image folder, captions file)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    captions = root / "captions.jsonl"
    with open(captions, "w") as f:
        for i in range(n):
            w, h = (int(v) for v in rng.integers(12, 80, size=2))
            grey = i % 2 == 1
            colours = rng.integers(0, 256, size=(2, 1 if grey else 3))
            pixels = np.empty((h, w, colours.shape[1]), np.uint8)
            pixels[:, : w // 2], pixels[:, w // 2 :] = colours[0], colours[1]
            image = Image.fromarray(pixels[..., 0] if grey else pixels, "L" if grey else "RGB")
            sub = "grey" if grey else "rgb"
            (images / sub).mkdir(exist_ok=True)
            image.save(images / sub / f"{i}.png")
            f.write(json.dumps({"file": f"{sub}/{i}.png", "text": f"picture {i}, two tones"}) + "\n")
    return images, captions


def make_text_docs(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i}: a few words of plain text"}) + "\n")
    return path


def make_audio_folder(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """`n` short tone clips (0.2-0.6 s) at 8, 16 and 22.05 kHz, wav and flac, mono and
    stereo, plus a transcripts jsonl. Returns (audio folder, transcripts file)."""
    import soundfile

    rng = np.random.default_rng(seed)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    transcripts = root / "transcripts.jsonl"
    with open(transcripts, "w") as f:
        for i in range(n):
            rate = (8000, 16000, 22050)[i % 3]
            t = np.arange(int(rate * rng.uniform(0.2, 0.6))) / rate
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
            if i % 2:
                wave = np.stack([wave, 0.5 * wave], axis=1)
            name = f"{i}.{'flac' if i % 4 == 3 else 'wav'}"
            soundfile.write(audio / name, wave.astype(np.float32), rate)
            f.write(json.dumps({"file": name, "text": f"tone {i}"}) + "\n")
    return audio, transcripts


def make_norms_informative(model: torch.nn.Module) -> None:
    """RMSNorm weights init to ones, which would hide a norm copied to the wrong place:
    perturb them (seeded by the caller)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


def modality_optimizer_config(**kw: Any) -> Any:
    """AdamW (lr 1e-2, weight decay 0.1) with per-modality settings for text and image."""
    from torchtitan.config import Optimizer

    from torchtitan_mot.trainer.optimizer import ModalityOptimizerConfig

    return ModalityOptimizerConfig(**dataclasses.asdict(Optimizer(lr=1e-2, weight_decay=0.1)),
                                   modalities=["text", "image"], **kw)


def rows_seen(tok: Any, batches: list) -> list[int]:
    """Row numbers (with repeats) of the `"row i"` text segments lying wholly inside one window.

    Windows are decoded one by one (with workers, consecutive batches come from different
    streams), dropping each window's first and last segment, which may be cut: rows cut at a
    window edge are not seen (use `encoded_rows` to count every row read).
    """
    seen = []
    for x, y in batches:
        for b in range(len(y)):
            segments = tok.decode_segments(x["input"][b].tolist() + [int(y[b, -1])])
            for seg in segments[1:-1]:
                if seg["modality"] == "text" and (m := re.fullmatch(r"row (\d+)", seg["text"])):
                    seen.append(int(m.group(1)))
    return seen


def encoded_rows(monkeypatch: Any, folder: Path) -> Callable[[], Counter[int]]:
    """Records the row-id column of every sample `MultimodalDataset` encodes, in this process
    and in (forked) DataLoader workers. Returns a reader: the rows recorded since its last
    call, with their counts."""
    from torchtitan_mot.data.dataset import MultimodalDataset

    folder.mkdir(parents=True, exist_ok=True)
    encode = MultimodalDataset.encode_sample

    def recording(self: MultimodalDataset, row: Any, sample: dict[str, Any]) -> list[int]:
        ids = encode(self, row, sample)
        with open(folder / f"rows-{os.getpid()}.txt", "a") as f:
            f.write(f"{row}\n")
        return ids

    def read() -> Counter[int]:
        rows: Counter[int] = Counter()
        for path in folder.glob("rows-*.txt"):
            rows.update(int(line) for line in path.read_text().split())
            path.unlink()
        return rows

    monkeypatch.setattr(MultimodalDataset, "encode_sample", recording)
    return read


def assert_same_batches(a: list, b: list) -> None:
    """Two lists of `(inputs, labels)` batches hold the same tensors."""
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.keys() == xb.keys() == {"input", "modality_ids"}
        assert all(torch.equal(xa[k], xb[k]) for k in xa) and torch.equal(ya, yb)


def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotary layout of q/k rows: transformers' convert_llama_weights_to_hf `permute`."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_llama_state_dict(llama: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The HF Llama state dict of a dense Llama3, built from HF's names and permutation."""
    a, sd = llama.model_args, llama.state_dict()
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"],
          "model.norm.weight": sd["norm.weight"], "lm_head.weight": sd["output.weight"]}
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    heads = {"attention.wq": a.n_heads, "attention.wk": a.n_kv_heads or a.n_heads}
    for i in range(a.n_layers):
        for ours, theirs in names.items():
            w = sd[f"layers.{i}.{ours}.weight"]
            hf[f"model.layers.{i}.{theirs}.weight"] = _hf_permute(w, heads[ours]) if ours in heads else w
    return {k: v.contiguous() for k, v in hf.items()}


TINY_TRANSFUSION = dict(TINY, diffusion=True, diffusion_modality=1, patch_dim=6)
"""`TINY` with Transfusion layers: modality 1 is the diffusion modality, P = 6."""


def transfusion_batch(
    bs: int,
    seq: int,
    patch_dim: int,
    *,
    seed: int = 0,
    text_ids: int = 40,
    boi: int = 45,
    eoi: int = 46,
    timesteps: int = 1000,
    text_len: tuple[int, int] = (1, 5),
    image_len: tuple[int, int] = (2, 6),
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A random window of the Transfusion contract (TRANSFUSION_CONTRACT.md): text runs and
    images (BOI, latent positions holding the BOI id, EOI), the first row starting inside
    an image (the tail of one split across windows) and every row ending inside one (cut by
    the window edge). Returns ({input, modality_ids, patches (x0), noise, timesteps,
    image_ids}, labels), labels IGNORE_INDEX where the input is BOI or a latent position.
    Text runs have [low, high) tokens (`text_len`), whole images [low, high) latent
    positions (`image_len`; the GPU acceptance takes runs longer than flex attention's
    128-position blocks)."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, list]] = []
    for r in range(bs):
        tok, mod, img = [], [], []
        n_img = 0
        if r == 0:  # the tail of an image begun in the previous window
            k = int(rng.integers(2, 5))
            tok += [boi] * k + [eoi]
            mod += [1] * (k + 1)
            img += [0] * k + [-1]
            n_img = 1
        while len(tok) < seq:
            t = int(rng.integers(*text_len))
            tok += [int(x) for x in rng.integers(0, text_ids, t)]
            mod += [0] * t
            img += [-1] * t
            k = int(rng.integers(*image_len))
            tok += [boi] * (k + 1) + [eoi]
            mod += [1] * (k + 2)
            img += [-1] + [n_img] * k + [-1]
            n_img += 1
        # End inside an image (the window edge) whatever the loop left there.
        tail = int(rng.integers(2, 4))
        tok, mod, img = tok[: seq - tail - 1], mod[: seq - tail - 1], img[: seq - tail - 1]
        n_img = max(img) + 1 if max(img) >= 0 else 0
        tok += [boi] * (tail + 1)
        mod += [1] * (tail + 1)
        img += [-1] + [n_img] * tail
        rows.append(dict(tok=tok[:seq], mod=mod[:seq], img=img[:seq]))
    tokens = torch.tensor([r["tok"] for r in rows])
    image_ids = torch.tensor([r["img"] for r in rows])
    latent = image_ids >= 0
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randn(bs, seq, patch_dim, generator=gen) * latent.unsqueeze(-1)
    noise = torch.randn(bs, seq, patch_dim, generator=gen) * latent.unsqueeze(-1)
    t_img = torch.randint(0, timesteps, (bs, seq), generator=gen)
    # one t per image: that of its first position
    t = torch.where(latent, t_img.gather(1, _first_position(image_ids)), torch.zeros_like(t_img))
    labels = torch.cat([tokens[:, 1:], torch.randint(0, text_ids, (bs, 1), generator=gen)], 1)
    labels = torch.where(latent | (tokens == boi), torch.full_like(labels, -100), labels)
    batch = dict(
        input=tokens,
        modality_ids=torch.tensor([r["mod"] for r in rows]),
        patches=patches,
        noise=noise,
        timesteps=t,
        image_ids=image_ids,
    )
    return batch, labels


def _first_position(image_ids: torch.Tensor) -> torch.Tensor:
    """For every position, the first position of its row holding the same image id."""
    same = image_ids.unsqueeze(2) == image_ids.unsqueeze(1)  # (bs, q, k)
    return same.int().argmax(dim=2)
