"""Multi-process worker for the parallelism parity tests (run under torchrun, gloo, CPU).

`python -m torch.distributed.run --nproc_per_node=N tests/infra/parallel_worker.py OUT CASE...`
runs every CASE (a `CASES` key, an `UNTIE_CASES` key: the same run with only some
components untied, or a `MOE_CASES` key: the same run with MoE FFN weight sets) after a single-process reference of the same 5 AdamW steps (computed on
every rank, deterministic) and writes, from rank 0, a JSON of max abs differences:
per-step losses, the gradients of the first and of the last step (full tensors, before
clipping; the last step's come from weights several updates away from the shared init) and
the final parameters.
"""

import json
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

from torchtitan_mot.compat.cpu import enable_cpu_fallback

enable_cpu_fallback()

from torch.distributed.tensor import DTensor  # noqa: E402
from torch.distributed.tensor.parallel import loss_parallel  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402
from torchtitan.config import JobConfig  # noqa: E402
from torchtitan.distributed import ParallelDims  # noqa: E402
from torchtitan.distributed.pipeline_parallel import pipeline_llm  # noqa: E402
from torchtitan.distributed.utils import clip_grad_norm_  # noqa: E402
from torchtitan.models.moe import MoEArgs  # noqa: E402

from torchtitan_mot.infra.modality_ids import prepare_mot_inputs  # noqa: E402
from torchtitan_mot.model.inputs import HostTensor  # noqa: E402
from torchtitan_mot.infra.parallelize import parallelize_mot  # noqa: E402
from torchtitan_mot.trainer.loss import modality_cross_entropy  # noqa: E402
from torchtitan_mot.model import MoTModelArgs, MoTTransformer  # noqa: E402

VOCAB, TEXT_VOCAB = 128, 96
ARGS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=32,
            rope_theta=500000, n_modalities=2, qk_norm=True)
BS, SEQ, STEPS, LR = 4, 32, 5, 1e-3
GRAD_STEPS = (0, STEPS - 1)  # steps whose gradients are compared
TABLE = (torch.arange(VOCAB) >= TEXT_VOCAB).long()  # token id -> modality (text, image)
# case: (dp_shard, tp, pp, ac mode, compile, rows of the batch that are text only, n_modalities)
CASES = {
    "tp2": (1, 2, 1, "none", False, (), 2),
    "tp2_dense": (1, 2, 1, "none", False, (), 1),
    "tp2_compile": (1, 2, 1, "none", True, (), 2),
    "fsdp2_rank1_text_only": (2, 1, 1, "none", False, (2, 3), 2),
    "pp2": (1, 1, 2, "none", False, (), 2),
    "tp2_ac_full": (1, 2, 1, "full", False, (), 2),
    "fsdp2_tp2": (2, 2, 1, "none", False, (2, 3), 2),
    "pp2_tp2": (1, 2, 2, "selective", False, (), 2),
    "fsdp2_compile": (2, 1, 1, "none", True, (2, 3), 2),
    "fsdp2_pp2": (2, 1, 2, "none", False, (2, 3), 2),
}
# the same runs with only some components untied (mot.untie): case -> (base case, untie)
UNTIE_CASES = {
    "tp2_untie_ffn": ("tp2", ["ffn"]),
    "tp2_untie_attention": ("tp2", ["attention"]),
    "fsdp2_untie_ffn": ("fsdp2_rank1_text_only", ["ffn"]),
    "fsdp2_untie_attention": ("fsdp2_rank1_text_only", ["attention"]),
    "pp2_untie_ffn_norms": ("pp2", ["ffn", "norms"]),
    "tp2_compile_untie_attention_norms": ("tp2_compile", ["attention", "norms"]),
    "tp2_ac_full_untie_ffn": ("tp2_ac_full", ["ffn"]),
}
ALL_UNTIED = ["attention", "ffn", "norms"]
# MoE FFN weight sets (model/moe.py): case -> (base case, MoE sets, expert parallel degree).
# Image-set cases train on image-sparse batches (`sparse_image_steps`): steps with one image
# token (a TP rank's share of it is empty) and with none.
MOE_CASES = {
    "tp2_hybrid": ("tp2", [0], 1),
    "tp2_moe4x": ("tp2_dense", [0], 1),
    "tp2_compile_hybrid": ("tp2_compile", [0], 1),
    "tp2_ep2_hybrid_image": ("tp2", [1], 2),
    "fsdp2_tp2_hybrid": ("fsdp2_tp2", [0], 1),
    "fsdp2_ep2_compile_hybrid": ("fsdp2_compile", [0], 2),
    "fsdp2_ep2_pp2_hybrid": ("fsdp2_pp2", [0], 2),
}
MOE_ARGS = MoEArgs(num_experts=4, num_shared_experts=1, top_k=2, score_func="softmax",
                   use_grouped_mm=False, load_balance_coeff=1e-3)


def model_args(n_modalities: int, untie: list[str], moe: list[int] = ()) -> MoTModelArgs:
    return MoTModelArgs(**(ARGS | dict(n_modalities=n_modalities, untie=untie,
                                       moe_modalities=list(moe), moe_args=MOE_ARGS)))


def batches(text_only_rows: tuple[int, ...], n_modalities: int = 2, sparse_image: bool = False):
    """`sparse_image`: steps 1 and 3 hold one image token, step 2 none."""
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BS, SEQ), generator=g)
        tokens[list(text_only_rows)] %= TEXT_VOCAB
        if sparse_image and step in (1, 2, 3):
            tokens %= TEXT_VOCAB
            if step != 2:
                tokens[0, 5] = TEXT_VOCAB
        labels = torch.randint(0, VOCAB, (BS, SEQ), generator=g)
        labels[:, :3] = -100
        yield tokens, TABLE[tokens].clamp(max=n_modalities - 1), labels


def loss_sum(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return modality_cross_entropy(pred, labels, TABLE, torch.ones(2))[0]


def clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def reference(init: dict, text_only_rows: tuple[int, ...], n_mod: int, untie: list[str],
              moe: list[int]) -> dict:
    model = MoTTransformer(model_args(n_mod, untie, moe))
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], {}
    for step, (tokens, ids, labels) in enumerate(batches(text_only_rows, n_mod, 1 in moe)):
        loss = loss_sum(model(tokens, modality_ids=ids), labels) / (labels != -100).sum()
        loss.backward()
        if step in GRAD_STEPS:
            grads[step] = {n: full(p.grad) for n, p in model.named_parameters()}
        clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return dict(losses=losses, grads=grads, params={n: full(p) for n, p in model.named_parameters()})


def run_case(name: str, init: dict, untie: list[str], moe: list[int], ep: int) -> dict:
    dp, tp, pp, ac, compile_, text_rows, n_mod = CASES[name]
    world = dist.get_world_size()
    jc = JobConfig()
    jc.training.seq_len = SEQ
    jc.training.local_batch_size = BS // dp
    jc.training.mixed_precision_param = "float32"
    jc.parallelism.data_parallel_shard_degree = dp
    jc.parallelism.tensor_parallel_degree = tp
    jc.parallelism.pipeline_parallel_degree = pp
    jc.parallelism.expert_parallel_degree = ep
    jc.parallelism.pipeline_parallel_microbatch_size = 1
    jc.activation_checkpoint.mode = ac
    jc.compile.enable = compile_
    jc.compile.components = ["model"]
    jc.compile.backend = "aot_eager"
    pd = ParallelDims(dp_replicate=1, dp_shard=dp, cp=1, tp=tp, pp=pp, ep=ep, etp=1, world_size=world)
    pd.build_mesh()
    model = MoTTransformer(model_args(n_mod, untie, moe))
    model.load_state_dict(init)
    n_tokens = {"n": 1.0}
    if pp > 1:
        schedule, parts, first, last = pipeline_llm(
            model, pd, jc, torch.device("cpu"), model.model_args, parallelize_mot,
            lambda pred, labels: loss_sum(pred, labels) / n_tokens["n"],
        )
    else:
        parts, first, last = [parallelize_mot(model, pd, jc)], True, True
    params = [p for m in parts for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=LR)
    dp_rank = pd.get_mesh("fsdp").get_local_rank() if dp > 1 else 0
    rows = slice(dp_rank * BS // dp, (dp_rank + 1) * BS // dp)
    ctx = loss_parallel if tp > 1 else nullcontext
    losses, grads = [], {}
    for step, (tokens, ids, labels) in enumerate(batches(text_rows, n_mod, 1 in moe)):
        n_tokens["n"] = (labels != -100).sum()
        tokens, ids, labels = tokens[rows], ids[rows], labels[rows]
        inputs, labels, extra_inputs, extra_kwargs = prepare_mot_inputs(
            tokens, labels, {"modality_ids": HostTensor(ids)}, {}, pd, jc, torch.device("cpu"))
        with ctx():
            if pp > 1:
                out: list[torch.Tensor] = []
                target, mb_losses = (labels, out) if last else (None, None)
                args = (inputs,) if first else ()
                schedule.step(*args, **extra_inputs, **extra_kwargs, target=target,
                              losses=mb_losses, return_outputs=False)
                loss = torch.stack(out).sum() if last else torch.zeros(())
            else:
                loss = loss_sum(parts[0](inputs, **extra_inputs, **extra_kwargs), labels)
                loss = loss / n_tokens["n"]
                loss.backward()
        if step in GRAD_STEPS:
            grads[step] = {clean(n): full(p.grad) for m in parts for n, p in m.named_parameters()}
        clip_grad_norm_(params, 1.0, pp_mesh=pd.get_mesh("pp") if pp > 1 else None,
                        ep_enabled=pd.ep_enabled)
        opt.step()
        opt.zero_grad()
        # every rank's share of the loss: dp ranks hold parts of the sum, tp ranks copies
        total = loss.detach().clone()
        if dp > 1:
            dist.all_reduce(total, group=pd.get_mesh("fsdp").get_group())
        if pp > 1:
            dist.all_reduce(total, group=pd.get_mesh("pp").get_group())
        losses.append(total.item())
    params_out = {clean(n): full(p) for m in parts for n, p in m.named_parameters()}
    names = [n for m in parts for n, _ in m.named_parameters()]
    wrapped = dict(compiled=any("_orig_mod." in n for n in names),
                   checkpointed=any("_checkpoint_wrapped_module." in n for n in names))
    placements = {clean(n): str(tuple(p.placements)) for m in parts
                  for n, p in m.named_parameters() if isinstance(p, DTensor)}
    return dict(losses=losses, grads=grads, params=params_out, wrapped=wrapped,
                placements=placements)


def cp_sharding_check() -> dict:
    """Context parallel input sharding: modality ids must follow the tokens on every rank."""
    world = dist.get_world_size()
    pd = ParallelDims(dp_replicate=1, dp_shard=1, cp=world, tp=1, pp=1, ep=1, etp=1,
                      world_size=world)
    pd.build_mesh()
    out = {}
    seq = 256  # PTRR balances whole 128-token mask blocks: seq/128 must divide by cp
    tokens = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(tokens, -1, 1)
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, 2, None, seq, seq, device="cpu")
    for lb, masks in (("headtail", None), (None, None), ("ptrr", mask)):
        jc = JobConfig()
        jc.parallelism.context_parallel_load_balancer = lb
        extra_kwargs = {} if masks is None else {"attention_masks": masks}
        inp, lab, extra_inputs, kw = prepare_mot_inputs(
            tokens, labels, {"modality_ids": HostTensor(TABLE[tokens])}, extra_kwargs, pd, jc,
            torch.device("cpu"))
        pos = kw["positions"].long()
        ids = kw["modality_ids"]
        out[str(lb)] = dict(
            ids_on_host=isinstance(ids, HostTensor),
            ids_follow_tokens=bool((TABLE[inp] == getattr(ids, "tensor", ids)).all()),
            tokens_at_positions=bool((tokens.gather(1, pos) == inp).all()),
            labels_at_positions=bool((labels.gather(1, pos) == lab).all()),
            local_len=int(inp.shape[1]),
            positions_contiguous=bool((pos.diff(dim=1) == 1).all()),
            extra_inputs_empty=not extra_inputs,
            mask_sharded=masks is None or kw["attention_masks"].shape[-2] == seq // world,
        )
    return out


def main() -> None:
    out_path, cases = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    results = {}
    for case in cases:
        if case == "cp_sharding":
            shards = [None] * dist.get_world_size()
            dist.all_gather_object(shards, cp_sharding_check())
            results[case] = shards
            continue
        torch._dynamo.reset()
        base, untie = UNTIE_CASES.get(case, (case, ALL_UNTIED))
        base, moe, ep = MOE_CASES.get(case, (base, [], 1))
        n_mod = CASES[base][6]
        torch.manual_seed(0)
        init_model = MoTTransformer(model_args(n_mod, untie, moe))
        with torch.no_grad():
            init_model.init_weights()
        init = {k: v.clone() for k, v in init_model.state_dict().items()}
        ref = reference(init, CASES[base][5], n_mod, untie, moe)
        got = run_case(base, init, untie, moe, ep)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (got["grads"], got["params"]))
        # under PP each rank holds only its stage's parameters; together they are all
        grads = {s: {k: v for g, _ in parts for k, v in g[s].items()} for s in GRAD_STEPS}
        params = {k: v for _, p in parts for k, v in p.items()}
        grad_diff = {s: max((grads[s][k] - ref["grads"][s][k]).abs().max().item() for k in grads[s])
                     for s in GRAD_STEPS}
        assert set(params) == set(ref["params"]), sorted(set(params) ^ set(ref["params"]))
        results[case] = dict(
            losses=got["losses"],
            ref_losses=ref["losses"],
            loss_diff=max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])),
            grad_diff=grad_diff[0],
            last_grad_diff=grad_diff[STEPS - 1],
            grad_scale=max(g.abs().max().item() for g in ref["grads"][0].values()),
            param_diff=max((params[k] - ref["params"][k]).abs().max().item() for k in params),
            **got["wrapped"],
            placements=got["placements"],
            n_params=len(got["params"]),
        )
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
