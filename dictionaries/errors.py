"""Every error the package raises: one root, and each subclass also inherits the builtin it resembles.

Errors carry structured attributes (what was expected, what was found, what to do) so that callers can
act on them and the CLI can turn each into one readable line (see `cli.py`'s table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class DictionariesError(Exception):
    """Root of every error raised by `dictionaries` and `training`."""


class UnknownNameError(DictionariesError, KeyError):
    """A registry name (or alias) that is not in the registry."""

    def __init__(self, name: str, suggestions: Sequence[str] = (), problem: str | None = None):
        self.name = name
        self.suggestions = list(suggestions)
        self.problem = problem
        if problem:  # a reference that resolves, but not to exactly one dictionary
            listed = f" ({', '.join(self.suggestions)})" if self.suggestions else ""
            super().__init__(f"{name!r} {problem}{listed}")
            return
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(f"no dictionary named {name!r} in the registry.{hint} (`dictctl list` shows all names)")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class CardError(DictionariesError, ValueError):
    """A card or registry file that does not validate."""

    def __init__(self, path: str, field: str, problem: str):
        self.path = path
        self.field = field
        self.problem = problem
        super().__init__(f"{path}: field {field!r}: {problem}")


class RegistryError(DictionariesError, ValueError):
    """The registry as a whole is inconsistent (duplicate names, a card that is missing)."""


class ShapeMismatchError(DictionariesError, ValueError):
    """A tensor whose shape is not the one expected."""

    def __init__(self, what: str, expected: object, found: object, hint: str = ""):
        self.what = what
        self.expected = expected
        self.found = found
        super().__init__(f"{what}: expected shape {expected}, found {found}.{' ' + hint if hint else ''}")


class FormatError(DictionariesError, ValueError):
    """A folder or file that is not in the format it claims to be (missing keys, unknown class)."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class NonFiniteWeightsError(FormatError, FloatingPointError):
    """Weights holding NaN or infinite values, refused when a folder is read, written or published."""

    def __init__(self, path: str, tensors: dict[str, int]):
        self.tensors = dict(tensors)  # tensor name -> how many of its values are not finite
        listing = ", ".join(f"{name!r} ({n} values)" for name, n in self.tensors.items())
        super().__init__(path, f"NaN or infinite weights in {listing}; such a dictionary computes NaN features. "
                               "Train it again, or convert it again from its original files")


class InvalidArgumentError(DictionariesError, ValueError):
    """An argument outside what it may be: a count below 1, a device this machine lacks, a file for a folder."""

    def __init__(self, argument: str, value: object, expected: str):
        self.argument, self.value, self.expected = argument, value, expected
        super().__init__(f"{argument} {value!r} is not valid: {expected}.")


class MissingFileError(DictionariesError, FileNotFoundError):
    """A file a dictionary needs is absent (locally or in the Hub repo)."""

    def __init__(self, path: str, hint: str = ""):
        self.path = path
        super().__init__(f"missing file {path}.{' ' + hint if hint else ''}")

    def __str__(self) -> str:
        return self.args[0]


class HashMismatchError(DictionariesError, ValueError):
    """A downloaded file whose sha256 differs from the card's, even after fetching it again."""

    def __init__(self, path: str, expected: str, found: str):
        self.path = path
        self.expected = expected
        self.found = found
        super().__init__(
            f"{path}: sha256 is {found}, the card expects {expected} (fetched twice). "
            "The file on the server differs from the pinned one: report it, or pin the new hash deliberately."
        )


class HubUnreachableError(DictionariesError, ConnectionError):
    """The Hub cannot be reached and the files are not in the cache."""

    def __init__(self, what: str, endpoint: str, offline: bool, reason: str = ""):
        self.what = what
        self.endpoint = endpoint
        self.offline = offline
        self.reason = reason or "could not be reached"  # e.g. "answered HTTP 503", "did not answer within 10 s"
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub at {endpoint} {self.reason}"
        super().__init__(
            f"cannot fetch {what}: {why} and it is not in the local cache. "
            "Connect to the network (unset HF_HUB_OFFLINE), point HF_ENDPOINT at a reachable mirror, "
            "or `dictctl download` it on a machine that has network first."
        )


class DtypeDeviceError(DictionariesError, TypeError):
    """An input whose dtype or device does not match the dictionary's."""

    def __init__(self, expected: str, found: str):
        self.expected = expected
        self.found = found
        super().__init__(
            f"input is {found} but the dictionary is {expected}; move one of them "
            "(`dictionary.to(x.device, x.dtype)` or `x.to(...)`)."
        )


class LocalHubError(DictionariesError, RuntimeError):
    """The local Hub server (olah) could not start, or a git operation on its repos failed."""


class UnverifiedFilesWarning(UserWarning):
    """Files loaded without a recorded sha256: the warning prints each hash and size to record in the card."""

    def __init__(self, what: str, files: dict[str, tuple[str, int]]):
        self.what = what
        self.files = dict(files)  # path -> (sha256, size)
        listing = "; ".join(f"{p}: sha256 {h}, size {s}" for p, (h, s) in self.files.items())
        super().__init__(f"{what}: loaded files with no recorded sha256 (not verified). "
                         f"Record these in the card's files.items to verify future downloads: {listing}")


class HubPathError(DictionariesError, ValueError):
    """A malformed `hf://org/repo[/subfolder][@revision]` path."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path!r} is not a valid Hub path: {problem}. "
                         "Write hf://org/repo/sub/folder@revision (revision optional, default main).")


class UnknownPresetError(DictionariesError, KeyError):
    """A recipe preset name that does not exist."""

    def __init__(self, name: str, known: Sequence[str]):
        import difflib

        self.name = name
        self.known = list(known)
        self.suggestions = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(f"no recipe preset named {name!r}.{hint} Known presets: {', '.join(self.known)}")

    def __str__(self) -> str:
        return self.args[0]


class RecipeError(DictionariesError, ValueError):
    """A training recipe with an unknown field, a bad value, or fields that contradict each other."""

    def __init__(self, fields: Sequence[str], problem: str):
        self.fields = list(fields)
        self.problem = problem
        super().__init__(f"recipe field{'s' if len(self.fields) > 1 else ''} "
                         f"{', '.join(repr(f) for f in self.fields)}: {problem}")


class RepoNameError(DictionariesError, ValueError):
    """A Hub repo id (or subfolder / branch) that the Hub would not accept."""

    def __init__(self, repo: str, problem: str):
        self.repo = repo
        self.problem = problem
        super().__init__(f"{repo!r} is not a valid Hub repo: {problem}. Write ORG/NAME with letters, digits, "
                         "'-', '_' and '.' (at most 96 characters each, no '--' or '..').")


class CardFilesMismatchError(DictionariesError, ValueError):
    """A folder whose card.json does not describe its files (hash, size, tensor names or shapes)."""

    def __init__(self, path: str, what: str, expected: object, found: object):
        self.path = path
        self.what = what
        self.expected = expected
        self.found = found
        super().__init__(f"{path}: {what} is {found} but card.json says {expected}. The card does not match the "
                         "files: rewrite the folder with formats.write_native (or `dictctl convert`) and retry.")


class TargetOccupiedError(DictionariesError, FileExistsError):
    """The Hub repo folder already holds a different dictionary."""

    def __init__(self, target: str, existing: str, existing_sha256: str | None, new_sha256: str | None):
        self.target = target
        self.existing = existing
        self.existing_sha256 = existing_sha256
        self.new_sha256 = new_sha256
        super().__init__(f"{target} already holds a different dictionary ({existing!r}, weights sha256 "
                         f"{existing_sha256}; yours is {new_sha256}). Publish to another --subfolder or repo, "
                         "or pass --force to replace it.")

    def __str__(self) -> str:
        return self.args[0]


class HubAuthError(DictionariesError, PermissionError):
    """No Hub token, or a token the Hub refused; nothing was uploaded."""

    def __init__(self, repo: str, endpoint: str, problem: str):
        self.repo = repo
        self.endpoint = endpoint
        self.problem = problem
        super().__init__(f"cannot publish to {repo} on {endpoint}: {problem}. Nothing was uploaded. Set HF_TOKEN "
                         "to a token with write access (or run `hf auth login`), then retry.")

    def __str__(self) -> str:
        return self.args[0]


class PublishError(DictionariesError, RuntimeError):
    """The upload failed part-way; the commit was not made and nothing was registered."""

    def __init__(self, target: str, problem: str):
        self.target = target
        self.problem = problem
        super().__init__(f"publishing to {target} failed: {problem}. No commit was made and nothing was "
                         "registered; retry when the problem is fixed.")


class DatasetColumnError(DictionariesError, KeyError):
    """A dataset column named by the recipe that the dataset does not have."""

    def __init__(self, dataset: str, column: str, columns: Sequence[str]):
        self.dataset = dataset
        self.column = column
        self.columns = list(columns)
        super().__init__(f"dataset {dataset!r} has no column {column!r}; its columns are "
                         f"{', '.join(repr(c) for c in self.columns) or '(none)'}. Set the recipe's dataset.column "
                         "to the one holding the text.")

    def __str__(self) -> str:
        return self.args[0]


class RecipeMismatchError(DictionariesError, ValueError):
    """A resume whose checkpoint was written by a run of a different recipe."""

    def __init__(self, checkpoint: str, differences: Sequence[tuple[str, object, object]]):
        self.checkpoint = checkpoint
        self.differences = list(differences)  # (dotted field, value in checkpoint, value now)
        listing = "; ".join(f"{f}: checkpoint {a!r}, now {b!r}" for f, a, b in self.differences[:8])
        more = f" (and {len(self.differences) - 8} more)" if len(self.differences) > 8 else ""
        super().__init__(f"cannot resume from {checkpoint}: it was written by a different recipe ({listing}{more}). "
                         "Resume with the same recipe (optimizer.lr, grad_clip, decay_fraction and a longer "
                         "`tokens` may change), or train into a fresh --out folder.")


class SharedHarvestError(DictionariesError, ValueError):
    """Recipes trained from one harvest that disagree on a field the harvest must share (model, data, context)."""

    def __init__(self, field: str, values: Sequence[object]):
        self.field = field
        self.values = list(values)
        super().__init__(f"dictionaries trained from one pass must agree on {field!r}, found {self.values}. "
                         "Train them in separate runs, or override the field so they agree.")


class OutOfDataError(DictionariesError, EOFError):
    """The dataset ran out before the recipe's token budget was reached."""

    def __init__(self, dataset: str, tokens_done: int, tokens_wanted: int, checkpoint: str | None):
        self.dataset = dataset
        self.tokens_done = tokens_done
        self.tokens_wanted = tokens_wanted
        self.checkpoint = checkpoint
        kept = f" The checkpoint at {checkpoint} is kept." if checkpoint else ""
        super().__init__(f"dataset {dataset!r} ran out after {tokens_done:,} of {tokens_wanted:,} training tokens."
                         f"{kept} Lower --tokens, or point --dataset at more text.")


class NonFiniteLossError(DictionariesError, FloatingPointError):
    """A training step produced a NaN or infinite loss, or left NaN or infinite weights after its update."""

    def __init__(self, name: str, step: int, metrics: dict, checkpoint: str | None):
        self.name = name
        self.step = step
        self.metrics = dict(metrics)
        self.checkpoint = checkpoint
        loss, norm = self.metrics.get("loss"), self.metrics.get("weight_norm")
        bad_loss = not isinstance(loss, float) or not math.isfinite(loss)
        self.what = "weights" if isinstance(norm, float) and not math.isfinite(norm) and not bad_loss else "loss"
        found = (f"loss is {loss} at step {step}" if self.what == "loss" else
                 f"weights are not finite after step {step} (norm {self.metrics.get('weight_norm')})")
        kept = (f"the last good checkpoint ({checkpoint}) is kept; resume from it (--resume) with a lower "
                "optimizer.lr or an optimizer.grad_clip (--recipe)" if checkpoint else
                "no checkpoint was written yet; lower the learning rate or set grad_clip")
        super().__init__(f"dictionary {name!r}: {found}; stopped before writing any output, {kept}.")


class EvalInputError(DictionariesError, ValueError):
    """An evaluation asked for something it cannot measure (no data, no hook point, dictionaries of two models)."""

    def __init__(self, what: str, problem: str, hint: str = ""):
        self.what = what
        self.problem = problem
        self.hint = hint
        super().__init__(f"cannot evaluate {what}: {problem}.{' ' + hint if hint else ''}")


class ModelLoadError(DictionariesError, OSError):
    """The model (or its tokenizer) to evaluate a dictionary on could not be loaded."""

    def __init__(self, model: str, reason: str):
        self.model = model
        self.reason = reason
        super().__init__(f"cannot load model {model!r}: {reason}. Pass --model with a local folder "
                         "(save_pretrained of the model and its tokenizer) or a reachable Hugging Face id.")

    def __str__(self) -> str:
        return self.args[0]


class ArchitectureMismatchError(DictionariesError, ValueError):
    """A card whose architecture, k or pre-encoder bias differs from what the dictionary's files hold."""

    def __init__(self, path: str, name: str, field: str, card_value: object, found: object):
        self.path = path
        self.name = name
        self.field = field
        self.card_value = card_value
        self.found = found
        super().__init__(f"{path}: the card of {name!r} says {field}={card_value!r} but the files hold "
                         f"{field}={found!r}. Use the card that belongs to these files, or read the folder "
                         "without a card to get one built from its own config.")


class HookPointError(DictionariesError, LookupError):
    """A hook point that names no module of the model, or a dictionary with no hook point to attach at."""

    def __init__(self, path: str, suggestions: Sequence[str] = (), problem: str = ""):
        self.path = path
        self.suggestions = list(suggestions)
        hint = f" Close module names: {', '.join(self.suggestions)}." if self.suggestions else ""
        what = problem or f"the model has no module {path!r}."
        super().__init__(f"hook point {path!r}: {what}{hint} Pass `at=\"module.path\"` (or "
                         "`module.path:input`) to choose another site.")

    def __str__(self) -> str:  # LookupError would quote the message
        return self.args[0]


class ModelMismatchError(ShapeMismatchError):
    """A dictionary made for another model, whose width does not match the hook point's."""

    def __init__(self, card_model: str, model: str, hook: str, expected: int, found: int):
        self.card_model = card_model
        self.model = model
        self.hook = hook
        self.what = f"dictionary of {card_model!r} attached to {model!r} at {hook}"
        self.expected = expected
        self.found = found
        ValueError.__init__(self, f"{self.what}: the dictionary reads width {expected} but the module gives "
                                  f"{found}. Use a dictionary made for {model!r} (`dictctl list --model ...`).")


class NotWrappedError(DictionariesError, TypeError):
    """A model passed where an nnsight-wrapped model is needed."""

    def __init__(self, found: str, needed: str = "an nnsight-wrapped model"):
        self.found = found
        self.needed = needed
        super().__init__(f"this needs {needed}, got {found}; "
                         "wrap it first with `dictionaries.attach.wrap_model(model, tokenizer)`.")


class FeatureIndexError(DictionariesError, IndexError):
    """A feature index outside 0..d_dict-1."""

    def __init__(self, index: object, d_dict: int):
        self.index = index
        self.d_dict = d_dict
        super().__init__(f"feature index {index} is out of range: this dictionary has features 0..{d_dict - 1}.")

    def __str__(self) -> str:
        return self.args[0]


class OutsideTraceError(DictionariesError, RuntimeError):
    """A Site's activation read or edited outside an nnsight trace."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"{what} reads the model's activation, which exists only while the model runs: use it "
                         "inside `with model.trace(...):` or `with model.generate(...):`.")
