"""`--checkpoint.initial_load_in_hf`: the trainer starts from a HuggingFace Llama safetensors
folder, every modality copy holding the HF weights."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torchtitan.models.llama3 import Transformer, TransformerModelArgs
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

import torchtitan_mot
from torchtitan_mot.data.tokenizer import MultimodalTokenizer

from helpers import checkpoint_tensors, make_norms_informative
from harness.trainer import REPO, run_trainer, small_args


@pytest.mark.slow
def test_trainer_starts_from_hf_llama(tmp_path: Path) -> None:
    """One step at lr 0 after loading: the saved MoT weights are the HF Llama's, in every
    modality copy. The HF folder is written by TorchTitan's own Llama3 adapter (its q/k
    permutation included), not by the MoT adapter under test."""
    from safetensors.torch import save_file

    vocab = MultimodalTokenizer(str(REPO / "assets" / "tokenizer"), ["text", "image"], [256]).get_vocab_size()
    mot = dataclasses.replace(torchtitan_mot.mot_args["debugmodel"], vocab_size=vocab)
    args = TransformerModelArgs(dim=mot.dim, n_layers=mot.n_layers, n_heads=mot.n_heads,
                                n_kv_heads=mot.n_kv_heads, vocab_size=vocab, rope_theta=mot.rope_theta,
                                multiple_of=mot.multiple_of, max_seq_len=64)
    torch.manual_seed(1)
    llama = Transformer(args)
    with torch.no_grad():
        llama.init_weights()
    make_norms_informative(llama)
    (tmp_path / "hf").mkdir()
    hf = Llama3StateDictAdapter(args, None).to_hf(llama.state_dict())
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "hf" / "model.safetensors"))

    dump = tmp_path / "run"
    run_trainer(small_args(
        dump, 1, "--optimizer.lr", "0", "--checkpoint.enable", "--checkpoint.interval", "1000",
        "--checkpoint.initial_load_path", str(tmp_path / "hf"), "--checkpoint.initial_load_in_hf"))
    saved = checkpoint_tensors(dump / "checkpoint" / "step-1")
    dense = llama.state_dict()
    copies = [k for k in saved if re.match(r"layers\.\d+\..*\.1\.weight$", k)]
    assert copies  # the second modality's copies are there, and checked below
    for key, value in saved.items():
        if key.startswith("optimizer."):
            continue
        source = re.sub(r"\.\d+\.weight$", ".weight", key) if key.startswith("layers.") else key
        assert torch.equal(value, dense[source]), key
