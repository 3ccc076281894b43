"""Train a meft adapter with transformers.Trainer: python examples/hf_trainer.py [--max-steps N]

With no arguments: the embedded SmolLM2-135M-Instruct and meft's built-in facts, the settings of
`meft train`'s default job; prints the held-out scores as JSON and saves OUTPUT/adapter.
"""

import argparse
import json

from datasets import Dataset, load_dataset
from transformers import TrainingArguments

from meft import MeftConfig, get_meft_model
from meft.adapter.loading import load_model_and_tokenizer
from meft.data.datasets import load_splits
from meft.data.records import load_samples, to_record
from meft.engine.disk import DiskArrays
from meft.evaluation.evaluate import evaluate
from meft.training.integrations import MeftCollator, MeftTrainer, encoder

ap = argparse.ArgumentParser()
ap.add_argument("--model", help="HF id, model dir or .gguf (default: the embedded model)")
ap.add_argument("--data", help="training JSONL (default: the built-in facts)")
ap.add_argument("--eval-data", help="held-out JSONL (default: the built-in held-out ones)")
ap.add_argument("--max-steps", type=int, default=90)
ap.add_argument("--output", default="runs/hf-trainer")
default = MeftConfig()  # meft train's defaults
ap.add_argument("--neurons", type=int, default=default.neurons)
ap.add_argument("--top-k", type=int, default=default.top_k)
ap.add_argument("--experts", type=int)
ap.add_argument("--n-probe", type=int, default=default.n_probe)
ap.add_argument("--seed", type=int, default=0, help="adapter initialisation and data order")
ap.add_argument("--store", help="a new directory: tables and their state on disk (bigger than RAM)")
a = ap.parse_args()

base, tokenizer, _ = load_model_and_tokenizer(a.model)
model = get_meft_model(base, MeftConfig(neurons=a.neurons, top_k=a.top_k, experts=a.experts,
                                        n_probe=a.n_probe, seed=a.seed),
                       arrays=DiskArrays(a.store) if a.store else None)
if a.data:
    train = load_dataset("json", data_files=a.data, split="train")
else:
    train = Dataset.from_list([to_record(s) for s in load_splits(None, None, seed=a.seed).train])
train = train.map(encoder(tokenizer), remove_columns=train.column_names)
held_out = (load_samples(a.eval_data) if a.eval_data
            else load_splits(None, None, seed=a.seed).test)

# meft train's settings; no warmup: transformers' warmup starts at lr 0 (a first step that
# learns nothing), meft's at a fraction of the peak (its 0.02 of 90 steps is 2 steps)
args = TrainingArguments(output_dir=a.output, max_steps=a.max_steps, learning_rate=3e-3,
                         per_device_train_batch_size=12, warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, logging_steps=10, save_strategy="no", report_to=[],
                         seed=a.seed)
trainer = MeftTrainer(model=model, args=args, train_dataset=train,
                      data_collator=MeftCollator(tokenizer.pad_token_id))
trainer.train()
trainer.save_model(f"{a.output}/adapter")  # with --store: the routers, naming the store
scores = evaluate(model, tokenizer, held_out, max_new_tokens=16, batch_size=32, progress=False)
print(json.dumps({k: scores[k] for k in ("exact_match", "f1", "contains", "n")}))
