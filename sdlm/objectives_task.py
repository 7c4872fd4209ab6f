"""Task term: one prompt that makes the model map each example input to its output.

Shapes: `S` Gumbel samples, `B` examples in a minibatch, `T` padded sequence, `O` output tokens,
`V` vocabulary, `D` embedding width.

Each example is laid out by a template such as "{prompt}\\nInput: {input}\\nOutput:", followed
by output_prefix and the expected output. The loss scores the output tokens teacher-forced
for a minibatch of training examples. The check runs greedy generation on every training
example and compares the text (surrounding whitespace ignored) with the expected output.
"""

from __future__ import annotations

import csv
import json
import random
import string as string_module
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlm.config import ConfigError, TaskConfig
from sdlm.objectives import CheckResult, LossOutput, TokenLoss, token_losses
from sdlm.stgs_diff_model import STGSDiffModel

# Greedy checks run this many examples as one left-padded batch.
CHECK_BATCH = 16


@dataclass
class Example:
    input: str
    output: str


def load_examples(path: str | Path) -> list[Example]:
    """Read examples with the fields input and output from a .jsonl or .csv file.

    Raises ConfigError naming task.path, the file and the line of a bad row.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ConfigError(f"task.path: expected a .jsonl or .csv file, got {str(path)!r}", key="task.path", value=str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"task.path: file not found: {str(path)!r} (check the path, relative to the config file)", key="task.path", value=str(path)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"task.path: cannot read {str(path)!r}: {error}", key="task.path", value=str(path)) from None

    def bad_row(line: int, problem: str) -> ConfigError:
        return ConfigError(f"task.path: {problem}", key="task.path", source=str(path), line=line, value=str(path))

    rows: list[tuple[int, object]] = []
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise bad_row(number, f"invalid JSON: {error.msg}") from None
    else:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or not {"input", "output"} <= set(reader.fieldnames):
            raise bad_row(1, f"expected a CSV header with the columns input and output, got {reader.fieldnames}")
        for row in reader:
            rows.append((reader.line_num, row))

    examples = []
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("output"), str):
            raise bad_row(number, "expected a row with the text fields input and output")
        if not row["output"].strip():
            raise bad_row(number, "the output is empty")
        examples.append(Example(row["input"], row["output"]))
    if not examples:
        raise ConfigError(f"task.path: no examples in {str(path)!r}", key="task.path", value=str(path))
    return examples


def split_examples(examples: list[Example], heldout: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle with `seed` and hold out round(heldout * n) examples, keeping at least one for training."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    heldout_count = min(round(heldout * len(order)), len(order) - 1)
    return order[heldout_count:], order[:heldout_count]


def split_template(template: str, input_text: str) -> tuple[str, str]:
    """Split a template at {prompt} into the text before and after, with {input} filled in.

    Doubled braces become single ones. Raises ValueError for a missing {prompt} or an unknown field.
    """
    before, after, seen_prompt = [], [], False
    for literal, name, _, _ in string_module.Formatter().parse(template):
        (after if seen_prompt else before).append(literal)
        if name == "prompt":
            seen_prompt = True
        elif name == "input":
            (after if seen_prompt else before).append(input_text)
        elif name is not None:
            raise ValueError(f"template field {{{name}}} is unknown; use {{prompt}} and {{input}}")
    if not seen_prompt:
        raise ValueError("the template has no {prompt}")
    return "".join(before), "".join(after)


@dataclass
class EncodedExample:
    before_ids: torch.Tensor  # (1, A)
    after_ids: torch.Tensor  # (1, C)
    output_ids: torch.Tensor  # (1, O)
    expected: str


class TaskTerm:
    """Make the model answer each example's input with its output, through one shared prompt.

    The loss averages the token loss over a minibatch of `batch_size` training examples, drawn
    in a seeded order. The check passes when exact-match accuracy on all training examples is
    at least min_accuracy. `report` scores the training and held-out examples.
    """

    name = "task"
    primary = True

    def __init__(
        self,
        model: STGSDiffModel,
        train: list[Example],
        heldout: list[Example] = (),
        *,
        template: str = "{prompt}\nInput: {input}\nOutput:",
        output_prefix: str = " ",
        batch_size: int = 4,
        loss: TokenLoss = "cross_entropy",
        margin: float = 1.0,
        min_accuracy: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not train:
            raise ValueError("the task needs at least one training example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.template, self.output_prefix = template, output_prefix
        self.train, self.heldout = list(train), list(heldout)
        self.batch_size = min(batch_size, len(self.train))
        self.loss_type, self.margin = loss, float(margin)
        self.min_accuracy = min_accuracy
        self._encoded_train = [self._encode(e) for e in self.train]
        self._encoded_heldout = [self._encode(e) for e in self.heldout]
        self._rng = random.Random(seed)
        self._queue: list[int] = []

    @classmethod
    def from_config(cls, model: STGSDiffModel, config: TaskConfig, *, seed: int, margin: float = 1.0) -> "TaskTerm":
        """Build from the task section: inline examples, then those of task.path, split with `seed`."""
        examples = [Example(e["input"], e["output"]) for e in config.examples]
        if config.path is not None:
            examples += load_examples(config.path)
        train, heldout = split_examples(examples, config.heldout, seed)
        return cls(
            model, train, heldout, template=config.template, output_prefix=config.output_prefix,
            batch_size=config.batch_size, loss=config.loss, margin=margin, min_accuracy=config.min_accuracy, seed=seed,
        )

    def _encode(self, example: Example) -> EncodedExample:
        before, after = split_template(self.template, example.input)
        output_ids = self.model.encode(self.output_prefix + example.output)
        if output_ids.shape[1] == 0:
            raise ValueError(f"the output of example {example!r} encodes to no tokens")
        return EncodedExample(self.model.encode(before), self.model.encode(after), output_ids, example.output.strip())

    def _next_batch(self) -> list[EncodedExample]:
        """Take the next batch_size training examples from a seeded pass, reshuffled each pass."""
        batch = []
        while len(batch) < self.batch_size:
            if not self._queue:
                self._queue = list(range(len(self.train)))
                self._rng.shuffle(self._queue)
            batch.append(self._encoded_train[self._queue.pop()])
        return batch

    def loss(self, prompt_y: torch.Tensor) -> LossOutput:
        S = prompt_y.shape[0]
        batch = self._next_batch()
        B = len(batch)

        # Embed each example around the prompt samples: B tensors of (S, T_i, D).
        embeds = [self.model.assemble([e.before_ids, prompt_y, e.after_ids, e.output_ids])[0] for e in batch]
        T = max(x.shape[1] for x in embeds)
        D = embeds[0].shape[-1]

        # Left-pad to T so every output ends at the last position; padding is masked out.
        padded = embeds[0].new_zeros(B, S, T, D)
        mask = torch.zeros(B, S, T, dtype=torch.long, device=self.model.device)
        for i, x in enumerate(embeds):
            padded[i, :, T - x.shape[1]:] = x
            mask[i, :, T - x.shape[1]:] = 1
        O = max(e.output_ids.shape[1] for e in batch)
        out = self.model(inputs_embeds=padded.view(B * S, T, D), attention_mask=mask.view(B * S, T), logits_to_keep=O + 1)
        logits = out.logits.view(B, S, O + 1, -1)  # the last O + 1 positions

        # Output token j of example i is predicted at kept position O - O_i + j.
        losses, hits = [], []
        for i, e in enumerate(batch):
            n = e.output_ids.shape[1]
            example_logits = logits[i, :, O - n:O]  # (S, n, V)
            targets = e.output_ids.expand(S, -1)  # (S, n)
            losses.append(token_losses(example_logits, targets, self.loss_type, self.margin).mean(-1))
            hits.append((example_logits.detach().argmax(-1) == targets).all(-1))
        # A minibatch that misses training examples cannot predict the check, so only a batch
        # that covers them all marks samples as worth a greedy check.
        solved = torch.stack(hits).all(0) if B == len(self.train) else None  # (S,)
        return LossOutput(per_sample=torch.stack(losses).mean(0), solved=solved, accuracy=torch.stack(hits).float().mean(0))

    # -- checks ----------------------------------------------------------------------------

    @torch.no_grad()
    def outputs(self, prompt_ids: list[int], examples: list[EncodedExample]) -> list[str]:
        """The greedy output text of each example with this prompt, as many tokens as its output."""
        inputs = [e.before_ids[0].tolist() + list(prompt_ids) + e.after_ids[0].tolist() for e in examples]
        lengths = [e.output_ids.shape[1] for e in examples]
        texts = []
        for start in range(0, len(inputs), CHECK_BATCH):
            chunk = inputs[start:start + CHECK_BATCH]
            generated = greedy_generate_batch(self.model, chunk, max(lengths[start:start + CHECK_BATCH]))
            for ids, n in zip(generated, lengths[start:start + CHECK_BATCH]):
                texts.append(self.model.tokenizer.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False))
        return texts

    def accuracy(self, prompt_ids: list[int], examples: list[EncodedExample]) -> float | None:
        """Exact-match accuracy over examples (whitespace around the output ignored), None if none."""
        if not examples:
            return None
        texts = self.outputs(prompt_ids, examples)
        return sum(text.strip() == e.expected for text, e in zip(texts, examples)) / len(examples)

    def check(self, prompt_ids: list[int]) -> CheckResult:
        tokenizer = self.model.tokenizer
        texts = self.outputs(prompt_ids, self._encoded_train)
        accuracy = sum(t.strip() == e.expected for t, e in zip(texts, self._encoded_train)) / len(texts)
        prompt_text = tokenizer.decode(list(prompt_ids), clean_up_tokenization_spaces=False)
        text_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        text_ids_same = text_ids == list(prompt_ids)
        text_accuracy = accuracy if text_ids_same else self.accuracy(text_ids, self._encoded_train)
        return CheckResult(
            success=accuracy >= self.min_accuracy, prompt_ids=list(prompt_ids), prompt_text=prompt_text,
            output_ids=tokenizer.encode(texts[0], add_special_tokens=False), output_text=texts[0],
            token_accuracy=accuracy, lcs_ratio=accuracy, text_ids_same=text_ids_same,
            text_success=text_accuracy >= self.min_accuracy,
            metrics={"train_accuracy": accuracy},
        )

    def report(self, initial_ids: list[int], final_ids: list[int]) -> dict:
        """Exact-match accuracy on the training and held-out examples with the initial and final prompts."""
        return {
            "train_examples": len(self.train),
            "heldout_examples": len(self.heldout),
            "train_accuracy_before": self.accuracy(initial_ids, self._encoded_train),
            "train_accuracy_after": self.accuracy(final_ids, self._encoded_train),
            "heldout_accuracy_before": self.accuracy(initial_ids, self._encoded_heldout),
            "heldout_accuracy_after": self.accuracy(final_ids, self._encoded_heldout),
        }


def greedy_generate_batch(model: STGSDiffModel, id_lists: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Plain greedy HF generation for several inputs at once, left-padded; the new tokens of each."""
    width = max(len(ids) for ids in id_lists)
    pad = model.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in id_lists], dtype=torch.long, device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in id_lists], dtype=torch.long, device=model.device)
    output = model.model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=pad,
    )
    return output[:, width:].tolist()
