"""Downstream tasks for fine-tuning, derived from the synthetic languages a model was pretrained on.

ST-MoE section 4 fine-tunes on SuperGLUE tasks of very different sizes (CB: 250 training examples,
ReCoRD: 138k) and finds that sparse models overfit sooner on the small ones. The lab's tasks mirror that:
each family comes in a small version (250 training examples) and a large one (65,536), with held-out
validation (1,024) and test (1,024) splits, all drawn from the pretraining data's own languages, so the
pretrained model has something to transfer.

Families (the text-to-text format of T5: inputs -> targets, both ending in EOS):
  langid   inputs: a run of LANGID_LENGTH tokens of one language of the pretraining mixture;
           target: [label, EOS], label = the language's index as an ordinary token id (NUM_SPECIAL + l).
           The run is short on purpose: the languages' transition tables are sparse, so one transition
           nearly always names the language (at 3 tokens the Bayes loss is already below 0.01 nats), and
           a 2-token run leaves a real, exactly computed uncertainty (`best_loss`: -log posterior(l | run)
           averaged over the test split; 0.10 nats per target token on tiny's default data, against
           ln(8) / 2 = 1.04 for the label prior). Solving it means knowing every language's table.
  langid16 the same with runs of LANGID16_LENGTH tokens: the language is all but certain from the run
           (Bayes loss ~0), so a model that carries the latent language from pretraining can be taught
           the label from few examples; langid's 2-token runs need every language's transition table,
           which 250 examples cannot teach (finetune_trainable: nothing learned beyond the label prior).
  reverse  inputs: a run of the pretraining data (any language) of REVERSE_INPUT tokens;
           target: its first REVERSE_LENGTH tokens in reverse order, then EOS. A deterministic function of
           the inputs (Bayes loss 0) that the model must learn as an algorithm: small data invites
           memorising the 250 examples instead.

Every split is a pure function of (data.seed, task name): the same examples for every run and seed;
`batch(step, batch_size, seed)` walks a seed's own shuffled epochs over the training split.
"""

from __future__ import annotations

import numpy as np

from precision_lab.data import EOS_ID, NUM_SPECIAL, Dataset, DataConfig, MarkovLanguage, make_dataset, to_features
from precision_lab.errors import UserError, unknown_choice

SIZES: dict[str, int] = {"small": 250, "large": 65_536}
VALIDATION_EXAMPLES = 1_024
TEST_EXAMPLES = 1_024
LANGID_LENGTH = 2
LANGID16_LENGTH = 16
REVERSE_INPUT = 24
REVERSE_LENGTH = 8
FAMILIES: tuple[str, ...] = ("langid", "reverse", "langid16")
# the run length of each language-identification family (the families whose target is a language label)
LANGID_LENGTHS: dict[str, int] = {"langid": LANGID_LENGTH, "langid16": LANGID16_LENGTH}
TASKS: tuple[str, ...] = tuple(f"{family}-{size}" for family in FAMILIES for size in SIZES)

# stream tags of numpy's SeedSequence: independent of the pretraining data's train/eval streams
_TASK_STREAM = 0x7A5C
_SPLITS = {"train": 0, "validation": 1, "test": 2}


def check_task(name: str) -> None:
    if name not in TASKS:
        raise unknown_choice("finetune.task", name, TASKS)


def pretraining_languages(data: DataConfig) -> tuple[list[MarkovLanguage], np.ndarray]:
    """The Markov languages (and their mixture weights) of a synthetic pretraining data config."""
    source = make_dataset(data)
    mixture = getattr(source, "mixture", None)
    if mixture is not None:
        return list(mixture.languages), np.asarray(mixture.weights, np.float64)
    language = getattr(source, "language", None)
    if language is None:
        raise UserError(f"fine-tuning tasks are built from synthetic languages; data.kind={data.kind!r} has none")
    return [language], np.ones(1)


class TaskDataset(Dataset):
    """A fixed, finite text-to-text task with train / validation / test splits (the `Dataset` interface:
    `batch` trains, `eval_batches` validates, `test_batches` tests)."""

    def __init__(self, name: str, data: DataConfig, *, inputs_length: int, targets_length: int,
                 vocab_size: int):
        check_task(name)
        self.name = name
        self.family, size = name.split("-")
        self.config = data
        self.vocab_size = vocab_size
        self.inputs_length, self.targets_length = inputs_length, targets_length
        self.languages, self.weights = pretraining_languages(data)
        if self.family in LANGID_LENGTHS:
            if len(self.languages) < 2:
                raise UserError(f"task {name!r} needs pretraining data with several languages "
                                f"(data.kind='mixture'); this run's data has {len(self.languages)}")
            if NUM_SPECIAL + len(self.languages) > vocab_size:
                raise UserError(f"task {name!r}: {len(self.languages)} language labels do not fit the vocabulary")
        need_in = LANGID_LENGTHS.get(self.family, REVERSE_INPUT) + 1
        need_out = (1 if self.family in LANGID_LENGTHS else REVERSE_LENGTH) + 1
        if need_in > inputs_length or need_out > targets_length:
            raise UserError(f"task {name!r} needs inputs_length >= {need_in} and targets_length >= {need_out}; "
                            f"the model has {inputs_length} and {targets_length}")
        counts = {"train": SIZES[size], "validation": VALIDATION_EXAMPLES, "test": TEST_EXAMPLES}
        self.splits = {split: self._make_split(split, n) for split, n in counts.items()}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # -- examples ------------------------------------------------------------------------------------------

    def _make_split(self, split: str, n: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([_TASK_STREAM, self.config.seed, FAMILIES.index(self.family), _SPLITS[split]])
        which = rng.choice(len(self.languages), size=n, p=self.weights)
        length = LANGID_LENGTHS.get(self.family, REVERSE_INPUT)
        tokens = np.empty((n, length), np.int32)
        for l, lang in enumerate(self.languages):
            rows = np.flatnonzero(which == l)
            if rows.size:
                tokens[rows] = lang.sample(rng, rows.size, length)
        if self.family in LANGID_LENGTHS:
            targets = (NUM_SPECIAL + which)[:, None].astype(np.int32)
        else:
            targets = tokens[:, :REVERSE_LENGTH][:, ::-1]
        eos = np.full((n, 1), EOS_ID, np.int32)
        features = to_features(np.concatenate([tokens, eos], 1), np.concatenate([targets, eos], 1),
                               inputs_length=self.inputs_length, targets_length=self.targets_length)
        # no sentinels in a downstream task: the specialisation telemetry sees none
        for name in ("inputs", "decoder_inputs"):
            features[f"{name}_sentinel"] = np.zeros(features[name].shape, np.float32)
        features["_language"] = which
        features["_tokens"] = tokens
        return features

    @staticmethod
    def _take(split: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[rows] for k, v in split.items() if not k.startswith("_")}

    def num_examples(self, split: str) -> int:
        return len(self.splits[split]["inputs"])

    # -- the Dataset interface -----------------------------------------------------------------------------

    def batch(self, step: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Training batch `step`: consecutive slices of seed `seed`'s shuffled epochs over the train split."""
        n = self.num_examples("train")
        index = step * batch_size + np.arange(batch_size)
        epochs, pos = index // n, index % n
        rows = np.array([self._perm(seed, int(e))[p] for e, p in zip(epochs, pos)])
        return self._take(self.splits["train"], rows)

    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            rng = np.random.default_rng([_TASK_STREAM, self.config.seed, seed, epoch, 7])
            self._perms[key] = rng.permutation(self.num_examples("train"))
        return self._perms[key]

    def eval_batches(self, n: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        """The first `n` batches of the validation split (`n * batch_size` must fit in it)."""
        return self._split_batches("validation", n, batch_size)

    def test_batches(self, batch_size: int) -> list[dict[str, np.ndarray]]:
        """Every full batch of the test split."""
        return self._split_batches("test", self.num_examples("test") // batch_size, batch_size)

    def _split_batches(self, split: str, n: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        if n * batch_size > self.num_examples(split):
            raise UserError(f"task {self.name!r}: {n} batches of {batch_size} exceed its {split} split of "
                            f"{self.num_examples(split)} examples (lower train.eval_batches)")
        return [self._take(self.splits[split], np.arange(i * batch_size, (i + 1) * batch_size)) for i in range(n)]

    # -- references ------------------------------------------------------------------------------------------

    @property
    def best_loss(self) -> float:
        """Bayes-optimal loss per target token on the test split (reverse: 0, the target is a function of
        the inputs; langid: -log posterior of the true language, exact, plus 0 for the EOS)."""
        if self.family == "reverse":
            return 0.0
        split = self.splits["test"]
        x = split["_tokens"] - NUM_SPECIAL
        log_lik = []
        with np.errstate(divide="ignore"):
            for lang in self.languages:
                log_lik.append(np.log(lang.stationary[x[:, 0]])
                               + np.log(lang.transition[x[:, :-1], x[:, 1:]]).sum(axis=1))
        from scipy.special import logsumexp

        log_joint = np.log(self.weights)[:, None] + np.array(log_lik)
        nll = logsumexp(log_joint, axis=0) - log_joint[split["_language"], np.arange(len(x))]
        return float(nll.mean()) / 2.0  # two target tokens: the label and a certain EOS

    @property
    def chance_loss(self) -> float:
        """The loss of predicting from the label (or token) prior alone: the 'learned nothing' reference."""
        if self.family in LANGID_LENGTHS:
            w = self.weights[self.weights > 0]
            return float(-(w * np.log(w)).sum()) / 2.0
        marginal = sum(w * lang.stationary for w, lang in zip(self.weights, self.languages))
        h = float(-(marginal[marginal > 0] * np.log(marginal[marginal > 0])).sum())
        return h * REVERSE_LENGTH / (REVERSE_LENGTH + 1)


def make_task(name: str, data: DataConfig, *, inputs_length: int, targets_length: int, vocab_size: int) -> TaskDataset:
    return TaskDataset(name, data, inputs_length=inputs_length, targets_length=targets_length, vocab_size=vocab_size)


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in task, for `--help` and errors."""
    text = {"langid": f"which language of the mixture produced a {LANGID_LENGTH}-token run",
            "langid16": f"which language of the mixture produced a {LANGID16_LENGTH}-token run",
            "reverse": f"the first {REVERSE_LENGTH} of {REVERSE_INPUT} tokens in reverse order"}
    return [(f"{f}-{s}", f"{text[f]} ({SIZES[s]:,} training examples)") for f in FAMILIES for s in SIZES]


__all__ = ["TASKS", "SIZES", "TaskDataset", "make_task", "check_task", "describe", "pretraining_languages"]
