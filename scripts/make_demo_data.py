"""Build the offline demo assets: BPE text tokenizer, image/speech codebooks and two datasets.

Sources are real and bundled: scikit-learn's `load_digits()` (1797 handwritten 8x8 digits),
captions from templates, and speech synthesised by `espeak-ng` (needed only for the
text_image_speech variant: `apt-get install -y espeak-ng`). Deterministic (fixed seeds);
rerunning overwrites `assets/tokenizer/` and `assets/demo/` with identical content.

    python scripts/make_demo_data.py [--out assets] [--skip-speech]
"""

import argparse
import io
import json
import random
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from torchtitan_mot.data.image_codec import ImageCodec, save_png_grid
from torchtitan_mot.data.speech_codec import SAMPLE_RATE, SpeechCodec

SEED = 0
TEXT_VOCAB_SIZE = 1024
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = [
    "a handwritten digit {w}",
    "the number {w}, written by hand",
    "an image of the digit {w}",
    "a small scanned picture of the digit {w}",
    "handwritten {d}",
    "this is the number {w}",
]
SPOKEN = ["{w}", "the digit {w}", "number {w}"]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-scotland"]
SPEEDS = [140, 180]
VALIDATION_FRACTION = 0.1


def generic_english() -> list[str]:
    """Offline English prose so the BPE learns more than the caption words."""
    import codecs
    import collections
    import functools
    import itertools
    import json as json_mod
    import pathlib
    import re
    import string
    from contextlib import redirect_stdout

    import sklearn.datasets

    with redirect_stdout(io.StringIO()):  # `this` prints the Zen of Python on import
        import this

    texts = [codecs.decode(this.s, "rot13")]
    descr = Path(sklearn.datasets.__file__).parent / "descr"
    texts += [p.read_text() for p in sorted(descr.glob("*.rst"))]
    for mod in (collections, functools, itertools, json_mod, pathlib, re, string, random):
        texts.append(mod.__doc__ or "")
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name), "__doc__", None)
            if isinstance(doc, str) and not name.startswith("_"):
                texts.append(doc)
    return texts


def train_tokenizer(corpus: list[str], out: Path) -> None:
    """Byte-level BPE with bos/eos declared so torchtitan's HuggingFaceTokenizer finds them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def espeak(text: str, voice: str, speed: int) -> np.ndarray:
    """Synthesise `text`, return a silence-trimmed float waveform at SAMPLE_RATE."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        sr = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    x = np.interp(np.arange(0, len(x), sr / SAMPLE_RATE), np.arange(len(x)), x).astype(np.float32)
    loud = np.flatnonzero(np.abs(x) > 0.02)
    return x[loud[0] : loud[-1] + 1] if len(loud) else x


def caption(rng: random.Random, digit: int) -> str:
    return rng.choice(CAPTIONS).format(w=WORDS[digit], d=digit)


def write_variant(out: Path, rows: list[dict], meta: dict) -> None:
    """Shuffle (seeded), split ~10% validation, write jsonl + meta.json."""
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    n_val = int(round(len(rows) * VALIDATION_FRACTION))
    splits = {"validation": order[:n_val], "train": order[n_val:]}
    for split, idx in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for i in idx:
                f.write(json.dumps(rows[i], separators=(",", ":")) + "\n")
    meta = {**meta, "splits": {k: len(v) for k, v in splits.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets")
    parser.add_argument("--skip-speech", action="store_true", help="do not build text_image_speech")
    args = parser.parse_args()
    demo = args.out / "demo"
    demo.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    images, labels = digits.images.astype(np.float32), digits.target.astype(int)

    rng = random.Random(SEED)
    captions = [caption(rng, d) for d in labels]
    every_caption = [t.format(w=w, d=d) for t in CAPTIONS for d, w in enumerate(WORDS)]
    train_tokenizer(every_caption * 20 + captions + generic_english(), args.out / "tokenizer")

    image_codec = ImageCodec.fit(images, codebook_size=256, seed=SEED)
    image_codec.save(demo / "image_codebook.npy")
    image_tokens = image_codec.encode(images)
    save_png_grid(
        np.concatenate([images[:10], image_codec.decode(image_tokens[:10])]),
        demo / "image_codec_roundtrip.png",
        titles=[f"orig {d}" for d in labels[:10]] + [f"decoded {d}" for d in labels[:10]],
    )
    err = np.abs(image_codec.decode(image_tokens) - images)
    print(f"image codec: mean |err| {err.mean():.3f}, max |err| {err.max():.3f} (pixel range 0..16)")

    rows = []
    for i, d in enumerate(labels):
        text = {"modality": "text", "text": captions[i]}
        image = {"modality": "image", "tokens": image_tokens[i].tolist()}
        rows.append({"segments": [text, image] if rng.random() < 0.5 else [image, text]})
    image_meta = {"tokens_per_sample": 16, "codec": "k-means over 2x2 patches, image_codebook.npy"}
    write_variant(
        demo / "text_image",
        rows,
        {"modalities": ["text", "image"], "codebook_sizes": {"image": 256}, "image": image_meta},
    )

    if args.skip_speech:
        return
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: apt-get install -y espeak-ng (or pass --skip-speech)")
    clips = {
        (d, p, v, s): espeak(p.format(w=WORDS[d]), v, s)
        for d in range(10)
        for p in SPOKEN
        for v in VOICES
        for s in SPEEDS
    }
    keys = list(clips)
    speech_codec = SpeechCodec.fit([clips[k] for k in keys], codebook_size=256, seed=SEED)
    speech_codec.save(demo / "speech_codebook.npy")
    clip_tokens = {k: speech_codec.encode(clips[k]).tolist() for k in keys}
    lengths = [len(t) for t in clip_tokens.values()]
    print(f"speech codec: {len(keys)} clips, {min(lengths)}-{max(lengths)} tokens per clip")

    rows = []
    for i, d in enumerate(labels):
        clip = rng.choice([k for k in keys if k[0] == d])
        segments = [
            {"modality": "text", "text": captions[i]},
            {"modality": "image", "tokens": image_tokens[i].tolist()},
            {"modality": "speech", "tokens": clip_tokens[clip]},
        ]
        rng.shuffle(segments)
        rows.append({"segments": segments})
    write_variant(
        demo / "text_image_speech",
        rows,
        {
            "modalities": ["text", "image", "speech"],
            "codebook_sizes": {"image": 256, "speech": 256},
            "image": image_meta,
            "speech": {
                "codec": "k-means over 40-band log-mel frames (32 ms hop), speech_codebook.npy",
                "source": f"espeak-ng, phrases {SPOKEN}, voices {VOICES}, speeds {SPEEDS}",
            },
        },
    )


if __name__ == "__main__":
    main()
