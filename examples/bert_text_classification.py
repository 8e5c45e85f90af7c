"""BERT text classification as a supernet: a small labelled text set, a word-level tokenizer, HF export.

The example builds its own sentiment data set from templates ("the film was not great" is negative, so word
order matters), a tiny word-level tokenizer, and a ``BertForSequenceClassification`` from a ``BertConfig``
(random init, no downloads). The supernet drops layers and shrinks the MLP widths (heads stay whole: a
``BertConfig`` derives the head size from ``hidden_size // num_attention_heads``, so it cannot describe fewer heads
of the same size). After sandwich training with in-place distillation:

* a subnet with the same shape in every layer is extracted, saved with ``save_pretrained`` and reloaded with
  ``from_pretrained`` (its config says ``num_hidden_layers``/``intermediate_size``);
* a subnet with a different width per layer refuses ``save_pretrained`` (saying why) and round-trips through
  ``save_subnet``/``load_subnet``.

Run (a couple of minutes on a laptop CPU)::

    python examples/bert_text_classification.py
    python examples/bert_text_classification.py --epochs 10 --hidden 256 --layers 8 --accelerator gpu
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import InplaceDistillation, ParameterPrioritization, SandwichSampling
from lightning_supernet.cost import count_params
from lightning_supernet.integrations.transformers import (
    NonUniformSubnetError,
    load_subnet,
    output_logits,
    save_subnet,
    uniform_subnet,
)

SUBJECTS = ["the movie", "the film", "this book", "the food", "the service", "the hotel", "my new phone",
            "the concert", "this game", "the show", "the lecture", "the trip", "our dinner", "the album"]
POSITIVE = ["great", "wonderful", "excellent", "amazing", "delightful", "fantastic", "superb", "enjoyable", "good"]
NEGATIVE = ["terrible", "awful", "boring", "horrible", "disappointing", "bad", "dull", "poor", "mediocre"]
TEMPLATES = ["{s} was {a}", "{s} was really {a}", "i think {s} is {a}", "honestly {s} felt {a}",
             "{s} was quite {a}", "we found {s} {a}", "everyone agreed {s} was {a}", "{s} is so {a}",
             "{s} was not {a}", "i do not think {s} is {a}", "nobody said {s} was {a}", "{s} was never {a}"]


def make_sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` templated sentences labelled positive (1) or negative (0); negations flip the adjective."""
    rows = []
    for s, t, (a, pos) in itertools.product(SUBJECTS, TEMPLATES,
                                            [(a, 1) for a in POSITIVE] + [(a, 0) for a in NEGATIVE]):
        negated = any(w in t.split() for w in ("not", "nobody", "never"))
        rows.append((t.format(s=s, a=a), pos ^ negated))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [rows[i][0] for i in order], [rows[i][1] for i in order]


class WordTokenizer:
    """Whitespace tokens; ids 0..3 are [PAD] [UNK] [CLS] [SEP]; sequences padded to ``max_len``."""

    def __init__(self, sentences: list[str], max_len: int = 16) -> None:
        words = sorted({w for s in sentences for w in s.split()})
        self.vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
        self.max_len = max_len

    def __call__(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(sentences), self.max_len, dtype=torch.long)
        for i, s in enumerate(sentences):
            tokens = [2] + [self.vocab.get(w, 1) for w in s.split()][: self.max_len - 2] + [3]
            ids[i, : len(tokens)] = torch.tensor(tokens)
        return ids, (ids != 0).long()


class TextClassifier(L.LightningModule):
    """An ordinary LightningModule around ``BertForSequenceClassification``."""

    def __init__(self, vocab_size: int, hidden: int = 64, layers: int = 4, heads: int = 4, intermediate: int = 256,
                 max_len: int = 16, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=max_len,
                            num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.model = BertForSequenceClassification(config)
        self.example_input_array = (torch.ones(2, max_len, dtype=torch.long), torch.ones(2, max_len, dtype=torch.long))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        ids, mask, y = batch
        loss = F.cross_entropy(self(ids, mask).logits, y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        ids, mask, y = batch
        logits = self(ids, mask).logits
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


@torch.no_grad()
def accuracy(hf_model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    hf_model.eval().to(device)
    hits = [(hf_model(input_ids=i.to(device), attention_mask=m.to(device)).logits.argmax(-1).cpu() == y)
            for i, m, y in loader]
    return torch.cat(hits).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1200, help="sentences (of 3024 distinct ones)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--out-dir", default=None, help="where the exported subnets go (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    L.seed_everything(args.seed)
    sentences, labels = make_sentences(args.samples, args.seed)
    n_val = len(sentences) // 5
    tok = WordTokenizer(sentences[n_val:])
    ids, mask = tok(sentences)
    y = torch.tensor(labels)
    train = DataLoader(TensorDataset(ids[n_val:], mask[n_val:], y[n_val:]), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(TensorDataset(ids[:n_val], mask[:n_val], y[:n_val]), batch_size=128)
    print(f"{len(sentences)} sentences, vocabulary {len(tok.vocab)}; e.g. {sentences[0]!r} -> {labels[0]}")

    model = TextClassifier(len(tok.vocab), args.hidden, args.layers, args.heads, args.intermediate)
    supernet = SupernetModule(model, output_transform=output_logits, eval_subnets=("largest", "smallest"),
                              space={"elastic": ["width", "depth"], "exclude": ["*pooler*"]})
    print(supernet.search_space)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10,
                        callbacks=[ParameterPrioritization(), SandwichSampling(num_random=2), InplaceDistillation()])
    t0 = time.time()
    trainer.fit(supernet, train, val)
    print(f"supernet trained in {time.time() - t0:.0f} s")

    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bert_subnets_"))
    device = supernet.device
    n = args.layers
    space = supernet.search_space
    widths = [name for name, d in space.dims.items() if d.kind == "width"]
    subnets = {
        "largest": space.largest(),
        f"uniform {max(1, n // 2)} layers, width {args.intermediate // 2}":
            uniform_subnet(supernet, num_layers=max(1, n // 2), intermediate_size=args.intermediate // 2),
        f"uniform {n} layers, width {args.intermediate // 4}":
            uniform_subnet(supernet, intermediate_size=args.intermediate // 4),
        "per-layer widths": space.config({w: sorted(space.dims[w].choices)[i % len(space.dims[w].choices)]
                                          for i, w in enumerate(widths)}),
    }
    results = {}
    print(f"\n{'subnet':<32} {'params':>9} {'val acc':>8} {'reloaded':>9}  format")
    for i, (name, cfg) in enumerate(subnets.items()):
        small = supernet.extract(cfg).model  # a BertForSequenceClassification of the smaller shape
        acc = accuracy(small, val, device)
        where = out / f"subnet{i}"
        if small.supernet_format_issue is None:
            small.save_pretrained(where)
            reloaded, fmt = BertForSequenceClassification.from_pretrained(where), "save_pretrained"
        else:
            try:
                small.save_pretrained(where)
            except NonUniformSubnetError as err:
                print(f"  save_pretrained refused: {str(err)[:150]}...")
            save_subnet(small, where)
            reloaded, fmt = load_subnet(where), "save_subnet"
        re_acc = accuracy(reloaded, val, device)
        results[name] = {"params": count_params(small), "val_acc": acc, "reloaded_acc": re_acc}
        print(f"{name:<32} {count_params(small):>9,} {acc:>8.3f} {re_acc:>9.3f}  {fmt} -> {where}")
    return results


if __name__ == "__main__":
    main()
