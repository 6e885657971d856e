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


DIFFUSION_PREFIX = "diffusion."


def transfusion_state_dict(
    source_sd: Mapping[str, Any],
    target: Mapping[str, Any],
    fresh_diffusion: Mapping[str, Any],
    text_vocab_size: int,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """A Transfusion MoT state dict from a dense Llama3 or a Chameleon-setting MoT source.

    `target` maps every key of the Transfusion model to its tensor or shape. The transformer
    blocks and final norm load from the source (a dense source untied as by
    `untie_dense_state_dict`; an MoT source must have the target's block keys, i.e. the same
    flavor shape and `untie`). The patch layers (`diffusion.*`) have no source counterpart and
    take `fresh_diffusion` (their own init). Vocabulary: a Chameleon source's rows past the
    text vocabulary are its markers and discrete image codebook, which the latent vocabulary
    does not have (the image is patches, only BOI/EOI remain), and whose ids differ between
    the two layouts; so only the first `text_vocab_size` rows load and every other row is
    initialised by `extend_rows` (mean text row plus seeded noise).
    """
    body = {k: v for k, v in target.items() if not k.startswith(DIFFUSION_PREFIX)}
    missing = sorted(set(target) - set(body) - set(fresh_diffusion))
    if missing:
        raise WarmStartError(f"no fresh init for the patch layers: {', '.join(missing)}")
    source = dict(source_sd)
    short = [f"{k} has {_shape(source[k])[0]} rows" for k in VOCAB_KEYS
             if k in source and _shape(source[k])[0] < text_vocab_size]
    if short:
        raise WarmStartError(f"source vocabulary smaller than the text vocabulary "
                             f"({text_vocab_size} ids): {'; '.join(short)}")
    for key in VOCAB_KEYS:
        if key in source:
            source[key] = source[key][:text_vocab_size]
    if any(_MODALITY_KEY.match(k) for k in source):  # an MoT source: same keys, same shapes
        extra = sorted(set(source) - set(body))
        absent = sorted(set(body) - set(source))
        wrong = [f"{k}: target {list(_shape(body[k]))} vs source {list(_shape(source[k]))}"
                 for k in sorted(set(body) & set(source))
                 if k not in VOCAB_KEYS and _shape(body[k]) != _shape(source[k])]
        problems = [f"{label}: {', '.join(keys)}" for label, keys in (
            ("missing in the MoT checkpoint", absent), ("MoT keys with no Transfusion counterpart", extra),
            ("shape mismatch", wrong)) if keys]
        if problems:
            raise WarmStartError("cannot warm start Transfusion from this MoT checkpoint "
                                 "(same flavor shape and untie needed): " + " | ".join(problems))
        state = {}
        for i, key in enumerate(body):
            value = source[key]
            state[key] = (extend_rows(value, _shape(body[key])[0], seed + i) if key in VOCAB_KEYS
                          else value.detach().clone())
    else:
        state = untie_dense_state_dict(source, body, seed=seed)
    for key in target:
        if key.startswith(DIFFUSION_PREFIX):
            state[key] = fresh_diffusion[key].detach().clone()
    return {key: state[key] for key in target}


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


# Entries of an MoE FFN (model/moe.py): `layers.<i>.feed_forward.moe.<set>.<rest>` and the
# dense SwiGLU of its other sets, `layers.<i>.feed_forward.dense.<w>.<j>.weight`.
_MOE_ENTRY = re.compile(r"^layers\.(\d+)\.feed_forward\.moe\.(\d+)\.(.+)$")
_MOE_DENSE_ENTRY = re.compile(r"^layers\.(\d+)\.feed_forward\.dense\.(w[123])\.(\d+)\.weight$")
_FFN_SOURCE = re.compile(r"^layers\.\d+\.feed_forward\.w[123](\.\d+)?\.weight$")


def _ffn_source(source_sd: Mapping[str, Any], layer: str, proj: str, modality: int) -> str:
    """The source key of modality `modality`'s FFN weight `proj` in block `layer`: its own
    MoT copy, else the single shared copy (`.0.`), else the dense Llama3 weight."""
    for key in (f"layers.{layer}.feed_forward.{proj}.{modality}.weight",
                f"layers.{layer}.feed_forward.{proj}.0.weight",
                f"layers.{layer}.feed_forward.{proj}.weight"):
        if key in source_sd:
            return key
    raise WarmStartError(
        f"the checkpoint has no FFN weight {proj} for modality {modality} in block {layer} "
        f"(looked for layers.{layer}.feed_forward.{proj}[.<modality>].weight)"
    )


def upcycle_state_dict(
    source_sd: Mapping[str, Any],
    target: Mapping[str, Any],
    model_args: MoTModelArgs,
    *,
    seed: int = 0,
    noise_scale: float = 0.01,
) -> dict[str, Any]:
    """Warm start a model with MoE FFNs (sparse upcycling) from a dense Llama3 or an MoT state
    dict (plain tensors).

    Every expert of an MoE set is that modality's FFN weight (w1/w2/w3, stacked into
    `GroupedExperts`' (experts, out, in) tensors) plus `noise_scale` x its std of seeded
    noise, so the experts can diverge; the router gate is fresh (Llama3's init std of the
    block, seeded) and the expert bias zero. A shared FFN set (the MoE-4x baseline) takes
    modality 0's FFN. The dense sets of an MoE FFN take their modality's FFN; every other
    entry is warm started as `untie_dense_state_dict` does (dense source) or copied under
    its own name (MoT source of the same attention/norm layout).
    """
    from .model import block_init_std

    if model_args.moe_args.num_shared_experts:
        raise WarmStartError(
            f"mot.moe_num_shared_experts = {model_args.moe_args.num_shared_experts}: upcycling "
            "defines no initialisation for shared experts; warm start with 0"
        )
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    used: set[str] = set()
    rest: dict[str, Any] = {}
    shared_ffn = model_args.n_copies("ffn") == 1
    for key, want in target.items():
        moe, dense_part = _MOE_ENTRY.match(key), _MOE_DENSE_ENTRY.match(key)
        if moe:
            layer, s, leaf = moe.groups()
            modality = 0 if shared_ffn else int(s)
            if leaf in ("experts.w1", "experts.w2", "experts.w3"):
                source = _ffn_source(source_sd, layer, leaf[-2:], modality)
                used.add(source)
                w = source_sd[source].detach().float()
                if (w.shape[0], w.shape[1]) != tuple(_shape(want)[1:]):
                    raise WarmStartError(f"{key}: expert {list(_shape(want)[1:])} vs {source} {list(w.shape)}")
                noise = torch.randn((_shape(want)[0], *w.shape), generator=generator)
                out[key] = (w + noise * noise_scale * w.std()).to(source_sd[source].dtype)
            elif leaf == "router.gate.weight":
                std = block_init_std(int(layer), model_args)
                gate = torch.empty(_shape(want))
                torch.nn.init.trunc_normal_(gate, std=std, a=-2.0, b=2.0, generator=generator)
                out[key] = gate
            elif leaf == "expert_bias":
                out[key] = torch.zeros(_shape(want))
            else:
                raise WarmStartError(f"{key}: upcycling does not know this MoE entry")
        elif dense_part:
            layer, proj, j = dense_part.groups()
            ffn_sets = [s for s in range(model_args.n_copies("ffn")) if s not in model_args.moe_modalities]
            source = _ffn_source(source_sd, layer, proj, ffn_sets[int(j)])
            used.add(source)
            out[key] = source_sd[source].detach().clone()
        else:
            rest[key] = want
    is_dense = any(re.match(r"^layers\.\d+\.attention\.wq\.weight$", k) for k in source_sd)
    others = {k: v for k, v in source_sd.items() if k not in used and not _FFN_SOURCE.match(k)}
    if is_dense:
        out.update(untie_dense_state_dict(others, rest, seed=seed))
    else:
        missing = sorted(set(rest) - set(others))
        shapes = [f"{k}: model {list(_shape(v))} vs checkpoint {list(_shape(others[k]))}"
                  for k, v in rest.items() if k in others and _shape(v) != _shape(others[k])]
        if missing or shapes:
            raise WarmStartError(
                f"the MoT checkpoint does not fit the model outside the MoE FFNs (same flavor, "
                f"mot.untie and vocabulary needed): missing {missing[:8]}; shapes {shapes[:8]}"
            )
        out.update({k: others[k].detach().clone() for k in rest})
    return out
