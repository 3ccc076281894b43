"""MeftTrainer fed meft train's exact data order and schedule (the default job, seed 0).

    python benchmarks/hf_trainer_same_order.py OUTPUT_DIR

With the same batches in the same order and meft's warmup + linear decay, transformers.Trainer
driving meft (meft.training.integrations.MeftTrainer) should learn what `meft train` learns: prints
the held-out exact match (compare with `meft train`'s default job, seed 0) as JSON.
"""
import json
import sys

import torch
from torch.utils.data import SequentialSampler
from transformers import TrainingArguments

from meft import MeftConfig, get_meft_model
from meft.adapter.loading import load_model_and_tokenizer
from meft.data.datasets import load_splits
from meft.data.records import encode_all, iterate_batches
from meft.evaluation.evaluate import evaluate
from meft.training.integrations import MeftCollator, MeftOptimizer, MeftTrainer
from meft.training.trainer import lr_multiplier

torch.manual_seed(0)
base, tok, _ = load_model_and_tokenizer(None)
model = get_meft_model(base, MeftConfig(seed=0))
splits = load_splits(None, None, seed=0)
enc = encode_all(splits.train, tok, 256, "training")
order = [i for e in range(3) for batch in iterate_batches(enc, 12, seed=0, epoch=e)
         for i in batch]
rows = [{"input_ids": enc[i].input_ids, "labels": enc[i].labels} for i in order]

class Ordered(MeftTrainer):
    def _get_train_sampler(self, *a, **k):
        return SequentialSampler(self.train_dataset)

opt = MeftOptimizer(model, lr=3e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, 90, 2))
args = TrainingArguments(output_dir=sys.argv[1], max_steps=90, learning_rate=3e-3,
                         per_device_train_batch_size=12, weight_decay=0.0, max_grad_norm=1.0,
                         logging_steps=10, save_strategy="no", report_to=[], seed=0)
trainer = Ordered(model=model, args=args, train_dataset=rows,
                  data_collator=MeftCollator(tok.pad_token_id), optimizers=(opt, sched))
trainer.train()
scores = evaluate(model, tok, splits.test, max_new_tokens=16, batch_size=32, progress=False)
losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
print(json.dumps({"exact_match": scores["exact_match"], "n": scores["n"],
                  "logged_losses": losses}))
