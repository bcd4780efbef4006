"""Evaluation of generation tasks: greedy generations scored by BLEU-4 / ROUGE, and the
teacher-forced dev loss (the low-noise metric)."""

from __future__ import annotations

import torch
from transformers import Trainer

from senslora.finetune.encoding import pad_left, prompt_ids
from senslora.finetune.evaluation import generation_metrics, teacher_forced_loss


class GenerationTrainer(Trainer):
    """Evaluates by greedy generation on the dev set (BLEU-4, ROUGE-1, ROUGE-L) and by the
    teacher-forced loss / perplexity of the dev responses (the low-noise metric)."""

    def __init__(self, *args, dev_examples=(), max_new_tokens=48, gen_tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dev_examples = list(dev_examples)
        self.max_new_tokens = max_new_tokens
        self.gen_tokenizer = gen_tokenizer

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        hypotheses = generate(
            self.model,
            self.gen_tokenizer,
            [e.prompt for e in self.dev_examples],
            self.max_new_tokens,
            self.args.per_device_eval_batch_size,
        )
        scores = generation_metrics(hypotheses, [e.response for e in self.dev_examples])
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        forced = teacher_forced_loss(self.model, self.get_eval_dataloader(dataset))
        scores.update({"nll": forced["loss"], "perplexity": forced["perplexity"]})
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
        self.log(metrics)
        return metrics


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int):
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without the prompt."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = pad_left(
            [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]], pad_id
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return outputs
