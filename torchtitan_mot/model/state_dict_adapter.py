"""Dense Llama3 <-> MoT state dicts: warm start and HuggingFace import/export.

An MoT parameter is the dense Llama3 parameter with the modality inserted before the leaf
(`layers.3.attention.wq.weight` -> `layers.3.attention.wq.<m>.weight`); a component that
`MoTModelArgs.untie` leaves shared has the single copy `<m> = 0`, like the dense twin. Because MoT blocks are
pre-norm like Llama3 (see `MoTBlock`), an MoT whose every modality copy holds the dense weight
computes exactly the dense model, whatever the modality of each token. Warm start is therefore
a pure renaming-and-copying of state dict entries; it is written on state dicts (not modules)
so that it works the same on plain tensors and on sharded DTensors.

The one place where shapes may legitimately differ is the vocabulary: the unified multimodal
vocabulary is the text vocabulary plus begin/end markers and codebooks (`VocabLayout`), so the
MoT embedding and output head may have more rows than the dense model. Those extra rows are
initialised by `extend_rows` (mean of the dense rows plus small seeded noise).
"""

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.tensor import distribute_tensor, DTensor
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

from .args import MoTModelArgs, UNTIE_COMPONENTS

# `layers.<i>.<path>.<modality>.weight`: a per-modality copy of a dense block weight.
_MODALITY_KEY = re.compile(r"^(layers\.\d+\..+)\.(\d+)\.(weight)$")
# Entries whose first dimension is the vocabulary (may grow from dense to MoT).
VOCAB_KEYS = ("tok_embeddings.weight", "output.weight")


class WarmStartError(ValueError):
    """A dense checkpoint does not fit the MoT model; the message names the offending keys."""


def dense_key(mot_key: str) -> tuple[str, int | None]:
    """(dense Llama3 name, modality id) of an MoT state dict key; modality None if shared."""
    match = _MODALITY_KEY.match(mot_key)
    if match is None:
        return mot_key, None
    return f"{match.group(1)}.{match.group(3)}", int(match.group(2))


def component_of(key: str) -> str:
    """The `MoTModelArgs.untie` component a block key belongs to (dense or MoT name)."""
    parts = key.split(".")
    if parts[0] != "layers" or len(parts) < 4:
        raise ValueError(f"{key} is not a transformer block weight")
    if "norm" in parts[2] or "norm" in parts[3]:  # attention_norm, ffn_norm, attention.q_norm
        return "norms"
    if parts[2] == "attention":
        return "attention"
    if parts[2] == "feed_forward":
        return "ffn"
    raise ValueError(f"{key} belongs to no component of {UNTIE_COMPONENTS}")


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def extend_rows(
    dense: torch.Tensor, n_rows: int, seed: int, noise_scale: float = 0.01
) -> torch.Tensor:
    """`dense` (V, d) grown to (n_rows, d); new rows = mean of the dense rows + noise.

    Why the mean: a new input id then embeds to the centre of the existing embedding cloud
    (a neutral input, not a random point of the wrong scale), and a new output row gives the
    new ids roughly the average logit, so they neither dominate nor vanish from the softmax
    at the first step and the dense model's predictions for existing ids barely move.
    Why the noise (`noise_scale` x the per-feature std of the dense rows, from a generator
    seeded with `seed`): without it all new rows would be identical; seeding makes warm start
    reproducible. A DTensor is gathered, grown and redistributed with its own placements.
    """
    if isinstance(dense, DTensor):
        grown = extend_rows(dense.full_tensor(), n_rows, seed, noise_scale)
        return distribute_tensor(grown, dense.device_mesh, dense.placements)
    n_old = dense.shape[0]
    if n_rows == n_old:
        return dense.detach().clone()
    rows = dense.detach().float()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((n_rows - n_old, rows.shape[1]), generator=generator)
    new = rows.mean(0, keepdim=True) + noise.to(rows.device) * noise_scale * rows.std(0)
    return torch.cat([rows, new]).to(dense.dtype)


def untie_dense_state_dict(
    dense_sd: Mapping[str, Any],
    mot_shapes: Mapping[str, Any],
    *,
    seed: int = 0,
    allow_vocab_growth: bool = True,
) -> dict[str, Any]:
    """Map a dense Llama3 state dict onto the MoT keys of `mot_shapes`.

    `mot_shapes` maps every MoT key to its tensor (any device, meta included) or shape.
    Every modality copy of a block weight gets a clone of the dense weight; shared entries
    are cloned as they are; the vocabulary entries may grow (`extend_rows`, seeded with
    `seed`). Raises `WarmStartError` naming every missing key, every dense key the MoT model
    has no place for, and every shape mismatch, before copying anything.
    """
    missing, wrong_shape = [], []
    used: set[str] = set()
    for key, target in mot_shapes.items():
        source, _ = dense_key(key)
        if source not in dense_sd:
            missing.append(f"{key} (from dense {source})")
            continue
        used.add(source)
        have, want = _shape(dense_sd[source]), _shape(target)
        grows = (
            allow_vocab_growth
            and key in VOCAB_KEYS
            and len(have) == 2
            and have[1] == want[1]
            and have[0] <= want[0]
        )
        if have != want and not grows:
            wrong_shape.append(f"{key}: MoT {list(want)} vs dense {source} {list(have)}")
    extra = sorted(set(dense_sd) - used)
    problems = []
    if missing:
        problems.append("missing in the dense checkpoint: " + ", ".join(missing))
    if extra:
        problems.append("dense keys with no MoT counterpart: " + ", ".join(extra))
    if wrong_shape:
        problems.append("shape mismatch: " + "; ".join(wrong_shape))
    if problems:
        raise WarmStartError("cannot warm start MoT from this dense checkpoint: " + " | ".join(problems))

    out: dict[str, Any] = {}
    for i, (key, target) in enumerate(mot_shapes.items()):
        value = dense_sd[dense_key(key)[0]]
        if key in VOCAB_KEYS:
            # A different seed per entry: embedding and output rows get independent noise.
            out[key] = extend_rows(value, _shape(target)[0], seed + i)
        else:
            out[key] = value.detach().clone()
    return out


def tie_to_dense_state_dict(mot_sd: Mapping[str, Any], modality: int) -> dict[str, Any]:
    """Dense Llama3 state dict made of one modality's copies (and the shared entries).

    A block weight with a single copy (`.0.` only: a component `untie` leaves shared) is
    shared, so it belongs to every modality's export.
    """
    copies = Counter(source for source, m in map(dense_key, mot_sd) if m is not None)
    out = {}
    for key, value in mot_sd.items():
        source, m = dense_key(key)
        if m is None and key.startswith("layers."):
            raise WarmStartError(
                f"{key} has no dense Llama3 counterpart (e.g. QK-norm): cannot export it"
            )
        if m is None or m == modality or copies[source] == 1:
            out[source] = value
    return out


class MoTStateDictAdapter(Llama3StateDictAdapter):
    """HuggingFace Llama <-> MoT, through Llama3's own adapter.

    `from_hf` converts HF names to dense Llama3 names (Llama3's adapter, including the RoPE
    permutation of wq/wk) and fans every dense block weight out to all modality copies of an
    untied component (a shared one keeps its single copy, `.0.`): with
    `--checkpoint.initial_load_path HF_DIR --checkpoint.initial_load_in_hf` an MoT starts
    as exactly the HF model on every modality.

    `to_hf` exports ONE modality, `export_modality` (default 0, text: an HF Llama is a text
    model, and text is modality 0 by the data contract). It cannot refuse for
    n_modalities > 1 because TorchTitan's HF load path calls `to_hf` on the MoT state dict
    to learn which HF tensors to read; exporting modality 0 there is exactly right. For a
    deliberate export (`--checkpoint.last_save_in_hf`) the other modalities are NOT in the
    output. Direct HF loading needs the HF vocabulary to equal the MoT vocabulary (DCP
    checks shapes); when the MoT vocabulary is larger, use `python -m
    torchtitan_mot.warm_start`, which grows the embedding and the output head.
    """

    export_modality: int = 0

    def __init__(self, model_args: MoTModelArgs, hf_assets_path: str | None) -> None:
        super().__init__(model_args, hf_assets_path)
        self.model_args = model_args

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return super().to_hf(tie_to_dense_state_dict(state_dict, self.export_modality))

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        unknown = [k for k in hf_state_dict if re.sub(r"\d+", "{}", k, count=1) not in self.from_hf_map]
        if unknown:
            raise WarmStartError(f"HF keys unknown to the Llama3 adapter: {', '.join(sorted(unknown))}")
        dense = super().from_hf(hf_state_dict)
        # The copies may share storage: the model's load_state_dict copies into its own
        # parameters. Shapes are the HF checkpoint's; DCP has checked them against the model.
        out: dict[str, Any] = {}
        for key, value in dense.items():
            if key.startswith("layers."):
                head, leaf = key.rsplit(".", 1)
                for m in range(self.model_args.n_copies(component_of(key))):
                    out[f"{head}.{m}.{leaf}"] = value
            else:
                out[key] = value
        return out
